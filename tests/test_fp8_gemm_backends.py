"""Dense FP8 GEMM semantics on the reference and torch backends (CPU here; the CUDA paths are in
tests/test_fp8_gemm_gpu.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import deepport
from deepport.backends.torch import fp8_gemm as torch_fp8
from deepport.conformance.checker import calc_diff
from deepport.kernels import fp8_gemm as op
from deepport.kernels.f64.fp8_gemm import reference_f64
from deepport.kernels.fp8_layout import (
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)

FP8 = torch.float8_e4m3fn
GEMMS = {layout: getattr(deepport, f"fp8_gemm_{layout}") for layout in op.LAYOUTS}


def quantized(m: int, n: int, k: int, *, seed: int = 0, ue8m0: bool = False, per_row_b: bool = False,
              outlier: bool = False) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """NT inputs quantized from random data, and that data (x [m, k], w [n, k]) for the exact check."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    if outlier and m > 0:
        x[0, 0] = 300.0
    a, sfa = per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    b, sfb = per_token_cast_to_fp8(w, use_ue8m0=ue8m0) if per_row_b or ue8m0 else per_block_cast_to_fp8(w)
    if ue8m0:
        sfa, sfb = get_mn_major_tma_aligned_packed_ue8m0_tensor(sfa), get_mn_major_tma_aligned_packed_ue8m0_tensor(sfb)
    return {"a": (a, sfa), "b": (b, sfb)}, x, w


def as_layout(layout: str, args: dict[str, Any]) -> dict[str, Any]:
    (a, sfa), (b, sfb) = args["a"], args["b"]
    if layout[0] == "t":
        a, sfa = a.t().contiguous(), sfa.t().contiguous()
    if layout[1] == "n":
        b, sfb = b.t().contiguous(), sfb.t().contiguous()
    return {**args, "a": (a, sfa), "b": (b, sfb)}


