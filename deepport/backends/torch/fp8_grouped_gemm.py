"""M-grouped block-scaled FP8 GEMMs in PyTorch: one GEMM per group segment.

Two paths, chosen by the device and the call, never by a failed attempt:

- **cuBLAS** (a CUDA device whose torch has ``torch.nn.functional.scaled_mm`` with
  ``ScalingType.BlockWise1x128``, K a multiple of 128): per group segment, one block-scaled
  ``scaled_mm`` (1x128 x 128x128 scales, or 1x128 x 1x128 for per-row SFB; UE8M0 scales unpacked to
  float32, exact). torch's ``scaled_grouped_mm`` only takes row-wise or MXFP8 scales, so it cannot
  express DeepGEMM's 1x128/128x128 recipe; the loop over groups is the portable cuBLAS form.
- **dequantize** (every other device and call): rows and ``B[g]`` times their scales in float32, one
  float32 matmul per group (TF32 off), rounded to bfloat16.

Either way the host needs the group boundaries: ``m_indices`` / ``masked_m`` come from the op
layer's value check, or are read here (one device-to-host copy) under ``DEEPPORT_CHECK_VALUES=0``.
Padding rows are zero-filled on the device; rows past ``masked_m`` are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from deepport.kernels._fp8_checks import SF_UE8M0
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall, ScaledOperand
from deepport.kernels.fp8_layout import BLOCK_K, num_k_blocks, unpack_ue8m0


def _scales_f32(op: ScaledOperand, k: int) -> torch.Tensor:
    """The operand's scales as float32 ``[G?, ceil(MN/gran_mn), ceil(K/128)]`` on its device."""
    if op.sf_format == SF_UE8M0:
        return unpack_ue8m0(op.sf, num_k_blocks(k))
    return op.sf


def _dequantize(x: torch.Tensor, sf: torch.Tensor, gran_mn: int) -> torch.Tensor:
    rows, k = (int(s) for s in x.shape)
    scale = sf.repeat_interleave(gran_mn, dim=0)[:rows].repeat_interleave(BLOCK_K, dim=1)[:, :k]
    return x.to(torch.float32) * scale


@contextlib.contextmanager
def _full_fp32_matmul(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def blockwise_scaled_mm_available(device: torch.device) -> bool:
    """Whether this torch offers cuBLAS block-scaled FP8 GEMMs on ``device``."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return False
    scaling = getattr(torch.nn.functional, "ScalingType", None)
    return hasattr(torch.nn.functional, "scaled_mm") and hasattr(scaling, "BlockWise1x128")


class _GroupGemm:
    """``out_rows = A_rows @ B[g]^T`` with block scales, for one call (scales converted once)."""

    def __init__(self, a: ScaledOperand, b: ScaledOperand, k: int, device: torch.device) -> None:
        self.b, self.k = b, k
        self.sfa = _scales_f32(a, k)
        self.sfb = _scales_f32(b, k)
        self.cublas = blockwise_scaled_mm_available(device) and k % BLOCK_K == 0

    def __call__(self, a_rows: torch.Tensor, sfa_rows: torch.Tensor, g: int) -> torch.Tensor:
        if self.cublas:
            return self._scaled_mm(a_rows, sfa_rows, g)
        a32 = _dequantize(a_rows, sfa_rows, 1)
        b32 = _dequantize(self.b.data[g], self.sfb[g], self.b.gran_mn)
        return (a32 @ b32.T).to(torch.bfloat16)

    def _scaled_mm(self, a_rows: torch.Tensor, sfa_rows: torch.Tensor, g: int) -> torch.Tensor:
        f = torch.nn.functional
        scaling = f.ScalingType
        scale_a = sfa_rows.t().contiguous().t()  # M-major [rows, kb]
        if self.b.gran_mn == 1:
            scale_b, recipe_b = self.sfb[g].t().contiguous().t(), scaling.BlockWise1x128  # N-major [N, kb]
        else:
            scale_b, recipe_b = self.sfb[g].contiguous().t(), scaling.BlockWise128x128  # [kb, Nb], strides (1, kb)
        result: torch.Tensor = f.scaled_mm(a_rows, self.b.data[g].t(), scale_a, scaling.BlockWise1x128, scale_b,
                                           recipe_b, output_dtype=torch.bfloat16)
        return result


def _runs(m_indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, end, group)`` of equal non-negative ids."""
    if m_indices.size == 0:
        return []
    edges = np.flatnonzero(np.diff(m_indices)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [m_indices.size]))
    return [(int(s), int(e), int(m_indices[s])) for s, e in zip(starts, ends, strict=True) if m_indices[s] >= 0]


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    host = call.m_indices_host if call.m_indices_host is not None else call.m_indices.cpu().numpy()
    device = out.device
    gemm = _GroupGemm(call.a, call.b, int(call.a.data.shape[1]), device)
    with _full_fp32_matmul(device):
        for start, end, g in _runs(host):
            out[start:end] = gemm(call.a.data[start:end], gemm.sfa[start:end], g)
    out.masked_fill_((call.m_indices < 0).unsqueeze(1), 0.0)


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    host = call.masked_m_host if call.masked_m_host is not None else call.masked_m.cpu().numpy()
    gemm = _GroupGemm(call.a, call.b, int(call.a.data.shape[2]), out.device)
    with _full_fp32_matmul(out.device):
        for g, rows in enumerate(int(x) for x in host):
            if rows:
                out[g, :rows] = gemm(call.a.data[g, :rows], gemm.sfa[g, :rows], g)
