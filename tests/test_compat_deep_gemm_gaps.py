"""The DeepGEMM names the compat audit added, called as DeepGEMM's tests and READMEs call them.

K-grouped GEMMs are built as tests/generators.py ``generate_k_grouped_contiguous`` builds them (per
group ``per_channel_cast_to_fp8``, MN-major for ``tn``, the K-major repack for ``nt``), the v1 K-grouped
weight gradient as v1's docstring lays it out, ``fp8_gemm_nt_skip_head_mid`` as tests/test_attention.py
calls it. Each result is checked against the same call on deepport's float64 reference backend (one
rounding of the output apart, give or take float32 accumulation) and against the unquantized
product with DeepGEMM's bar (``calc_diff < 1e-3``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import deepport
from deepport.compat import deep_gemm
from deepport.compat.deep_gemm import calc_diff
from deepport.errors import ArgumentTypeError, InvalidArgumentError

Pair = tuple[torch.Tensor, torch.Tensor]

pytestmark = pytest.mark.usefixtures("clean_env")


def close_to_reference(got: torch.Tensor, ref: torch.Tensor) -> None:
    """``got`` and the reference backend's result are one rounding to their dtype apart (plus float32
    accumulation: 2**-16 of the rms)."""
    assert not got.isnan().any() and not ref.isnan().any()
    ulp = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-23
    want = ref.double()
    err = (got.double() - want).abs()
    assert bool((err <= ulp * want.abs() + 2.0**-16 * want.pow(2).mean().sqrt()).all()), float(err.max())


def run_both(fn: Callable[..., None], out: torch.Tensor, *args: Any,
             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(..., out, ...)`` on deepport's choice and on the reference backend, each into a copy of ``out``
    (``c`` given as ``d``, when ``c is d``, follows the copy)."""
    results = []
    for backend in (None, "reference"):
        target = out.clone()
        call_kwargs = {key: (target if value is out else value) for key, value in kwargs.items()}
        fn(*args[:2], target, *args[2:], backend=backend, **call_kwargs)
        results.append(target)
    return results[0], results[1]


