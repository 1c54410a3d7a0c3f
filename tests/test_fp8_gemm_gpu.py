"""Dense FP8 GEMM on a CUDA device: the torch backend's cuBLAS ``scaled_mm`` path and its blocked
fallback, against the float64 reference. Skipped where no GPU is present; run on the device machine:
``python -m pytest -q -m gpu tests/test_fp8_gemm_gpu.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import deepport
from deepport.backends.torch import fp8_gemm as torch_fp8
from deepport.conformance import fp8_bound
from deepport.conformance.checker import calc_diff
from deepport.kernels import fp8_gemm as op
from deepport.kernels.f64.fp8_gemm import reference_f64
from deepport.kernels.fp8_layout import (
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(m: int, n: int, k: int, *, seed: int = 0, ue8m0: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """CUDA NT inputs quantized on the GPU, and the unquantized product x @ w^T in float64."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, w = torch.randn(m, k, generator=g).cuda(), torch.randn(n, k, generator=g).cuda()
    a, sfa = per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    if ue8m0:
        b, sfb = per_token_cast_to_fp8(w, use_ue8m0=True)
        sfa, sfb = get_mn_major_tma_aligned_packed_ue8m0_tensor(sfa), get_mn_major_tma_aligned_packed_ue8m0_tensor(sfb)
    else:
        b, sfb = per_block_cast_to_fp8(w)
        sfa = get_mn_major_tma_aligned_tensor(sfa)
    exact = x.double().cpu().numpy() @ w.double().cpu().numpy().T
    return {"a": (a, sfa), "b": (b, sfb)}, exact


def _close(out: torch.Tensor, call: op.FP8GemmCall) -> None:
    """The suite's bound against the simulated reference: one rounding of ``out`` plus gamma(K) * S for the
    limited-precision accumulation (deepport.conformance.fp8_bound)."""
    u_out = 2.0**-8 if out.dtype == torch.bfloat16 else 2.0**-24
    over = fp8_bound.excess(out.double().cpu().numpy(), reference_f64(call), reference_f64(call, absolute=True),
                            call.k, u_out)
    assert over <= 1.0, f"error {over:.3g}x the bound"


@pytest.fixture
def scaled_mm_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of torch.nn.functional.scaled_mm (the cuBLAS path)."""
    calls: list[int] = []
    real: Callable[..., torch.Tensor] = getattr(torch.nn.functional, "scaled_mm")  # noqa: B009 - absent before 2.10

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_mm", counting)
    return calls


@pytest.mark.parametrize(("m", "n", "k"), [(64, 2112, 7168), (1, 576, 7168), (3, 256, 512), (17, 2112, 512),
                                            (128, 24576, 1536), (4096, 7168, 2048)])
def test_scaled_mm_path_matches_reference(m: int, n: int, k: int, scaled_mm_calls: list[int]) -> None:
    args, exact = _inputs(m, n, k)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    call = op.bind("nt", **args, out=out)
    if torch.cuda.get_device_capability() == (9, 0):
        assert torch_fp8.path(call.signature) == ("scaled_mm", [])
    deepport.fp8_gemm_nt(**args, out=out, backend="torch")
    assert len(scaled_mm_calls) == (1 if torch_fp8.path(call.signature)[0] == "scaled_mm" else 0)
    _close(out, call)
    assert calc_diff(out.double().cpu().numpy(), exact) < 1e-3


@pytest.mark.parametrize("layout", ["nn", "tn", "tt"])
def test_scaled_mm_path_other_layouts(layout: str) -> None:
    args, exact = _inputs(96, 1024, 1024, seed=1)
    (a, sfa), (b, sfb) = args["a"], args["b"]
    if layout[0] == "t":
        a, sfa = a.t().contiguous(), sfa.t().contiguous()
    if layout[1] == "n":
        b, sfb = b.t().contiguous(), sfb.t().contiguous()
    out = torch.full((96, 1024), float("nan"), dtype=torch.bfloat16, device="cuda")
    getattr(deepport, f"fp8_gemm_{layout}")((a, sfa), (b, sfb), out, backend="torch")
    _close(out, op.bind("nt", **args, out=out))
    assert calc_diff(out.double().cpu().numpy(), exact) < 1e-3


def test_blocked_fallback_on_cuda_for_k_tails_ue8m0_and_accumulation(scaled_mm_calls: list[int]) -> None:
    for m, n, k, ue8m0, accumulate in [(5, 2112, 200, False, False), (33, 512, 1024, True, False),
                                       (17, 256, 640, False, True)]:
        args, _ = _inputs(m, n, k, seed=m, ue8m0=ue8m0)
        dtype = torch.float32 if accumulate else torch.bfloat16
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        c = torch.randn(m, n, device="cuda") * 32 if accumulate else None
        call = op.bind("nt", **args, out=out, c=c)
        assert torch_fp8.path(call.signature)[0] == "blocked"
        deepport.fp8_gemm_nt(**args, out=out, c=c, backend="torch")
        _close(out, call)
    assert scaled_mm_calls == []


def test_automatic_choice_on_cuda_is_the_measured_fastest_else_hopper_then_triton_then_torch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from deepport.dispatch import device_info, perf_table, registry
    from deepport.kernels import bind_call

    for var in ("DEEPPORT_BACKEND", "DEEPPORT_BACKEND_FP8_GEMM_NT", "DEEPPORT_SELECTION", "DEEPPORT_PERF_TABLE"):
        monkeypatch.delenv(var, raising=False)
    args, _ = _inputs(4, 256, 512)
    out = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda")
    signature = bind_call("fp8_gemm_nt", **args, out=out)
    able = [name for name in ("hopper", "triton", "torch") if not registry.get(name).reasons("fp8_gemm_nt", signature)]
    assert able and able[-1] == "torch"
    found = deepport.explain("fp8_gemm_nt", **args, out=out)
    if perf_table.family(device_info(out.device)) == "nvidia-sm90":  # the shipped table measured M <= 64
        assert found.measured is not None and found.measured.bucket == "m<=64", found.reason
        assert found.chosen == next(b for b in found.measured.backends if b in able), found.reason
    monkeypatch.setenv("DEEPPORT_SELECTION", "priority")
    found = deepport.explain("fp8_gemm_nt", **args, out=out)
    assert found.chosen == able[0] and found.reason.startswith("DEEPPORT_SELECTION=priority"), found.reason
