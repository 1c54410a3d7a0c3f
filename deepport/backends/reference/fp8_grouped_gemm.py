"""M-grouped block-scaled FP8 GEMMs in NumPy float64: the definition of both grouped layouts.

Each group's rows are dequantized exactly (every e4m3 value times its float32 / UE8M0 scale is exact
in float64) and multiplied by the group's dequantized ``B[g]`` in float64; only the rows the op says
are read are copied to the host, so poison in padding rows or rows past ``masked_m`` never enters.
"""

from __future__ import annotations

import numpy as np
import torch

from deepport.kernels._fp8_checks import SF_UE8M0
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall, ScaledOperand
from deepport.kernels.fp8_layout import BLOCK_K, num_k_blocks, unpack_ue8m0


def scales_f64(op: ScaledOperand, k: int) -> np.ndarray:
    """The operand's scale factors as float64 ``[G?, ceil(MN/gran_mn), ceil(K/128)]`` on the host (packed
    UE8M0 decoded exactly)."""
    sf = op.sf.detach().cpu()
    if op.sf_format == SF_UE8M0:
        sf = unpack_ue8m0(sf, num_k_blocks(k))
    values: np.ndarray = sf.to(torch.float64).numpy()
    return values


def _expand(sf: np.ndarray, rows: int, gran_mn: int, k: int) -> np.ndarray:
    """Scale per element ``[rows, k]`` from per-block scales ``[ceil(rows/gran_mn), ceil(k/128)]``."""
    return np.repeat(np.repeat(sf, gran_mn, axis=0)[:rows], BLOCK_K, axis=1)[:, :k]


def dequantize_rows_f64(x: torch.Tensor, sf64: np.ndarray, gran_mn: int) -> np.ndarray:
    """``x`` (e4m3 ``[R, K]``, any device) times its block scales ``sf64`` (``[ceil(R/gran_mn), kb]``)."""
    rows, k = (int(s) for s in x.shape)
    values: np.ndarray = x.detach().to("cpu").to(torch.float64).numpy()
    scaled: np.ndarray = values * _expand(sf64, rows, gran_mn, k)
    return scaled


def _group_b_f64(b: ScaledOperand, sfb64: np.ndarray, g: int) -> np.ndarray:
    return dequantize_rows_f64(b.data[g], sfb64[g], b.gran_mn)


def contiguous_f64(call: ContiguousCall, m_indices: np.ndarray) -> np.ndarray:
    """``out [M_sum, N]`` in float64: per group, the dequantized rows times ``B[g]^T``; padding rows 0."""
    k = int(call.a.data.shape[1])
    n = int(call.b.data.shape[1])
    sfa64 = scales_f64(call.a, k)
    sfb64 = scales_f64(call.b, k)
    out = np.zeros((call.m_sum, n), dtype=np.float64)
    for g in range(int(call.b.data.shape[0])):
        rows = np.flatnonzero(m_indices == g)
        if rows.size == 0:
            continue
        picked = torch.from_numpy(rows).to(call.a.data.device)
        a64 = dequantize_rows_f64(call.a.data.index_select(0, picked), sfa64[rows], 1)
        out[rows] = a64 @ _group_b_f64(call.b, sfb64, g).T
    return out


def masked_rows_f64(call: MaskedCall, masked_m: np.ndarray) -> list[np.ndarray]:
    """Per group ``g``, its computed rows ``out[g, :masked_m[g]]`` ``[masked_m[g], N]`` in float64 (rows
    past ``masked_m[g]`` are not part of the result: the op leaves them as they were)."""
    k, n = int(call.a.data.shape[2]), int(call.b.data.shape[1])
    sfa64 = scales_f64(call.a, k)
    sfb64 = scales_f64(call.b, k)
    blocks = []
    for g, rows in enumerate(int(x) for x in masked_m):
        if rows == 0:
            blocks.append(np.zeros((0, n), dtype=np.float64))
            continue
        a64 = dequantize_rows_f64(call.a.data[g, :rows], sfa64[g, :rows], 1)
        blocks.append(a64 @ _group_b_f64(call.b, sfb64, g).T)
    return blocks


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    m_indices = call.m_indices_host if call.m_indices_host is not None else call.m_indices.cpu().numpy()
    out.copy_(torch.from_numpy(contiguous_f64(call, m_indices)).to(out.dtype))


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    masked_m = call.masked_m_host if call.masked_m_host is not None else call.masked_m.cpu().numpy()
    for g, block in enumerate(masked_rows_f64(call, masked_m)):
        if block.shape[0]:
            out[g, : block.shape[0]] = torch.from_numpy(block).to(out.dtype)