def k_grouped_inputs(m: int, n: int, ks: list[int], seed: int = 0) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """generators.py ``generate_k_grouped_contiguous`` (MN-major): FP8 ``(A [sum_K, M], SFA)``,
    ``(B [sum_K, N], SFB)``, ``c`` and the unquantized reference ``c[g] + a_g^T @ b_g``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((sum(ks), m), generator=g).to(torch.bfloat16)
    b = torch.randn((sum(ks), n), generator=g).to(torch.bfloat16)
    c = torch.randn((len(ks), m, n), generator=g) * 32
    ref = torch.empty_like(c)
    casts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x in (a, b):
        data, sfs, start = torch.zeros(x.shape, dtype=torch.float8_e4m3fn), [], 0
        for k in ks:
            if k:
                data[start:start + k], sf = deep_gemm.per_channel_cast_to_fp8(x[start:start + k], use_ue8m0=False)
                sfs.append(sf)
            start += k
        casts.append((data, torch.cat(sfs)))
    start = 0
    for i, k in enumerate(ks):
        ref[i] = c[i] + a[start:start + k].float().T @ b[start:start + k].float()
        start += k
    return casts[0], casts[1], c, ref


@pytest.mark.parametrize("ks", [[256, 128, 384], [128, 0, 256]])
def test_k_grouped_tn_as_the_upstream_test_calls_it(ks: list[int]) -> None:
    a, b, c, unquantized = k_grouped_inputs(40, 24, ks)
    layout = torch.tensor(ks, dtype=torch.int32)
    d = c.clone()  # upstream: d = c, accumulate in place
    got, ref = run_both(deep_gemm.k_grouped_fp8_gemm_tn_contiguous, d, a, b, ks, layout, c=d,
                        recipe=(1, 1, 128))
    close_to_reference(got, ref)
    assert calc_diff(got, unquantized) < 1e-3
    apart = torch.full_like(c, float("nan"))
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, apart, ks, layout, c)  # c distinct from d
    v2_0 = c.clone()  # v2.0's keyword names
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, v2_0, ks=ks, ks_tensor=layout, c=v2_0, recipe=(1, 1, 128))
    assert torch.equal(v2_0, got)
    with pytest.raises(InvalidArgumentError, match=r"either ks_cpu or its v2\.0 name ks"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, v2_0, ks, layout, v2_0, ks=ks)
    assert torch.equal(apart, got) and torch.equal(apart[1] if ks[1] == 0 else c[0], c[1] if ks[1] == 0 else c[0])


def test_k_grouped_tn_psum_layout_reads_end_offsets() -> None:
    real, alignment = [128, 256], deep_gemm.get_mk_alignment_for_contiguous_layout()
    a, b, c, unquantized = k_grouped_inputs(16, 8, real)
    ends = torch.tensor([128, 128 + 256], dtype=torch.int32)  # aligned K sizes: the end offsets are the prefix sums
    psum = c.clone()
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, psum, None, ends, psum, use_psum_layout=True)
    sized = c.clone()
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, sized, real, torch.tensor(real, dtype=torch.int32), sized)
    assert torch.equal(psum, sized) and alignment == 128 and calc_diff(psum, unquantized) < 1e-3


def test_k_grouped_nt_takes_each_group_k_major_back_to_back() -> None:
    ks, m, n = [128, 256], 24, 16
    (a, sfa), (b, sfb), c, unquantized = k_grouped_inputs(m, n, ks, seed=3)
    flat_a, flat_b, start = torch.empty(sum(ks) * m, dtype=a.dtype), torch.empty(sum(ks) * n, dtype=b.dtype), 0
    for k in ks:  # generators.py's K-major repack
        flat_a[start * m:(start + k) * m] = a[start:start + k].T.flatten()
        flat_b[start * n:(start + k) * n] = b[start:start + k].T.flatten()
        start += k
    layout = torch.tensor(ks, dtype=torch.int32)
    d = c.clone()
    got, ref = run_both(deep_gemm.k_grouped_fp8_gemm_nt_contiguous, d, (flat_a, sfa.T), (flat_b, sfb.T), ks, layout,
                        c=d)
    close_to_reference(got, ref)
    assert calc_diff(got, unquantized) < 1e-3
    tn = c.clone()
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), tn, ks, layout, tn, backend="reference")
    assert torch.equal(ref, tn)


def test_k_grouped_checks_say_expected_and_got() -> None:
    (a, sfa), (b, sfb), c, _ = k_grouped_inputs(8, 8, [128])
    layout = torch.tensor([128], dtype=torch.int32)
    with pytest.raises(InvalidArgumentError, match="always accumulate"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), c.clone(), [128], layout)
    with pytest.raises(InvalidArgumentError, match=r"\(1, 1, 128\)"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), c, [128], layout, c, recipe=(1, 1, 32))
    with pytest.raises(InvalidArgumentError, match="multiple of 128"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), c, [100], layout, c)
    with pytest.raises(InvalidArgumentError, match="sum_K"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), c, [256], torch.tensor([256],
                                                   dtype=torch.int32), c)
    with pytest.raises(InvalidArgumentError, match="group sizes of ks_cpu"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), c, [128], torch.tensor([0],
                                                   dtype=torch.int32), c)
    with pytest.raises(InvalidArgumentError, match="psum"):
        deep_gemm.k_grouped_fp8_gemm_nt_contiguous((a, sfa.T), (b, sfb.T), c, [128], layout, c, use_psum_layout=True)


def test_v1_k_grouped_weight_gradient_accumulates_per_batch() -> None:
    m, n, batch_sizes = 24, 40, [256, 128]
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn((m, k), generator=g).to(torch.bfloat16) for k in batch_sizes]
    ys = [torch.randn((n, k), generator=g).to(torch.bfloat16) for k in batch_sizes]
    lhs_casts = [deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False) for x in xs]
    rhs_casts = [deep_gemm.per_token_cast_to_fp8(y, use_ue8m0=False) for y in ys]
    lhs = (torch.cat([q.flatten() for q, _ in lhs_casts]), torch.cat([sf.T for _, sf in lhs_casts]))
    rhs = (torch.cat([q.flatten() for q, _ in rhs_casts]), torch.cat([sf.T for _, sf in rhs_casts]))
    out = torch.randn((len(batch_sizes), m, n), generator=g)
    unquantized = out + torch.stack([x.float() @ y.float().T for x, y in zip(xs, ys, strict=True)])
    got, ref = run_both(deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt, out, lhs, rhs, batch_sizes)
    close_to_reference(got, ref)
    assert calc_diff(got, unquantized) < 1e-3
    each = out.clone()
    for i in range(len(batch_sizes)):
        deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(lhs_casts[i], rhs_casts[i], each[i])
    assert torch.equal(each, got)
    with pytest.raises(InvalidArgumentError, match="batch_sizes"):
        deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out.clone(), [256])


def apply_skip_head_mid(d: torch.Tensor, head_splits: tuple[int, int, int]) -> torch.Tensor:
    """tests/test_attention.py's helper: each head's columns with ``mid`` zero columns inserted."""
    left, mid, right = head_splits
    m, n = d.shape
    per_head = d.view(m, n // (left + right), -1)
    gap = torch.zeros((m, per_head.shape[1], mid), dtype=d.dtype)
    return torch.cat([per_head[:, :, :left], gap, per_head[:, :, -right:]], dim=2).view(m, -1)


def test_skip_head_mid_as_the_upstream_test_calls_it() -> None:
    head_splits, m, n, k = (32, 16, 32), 8, 128, 256
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn((m, k), generator=g).bfloat16(), torch.randn((n, k), generator=g).bfloat16()
    a, b = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False), deep_gemm.per_block_cast_to_fp8(y, use_ue8m0=False)
    dense = torch.empty((m, n), dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt(a, b, dense, backend="reference")
    d = apply_skip_head_mid(torch.full((m, n), float("nan"), dtype=torch.bfloat16), head_splits)
    deep_gemm.fp8_gemm_nt_skip_head_mid(a, b, d, head_splits, disable_ue8m0_cast=True, backend="reference")
    assert torch.equal(d, apply_skip_head_mid(dense, head_splits))  # the mid columns stay as they were (zero)
    assert calc_diff(d, apply_skip_head_mid((x.float() @ y.float().T).bfloat16(), head_splits)) < 1e-3
    with pytest.raises(InvalidArgumentError, match="divide N"):
        deep_gemm.fp8_gemm_nt_skip_head_mid(a, b, d, (48, 16, 48))


def test_transform_sf_into_required_layout_gives_what_the_gemms_consume() -> None:
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn((6, 256), generator=g), torch.randn((130, 256), generator=g)
    (a, sfa), (b, sfb) = deep_gemm.per_token_cast_to_fp8(x), deep_gemm.per_block_cast_to_fp8(y)
    recipe = (1, 128, 128)
    sfa_t = deep_gemm.transform_sf_into_required_layout(sfa, 6, 256, recipe, is_sfa=True)
    deep_gemm.testing.assert_bitwise_equal(sfa_t, deep_gemm.get_mn_major_tma_aligned_tensor(sfa))
    assert sfa_t.stride() == (1, 8)
    assert deep_gemm.transform_sf_into_required_layout(sfb, 130, 256, recipe, is_sfa=False) is sfb
    assert deep_gemm.transform_sf_into_required_layout(sfb.T.contiguous().T, 130, 256, (128, 128)).stride() == (1, 2)
    via, direct = torch.empty((6, 130), dtype=torch.bfloat16), torch.empty((6, 130), dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt((a, sfa_t), (b, sfb), via, backend="reference")
    deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), direct, backend="reference")
    assert torch.equal(via, direct)
    packed = deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(deep_gemm.ceil_to_ue8m0(sfa))
    assert deep_gemm.transform_sf_into_required_layout(packed, 6, 256, (1, 128)) is packed
    grouped = torch.ones((2, 6, 2))
    assert deep_gemm.transform_sf_into_required_layout(grouped, 6, 256, (1, 128), num_groups=2).stride() == (16, 1, 8)
    assert deep_gemm.transform_sf_into_required_layout(sfb, 130, 256, recipe) is sfb  # v2.0: is_sfa=False default
    with pytest.raises(InvalidArgumentError, match="is_sfa"):
        deep_gemm.transform_sf_into_required_layout(sfa, 6, 256, (1, 128), is_sfa=True)
    with pytest.raises(InvalidArgumentError, match="gran_k = 128"):
        deep_gemm.transform_sf_into_required_layout(sfa, 6, 256, (1, 32))
    with pytest.raises(InvalidArgumentError, match=r"expected shape \(6, 3\)"):
        deep_gemm.transform_sf_into_required_layout(sfa, 6, 384, (1, 128))
    row_major = deep_gemm.pack_ue8m0_to_int(torch.ones((6, 8)))
    with pytest.raises(InvalidArgumentError, match="MN-major"):
        deep_gemm.transform_sf_into_required_layout(row_major, 6, 1024, (1, 128))


def test_math_helpers_follow_deepgemm_utils() -> None:
    g = torch.Generator().manual_seed(11)
    w = torch.randn((256, 24), generator=g).bfloat16()
    data, sf = deep_gemm.per_channel_cast_to_fp8(w, use_ue8m0=False)
    assert data.shape == (256, 24) and sf.shape == (2, 24)
    assert torch.equal(sf[1], w[128:].float().abs().amax(dim=0).clamp(min=1e-4) * deepport.kernels.fp8_layout
                       .FP8_E4M3_MAX_INV)
    back = (data.float().view(2, 128, 24) * sf[:, None, :]).view(256, 24)
    assert calc_diff(back, w.float()) < 1e-3
    with pytest.raises(InvalidArgumentError, match="multiple of 128"):
        deep_gemm.per_channel_cast_to_fp8(w[:100], use_ue8m0=False)
    q = torch.randn((4, 8, 64), generator=g)
    scaled, per_token = deep_gemm.per_custom_dims_cast_to_fp8(q, (0,), use_ue8m0=True)
    assert per_token.shape == (4,) and scaled.dtype == torch.float8_e4m3fn
    assert torch.equal(per_token, deep_gemm.ceil_to_ue8m0(q.abs().amax(dim=(1, 2)).clamp(min=1e-4) *
                                                          deepport.kernels.fp8_layout.FP8_E4M3_MAX_INV))
    pow2 = deep_gemm.ceil_to_ue8m0(torch.rand((3, 8), generator=g) + 0.01)
    packed = deep_gemm.pack_ue8m0_to_int(pow2)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2) and torch.equal(packed, deepport.pack_ue8m0(pow2))
    assert torch.equal(deep_gemm.unpack_ue8m0_from_int(packed), pow2)
    with pytest.raises(InvalidArgumentError, match="multiple of 4"):
        deep_gemm.pack_ue8m0_to_int(pow2[:, :6])
    with pytest.raises(InvalidArgumentError, match="powers of two"):
        deep_gemm.pack_ue8m0_to_int(torch.full((1, 4), 0.3))


def test_runtime_knobs_are_checked_recorded_and_harmless() -> None:
    assert deep_gemm.get_tc_util() == 100 and deep_gemm.get_pdl() is False
    deep_gemm.set_tc_util(80)
    deep_gemm.set_pdl(True)
    deep_gemm.set_ignore_compile_dims(True)
    deep_gemm.set_block_size_multiple_of((16, 32))
    deep_gemm.set_block_size_multiple_of(64)
    try:
        assert deep_gemm.get_tc_util() == 80 and deep_gemm.get_pdl() is True
        (a, sfa), b = deep_gemm.per_token_cast_to_fp8(torch.ones((2, 128))), deep_gemm.per_block_cast_to_fp8(
            torch.ones((4, 128)))
        out = torch.empty((2, 4), dtype=torch.bfloat16)
        deep_gemm.fp8_gemm_nt((a, sfa), b, out)
        assert torch.equal(out, torch.full((2, 4), 128.0, dtype=torch.bfloat16))
    finally:
        deep_gemm.set_tc_util(0)
        deep_gemm.set_pdl(False)
        deep_gemm.set_ignore_compile_dims(False)
        deep_gemm.set_block_size_multiple_of(1)
    with pytest.raises(InvalidArgumentError, match="<= 100"):
        deep_gemm.set_tc_util(101)
    with pytest.raises(ArgumentTypeError, match="bool"):
        deep_gemm.set_pdl(1)
    with pytest.raises(InvalidArgumentError, match=">= 1"):
        deep_gemm.set_block_size_multiple_of((0, 8))


def test_testing_helpers_and_v1_bench() -> None:
    x = torch.arange(6.0).view(2, 3)
    deep_gemm.testing.assert_bitwise_equal(x, x.clone(), "same")
    with pytest.raises(AssertionError, match=r"element \(1, 2\)"):
        deep_gemm.testing.assert_bitwise_equal(x, torch.where(x == 5, -1.0, x))
    with pytest.raises(AssertionError, match="shapes and dtypes"):
        deep_gemm.testing.assert_bitwise_equal(x, x.double())
    calls: list[int] = []
    seconds = deep_gemm.bench(lambda: calls.append(1), num_warmups=2, num_tests=3)
    assert isinstance(seconds, float) and seconds >= 0 and len(calls) == 5
    assert deep_gemm.bench is deep_gemm.testing.bench


@pytest.mark.parametrize("name", ["bf16_gemm_nt", "m_grouped_bf16_gemm_nt_masked", "fp8_mqa_logits", "einsum",
                                  "fp8_fp4_mega_moe", "bench_kineto", "per_token_cast_to_fp4"])
def test_absent_upstream_names_say_why(name: str) -> None:
    assert not hasattr(deep_gemm, name)
    with pytest.raises(AttributeError, match="not provided by deepport"):
        getattr(deep_gemm, name)
    with pytest.raises(AttributeError, match=r"has no attribute 'no_such_name'$"):
        deep_gemm.no_such_name  # noqa: B018


def test_utils_submodule_paths_resolve_as_upstream() -> None:
    from deepport.compat.deep_gemm.utils.layout import get_mn_major_tma_aligned_tensor
    from deepport.compat.deep_gemm.utils.math import align, per_block_cast_to_fp8, per_token_cast_to_fp8

    assert per_token_cast_to_fp8 is deep_gemm.per_token_cast_to_fp8 is deep_gemm.utils.per_token_cast_to_fp8
    assert per_block_cast_to_fp8 is deep_gemm.utils.math.per_block_cast_to_fp8 and align(5, 4) == 8
    assert get_mn_major_tma_aligned_tensor is deep_gemm.get_col_major_tma_aligned_tensor


def test_packed_ue8m0_layout_skips_the_gap_rows_of_a_psum_layout() -> None:
    g = torch.Generator().manual_seed(13)
    sf = deep_gemm.ceil_to_ue8m0(torch.rand((300, 5), generator=g) + 0.1)
    sf[100:128] = float("nan")  # the alignment gap after a group ending at row 100: anything, upstream skips it
    ends = torch.tensor([100, 300], dtype=torch.int32)
    packed = deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(sf, psum_layout=ends)
    whole = deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(torch.where(sf.isnan(), 1.0, sf))
    assert packed.stride() == whole.stride() == (1, 300)
    assert torch.equal(packed[:100], whole[:100]) and torch.equal(packed[128:], whole[128:])
    assert not packed[100:128].any()
    with pytest.raises(InvalidArgumentError, match="powers of two"):
        deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(sf)


@pytest.mark.parametrize("in_place", [True, False])
def test_bf16_accumulation_as_the_sm100_test_calls_it(in_place: bool) -> None:
    """generators.py ``generate_normal(accumulate=True, out_dtype=bf16)``: ``d = randn * 32``, ``c = d``."""
    g = torch.Generator().manual_seed(15)
    x, y = torch.randn((16, 256), generator=g).bfloat16(), torch.randn((48, 256), generator=g).bfloat16()
    a, b = deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=False), deep_gemm.per_block_cast_to_fp8(y, use_ue8m0=False)
    d = (torch.randn((16, 48), generator=g) * 32).bfloat16()
    c = d if in_place else d.clone()
    unquantized = (x.float() @ y.float().T + c.float()).bfloat16()
    want = c.float().clone()
    deep_gemm.fp8_gemm_nt(a, b, want, c=want, backend="reference")  # the float32 result, rounded once below
    deep_gemm.fp8_gemm_nt(a, b, d, c=c)
    assert d.dtype == torch.bfloat16
    close_to_reference(d, want)
    assert calc_diff(d, unquantized) < 1e-3
    with pytest.raises(ArgumentTypeError, match="bfloat16"):
        deep_gemm.fp8_gemm_nt(a, b, d, c=c.float())


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
def test_empty_reduction_gives_c_and_empty_output_is_a_no_op(layout: str) -> None:
    """DeepGEMM: ``K == 0`` -> ``D = C`` (or 0), ``N == 0`` -> nothing; deepport's ops reject both, the shims answer."""
    fp8, m, n = torch.float8_e4m3fn, 4, 6
    gemm = getattr(deep_gemm, f"fp8_gemm_{layout}")

    def operands(k: int, n_: int) -> tuple[Pair, Pair]:
        a = torch.empty((m, k) if layout[0] == "n" else (k, m), dtype=fp8)
        b = torch.empty((n_, k) if layout[1] == "t" else (k, n_), dtype=fp8)
        return (a, torch.empty((m, 0))), (b, torch.empty((1, 0)))

    c = torch.randn((m, n))
    d = torch.full((m, n), float("nan"))
    gemm(*operands(0, n), d, c=c)
    assert torch.equal(d, c)
    bf16 = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    gemm(*operands(0, n), bf16)
    assert not bf16.any()
    gemm(*operands(128, 0), torch.empty((m, 0), dtype=torch.bfloat16))  # nothing to write, nothing raised
    with pytest.raises(InvalidArgumentError, match="agree on M, N, K"):
        gemm(*operands(0, n + 1), d, c=c)


