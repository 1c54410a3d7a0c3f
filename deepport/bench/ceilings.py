"""Ceilings: the device's physical limits, measured by microbenchmarks in the same run as the kernels.

==================  ========  ===========================================================================
name                unit      how (CUDA / other devices)
==================  ========  ===========================================================================
``hbm_copy``        GB/s      bf16 device-to-device copy of 4 GiB (1 GiB with ``quick``), bytes read + written
``bf16_matmul``     TFLOP/s   torch.mm bf16 8192^3
``fp8_matmul``      TFLOP/s   torch._scaled_mm e4m3 8192^3, per-tensor scales, bf16 out
``cpu_memcpy``      GB/s      fp32 copy of 256 MiB (64 MiB quick), bytes read + written
``cpu_fp32_matmul`` TFLOP/s   torch.mm fp32 1024^3 (512^3 quick)
==================  ========  ===========================================================================

Timing: a microbenchmark of 1 ms or more runs as single calls between CUDA events, the method the
published ceilings were measured with, never as a CUDA graph (``time_calls(graph_long_calls=False)``):
captured in a graph, the device-to-device copy becomes a memcpy node run by the copy engines and reads
about two thirds of what the SMs copy.

A config names a logical ceiling (``"memory"``, ``"bf16_matmul"``, ``"fp8_matmul"``, or one added to
:data:`CEILINGS`); :func:`resolve` maps it to the microbenchmark for the run's device. Another op adds
its ceiling by adding a :class:`Ceiling` to :data:`CEILINGS` (e.g. an NVLink all-to-all measured by
spawned processes) and, if a CPU stand-in exists, an entry to :data:`_CPU_STAND_INS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.bench.timing import time_calls


@dataclass(frozen=True)
class Ceiling:
    name: str
    unit: str  # "GB/s" or "TFLOP/s"
    how: str
    measure: Callable[[torch.device, bool], tuple[float, dict[str, Any]]]  # -> (figure, timing summary)


@dataclass
class CeilingResult:
    name: str
    unit: str
    how: str
    value: float | None = None
    error: str | None = None
    timing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "how": self.how, "value": self.value, "error": self.error,
                "timing": self.timing}


def _rate(work: float, fn: Callable[[], None], device: torch.device, quick: bool, scale: float) -> tuple[
        float, dict[str, Any]]:
    timing = time_calls([fn], device, samples=5 if quick else 20, warmup=2, graph_long_calls=False)
    return work / (timing.median_us * 1e-6) / scale, timing.summary()


def _copy(dtype: torch.dtype, full_bytes: int, quick_bytes: int) -> Callable[[torch.device, bool], tuple[
        float, dict[str, Any]]]:
    def measure(device: torch.device, quick: bool) -> tuple[float, dict[str, Any]]:
        size = quick_bytes if quick else full_bytes
        numel = size // torch.empty((), dtype=dtype).element_size()
        src = torch.rand(numel, device=device).to(dtype)
        dst = torch.empty_like(src)

        def run() -> None:
            dst.copy_(src)
        return _rate(2.0 * size, run, device, quick, 1e9)
    return measure


def _matmul(dtype: torch.dtype, full_n: int, quick_n: int) -> Callable[[torch.device, bool], tuple[
        float, dict[str, Any]]]:
    def measure(device: torch.device, quick: bool) -> tuple[float, dict[str, Any]]:
        n = quick_n if quick else full_n
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)

        def run() -> None:
            torch.mm(a, b, out=out)
        return _rate(2.0 * n**3, run, device, quick, 1e12)
    return measure


def _fp8_scaled_mm(device: torch.device, quick: bool) -> tuple[float, dict[str, Any]]:
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS wants
    one = torch.ones((), device=device, dtype=torch.float32)

    def run() -> None:
        torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)
    return _rate(2.0 * n**3, run, device, quick, 1e12)


CEILINGS: dict[str, Ceiling] = {
    "hbm_copy": Ceiling("hbm_copy", "GB/s", "bf16 device-to-device copy, bytes read + written",
                        _copy(torch.bfloat16, 4 << 30, 1 << 30)),
    "bf16_matmul": Ceiling("bf16_matmul", "TFLOP/s", "torch.mm bf16 8192^3", _matmul(torch.bfloat16, 8192, 8192)),
    "fp8_matmul": Ceiling("fp8_matmul", "TFLOP/s", "torch._scaled_mm e4m3 8192^3, per-tensor scales, bf16 out",
                          _fp8_scaled_mm),
    "cpu_memcpy": Ceiling("cpu_memcpy", "GB/s", "fp32 copy, bytes read + written",
                          _copy(torch.float32, 256 << 20, 64 << 20)),
    "cpu_fp32_matmul": Ceiling("cpu_fp32_matmul", "TFLOP/s", "torch.mm fp32 n^3 (1024, quick 512)",
                               _matmul(torch.float32, 1024, 512)),
}

_GPU_NAMES = {"memory": "hbm_copy"}
_CPU_STAND_INS = {"memory": "cpu_memcpy", "bf16_matmul": "cpu_fp32_matmul", "fp8_matmul": "cpu_fp32_matmul"}


def resolve(logical: str, device_type: str) -> str:
    """The microbenchmark that bounds a config whose logical ceiling is ``logical`` on ``device_type``."""
    name = _CPU_STAND_INS.get(logical, logical) if device_type == "cpu" else _GPU_NAMES.get(logical, logical)
    if name not in CEILINGS:
        raise KeyError(f"no ceiling {name!r} (for {logical!r} on {device_type}); known: {sorted(CEILINGS)}")
    return name


def measure(name: str, device: torch.device, quick: bool) -> CeilingResult:
    """Run one ceiling's microbenchmark; an error is recorded, not raised (the run goes on without it)."""
    ceiling = CEILINGS[name]
    result = CeilingResult(ceiling.name, ceiling.unit, ceiling.how)
    try:
        result.value, result.timing = ceiling.measure(device, quick)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
