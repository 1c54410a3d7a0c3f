"""The op layer's boundary checks for the grouped FP8 GEMMs: every bad input is refused before any
backend runs, with an error naming the argument and saying expected versus got."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fp8_grouped_inputs import contiguous_inputs, masked_inputs

import deepport
from deepport.dispatch import Backend, OpSupport, registered
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels.fp8_grouped_gemm import OP_CONTIGUOUS, OP_MASKED, ContiguousCall, MaskedCall
from deepport.kernels.fp8_layout import get_mn_major_tma_aligned_tensor

pytestmark = pytest.mark.usefixtures("clean_env")
SPY_RUNS: list[ContiguousCall | MaskedCall] = []


def spy_run(call: ContiguousCall | MaskedCall, out: torch.Tensor) -> None:
    SPY_RUNS.append(call)


@pytest.fixture
def spy() -> Iterator[list[ContiguousCall | MaskedCall]]:
    support = [OpSupport(op=op, entry=f"{__name__}:spy_run", dtypes=frozenset({torch.float8_e4m3fn}))
               for op in (OP_CONTIGUOUS, OP_MASKED)]
    SPY_RUNS.clear()
    with registered(Backend(name="fp8spy", summary="records calls", version="0", ops=tuple(support), priority={})):
        yield SPY_RUNS
    SPY_RUNS.clear()


def _contiguous(**overrides: Any) -> None:
    q, m_indices = contiguous_inputs([100, 0, 128])
    args = dict(a=q.pair_a, b=q.pair_b, out=torch.empty(256, 160, dtype=torch.bfloat16), m_indices=m_indices)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in ("recipe",) if k in args}
    deepport.m_grouped_fp8_gemm_nt_contiguous(args["a"], args["b"], args["out"], args["m_indices"], backend="fp8spy",
                                              **kwargs)


def _masked(**overrides: Any) -> None:
    q, masked_m = masked_inputs(3, 40, [40, 0, 7])
    args = dict(a=q.pair_a, b=q.pair_b, out=torch.empty(3, 40, 160, dtype=torch.bfloat16), masked_m=masked_m,
                expected_m=16)
    args.update(overrides)
    deepport.m_grouped_fp8_gemm_nt_masked(args["a"], args["b"], args["out"], args["masked_m"], args["expected_m"],
                                          backend="fp8spy")


def _rejected(spy: list[Any], call: Any, error: type[Exception], argument: str, *fragments: str,
              **overrides: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        call(**overrides)
    assert type(info.value) is error, info.value
    assert info.value.argument == argument, info.value
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} missing from {info.value}"
    assert spy == [], "a backend ran on an input the op layer should have refused"


def test_valid_calls_reach_the_backend_once_with_host_copies_of_the_indices(spy: list[Any]) -> None:
    _contiguous()
    _masked()
    assert [type(c) for c in spy] == [ContiguousCall, MaskedCall]
    assert spy[0].m_indices_host is not None and spy[1].masked_m_host.tolist() == [40, 0, 7]


# ---- operands and scale factors --------------------------------------------------------------------

def test_a_must_be_a_pair(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([1])
    _rejected(spy, _contiguous, ArgumentTypeError, "a", "expected a pair", "got Tensor", a=q.a)


def test_a_must_be_e4m3(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128])
    _rejected(spy, _contiguous, ArgumentTypeError, "a[0]", "float8_e4m3fn", "got torch.bfloat16",
              a=(q.a.to(torch.bfloat16), q.sfa))


def test_a_must_be_k_major(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128])
    a_t = q.a.t().contiguous().t()
    _rejected(spy, _contiguous, InvalidArgumentError, "a[0]", "contiguous", a=(a_t, q.sfa))


def test_masked_a_must_have_three_dimensions(spy: list[Any]) -> None:
    q, _ = masked_inputs(3, 40, [1, 1, 1])
    _rejected(spy, _masked, InvalidArgumentError, "a[0]", "3 dimensions", a=(q.a[0], q.sfa[0]))


def test_b_k_must_match_a(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128], k=384)
    _rejected(spy, _contiguous, InvalidArgumentError, "b[0]", "K, the last dimension of `a[0]`", b=q.pair_b)


def test_masked_groups_of_a_and_b_must_agree(spy: list[Any]) -> None:
    q, _ = masked_inputs(2, 40, [1, 1])
    _rejected(spy, _masked, InvalidArgumentError, "b[0]", "expected size 3", b=q.pair_b)


def test_sfa_shape_is_checked(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128])
    _rejected(spy, _contiguous, InvalidArgumentError, "a[1]", "(256, 2)", "got (256, 1)", a=(q.a, q.sfa[:, :1]))


def test_sfb_must_be_128x128_blocks_by_default(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128], per_row_b=True)
    _rejected(spy, _contiguous, InvalidArgumentError, "b[1]", "(3, 2, 2)", "got (3, 160, 2)", b=q.pair_b)


def test_scale_formats_must_match(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128])
    packed, _ = contiguous_inputs([100, 0, 128], ue8m0=True)
    _rejected(spy, _contiguous, ArgumentTypeError, "a[1]", "float32", a=(q.a, packed.sfa))


def test_recipe_is_checked(spy: list[Any]) -> None:
    _rejected(spy, _contiguous, InvalidArgumentError, "recipe", "(1, 128, 128)", "got (1, 64, 128)",
              recipe=(1, 64, 128))


def test_mn_major_sfa_is_accepted(spy: list[Any]) -> None:
    q, _ = masked_inputs(3, 40, [40, 0, 7])
    _masked(a=(q.a, get_mn_major_tma_aligned_tensor(q.sfa)))
    assert len(spy) == 1


# ---- outputs ------------------------------------------------------------------------------------------

def test_out_must_be_bfloat16(spy: list[Any]) -> None:
    _rejected(spy, _contiguous, ArgumentTypeError, "out", "torch.bfloat16", "got torch.float32",
              out=torch.empty(256, 160))


def test_out_shape_is_checked(spy: list[Any]) -> None:
    _rejected(spy, _masked, InvalidArgumentError, "out", "(3, 40, 160)", out=torch.empty(3, 40, 128,
                                                                                            dtype=torch.bfloat16))


def test_out_must_not_overlap_an_input(spy: list[Any]) -> None:
    q, _ = contiguous_inputs([100, 0, 128])
    storage = torch.empty(256 * 160 + 4, dtype=torch.bfloat16)
    alias = storage[: 256 * 160].view(256, 160)
    fake_sfa = storage[:1024].view(torch.float32).view(256, 2)  # SFA inside out's bytes
    fake_sfa.copy_(q.sfa.nan_to_num(1.0))
    _rejected(spy, _contiguous, InvalidArgumentError, "out", "disjoint from `a[1]`", a=(q.a, fake_sfa), out=alias)


# ---- m_indices -----------------------------------------------------------------------------------------

def test_m_indices_must_be_int32(spy: list[Any]) -> None:
    _, m_indices = contiguous_inputs([100, 0, 128])
    _rejected(spy, _contiguous, ArgumentTypeError, "m_indices", "torch.int32", "got torch.int64",
              m_indices=m_indices.long())


def test_m_indices_needs_one_id_per_row(spy: list[Any]) -> None:
    _, m_indices = contiguous_inputs([100, 0, 128])
    _rejected(spy, _contiguous, InvalidArgumentError, "m_indices", "(256,)", m_indices=m_indices[:128])


@pytest.mark.parametrize("bad", [3, -2, 2**31 - 1])
def test_group_ids_out_of_range_are_named(spy: list[Any], bad: int) -> None:
    _, m_indices = contiguous_inputs([100, 0, 128])
    m_indices[200] = bad
    _rejected(spy, _contiguous, InvalidArgumentError, "m_indices", "[-1, 3)", f"m_indices[200] = {bad}",
              m_indices=m_indices)


def test_a_segment_must_start_at_a_multiple_of_128(spy: list[Any]) -> None:
    _, m_indices = contiguous_inputs([100, 0, 128])
    m_indices[100:120] = 2  # group 2 starts inside group 0's padding
    _rejected(spy, _contiguous, InvalidArgumentError, "m_indices", "multiple of 128",
              "m_indices[99] = 0, m_indices[100] = 2", m_indices=m_indices)


def test_padding_inside_a_block_may_not_be_followed_by_rows(spy: list[Any]) -> None:
    _, m_indices = contiguous_inputs([100, 0, 128])
    m_indices[110] = 0
    _rejected(spy, _contiguous, InvalidArgumentError, "m_indices", "m_indices[109] = -1, m_indices[110] = 0",
              m_indices=m_indices)


def test_value_checks_can_be_switched_off(spy: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    _, m_indices = contiguous_inputs([100, 0, 128])
    m_indices[200] = 7
    _contiguous(m_indices=m_indices)
    _masked(masked_m=torch.tensor([41, 0, 0], dtype=torch.int32))
    assert len(spy) == 2 and spy[0].m_indices_host is None and spy[1].masked_m_host is None


# ---- masked_m and expected_m ------------------------------------------------------------------------

def test_masked_m_must_be_int32_per_group(spy: list[Any]) -> None:
    _rejected(spy, _masked, ArgumentTypeError, "masked_m", "torch.int32", masked_m=torch.tensor([1, 1, 1]))
    _rejected(spy, _masked, InvalidArgumentError, "masked_m", "(3,)", masked_m=torch.ones(2, dtype=torch.int32))


@pytest.mark.parametrize("bad", [41, -1])
def test_masked_m_beyond_m_max_is_named(spy: list[Any], bad: int) -> None:
    _rejected(spy, _masked, InvalidArgumentError, "masked_m", "M_max = 40", f"masked_m[1] = {bad}",
              masked_m=torch.tensor([3, bad, 0], dtype=torch.int32))


@pytest.mark.parametrize(("bad", "error"), [(0, InvalidArgumentError), (True, ArgumentTypeError),
                                            (16.0, ArgumentTypeError)])
def test_expected_m_must_be_a_positive_int(spy: list[Any], bad: object, error: type[Exception]) -> None:
    _rejected(spy, _masked, error, "expected_m", expected_m=bad)