def test_v2_0_positional_order_is_recognised() -> None:
    """v2.0 (2025-07) signatures had ``compiled_dims, disable_ue8m0_cast`` right after ``recipe``."""
    g = torch.Generator().manual_seed(17)
    x, y = torch.randn((2, 8, 256), generator=g).bfloat16(), torch.randn((2, 128, 256), generator=g).bfloat16()
    a = deep_gemm.per_token_cast_to_fp8(x[0], use_ue8m0=False)
    b = deep_gemm.per_block_cast_to_fp8(y[0], use_ue8m0=False)
    recipe = (1, 128, 128)
    keyword, positional = (torch.empty((8, 128), dtype=torch.bfloat16) for _ in range(2))
    deep_gemm.fp8_gemm_nt(a, b, keyword, None, recipe, compiled_dims="nk", disable_ue8m0_cast=True)
    deep_gemm.fp8_gemm_nt(a, b, positional, None, recipe, "nk", True)
    assert torch.equal(keyword, positional)
    grouped_b = tuple(torch.stack(t) for t in zip(*(deep_gemm.per_block_cast_to_fp8(w) for w in y), strict=True))
    m_indices = torch.zeros(8, dtype=torch.int32)
    for args in ((m_indices, recipe, "nk", False), (m_indices, recipe, "nk")):
        out = torch.empty((8, 128), dtype=torch.bfloat16)
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, grouped_b, out, *args)
        assert torch.equal(out, keyword)
    masked_a = tuple(torch.stack(t) for t in zip(*(deep_gemm.per_token_cast_to_fp8(r) for r in x), strict=True))
    masked, expected = (torch.zeros((2, 8, 128), dtype=torch.bfloat16) for _ in range(2))
    masked_m = torch.tensor([8, 3], dtype=torch.int32)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(masked_a, grouped_b, masked, masked_m, 8, recipe, "nk", False)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(masked_a, grouped_b, expected, masked_m, 8, recipe=recipe)
    assert torch.equal(masked, expected) and torch.equal(masked[0], keyword)
    with pytest.raises(ArgumentTypeError, match="disable_ue8m0_cast"):
        deep_gemm.fp8_gemm_nt(a, b, positional, None, recipe, "nk", (1, 128))
