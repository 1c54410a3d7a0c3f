"""deepport.compat.deep_gemm called as DeepGEMM's READMEs and tests call it (v1 and current names).

Inputs are built the way DeepGEMM's tests build them (``per_token_cast_to_fp8`` activations,
``per_block_cast_to_fp8`` weights, SFA through ``get_col_major_tma_aligned_tensor``), at tiny sizes.
Each result is checked against the float64 reference backend on the same FP8 operands (within one
rounding of the output dtype) and against the unquantized product with DeepGEMM's bar
(``calc_diff < 1e-3``); v1 and current names must agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from same_computation import assert_same_up_to_rounding

import deepport
from deepport.compat import deep_gemm
from deepport.compat.deep_gemm import calc_diff, get_col_major_tma_aligned_tensor
from deepport.errors import ArgumentTypeError, InvalidArgumentError

pytestmark = pytest.mark.usefixtures("clean_env")

Pair = tuple[torch.Tensor, torch.Tensor]


def construct(m: int, k: int, n: int, seed: int = 0) -> tuple[Pair, Pair, torch.Tensor, torch.Tensor]:
    """DeepGEMM's tests/test_core.py ``construct``: (a, b, out, unquantized x @ y^T)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((m, k), generator=g).to(torch.bfloat16)
    y = torch.randn((n, k), generator=g).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    x_fp8, y_fp8 = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False), deep_gemm.per_block_cast_to_fp8(y, False)
    x_fp8 = (x_fp8[0], get_col_major_tma_aligned_tensor(x_fp8[1]))
    return x_fp8, y_fp8, out, x.float() @ y.float().t()


def construct_grouped(num_groups: int, m: int, k: int, n: int, masked: bool,
                      seed: int = 0) -> tuple[Pair, Pair, torch.Tensor, torch.Tensor]:
    """DeepGEMM's ``construct_grouped``: per-group casts; the contiguous form merges the group and M dims."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_groups, m, k), generator=g).to(torch.bfloat16)
    y = torch.randn((num_groups, n, k), generator=g).to(torch.bfloat16)
    out = torch.full((num_groups, m, n), float("nan"), dtype=torch.bfloat16)
    ref = torch.einsum("gmk,gnk->gmn", x.float(), y.float())
    x_fp8 = (torch.empty_like(x, dtype=torch.float8_e4m3fn), torch.empty((num_groups, m, k // 128)))
    y_fp8 = (torch.empty_like(y, dtype=torch.float8_e4m3fn), torch.empty((num_groups, -(-n // 128), k // 128)))
    for i in range(num_groups):
        x_fp8[0][i], x_fp8[1][i] = deep_gemm.per_token_cast_to_fp8(x[i])
        y_fp8[0][i], y_fp8[1][i] = deep_gemm.per_block_cast_to_fp8(y[i])
    if not masked:
        x_fp8 = (x_fp8[0].view(-1, k), deep_gemm.per_token_cast_to_fp8(x.view(-1, k))[1])
        out, ref = out.view(-1, n), ref.view(-1, n)
    return (x_fp8[0], get_col_major_tma_aligned_tensor(x_fp8[1])), y_fp8, out, ref


def on_reference(fn: Callable[..., None], out: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``fn`` run on deepport's float64 reference backend into a copy of ``out``."""
    ref_out = out.clone()
    with deepport.use_backend("reference"):
        fn(*args[:2], ref_out, *args[2:], **kwargs)
    return ref_out


def assert_one_rounding(got: torch.Tensor, ref: torch.Tensor) -> None:
    """``got`` and the reference backend's result are the same float64 value rounded once each to their dtype
    (so at most one unit in the last place apart), give or take float32 accumulation (2**-16 of the rms)."""
    assert not got.isnan().any() and not ref.isnan().any()
    ulp = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-23
    want = ref.double()
    err = (got.double() - want).abs()
    assert bool((err <= ulp * want.abs() + 2.0**-16 * want.pow(2).mean().sqrt()).all()), float(err.max())


@pytest.mark.parametrize("m", [1, 64, 96])
def test_fp8_gemm_nt_as_the_upstream_test_calls_it(m: int) -> None:
    a, b, out, unquantized = construct(m, 384, 320)
    deep_gemm.fp8_gemm_nt(a, b, out)
    assert calc_diff(out, unquantized) < 1e-3
    assert_one_rounding(out, on_reference(deep_gemm.fp8_gemm_nt, out, a, b))


def test_v1_and_current_dense_names_agree_bit_for_bit() -> None:
    a, b, out, _ = construct(64, 256, 256)
    deep_gemm.fp8_gemm_nt(a, b, out)
    for name in ("gemm_fp8_fp8_bf16_nt", "fp8_fp4_gemm_nt"):
        again = torch.full_like(out, float("nan"))
        getattr(deep_gemm, name)(a, b, again)
        assert_same_up_to_rounding(again, out, name)
    with pytest.raises(ArgumentTypeError, match="bfloat16"):
        deep_gemm.gemm_fp8_fp8_bf16_nt(a, b, torch.empty(64, 256))


