"""M-grouped block-scaled FP8 GEMMs in PyTorch: one GEMM per group segment.

Two paths, chosen by the device and the call, never by a failed attempt:

- **cuBLAS** (:func:`uses_cublas`: an sm_90 NVIDIA device whose torch has ``torch.nn.functional.scaled_mm``
  with ``ScalingType.BlockWise1x128/BlockWise128x128``, recipe (1, 128, 128) with float32 SFs, K a
  multiple of 512 and N of 16, the conditions the dense torch backend found cuBLAS to need): per group
  segment one block-scaled ``scaled_mm``. torch's ``scaled_grouped_mm`` takes only row-wise or MXFP8
  scales, so it cannot express DeepGEMM's 1x128/128x128 recipe; the loop over groups is the cuBLAS form.
- **dequantize** (every other device and call): rows and ``B[g]`` times their scales in float32, one
  float32 matmul per group (TF32 off), rounded to bfloat16.

Either way the host needs the group boundaries: ``m_indices`` / ``masked_m`` come from the op
layer's value check, or are read here (one device-to-host copy) under ``DEEPPORT_CHECK_VALUES=0``.
Padding rows are zero-filled on the device; rows past ``masked_m`` are never touched.
"""

from __future__ import annotations

import numpy as np
import torch

from deepport.backends.torch.mla_decode import _ieee_fp32_matmul
from deepport.kernels._fp8_checks import RECIPE_1D2D, SF_FLOAT32, SF_UE8M0
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, GroupedFP8Signature, MaskedCall, ScaledOperand
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


def blockwise_scaled_mm_available(device: torch.device) -> bool:
    """Whether this torch offers cuBLAS block-scaled FP8 GEMMs (1x128 x 128x128) on ``device``."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return False
    scaling = getattr(torch.nn.functional, "ScalingType", None)
    return hasattr(torch.nn.functional, "scaled_mm") and all(
        hasattr(scaling, s) for s in ("BlockWise1x128", "BlockWise128x128"))


def uses_cublas(signature: GroupedFP8Signature) -> bool:
    """Whether a call with this signature takes the cuBLAS path (see the module docstring)."""
    dev = signature.device
    return (dev.kind == "cuda" and dev.arch == "sm_90" and blockwise_scaled_mm_available(torch.device(dev.type))
            and (signature.recipe, signature.sf_format) == (RECIPE_1D2D, SF_FLOAT32)
            and signature.k % (4 * BLOCK_K) == 0 and signature.n % 16 == 0)


class _GroupGemm:
    """``out_rows = A_rows @ B[g]^T`` with block scales, for one call (scales converted once)."""

    def __init__(self, a: ScaledOperand, b: ScaledOperand, signature: GroupedFP8Signature) -> None:
        self.b, k = b, signature.k
        self.sfa = _scales_f32(a, k)
        self.sfb = _scales_f32(b, k)
        self.cublas = uses_cublas(signature)

    def __call__(self, a_rows: torch.Tensor, sfa_rows: torch.Tensor, g: int) -> torch.Tensor:
        if self.cublas:
            return self._scaled_mm(a_rows, sfa_rows, g)
        a32 = _dequantize(a_rows, sfa_rows, 1)
        b32 = _dequantize(self.b.data[g], self.sfb[g], self.b.gran_mn)
        return (a32 @ b32.T).to(torch.bfloat16)

    def _scaled_mm(self, a_rows: torch.Tensor, sfa_rows: torch.Tensor, g: int) -> torch.Tensor:
        f = torch.nn.functional
        scaling = f.ScalingType
        scale_a = sfa_rows.t().contiguous().t()  # [rows, kb], strides (1, rows)
        scale_b = self.sfb[g].contiguous().t()  # [kb, ceil(N/128)], strides (1, kb): the scale of mat2 = B^T
        result: torch.Tensor = f.scaled_mm(a_rows, self.b.data[g].t(), scale_a, scaling.BlockWise1x128, scale_b,
                                           scaling.BlockWise128x128, output_dtype=torch.bfloat16)
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
    gemm = _GroupGemm(call.a, call.b, call.signature)
    with _ieee_fp32_matmul(device):
        for start, end, g in _runs(host):
            out[start:end] = gemm(call.a.data[start:end], gemm.sfa[start:end], g)
    out.masked_fill_((call.m_indices < 0).unsqueeze(1), 0.0)


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    host = call.masked_m_host if call.masked_m_host is not None else call.masked_m.cpu().numpy()
    gemm = _GroupGemm(call.a, call.b, call.signature)
    with _ieee_fp32_matmul(out.device):
        for g, rows in enumerate(int(x) for x in host):
            if rows:
                out[g, :rows] = gemm(call.a.data[g, :rows], gemm.sfa[g, :rows], g)
