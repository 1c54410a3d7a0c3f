"""Dense block-scaled FP8 GEMM in NumPy float64: the definition every backend and the suite measure against."""

from __future__ import annotations

import numpy as np
import torch

from deepport.kernels._fp8_checks import SF_UE8M0
from deepport.kernels.f64.products import matmul_nt
from deepport.kernels.fp8_gemm import FP8GemmCall
from deepport.kernels.fp8_layout import BLOCK_K, num_k_blocks, unpack_ue8m0

_ROWS_PER_CHUNK = 1024  # rows of B dequantized at a time (bounds the float64 working set)


def _f64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy on the host of the logical elements (strided padding is never read)."""
    return t.detach().to("cpu").to(torch.float64).numpy()


def scale_factors_f64(sf: torch.Tensor, sf_format: str, k: int) -> np.ndarray:
    """SFs ``[rows, ceil(K/128)]`` as float64 multipliers (packed UE8M0 words decoded)."""
    if sf_format == SF_UE8M0:
        return _f64(unpack_ue8m0(sf.detach().to("cpu"), num_k_blocks(k)))
    return _f64(sf)


def dequantize_f64(x: torch.Tensor, sf_rows: np.ndarray) -> np.ndarray:
    """``x[r, k] * sf_rows[r, k // 128]`` in float64 (exact: 4 significant bits times 24)."""
    k = int(x.shape[1])
    deq: np.ndarray = _f64(x) * np.repeat(sf_rows, BLOCK_K, axis=1)[:, :k]
    return deq


def fp8_gemm_f64(a: torch.Tensor, sfa: np.ndarray, b: torch.Tensor, sfb: np.ndarray, gran_n: int,
                 c: np.ndarray | None = None, *, absolute: bool = False,
                 magnitudes: np.ndarray | None = None) -> np.ndarray:
    """``D [M, N]`` in float64, exactly as :mod:`deepport.kernels.fp8_gemm` defines it: ``a`` ``[M, K]`` and ``b``
    ``[N, K]`` FP8 (any strides), ``sfa`` ``[M, kb]`` and ``sfb`` ``[ceil(N / gran_n), kb]`` float64 multipliers,
    optional ``c`` ``[M, N]``. B is dequantized ``1024`` rows at a time, so the working set stays
    ``O((M + 1024) * K)`` float64.

    ``S = |C| + sum_k |SFA * SFB * A * B|`` (every term's magnitude, the scale of the accumulation error an
    FP8 kernel may make: :mod:`deepport.conformance.fp8_bound`) is returned instead of D with
    ``absolute``, or written into ``magnitudes`` (float64 ``[M, N]``) in the same pass over the operands."""
    m, n = int(a.shape[0]), int(b.shape[0])
    deq_a = dequantize_f64(a, sfa)
    abs_a = np.abs(deq_a) if absolute or magnitudes is not None else None
    if absolute:
        deq_a, c = np.asarray(abs_a), None if c is None else np.abs(c)
    out = np.zeros((m, n), dtype=np.float64) if c is None else np.array(c, dtype=np.float64, copy=True)
    if magnitudes is not None:
        magnitudes[...] = 0.0 if c is None else np.abs(c)
    for start in range(0, n, _ROWS_PER_CHUNK):
        stop = min(n, start + _ROWS_PER_CHUNK)
        rows = np.arange(start, stop) // gran_n
        deq_b = dequantize_f64(b[start:stop], sfb[rows])
        out[:, start:stop] += matmul_nt(deq_a, np.abs(deq_b) if absolute else deq_b)
        if magnitudes is not None and abs_a is not None:
            magnitudes[:, start:stop] += matmul_nt(abs_a, np.abs(deq_b))
    return out


def reference_f64(call: FP8GemmCall, *, absolute: bool = False, magnitudes: np.ndarray | None = None) -> np.ndarray:
    """The call's exact answer in float64 (before rounding to ``out``'s dtype); with ``absolute`` or
    ``magnitudes``, the sum of its terms' magnitudes (:func:`fp8_gemm_f64`)."""
    sfa = scale_factors_f64(call.sfa, call.sf_format, call.k)
    sfb = scale_factors_f64(call.sfb, call.sf_format, call.k)
    c = None if call.c is None else _f64(call.c)
    return fp8_gemm_f64(call.a, sfa, call.b, sfb, call.gran_n, c, absolute=absolute, magnitudes=magnitudes)


def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Write the float64 answer, rounded once to ``out``'s dtype, into ``out`` (on any device)."""
    out.copy_(torch.from_numpy(reference_f64(call)).to(out.dtype))