def poisoned(m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def within_one_rounding(got: torch.Tensor, ref: np.ndarray) -> bool:
    """``got`` is ``ref`` rounded once to got's dtype, give or take float32 accumulation (2**-20 of rms)."""
    rel = 2.0**-8 if got.dtype == torch.bfloat16 else 2.0**-22
    rms = float(np.sqrt(np.mean(ref**2))) if ref.size else 0.0
    return bool(np.all(np.abs(f64(got) - ref) <= rel * np.abs(ref) + 2.0**-20 * rms))


def test_reference_matches_a_hand_computed_case() -> None:
    # K = 130: block 0 holds k < 128, block 1 the 2-wide tail; SFB per 128 rows of B (N = 129 -> 2 blocks)
    a = torch.zeros(1, 130)
    a[0, 0], a[0, 127], a[0, 128] = 2.0, -1.5, 4.0
    b = torch.zeros(129, 130)
    b[0, 0], b[0, 127], b[0, 128] = 3.0, 2.0, 0.5
    b[128, 129], b[128, 0] = 1.0, 1.0
    sfa = torch.tensor([[0.5, 3.0]])
    sfb = torch.tensor([[2.0, 0.25], [10.0, 7.0]])
    out = poisoned(1, 129, torch.float32)
    deepport.fp8_gemm_nt((a.to(FP8), sfa), (b.to(FP8), sfb), out, backend="reference")
    # n = 0: block 0: 0.5*2*(2*3 + -1.5*2) = 3; block 1: 3*0.25*(4*0.5) = 1.5 -> 4.5
    # n = 128: block 0: 0.5*10*(2*1) = 10; block 1: a[0, 129] = 0 -> 10
    assert out[0, 0].item() == 4.5 and out[0, 128].item() == 10.0
    assert out[0, 1:128].eq(0).all()


@pytest.mark.parametrize("layout", op.LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_layout_computes_the_nt_answer(layout: str, backend: str) -> None:
    args, x, w = quantized(5, 320, 384, seed=1)
    ref = reference_f64(op.bind("nt", **args, out=poisoned(5, 320)))
    out = poisoned(5, 320)
    GEMMS[layout](**as_layout(layout, args), out=out, backend=backend)
    assert within_one_rounding(out, ref)
    assert calc_diff(f64(out), f64(x) @ f64(w).T) < 1e-3  # DeepGEMM's check against unquantized data


@pytest.mark.parametrize(("m", "n", "k"), [(1, 192, 128), (7, 130, 200), (3, 2112 // 8, 896), (64, 576 // 2, 512)])
def test_torch_matches_reference_on_edge_shapes(m: int, n: int, k: int) -> None:
    args, x, w = quantized(m, n, k, seed=m + n, outlier=True)
    out = poisoned(m, n)
    deepport.fp8_gemm_nt(**args, out=out, backend="torch")
    ref = reference_f64(op.bind("nt", **args, out=out))
    assert within_one_rounding(out, ref)
    assert calc_diff(f64(out), f64(x) @ f64(w).T) < 1e-3


def test_mn_major_scales_give_the_same_answer_and_their_padding_is_never_read() -> None:
    args, _, _ = quantized(6, 256, 384, seed=3)
    a, sfa = args["a"]
    storage = torch.full((3, 8), float("nan"))  # MN-major, M = 6 padded to 8 rows of NaN
    storage[:, :6] = sfa.t()
    padded = storage.t()[:6]
    assert padded.stride() == (1, 8)
    for backend in ("reference", "torch"):
        plain, mn_major = poisoned(6, 256), poisoned(6, 256)
        deepport.fp8_gemm_nt(**args, out=plain, backend=backend)
        deepport.fp8_gemm_nt((a, padded), args["b"], mn_major, backend=backend)
        assert torch.equal(plain, mn_major)
        aligned = get_mn_major_tma_aligned_tensor(sfa)
        deepport.fp8_gemm_nt((a, aligned), args["b"], mn_major, backend=backend)
        assert torch.equal(plain, mn_major)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ue8m0_and_per_row_recipes(backend: str) -> None:
    for kwargs in ({"ue8m0": True}, {"per_row_b": True}):
        args, x, w = quantized(4, 192, 640, seed=5, **kwargs)
        recipe = (1, 1, 128)
        out = poisoned(4, 192)
        deepport.fp8_gemm_nt(**args, out=out, recipe=recipe, backend=backend)
        ref = reference_f64(op.bind("nt", **args, out=out, recipe=recipe))
        assert within_one_rounding(out, ref)
        assert calc_diff(f64(out), f64(x) @ f64(w).T) < 1e-3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_accumulation_into_c_separately_and_in_place(backend: str) -> None:
    args, _, _ = quantized(3, 256, 256, seed=7)
    c = torch.randn(3, 256, generator=torch.Generator().manual_seed(8)) * 32
    out = poisoned(3, 256, torch.float32)
    deepport.fp8_gemm_nt(**args, out=out, c=c, backend=backend)
    ref = reference_f64(op.bind("nt", **args, out=out, c=c))
    assert within_one_rounding(out, ref)
    assert np.allclose(ref, f64(c) + reference_f64(op.bind("nt", **args, out=out)), rtol=0, atol=1e-9)
    in_place = c.clone()
    deepport.fp8_gemm_nt(**args, out=in_place, c=in_place, backend=backend)
    assert torch.equal(in_place, out)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float32_out_without_c_and_strided_out(backend: str) -> None:
    args, _, _ = quantized(4, 128, 256, seed=9)
    wide = poisoned(4, 200, torch.float32)
    out = wide[:, 10:138]  # row stride 200, last dimension contiguous
    deepport.fp8_gemm_nt(**args, out=out, backend=backend)
    assert within_one_rounding(out, reference_f64(op.bind("nt", **args, out=out)))
    assert wide[:, :10].isnan().all() and wide[:, 138:].isnan().all()  # nothing outside `out` written


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_m_zero_writes_nothing_and_needs_no_backend_call(backend: str) -> None:
    args, _, _ = quantized(0, 192, 256)
    out = poisoned(0, 192)
    deepport.fp8_gemm_nt(**args, out=out, backend=backend)
    assert out.shape == (0, 192)


def test_blocked_path_chunks_k_blocks_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    args, _, _ = quantized(3, 130, 1000, seed=11)
    whole = poisoned(3, 130)
    deepport.fp8_gemm_nt(**args, out=whole, backend="torch")
    monkeypatch.setitem(torch_fp8._BUDGET_BYTES, "cpu", 8 * 3 * 130 * 2)  # two K blocks per chunk
    chunked = poisoned(3, 130)
    deepport.fp8_gemm_nt(**args, out=chunked, backend="torch")
    assert within_one_rounding(chunked, reference_f64(op.bind("nt", **args, out=chunked)))
    assert (chunked.float() - whole.float()).abs().max() <= 2.0**-7 * whole.float().abs().max()


def test_nan_scale_factors_propagate_to_the_rows_they_scale() -> None:
    args, _, _ = quantized(3, 128, 256, seed=12)
    a, sfa = args["a"]
    sfa = sfa.clone()
    sfa[1, 1] = float("nan")
    for backend in ("reference", "torch"):
        out = torch.zeros(3, 128, dtype=torch.bfloat16)
        deepport.fp8_gemm_nt((a, sfa), args["b"], out, backend=backend)
        assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


def test_torch_path_reasons_are_data() -> None:
    args, _, _ = quantized(2, 192, 200)
    call = op.bind("nt", **args, out=poisoned(2, 192))
    chosen, reasons = torch_fp8.path(call.signature)
    assert chosen == "blocked"
    assert any("sm_90" in r and "got cpu" in r for r in reasons)
    assert any("K=200" in r for r in reasons)
    assert not any("N=" in r for r in reasons)  # 192 is a multiple of 16
    assert len(torch_fp8.SCALED_MM_REQUIREMENTS) == 6
