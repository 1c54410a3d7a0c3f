"""The triton backend: Triton kernels for NVIDIA, AMD and Intel GPUs (and the CPU interpreter).

- ``mla_decode``: split-KV decode over the paged cache, driven by the plan of ``get_mla_metadata``
  (``mla_decode.py`` wrapper, ``mla_decode_kernels.py`` kernels, ``configs.py`` tuned tile sizes).
- MoE: the layout count and the single-device steps of the expanded and low-latency layouts (placing
  rows, the weighted un-permute, the per-token FP8 cast) in ``moe_permute.py``; routing and the
  multi-rank exchange are the torch backend's ``torch.distributed`` code. The normal dispatch/combine
  (pure exchange) are left to the torch backend.

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

_MOE_PAYLOAD = frozenset({torch.bfloat16, torch.float8_e4m3fn})
_MOE_ENTRY = "deepport.backends.triton.moe_permute"
_MOE = (
    OpSupport(op="moe_layout", entry=f"{_MOE_ENTRY}:layout", dtypes=frozenset({torch.int64, torch.int32}),
              requirements=(DEVICE,)),
    OpSupport(op="moe_dispatch_expanded", entry=f"{_MOE_ENTRY}:dispatch_expanded", dtypes=_MOE_PAYLOAD,
              requirements=(DEVICE,)),
    OpSupport(op="moe_combine_expanded", entry=f"{_MOE_ENTRY}:combine_expanded",
              dtypes=frozenset({torch.bfloat16}), requirements=(DEVICE,)),
    OpSupport(op="moe_low_latency_dispatch", entry=f"{_MOE_ENTRY}:dispatch_low_latency", dtypes=_MOE_PAYLOAD,
              requirements=(DEVICE,)),
    OpSupport(op="moe_low_latency_combine", entry=f"{_MOE_ENTRY}:combine_low_latency",
              dtypes=frozenset({torch.bfloat16}), requirements=(DEVICE,)),
)

# --- FP8 GEMM ops (fp8_*.py, owned by the triton-gemm branch): their OpSupport records go here ---
_FP8: tuple[OpSupport, ...] = ()
# --- end of FP8 GEMM ops ---

BACKEND = Backend(
    name="triton",
    summary="Triton kernels (NVIDIA, AMD, Intel GPUs; CPU through TRITON_INTERPRET=1)",
    version="1",
    ops=(*_MLA, *_MOE, *_FP8),
    priority={"cuda": 20, "rocm": 20, "xpu": 20},  # never automatic on the CPU: the interpreter is slow
    probe=probe,
)
