"""The helper that compares two runs of one computation lets rounding through and nothing else."""

import pytest
import torch
from same_computation import assert_same_up_to_rounding


def test_one_bf16_ulp_passes_and_two_fail() -> None:
    want = torch.tensor([1.0, -3.0, 0.0], dtype=torch.bfloat16)
    one_ulp = want.view(torch.int16).add(torch.tensor([1, 1, 0], dtype=torch.int16)).view(torch.bfloat16)
    assert_same_up_to_rounding(one_ulp, want)
    two_ulps = want.view(torch.int16).add(torch.tensor([2, 0, 0], dtype=torch.int16)).view(torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_same_up_to_rounding(two_ulps, want)


def test_nan_dtype_and_one_byte_values_must_match_exactly() -> None:
    want = torch.tensor([1.0, 2.0])
    with pytest.raises(AssertionError):
        assert_same_up_to_rounding(torch.tensor([1.0, float("nan")]), want)
    with pytest.raises(AssertionError):
        assert_same_up_to_rounding(want.double(), want)
    fp8 = torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn)
    next_code = fp8.view(torch.uint8).add(1).view(torch.float8_e4m3fn)
    with pytest.raises(AssertionError):
        assert_same_up_to_rounding(next_code, fp8)
    with pytest.raises(AssertionError):
        assert_same_up_to_rounding(torch.tensor([1, 3]), torch.tensor([1, 2]))
