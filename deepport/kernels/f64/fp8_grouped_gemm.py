"""M-grouped block-scaled FP8 GEMMs in NumPy float64: the definition of both grouped layouts.

Each group is the dense op's float64 definition (:func:`deepport.kernels.f64.fp8_gemm.fp8_gemm_f64`)
on the group's rows and ``B[g]``. Only the rows the op says are read are copied to the host, so
poison in padding rows or rows past ``masked_m`` never enters.
"""

from __future__ import annotations

import numpy as np
import torch

from deepport.kernels.f64.fp8_gemm import fp8_gemm_f64, scale_factors_f64
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall, ScaledOperand


def _scales(op: ScaledOperand, k: int) -> np.ndarray:
    """The operand's SFs as float64 ``[G?, rows, ceil(K/128)]`` (each group decoded by the dense helper)."""
    if op.sf.dim() == 2:
        return scale_factors_f64(op.sf, op.sf_format, k)
    return np.stack([scale_factors_f64(sf, op.sf_format, k) for sf in op.sf]) if op.sf.shape[0] else \
        np.zeros((0, *op.sf.shape[1:]))


def contiguous_f64(call: ContiguousCall, m_indices: np.ndarray, *, absolute: bool = False,
                   magnitudes: np.ndarray | None = None) -> np.ndarray:
    """``out [M_sum, N]`` in float64: per group, its rows times ``B[g]^T``; padding rows 0. With ``absolute``,
    the sums of the terms' magnitudes instead, or with ``magnitudes`` (``[M_sum, N]``) also those, in the
    same pass (:func:`~deepport.kernels.f64.fp8_gemm.fp8_gemm_f64`)."""
    k, n = call.signature.k, call.signature.n
    sfa, sfb = _scales(call.a, k), _scales(call.b, k)
    out = np.zeros((call.m_sum, n), dtype=np.float64)
    if magnitudes is not None:
        magnitudes[...] = 0.0
    for g in range(call.signature.num_groups):
        rows = np.flatnonzero(m_indices == g)
        if rows.size:
            picked = call.a.data.index_select(0, torch.from_numpy(rows).to(call.a.data.device))
            mag = None if magnitudes is None else np.zeros((rows.size, n))
            out[rows] = fp8_gemm_f64(picked, sfa[rows], call.b.data[g], sfb[g], call.b.gran_mn, absolute=absolute,
                                     magnitudes=mag)
            if magnitudes is not None:
                magnitudes[rows] = mag
    return out


def masked_rows_f64(call: MaskedCall, masked_m: np.ndarray, *, absolute: bool = False,
                    magnitudes: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per group ``g``, its computed rows ``out[g, :masked_m[g]]`` ``[masked_m[g], N]`` in float64 (rows
    past ``masked_m[g]`` are not part of the result: the op leaves them as they were). With ``absolute``,
    the sums of the terms' magnitudes instead, or with ``magnitudes`` (an empty list) also those, appended
    per group, in the same pass."""
    k, n = call.signature.k, call.signature.n
    sfa, sfb = _scales(call.a, k), _scales(call.b, k)
    blocks = []
    for g, rows in enumerate(int(x) for x in masked_m):
        mag = np.zeros((rows, n), dtype=np.float64)
        blocks.append(fp8_gemm_f64(call.a.data[g, :rows], sfa[g, :rows], call.b.data[g], sfb[g], call.b.gran_mn,
                                   absolute=absolute, magnitudes=mag if magnitudes is not None else None)
                      if rows else np.zeros((0, n), dtype=np.float64))
        if magnitudes is not None:
            magnitudes.append(mag)
    return blocks


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    m_indices = call.m_indices_host if call.m_indices_host is not None else call.m_indices.cpu().numpy()
    out.copy_(torch.from_numpy(contiguous_f64(call, m_indices)).to(out.dtype))


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    masked_m = call.masked_m_host if call.masked_m_host is not None else call.masked_m.cpu().numpy()
    for g, block in enumerate(masked_rows_f64(call, masked_m)):
        if block.shape[0]:
            out[g, : block.shape[0]] = torch.from_numpy(block).to(out.dtype)
