"""Dense block-scaled FP8 GEMM in PyTorch: cuBLAS's block-scaled ``scaled_mm`` where it can express the
call, else per-K-block float32 products with DeepGEMM's promotion, on any torch device.

Two paths, chosen per call from :data:`SCALED_MM_REQUIREMENTS` (capabilities as data; the first unmet
one is the reason :func:`path` gives):

- ``scaled_mm``: ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` (A) and
  ``BlockWise128x128`` (B), i.e. cuBLAS's DeepSeek recipe: the peer every faster backend is measured
  against. Scales are restaged into the layouts cuBLAS wants (A: ``[M, kb]`` with strides ``(1, M)``;
  B for ``mat2 = B^T``: ``[kb, ceil(N/128)]`` with strides ``(1, kb)``); operands that are not K-major
  (the ``nn``/``tn``/``tt`` layouts) are copied K-major first; M is padded with zero rows to a multiple of
  4 (cuBLAS has no block-scaled algorithm otherwise); the bf16 result's first M rows are copied into ``out``.
- ``blocked``: per 128-K block, ``A8 @ B8^T`` in float32 (FP8 products are exact in float32), scaled by
  ``SFA * SFB`` and summed in float32 (DeepGEMM's SM90 promotion), then ``+ C`` and one rounding to
  ``out``'s dtype. Any device, any recipe, SF format, K tail, output dtype and accumulation. K blocks
  are processed in chunks so the ``[chunk, M, N]`` float32 partials stay within a working-set budget.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.backends.torch._precision import ieee_fp32_matmul
from deepport.dispatch.capability import Requirement
from deepport.kernels._fp8_checks import RECIPE_1D2D, SF_FLOAT32, SF_UE8M0
from deepport.kernels.fp8_gemm import FP8GemmCall, FP8GemmSignature
from deepport.kernels.fp8_layout import BLOCK_K, unpack_ue8m0

# cuBLAS (CUDA 13.0, H200) answers CUBLAS_STATUS_NOT_SUPPORTED for block-scaled FP8 unless M % 4 == 0
# (measured: M in {1, 2, 3, 15, 17} fail, {4, 8, 16, 64} pass), and scaled_mm rejects a padded scale stride.
_CUBLAS_M_MULTIPLE = 4
_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 8 << 20}
_DEFAULT_BUDGET = 256 << 20


def _scaled_mm_api() -> tuple[Any, Any] | None:
    """``(torch.nn.functional.scaled_mm, ScalingType)`` when this torch has block-scaled scaled_mm."""
    fn = getattr(torch.nn.functional, "scaled_mm", None)
    scaling = getattr(torch.nn.functional, "ScalingType", None)
    if fn is None or scaling is None or not all(hasattr(scaling, s) for s in ("BlockWise1x128", "BlockWise128x128")):
        return None
    return fn, scaling


def _requirement(description: str, check: Any) -> Requirement:
    return Requirement(description, check)


SCALED_MM_REQUIREMENTS: tuple[Requirement, ...] = (
    _requirement("torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128/BlockWise128x128 (torch >= 2.10)",
                 lambda s: None if _scaled_mm_api() is not None else f"torch {torch.__version__} without it"),
    _requirement("an NVIDIA sm_90 device (cuBLAS block-scaled FP8; other archs are untested)",
                 lambda s: None if s.device.kind == "cuda" and s.device.arch == "sm_90" else s.device.arch),
    _requirement("recipe (1, 128, 128) with float32 SFs (the only block recipe cuBLAS offers)",
                 lambda s: None if (s.recipe, s.sf_format) == (RECIPE_1D2D, SF_FLOAT32)
                 else f"recipe {s.recipe}, {s.sf_format} SFs"),
    _requirement("bfloat16 out without c (scaled_mm has no float32 C accumulation)",
                 lambda s: None if s.out_dtype == torch.bfloat16 and not s.accumulate
                 else f"out {s.out_dtype}{' with c' if s.accumulate else ''}"),
    _requirement("K a multiple of 512 (whole 128-blocks; the B-scale row stride of torch 2.10-2.13 "
                 "versions agrees only when ceil(K/128) is a multiple of 4)",
                 lambda s: None if s.k % (4 * BLOCK_K) == 0 else f"K={s.k}"),
    _requirement("N a multiple of 16 (cuBLAS FP8 leading dimensions)",
                 lambda s: None if s.n % 16 == 0 else f"N={s.n}"),
)


def path(signature: FP8GemmSignature) -> tuple[str, list[str]]:
    """``("scaled_mm", [])`` or ``("blocked", reasons scaled_mm cannot express the call)``."""
    reasons = [r for r in (req.reason(signature) for req in SCALED_MM_REQUIREMENTS) if r is not None]
    return ("blocked", reasons) if reasons else ("scaled_mm", [])


def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Compute the call into ``out`` on the path :func:`path` picks."""
    chosen, _ = path(call.signature)
    if chosen == "scaled_mm":
        _scaled_mm(call, out)
    else:
        _blocked(call, out)


