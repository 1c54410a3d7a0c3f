"""GPU tests of the grouped FP8 GEMMs: the torch backend on CUDA (cuBLAS block-scaled scaled_mm per group
where torch offers it, else the dequantize path) against the float64 reference, at DeepSeek-V3 sizes.
Skipped where no CUDA device is present; run on the device machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fp8_grouped_inputs import Grouped, contiguous_inputs, masked_inputs

import deepport
from deepport.backends.torch import fp8_gemm as dense
from deepport.conformance import fp8_bound, run_suite
from deepport.dispatch import device_info
from deepport.kernels import fp8_gemm
from deepport.kernels.f64.fp8_grouped_gemm import contiguous_f64, masked_rows_f64
from deepport.kernels.fp8_grouped_gemm import bind_contiguous, bind_masked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
OPS = ["m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"]


def _cuda(q: Grouped) -> Grouped:
    return Grouped(q.a.cuda(), q.sfa.cuda(), q.b.cuda(), q.sfb.cuda(), q.gran_n)


def _within_bound(got: torch.Tensor, want: torch.Tensor, magnitudes: np.ndarray, k: int) -> None:
    """The suite's bound (deepport.conformance.fp8_bound) against the reference backend's bf16 result: two
    roundings (got and want) plus gamma(K) * S for the limited-precision accumulation."""
    g, w = got.cpu().to(torch.float64).numpy(), want.cpu().to(torch.float64).numpy()
    assert not np.isnan(g).any()
    over = fp8_bound.excess(g, w, magnitudes, k, 2.0**-8, roundings=2)
    assert over <= 1.0, f"error {over:.3g}x the bound"


def test_deepseek_shapes_take_the_cublas_path_on_an_h200() -> None:
    if device_info(torch.device("cuda")).arch != "sm_90":
        pytest.skip("cuBLAS block-scaled path is declared for sm_90 only")
    q, _ = contiguous_inputs([128], n=4096, k=7168)
    q = _cuda(q)
    rows = q.a[:128], q.sfa[:128]
    call = fp8_gemm.bind("nt", rows, (q.b[0], q.sfb[0]), torch.empty(128, 4096, dtype=torch.bfloat16, device="cuda"))
    assert dense.path(call.signature) == ("scaled_mm", [])


@pytest.mark.parametrize(("n", "k", "ue8m0", "per_row_b"), [(4096, 7168, False, False), (7168, 2048, False, False),
                                                          (4096, 7168, True, False), (512, 2048, False, True),
                                                          (200, 320, False, False)])
def test_contiguous_on_cuda_matches_the_reference(n: int, k: int, ue8m0: bool, per_row_b: bool) -> None:
    q, m_indices = contiguous_inputs([300, 0, 1, 513], n=n, k=k, ue8m0=ue8m0, per_row_b=per_row_b)
    q, m_indices = _cuda(q), m_indices.cuda()
    recipe = (1, 1, 128) if per_row_b else None
    out = torch.full((int(m_indices.shape[0]), n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, recipe=recipe, backend="torch")
    want = torch.empty_like(out)
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, want, m_indices, recipe=recipe,
                                              backend="reference")
    call = bind_contiguous(q.pair_a, q.pair_b, out, m_indices, recipe=recipe)
    _within_bound(out, want, contiguous_f64(call, m_indices.cpu().numpy(), absolute=True), k)
    pad = m_indices < 0
    assert torch.equal(out[pad].view(torch.int16), torch.zeros_like(out[pad].view(torch.int16)))


@pytest.mark.parametrize(("n", "k"), [(4096, 7168), (7168, 2048)])
def test_masked_on_cuda_matches_the_reference_and_leaves_other_rows(n: int, k: int) -> None:
    masked = [0, 1, 256, 20, 100, 255]
    q, masked_m = masked_inputs(6, 256, masked, n=n, k=k)
    q, masked_m = _cuda(q), masked_m.cuda()
    before = (torch.randn(6, 256, n, device="cuda") * 100).to(torch.bfloat16)
    out = before.clone()
    deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, out, masked_m, 64, backend="torch")
    want = before.clone()
    deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, want, masked_m, 64, backend="reference")
    magnitudes = masked_rows_f64(bind_masked(q.pair_a, q.pair_b, out, masked_m, 64), masked_m.cpu().numpy(),
                                 absolute=True)
    for g, m in enumerate(masked):
        if m:
            _within_bound(out[g, :m], want[g, :m], magnitudes[g], k)
        assert torch.equal(out[g, m:].view(torch.int16), before[g, m:].view(torch.int16))


def test_value_checks_run_on_cuda_tensors() -> None:
    q, m_indices = contiguous_inputs([100, 28])
    q, m_indices = _cuda(q), m_indices.cuda()
    m_indices[130] = 2
    out = torch.empty(256, 160, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(deepport.InvalidArgumentError, match=r"m_indices\[130\] = 2"):
        deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grouped_smoke_tier_passes_on_cuda(backend: str) -> None:
    run = run_suite([backend], "smoke", device="cuda", ops=OPS)
    bad = [f"{r.case_id}: {r.status} {r.message}" for r in run.cases if r.status.value != "pass"]
    assert not bad, "\n".join(bad) + f"\nrun seed {run.run_seed}"
