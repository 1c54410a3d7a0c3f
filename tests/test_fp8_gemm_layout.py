"""The FP8 layout helpers, checked bit-exactly against hand-computed small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepport.errors import InvalidArgumentError
from deepport.kernels.fp8_layout import (
    FP8_E4M3_MAX_INV,
    align,
    amax_scales,
    ceil_div,
    ceil_to_ue8m0,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
    is_mn_major_tma_aligned,
    num_k_blocks,
    num_packed_k_words,
    pack_ue8m0,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
    unpack_ue8m0,
)


def test_integer_helpers() -> None:
    assert [ceil_div(x, 128) for x in (0, 1, 128, 129, 256)] == [0, 1, 1, 2, 2]
    assert [align(x, 4) for x in (0, 1, 4, 5)] == [0, 4, 4, 8]
    assert get_tma_aligned_size(5, 4) == 8 and get_tma_aligned_size(5, 2) == 8 and get_tma_aligned_size(9, 1) == 16
    assert get_mk_alignment_for_contiguous_layout() == 128
    assert num_k_blocks(7168) == 56 and num_k_blocks(200) == 2
    assert num_packed_k_words(7168) == 14 and num_packed_k_words(640) == 2 and num_packed_k_words(128) == 1


def test_mn_major_tma_aligned_tensor_has_padded_column_stride_and_same_values() -> None:
    sf = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    t = get_mn_major_tma_aligned_tensor(sf)
    assert t.shape == (5, 3) and t.stride() == (1, 8)
    assert torch.equal(t, sf)
    storage = t.as_strided((24,), (1,))  # the padding rows 5..7 of each column are zero
    assert storage.tolist()[5:8] == [0.0, 0.0, 0.0] and storage.tolist()[:5] == [0.0, 3.0, 6.0, 9.0, 12.0]
    assert is_mn_major_tma_aligned(t) and not is_mn_major_tma_aligned(sf)
    assert get_mn_major_tma_aligned_tensor(t) is t  # already aligned: returned as is


def test_mn_major_tma_aligned_tensor_batched_and_int32() -> None:
    sf = torch.arange(2 * 6 * 2, dtype=torch.int32).reshape(2, 6, 2)
    t = get_mn_major_tma_aligned_tensor(sf)
    assert t.shape == (2, 6, 2) and t.stride() == (16, 1, 8)
    assert torch.equal(t, sf) and t.dtype == torch.int32
    aligned = get_mn_major_tma_aligned_tensor(torch.ones(8, 3))
    assert aligned.stride() == (1, 8)  # M already a multiple of 4: no padding


def test_mn_major_tma_aligned_tensor_rejects_bad_input() -> None:
    with pytest.raises(InvalidArgumentError, match="dtype"):
        get_mn_major_tma_aligned_tensor(torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match="2 or 3 dimensions"):
        get_mn_major_tma_aligned_tensor(torch.ones(4))


def test_ceil_to_ue8m0_rounds_up_to_powers_of_two_bit_exactly() -> None:
    x = torch.tensor([1.0, 1.5, 0.75, 2.0**-20 * 1.0001, 3.0e-39, 448.0 / 448, 5.0], dtype=torch.float32)
    want = torch.tensor([1.0, 2.0, 1.0, 2.0**-19, 2.0**-126, 1.0, 8.0], dtype=torch.float32)
    got = ceil_to_ue8m0(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_pack_ue8m0_puts_k_block_4j_plus_i_in_byte_i_of_word_j() -> None:
    sf = torch.tensor([[1.0, 2.0, 0.5, 4.0, 8.0], [2.0**-10, 1.0, 1.0, 1.0, 2.0**10]], dtype=torch.float32)
    packed = pack_ue8m0(sf)
    assert packed.shape == (2, 2) and packed.dtype == torch.int32 and packed.is_contiguous()
    # exponents: 1.0 -> 127 (0x7f), 2.0 -> 0x80, 0.5 -> 0x7e, 4.0 -> 0x81, 8.0 -> 0x82
    words = [[w & 0xFFFFFFFF for w in row] for row in packed.tolist()]
    assert words[0] == [0x817E807F, 0x00000082]
    assert words[1] == [0x7F7F7F75, 0x00000089]  # 2**-10 -> 117 = 0x75, 2**10 -> 137 = 0x89
    assert torch.equal(unpack_ue8m0(packed, 5), sf)


def test_pack_ue8m0_round_trips_and_aligns() -> None:
    g = torch.Generator().manual_seed(0)
    sf = torch.exp2(torch.randint(-40, 40, (2, 7, 9), generator=g).to(torch.float32))
    packed = get_mn_major_tma_aligned_packed_ue8m0_tensor(sf)
    assert packed.shape == (2, 7, 3) and packed.stride() == (24, 1, 8)
    assert torch.equal(unpack_ue8m0(packed, 9), sf)


def test_pack_ue8m0_rejects_scales_that_are_not_powers_of_two() -> None:
    with pytest.raises(InvalidArgumentError, match=r"sf\[0, 1\] = 1.5"):
        pack_ue8m0(torch.tensor([[1.0, 1.5]]))
    with pytest.raises(InvalidArgumentError, match="powers of two"):
        pack_ue8m0(torch.tensor([[-2.0]]))
    with pytest.raises(InvalidArgumentError, match="words"):
        unpack_ue8m0(torch.zeros(2, 2, dtype=torch.int32), 9)


def test_per_token_cast_scales_each_row_block_by_amax_over_448() -> None:
    x = torch.zeros(2, 200)
    x[0, 3] = -896.0  # block 0 of row 0: amax 896 -> sf 2
    x[0, 130] = 44.8  # block 1 of row 0 (a 72-wide tail): amax 44.8 -> sf 0.1
    x[1, :128] = 1.0  # block 0 of row 1: sf 1/448; block 1 all zero: sf 1e-4/448
    q, sf = per_token_cast_to_fp8(x)
    assert q.shape == (2, 200) and q.dtype == torch.float8_e4m3fn and q.is_contiguous()
    assert sf.shape == (2, 2) and sf.stride() == (2, 1)
    want = torch.tensor([[896.0, 44.8], [1.0, 1e-4]]) * FP8_E4M3_MAX_INV  # DeepEP: amax * float32(1/448)
    assert torch.equal(sf, want)
    assert q[0, 3].item() == -448.0 and q[0, 130].item() == pytest.approx(448.0, rel=0.07)
    assert q[1, :128].float().eq(448.0).all() and q[1, 128:].float().eq(0.0).all()


def test_scale_is_amax_times_float32_reciprocal_of_448_not_a_division() -> None:
    # DeepEP: scale_inv = amax * kFP8AmaxInv (float32(1/448)), scale = 448 / amax. For amax 12 the
    # product rounds to 0.0267857164144516, the division 12 / 448 to 0.02678571455180645 and the float64
    # quotient is 0.026785714285714284: the rule fixes the last bit on every device.
    assert float(np.float32(1.0 / 448.0)) == FP8_E4M3_MAX_INV
    amax = torch.tensor([12.0, 0.0, 3.5, 1000.0, 2.0**-20])
    sf, multiplier = amax_scales(amax)
    assert sf[0].item() == 0.0267857164144516 and sf[0].item() != float(np.float32(12.0) / np.float32(448.0))
    assert sf[1].item() == float(np.float32(1e-4) * np.float32(1.0 / 448.0))  # the floor, times the reciprocal
    a = np.maximum(amax.numpy(), np.float32(1e-4))
    assert sf.numpy().tobytes() == (a * np.float32(1.0 / 448.0)).tobytes()
    assert multiplier.numpy().tobytes() == (np.float32(448.0) / a).tobytes()


def test_scale_rule_matches_numpy_float32_where_division_would_differ() -> None:
    amax = torch.arange(1, 4001, dtype=torch.float32) * 0.37
    sf, multiplier = amax_scales(amax)
    a = amax.numpy()
    assert sf.numpy().tobytes() == (a * np.float32(1.0 / 448.0)).tobytes()
    assert multiplier.numpy().tobytes() == (np.float32(448.0) / a).tobytes()
    assert (sf.numpy() != a / np.float32(448.0)).mean() > 0.2  # the rule is not the division


def test_per_token_cast_ue8m0_uses_power_of_two_scales() -> None:
    x = torch.zeros(1, 128)
    x[0, 0] = 300.0  # 300/448 = 0.67 -> 1.0
    q, sf = per_token_cast_to_fp8(x, use_ue8m0=True)
    assert sf.tolist() == [[1.0]] and q[0, 0].item() == 288.0  # 300 rounds to 288 in e4m3 (step 32)


def test_per_block_cast_uses_one_scale_per_128x128_block() -> None:
    x = torch.zeros(130, 129)
    x[0, 0] = 4.48
    x[129, 128] = -448.0  # the corner block (rows 128-129, column 128)
    x[100, 1] = 8.96  # same block as x[0, 0]: amax 8.96
    q, sf = per_block_cast_to_fp8(x)
    assert q.shape == (130, 129) and sf.shape == (2, 2)
    assert torch.equal(sf, torch.tensor([[8.96, 1e-4], [1e-4, 448.0]]) * FP8_E4M3_MAX_INV)
    assert q[100, 1].item() == 448.0 and q[129, 128].item() == -448.0
    assert q[0, 0].item() == 224.0


def test_casts_reconstruct_within_e4m3_precision() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=g)
    q, sf = per_token_cast_to_fp8(x)
    back = q.float() * sf.repeat_interleave(128, dim=1)[:, :300]
    assert ((back - x).abs() <= x.abs() / 16 + 1e-6).all()
    qb, sfb = per_block_cast_to_fp8(x.t().contiguous())
    back_b = qb.float() * sfb.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :3]
    assert ((back_b - x.t()).abs() <= x.t().abs() / 16 + 1e-6).all()


def test_casts_handle_empty_rows() -> None:
    q, sf = per_token_cast_to_fp8(torch.zeros(0, 256))
    assert q.shape == (0, 256) and sf.shape == (0, 2)