@pytest.mark.parametrize("layout", ["nn", "tn", "tt"])
def test_layout_aliases_compute_the_nt_answer(layout: str) -> None:
    """DeepGEMM's ``test_alias``: the same operands stored transposed, through ``fp8_gemm_{layout}``."""
    (a, sfa), (b, sfb), out, _ = construct(32, 256, 256)
    deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), out)
    if layout[0] == "t":
        a, sfa = a.t().contiguous(), sfa.t()
    if layout[1] == "n":
        b, sfb = b.t().contiguous(), sfb.t()
    again = torch.full_like(out, float("nan"))
    getattr(deep_gemm, f"fp8_gemm_{layout}")((a, sfa), (b, sfb), again)
    assert_same_up_to_rounding(again, out)


def test_weight_gradient_accumulates_in_place_in_both_generations() -> None:
    """v1 ``wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out)`` = ``fp8_gemm_nt(a, b, d, c=d, recipe=(1, 1, 128))``."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 256, generator=g), torch.randn(160, 256, generator=g)
    residual = torch.randn(48, 160, generator=g) * 10
    a, b = deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_token_cast_to_fp8(y)
    current = residual.clone()
    deep_gemm.fp8_gemm_nt(a, b, current, c=current, recipe=(1, 1, 128))
    assert calc_diff(current, residual + x @ y.t()) < 1e-3
    ref = residual.clone()
    with deepport.use_backend("reference"):
        deep_gemm.fp8_gemm_nt(a, b, ref, c=ref, recipe=(1, 1, 128))
    assert_one_rounding(current, ref)
    v1 = residual.clone()
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, (b[0], b[1].t().contiguous()), v1)  # v1 also took [kb, N] SFs
    assert torch.equal(v1, current)


def test_per_operand_recipes_map_to_one_recipe() -> None:
    a, b, out, _ = construct(16, 256, 256)
    deep_gemm.fp8_gemm_nt(a, b, out)
    again = torch.full_like(out, float("nan"))
    deep_gemm.fp8_gemm_nt(a, b, again, recipe_a=(1, 128), recipe_b=(128, 128), disable_ue8m0_cast=True,
                          compiled_dims="nk")
    assert_same_up_to_rounding(again, out)
    with pytest.raises(InvalidArgumentError, match="either recipe or"):
        deep_gemm.fp8_gemm_nt(a, b, again, recipe=(1, 128, 128), recipe_a=(1, 128), recipe_b=(128, 128))
    with pytest.raises(InvalidArgumentError, match="gran_k"):
        deep_gemm.fp8_gemm_nt(a, b, again, recipe_a=(1, 128), recipe_b=(128, 32))
    with pytest.raises(ArgumentTypeError, match="recipe_b"):
        deep_gemm.fp8_gemm_nt(a, b, again, recipe_a=(1, 128))


def test_contiguous_grouped_gemm_as_the_upstream_test_calls_it() -> None:
    """DeepGEMM's v1 contiguous test (every row in a group), with a padded group added: -1 rows give 0."""
    (a, sfa), b, out, ref = construct_grouped(2, 128, 256, 192, masked=False)
    m_indices = torch.arange(0, 2, dtype=torch.int).unsqueeze(-1).expand(2, 128).contiguous().view(-1)
    m_indices[200:] = -1  # group 1 has 72 rows, then padding
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, out, m_indices)
    assert calc_diff(out[:200], ref[:200]) < 1e-3
    assert torch.equal(out[200:], torch.zeros_like(out[200:]))
    assert_one_rounding(out, on_reference(deep_gemm.m_grouped_fp8_gemm_nt_contiguous, out, (a, sfa), b, m_indices))
    for call in (lambda d: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, sfa), b, d, m_indices),
                 lambda d: deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, d, m_indices=m_indices),
                 lambda d: deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, d, grouped_layout=m_indices),
                 lambda d: deep_gemm.m_grouped_fp8_gemm_nn_contiguous((a, sfa), (b[0].mT.contiguous(), b[1].mT), d,
                                                                      m_indices)):
        again = torch.full_like(out, float("nan"))
        call(again)
        assert_same_up_to_rounding(again, out)
    with pytest.raises(InvalidArgumentError, match="grouped_layout"):
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, out, m_indices, m_indices=m_indices)


def test_psum_layout_is_the_per_row_layout_written_as_end_offsets() -> None:
    """DeepGEMM 2026's ``use_psum_layout=True``: group g owns rows [align(end[g-1], 128), end[g])."""
    (a, sfa), b, _, ref = construct_grouped(3, 128, 256, 128, masked=False)
    ends = torch.tensor([100, 128, 300], dtype=torch.int32)  # group 1 empty (starts at 128, ends at 128)
    rows = torch.full((384,), -1, dtype=torch.int32)
    rows[:100], rows[128:300] = 0, 2
    per_row = torch.full((384, 128), float("nan"), dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, per_row, rows)
    psum = torch.full_like(per_row, float("nan"))
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, psum, ends, use_psum_layout=True,
                                               expected_m_for_psum_layout=100)
    assert torch.equal(psum, per_row)
    for gap in (psum[100:128], psum[300:]):  # ensure_zero_padding
        assert torch.equal(gap, torch.zeros_like(gap))
    assert calc_diff(psum[256:300], ref[256:300]) < 1e-3
    with pytest.raises(InvalidArgumentError, match="end offsets"):
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, sfa), b, psum, torch.tensor([100, 110, 300], dtype=torch.int32),
                                                   use_psum_layout=True)


