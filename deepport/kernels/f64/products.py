"""Float64 matrix products ``x @ y.T`` for the FP8 GEMM definitions: NumPy, or, inside
:func:`products_on`, a CUDA device's IEEE float64 GEMM (DGEMM).

The reference *backend* always runs on NumPy. The conformance runner computes its oracles inside
``products_on(<the run's device>)``: a full-tier DeepSeek-V3 case is up to 2 TFLOP of float64, minutes of
host time per run, and milliseconds of DGEMM. Both are float64 with round-to-nearest; they differ only
in summation order (relative differences around 1e-15, nine orders below every FP8 tolerance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
import torch

_DEVICE: ContextVar[torch.device | None] = ContextVar("deepport_f64_products_device", default=None)
_MIN_FLOP_ON_DEVICE = 1 << 28  # smaller products stay on the host: the copies would cost more


@contextlib.contextmanager
def products_on(device: torch.device | str) -> Iterator[None]:
    """Run large :func:`matmul_nt` products on ``device`` when it is a CUDA device (else on NumPy)."""
    dev = torch.device(device)
    token = _DEVICE.set(dev if dev.type == "cuda" else None)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def matmul_nt(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y.T`` in float64: ``x`` ``[M, K]``, ``y`` ``[N, K]`` float64 arrays, result ``[M, N]``."""
    device = _DEVICE.get()
    if device is None or 2 * x.shape[0] * y.shape[0] * x.shape[1] < _MIN_FLOP_ON_DEVICE:
        out: np.ndarray = x @ y.T
        return out
    with torch.no_grad():
        xd = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(device)
        yd = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64)).to(device)
        result: np.ndarray = (xd @ yd.T).cpu().numpy()
    return result