def _k_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[rows, K]`` with unit K stride and a 16-byte aligned row stride (a copy only if needed)."""
    if x.stride(1) == 1 and (x.shape[0] <= 1 or x.stride(0) % 16 == 0):
        return x
    return x.contiguous()


def _scaled_mm(call: FP8GemmCall, out: torch.Tensor) -> None:
    api = _scaled_mm_api()
    assert api is not None  # path() checked it
    scaled_mm, scaling = api
    a, b = _k_major(call.a), _k_major(call.b)
    m = call.m
    m_padded = -(-m // _CUBLAS_M_MULTIPLE) * _CUBLAS_M_MULTIPLE
    if m_padded != m:  # cuBLAS has no block-scaled algorithm for these M: add zero rows, drop them after
        a = torch.cat([a, a.new_zeros(m_padded - m, a.shape[1])])
    # [M_padded, kb] with strides (1, M_padded): compact M-major, as scaled_mm insists; padded rows scale 1
    scale_a = torch.ones((call.sfa.shape[1], m_padded), dtype=torch.float32, device=a.device)
    scale_a[:, :m] = call.sfa.t()
    scale_b = call.sfb.contiguous().t()  # [kb, ceil(N/128)], strides (1, kb): the scale of mat2 = B^T
    d = scaled_mm(a, b.t(), scale_a.t(), scaling.BlockWise1x128, scale_b, scaling.BlockWise128x128,
                  output_dtype=torch.bfloat16)
    out.copy_(d[:m])




def _sf_float32(sf: torch.Tensor, sf_format: str, k_blocks: int) -> torch.Tensor:
    return unpack_ue8m0(sf, k_blocks) if sf_format == SF_UE8M0 else sf.to(torch.float32)


def _padded_k(x: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """``x`` ``[rows, K]`` FP8 as float32 ``[rows, kb, 128]``, the K tail zero-padded."""
    rows, k = int(x.shape[0]), int(x.shape[1])
    if k == k_blocks * BLOCK_K:
        return x.to(torch.float32).reshape(rows, k_blocks, BLOCK_K)
    padded = torch.zeros((rows, k_blocks * BLOCK_K), dtype=torch.float32, device=x.device)
    padded[:, :k] = x.to(torch.float32)
    return padded.view(rows, k_blocks, BLOCK_K)


def _blocked(call: FP8GemmCall, out: torch.Tensor) -> None:
    m, n, kb = call.m, call.n, call.k_blocks
    sfa = _sf_float32(call.sfa, call.sf_format, kb)  # [M, kb]
    sfb = _sf_float32(call.sfb, call.sf_format, kb)  # [rows_b, kb]
    if call.gran_n > 1:
        sfb = sfb.repeat_interleave(call.gran_n, dim=0)[:n]  # [N, kb]
    a = _padded_k(call.a, kb).transpose(0, 1)  # [kb, M, 128]
    b = _padded_k(call.b, kb).permute(1, 2, 0)  # [kb, 128, N]
    budget = _BUDGET_BYTES.get(out.device.type, _DEFAULT_BUDGET)
    chunk = max(1, min(kb, budget // max(1, 8 * m * n)))  # partials and their scales, float32
    acc = torch.zeros((m, n), dtype=torch.float32, device=out.device)
    with ieee_fp32_matmul(out.device):
        for start in range(0, kb, chunk):
            stop = min(kb, start + chunk)
            partial = torch.bmm(a[start:stop], b[start:stop])  # [c, M, N], exact per block
            scale = sfa[:, start:stop].t().unsqueeze(2) * sfb[:, start:stop].t().unsqueeze(1)
            acc += (partial * scale).sum(dim=0)
    if call.c is not None:
        acc += call.c  # read before out is written (c may be out)
    out.copy_(acc)