def test_masked_grouped_gemm_as_the_upstream_test_calls_it() -> None:
    (a, sfa), b, out, ref = construct_grouped(3, 64, 256, 128, masked=True)
    masked_m = torch.tensor([64, 17, 0], dtype=torch.int32)
    expected_m = int(masked_m.float().mean()) + 1
    deep_gemm.m_grouped_fp8_gemm_nt_masked((a, sfa), b, out, masked_m, expected_m)
    for j in range(3):
        rows = int(masked_m[j])
        if rows:
            assert calc_diff(out[j, :rows], ref[j, :rows]) < 1e-3
        assert out[j, rows:].isnan().all()  # rows past masked_m are not written
    assert_one_rounding(out[0], on_reference(deep_gemm.m_grouped_fp8_gemm_nt_masked, out, (a, sfa), b, masked_m,
                                             expected_m)[0])
    for name in ("m_grouped_gemm_fp8_fp8_bf16_nt_masked", "fp8_m_grouped_gemm_nt_masked",
                 "m_grouped_fp8_fp4_gemm_nt_masked"):
        again = torch.full_like(out, float("nan"))
        getattr(deep_gemm, name)((a, sfa), b, again, masked_m, expected_m)
        assert_same_up_to_rounding(again, out, name)


def test_layout_and_alignment_helpers() -> None:
    sf = torch.randn(5, 3)
    aligned = deep_gemm.get_col_major_tma_aligned_tensor(sf)
    assert aligned.stride() == (1, 8) and torch.equal(aligned, sf)
    assert deep_gemm.get_mn_major_tma_aligned_tensor is deep_gemm.get_col_major_tma_aligned_tensor
    assert deep_gemm.get_tma_aligned_size(5, 4) == 8 and deep_gemm.ceil_div(5, 4) == 2 and deep_gemm.align(5, 4) == 8
    assert deep_gemm.get_m_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_theoretical_mk_alignment_for_contiguous_layout(20) == 128
    deep_gemm.utils.set_mk_alignment_for_contiguous_layout(128)
    with pytest.raises(InvalidArgumentError, match="128"):
        deep_gemm.set_mk_alignment_for_contiguous_layout(64)


def test_quantizers_follow_deepgemm_utils() -> None:
    x = torch.randn(4, 640)
    data, sf = deep_gemm.utils.per_token_cast_to_fp8(x, True, 128, use_packed_ue8m0=True)
    assert data.dtype == torch.float8_e4m3fn and sf.dtype == torch.int32 and sf.shape == (4, 2)
    data32, sf32 = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True)
    assert torch.equal(data.view(torch.uint8), data32.view(torch.uint8))
    assert torch.equal(deepport.unpack_ue8m0(sf, 5), sf32)
    assert torch.equal(sf32, deep_gemm.ceil_to_ue8m0(x.abs().view(4, 5, 128).amax(-1).clamp(min=1e-4) / 448))
    _, sfb = deep_gemm.per_block_cast_to_fp8(torch.randn(130, 256), False)
    assert sfb.shape == (2, 2)
    with pytest.raises(InvalidArgumentError, match="gran_k"):
        deep_gemm.per_token_cast_to_fp8(x, False, gran_k=32)


def test_num_sms_is_recorded_and_calc_diff_follows_upstream() -> None:
    before = deep_gemm.get_num_sms()
    assert before >= 1
    deep_gemm.set_num_sms(1)
    try:
        assert deep_gemm.get_num_sms() == 1
    finally:
        deep_gemm.set_num_sms(before)
    with pytest.raises(InvalidArgumentError):
        deep_gemm.set_num_sms(before + 1_000_000)
    x = torch.randn(8, 8)
    assert float(calc_diff(x, x)) == pytest.approx(0.0, abs=1e-15)
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert float(deep_gemm.testing.calc_diff(x, -x)) == pytest.approx(2.0)
    assert deep_gemm.testing.count_bytes((x, None), [x]) == 2 * 8 * 8 * 4


def test_calls_route_through_deepport_dispatch() -> None:
    a, b, out, _ = construct(8, 256, 128)
    with deepport.use_backend("reference"):
        deep_gemm.fp8_gemm_nt(a, b, out)
    direct = torch.full_like(out, float("nan"))
    deepport.fp8_gemm_nt(a, b, direct, backend="reference")
    assert torch.equal(out, direct)
    keyword = torch.full_like(out, float("nan"))
    deep_gemm.fp8_gemm_nt(a, b, keyword, backend="reference")
    assert torch.equal(keyword, direct)
    with pytest.raises(ArgumentTypeError, match="float8_e4m3fn"):
        deep_gemm.fp8_gemm_nt((a[0].to(torch.bfloat16), a[1]), b, out)
