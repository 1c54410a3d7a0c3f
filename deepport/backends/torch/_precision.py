"""Numerics settings the torch backend's kernels share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Run float32 matmuls on ``device`` in full float32, whatever the process-wide TF32 setting is (it is
    process-wide state: restored on exit, not thread-safe)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
