"""The triton backend: Triton kernels for NVIDIA, AMD and Intel GPUs (and the CPU interpreter).

- ``mla_decode``: split-KV decode over the paged cache, driven by the plan of ``get_mla_metadata``
  (``mla_decode.py`` wrapper, ``mla_decode_kernels.py`` kernels, ``configs.py`` tuned tile sizes).
- FP8 GEMMs (dense NT/NN/TN/TT, grouped contiguous and masked): block-scaled kernels with per-128-K
  promotion (``fp8_gemm*.py``, ``fp8_grouped_gemm.py``, tuned tiles in ``fp8_configs.py``; records in
  ``fp8_support.py``).
- MoE: the layout count and the single-device steps of the expanded and low-latency layouts (placing
  rows, the weighted un-permute, the per-token FP8 cast) in ``moe_permute.py``; the normal layout's
  dispatch/combine (gathering the rows each rank sends, the per-token sum of the returned rows) in
  ``moe_routes.py``. Routing and the multi-rank exchange are the torch backend's ``torch.distributed``
  code, called with these steps.

Automatic choice prefers it on GPUs (priority 20, above torch's 10). On the CPU it runs only under
``TRITON_INTERPRET=1`` (set before triton decorates a kernel) and is never chosen automatically there
(the interpreter is slow): ask for it explicitly (``backend="triton"``) to test kernels without a GPU.
"""

from deepport.backends import dtypes
from deepport.backends.torch.determinism import RANK_SUMS
from deepport.backends.triton._runtime import DEVICE, identity, probe
from deepport.backends.triton.fp8_support import FP8_OPS
from deepport.dispatch import Backend, Determinism, OpSupport, reproducible

_MLA = (
    OpSupport(op="mla_decode", entry="deepport.backends.triton.mla_decode:run", dtypes=dtypes.MLA,
              requirements=(DEVICE,)),
)

_MOE = (
    OpSupport(op="moe_layout", entry="deepport.backends.triton.moe_permute:layout", dtypes=dtypes.MOE_TOPK,
              requirements=(DEVICE,)),
    OpSupport(op="moe_dispatch", entry="deepport.backends.triton.moe_routes:dispatch", dtypes=dtypes.MOE_PAYLOAD,
              requirements=(DEVICE,)),
    OpSupport(op="moe_combine", entry="deepport.backends.triton.moe_routes:combine", dtypes=dtypes.MOE_COMBINE,
              requirements=(DEVICE,)),
    OpSupport(op="moe_dispatch_expanded", entry="deepport.backends.triton.moe_permute:dispatch_expanded",
              dtypes=dtypes.MOE_PAYLOAD, requirements=(DEVICE,)),
    OpSupport(op="moe_combine_expanded", entry="deepport.backends.triton.moe_permute:combine_expanded",
              dtypes=dtypes.MOE_COMBINE, requirements=(DEVICE,)),
    OpSupport(op="moe_low_latency_dispatch", entry="deepport.backends.triton.moe_permute:dispatch_low_latency",
              dtypes=dtypes.MOE_PAYLOAD, requirements=(DEVICE,)),
    OpSupport(op="moe_low_latency_combine", entry="deepport.backends.triton.moe_permute:combine_low_latency",
              dtypes=dtypes.MOE_COMBINE, requirements=(DEVICE,)),
)

_GEMM = reproducible("one program per output tile walks K in order; split-K partials are summed in a fixed "
                     "order by a second kernel; no atomics")
_MOVES = reproducible("rows move as raw bits; counts are integer atomics (exact in any order); slot weights "
                      "are summed in slot order; the FP8 cast is elementwise")
DETERMINISM: dict[str, Determinism] = {
    "mla_decode": reproducible("the split-KV plan depends only on the lengths and the device; each split writes "
                               "its own partial result, merged in split order; no atomics"),
    **{s.op: _GEMM for s in FP8_OPS},
    "moe_layout": _MOVES,
    "moe_dispatch": _MOVES,
    "moe_combine": reproducible("the rows and weights returned by the ranks are summed per token in float32 in "
                                "a fixed rank order (entries sorted stably by token); no float atomics"),
    "moe_low_latency_dispatch": _MOVES,
    "moe_dispatch_expanded": _MOVES,
    "moe_combine_expanded": RANK_SUMS,
    "moe_low_latency_combine": reproducible("weighted rows summed per destination in a fixed order (entries "
                                            "sorted stably); slot weights and the per-token sum over ranks are "
                                            "dense fixed-order reductions; no float atomics"),
}

BACKEND = Backend(
    name="triton",
    summary="Triton kernels (NVIDIA, AMD, Intel GPUs; CPU through TRITON_INTERPRET=1)",
    version="1",
    ops=(*_MLA, *_MOE, *FP8_OPS),
    priority={"cuda": 20, "rocm": 20, "xpu": 20},  # never automatic on the CPU: the interpreter is slow
    probe=probe,
    determinism=DETERMINISM,
    identity=identity,
)
