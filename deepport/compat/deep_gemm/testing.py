"""DeepGEMM's ``deep_gemm.testing`` accuracy helpers (the benchmarking ones need CUPTI and are not provided)."""

from __future__ import annotations

import torch

__all__ = ["calc_diff", "count_bytes"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float | torch.Tensor:
    """DeepGEMM's global similarity error ``1 - 2 * sum(x * y) / sum(x^2 + y^2)`` in float64: 0 for equal
    tensors, 0.0 when both are all zeros. Upstream's accuracy bar: ``< 1e-3`` for FP8 x FP8 against the
    unquantized product. Returns a 0-d float64 tensor (a Python ``0.0`` for all-zero inputs), as upstream."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if bool(denominator == 0):
        return 0.0
    return 1 - 2 * (x * y).sum() / denominator


def count_bytes(*tensors: object) -> int:
    """Bytes of every tensor given (tuples and lists are walked; ``None`` counts 0), for GB/s figures."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
