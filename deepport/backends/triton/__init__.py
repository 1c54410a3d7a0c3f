"""The Triton backend (TEMPORARY declaration from the triton-gemm branch: FP8 GEMMs only).

The backend's real declaration (probe, runtime helpers, MLA decode and MoE ops) lives on the
triton-mla branch; it includes :data:`deepport.backends.triton.fp8_support.FP8_OPS`.
"""

from __future__ import annotations

import importlib.util

from deepport.backends.triton.fp8_support import FP8_OPS
from deepport.dispatch import Backend


def _probe() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'deepport[triton]')"
    return None


BACKEND = Backend(
    name="triton",
    summary="Triton kernels (NVIDIA sm_89+ GPUs; the CPU under TRITON_INTERPRET=1)",
    version="1",
    ops=FP8_OPS,
    priority={},
    probe=_probe,
)
