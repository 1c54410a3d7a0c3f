"""DeepGEMM's ``deep_gemm.testing`` helpers: accuracy metrics and a portable ``bench``.

``bench`` times on any device (CUDA events on CUDA, as upstream; ``time.perf_counter`` after a device
synchronisation elsewhere) and skips upstream's L2 flush and "high precision" warm-up kernel, which
only sharpen CUDA figures. Not provided: ``bench_kineto`` (it filters CUPTI kernel records by
DeepGEMM's kernel names, which deepport's backends do not carry; use ``bench`` or
``python -m deepport bench``), ``get_arch_major``, ``test_filter``, ``ignore_env`` (DeepGEMM's own
test-suite switches over SM90/SM100).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from deepport.compat._absent import module_getattr
from deepport.kernels import _checks as chk

_SUITE = "a switch of DeepGEMM's own test suite over SM90/SM100 kernels"
__getattr__ = module_getattr(__name__, {
    "bench_kineto": "it filters CUPTI records by DeepGEMM kernel names, which deepport's backends do not carry; use "
                    "bench or `python -m deepport bench`",
    "get_arch_major": _SUITE, "test_filter": _SUITE, "ignore_env": _SUITE,
})

__all__ = ["assert_bitwise_equal", "bench", "calc_diff", "count_bytes"]


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


def assert_bitwise_equal(x: torch.Tensor, y: torch.Tensor, label: str = "") -> None:
    """Raise ``AssertionError`` unless ``x`` and ``y`` have the same shape, dtype and bytes; the message
    names the first differing element and both values (DeepGEMM's layout tests use it)."""
    where = f" ({label})" if label else ""
    if x.shape != y.shape or x.dtype != y.dtype:
        raise AssertionError(f"expected equal shapes and dtypes{where}, got {tuple(x.shape)} {x.dtype} and "
                             f"{tuple(y.shape)} {y.dtype}")
    x_bytes, y_bytes = x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)
    if torch.equal(x_bytes, y_bytes):
        return
    differ = (x_bytes != y_bytes).flatten()
    first = int(differ.nonzero()[0])
    element = first // x.element_size()
    coord = tuple(int(i) for i in torch.unravel_index(torch.tensor(element), tuple(x.shape)))
    raise AssertionError(f"bitwise mismatch{where}: {int(differ.sum())} of {differ.numel()} bytes differ, first at "
                         f"element {coord}: {x.flatten()[element].item()!r} vs {y.flatten()[element].item()!r}")


def bench(fn: Callable[[], Any], num_warmups: int = 5, num_tests: int = 10, high_precision: bool = False) -> float:
    """Seconds per call of ``fn``: ``num_warmups`` untimed calls, then the mean of ``num_tests`` (see the
    module docstring for how; ``high_precision`` is accepted and has no effect)."""
    chk.expect_int("num_warmups", num_warmups, minimum=0)
    chk.expect_int("num_tests", num_tests, minimum=1)
    chk.expect_bool("high_precision", high_precision)
    for _ in range(num_warmups):
        fn()
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if on_cuda:
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
        start.record()
        for _ in range(num_tests):
            fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end)) / num_tests / 1e3
    began = time.perf_counter()
    for _ in range(num_tests):
        fn()
    return (time.perf_counter() - began) / num_tests
