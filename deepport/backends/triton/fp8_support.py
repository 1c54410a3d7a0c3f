"""What the Triton backend's FP8 GEMMs support, as data (no Triton import here).

Every dense layout (``nt``/``nn``/``tn``/``tt``: the op layer hands over NT-form views, and the kernel
reads any strides), both recipes, float32 or packed UE8M0 scale factors in row-major or MN-major
layout, K tails, ``c`` accumulation and bf16/float32 output; the M-grouped contiguous and masked
layouts likewise. The kernels need FP8 (e4m3) tensor-core ``tl.dot``: an NVIDIA GPU of compute
capability 8.9 or newer (sm_90 runs ``wgmma``), or the CPU under ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by CI).
"""

from __future__ import annotations

import os
from typing import Any

from deepport.backends import dtypes
from deepport.dispatch import OpSupport, Requirement

MIN_CAPABILITY = (8, 9)
_INTERPRET_VALUES = ("1", "true", "yes", "on")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _INTERPRET_VALUES


def _fp8_device(sig: Any) -> str | None:
    device = sig.device
    if device.kind == "cuda" and device.capability is not None and tuple(device.capability) >= MIN_CAPABILITY:
        return None
    if device.kind == "cpu" and interpreting():
        return None
    if device.kind == "cpu":
        return "cpu without TRITON_INTERPRET=1"
    return f"{device.arch} ({device.name})"


FP8_DEVICE = Requirement(
    "an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9), or the CPU under TRITON_INTERPRET=1",
    _fp8_device)

_KINDS = frozenset({"cuda", "cpu"})
_REQUIRES = (FP8_DEVICE,)

FP8_OPS: tuple[OpSupport, ...] = (
    OpSupport(op="fp8_gemm_nt", entry="deepport.backends.triton.fp8_gemm:run", dtypes=dtypes.FP8,
              device_kinds=_KINDS, requirements=_REQUIRES),
    OpSupport(op="fp8_gemm_nn", entry="deepport.backends.triton.fp8_gemm:run", dtypes=dtypes.FP8,
              device_kinds=_KINDS, requirements=_REQUIRES),
    OpSupport(op="fp8_gemm_tn", entry="deepport.backends.triton.fp8_gemm:run", dtypes=dtypes.FP8,
              device_kinds=_KINDS, requirements=_REQUIRES),
    OpSupport(op="fp8_gemm_tt", entry="deepport.backends.triton.fp8_gemm:run", dtypes=dtypes.FP8,
              device_kinds=_KINDS, requirements=_REQUIRES),
    OpSupport(op="m_grouped_fp8_gemm_nt_contiguous", entry="deepport.backends.triton.fp8_grouped_gemm:run_contiguous",
              dtypes=dtypes.FP8, device_kinds=_KINDS, requirements=_REQUIRES),
    OpSupport(op="m_grouped_fp8_gemm_nt_masked", entry="deepport.backends.triton.fp8_grouped_gemm:run_masked",
              dtypes=dtypes.FP8, device_kinds=_KINDS, requirements=_REQUIRES),
)
"""The FP8 GEMM ops of the Triton backend (the backend's declaration includes these records)."""
