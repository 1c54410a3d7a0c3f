"""The triton backend: Triton kernels for NVIDIA, AMD and Intel GPUs (and the CPU interpreter).

- ``mla_decode``: split-KV decode over the paged cache, driven by the plan of ``get_mla_metadata``
  (``mla_decode.py`` wrapper, ``mla_decode_kernels.py`` kernels, ``configs.py`` tuned tile sizes).
- MoE: the single-GPU data movement (``moe_permute.py``); the multi-rank exchange is the torch
  backend's ``torch.distributed`` code.

Automatic choice prefers it on GPUs (priority 20, above torch's 10). On the CPU it runs only under
``TRITON_INTERPRET=1`` (set before triton decorates a kernel) and is never chosen automatically there
(the interpreter is slow): ask for it explicitly (``backend="triton"``) to test kernels without a GPU.
"""

import torch

from deepport.backends.triton._runtime import DEVICE, probe
from deepport.dispatch import Backend, OpSupport

_MLA = (
    OpSupport(op="mla_decode", entry="deepport.backends.triton.mla_decode:run",
              dtypes=frozenset({torch.bfloat16, torch.float16}), requirements=(DEVICE,)),
)

# --- FP8 GEMM ops (fp8_*.py, owned by the triton-gemm branch): their OpSupport records go here ---
_FP8: tuple[OpSupport, ...] = ()
# --- end of FP8 GEMM ops ---

BACKEND = Backend(
    name="triton",
    summary="Triton kernels (NVIDIA, AMD, Intel GPUs; CPU through TRITON_INTERPRET=1)",
    version="1",
    ops=(*_MLA, *_FP8),
    priority={"cuda": 20, "rocm": 20, "xpu": 20},  # never automatic on the CPU: the interpreter is slow
    probe=probe,
)
