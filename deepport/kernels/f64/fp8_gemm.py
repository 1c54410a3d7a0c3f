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
                 c: np.ndarray | None = None) -> np.ndarray:
    """``D [M, N]`` in float64, exactly as :mod:`deepport.kernels.fp8_gemm` defines it: ``a`` ``[M, K]`` and ``b``
    ``[N, K]`` FP8 (any strides), ``sfa`` ``[M, kb]`` and ``sfb`` ``[ceil(N / gran_n), kb]`` float64 multipliers,
    optional ``c`` ``[M, N]``. B is dequantized ``1024`` rows at a time, so the working set stays
    ``O((M + 1024) * K)`` float64."""
    m, n = int(a.shape[0]), int(b.shape[0])
    deq_a = dequantize_f64(a, sfa)
    out = np.zeros((m, n), dtype=np.float64) if c is None else np.array(c, dtype=np.float64, copy=True)
    for start in range(0, n, _ROWS_PER_CHUNK):
        stop = min(n, start + _ROWS_PER_CHUNK)
        rows = np.arange(start, stop) // gran_n
        out[:, start:stop] += matmul_nt(deq_a, dequantize_f64(b[start:stop], sfb[rows]))
    return out


def reference_f64(call: FP8GemmCall) -> np.ndarray:
    """The call's exact answer in float64 (before rounding to ``out``'s dtype)."""
    sfa = scale_factors_f64(call.sfa, call.sf_format, call.k)
    sfb = scale_factors_f64(call.sfb, call.sf_format, call.k)
    c = None if call.c is None else _f64(call.c)
    return fp8_gemm_f64(call.a, sfa, call.b, sfb, call.gran_n, c)


def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Write the float64 answer, rounded once to ``out``'s dtype, into ``out`` (on any device)."""
    out.copy_(torch.from_numpy(reference_f64(call)).to(out.dtype))
