"""The hopper backend: CUDA C++ kernels for sm_90a (H100/H200), compiled at run time with NVRTC.

Ops: ``mla_decode`` (``kernels/sm90_mla_decode.cu``: split-KV over the plan of ``get_mla_metadata``, a
TMA producer warp filling two 64-token K stages, wgmma for QK^T and PV on two consumer warpgroups,
online softmax in float32; ``kernels/sm90_mla_combine.cu`` merges cut requests), and the dense
block-scaled FP8 GEMM ``fp8_gemm_nt`` and the M-grouped contiguous and masked FP8 GEMMs, DeepSeek-V3's
recipe (1, 128, 128) with float32 SFs and bf16 output (``kernels/sm90_fp8_gemm.cu``: TMA into a
shared-memory ring on mbarriers, a producer warpgroup and one or two wgmma consumer warpgroups, fp32
promotion per 128-K block, persistent tiles; an opt-in 2-CTA cluster variant that TMA-multicasts the A
tile, ``GemmConfig.cluster_n = 2``, is never chosen by default until measured: see NOTES.md).

Expert parallelism over NVLink (``moe.py``): the six multi-rank MoE ops (dispatch and combine in the
normal, expanded and low-latency layouts) run the torch backend's routing with every exchange written
straight into the peers' symmetric memory (``peer_transport.py``, ``peer_memory_cuda.py``,
``kernels/sm90_peer_flags.cu``); opt-in with ``DEEPPORT_HOPPER_EP=1`` until measured on GPUs.

Available only where torch sees an sm_90 GPU and ``cuda-bindings`` (with ``nvidia-cuda-nvrtc``) and
``cupy`` import (``pip install 'deepport[hopper]'``); the probe says which is missing. The toolchain
is imported only when a kernel runs. Kernels are cached on disk (:mod:`.jit`: ``DEEPPORT_CACHE_DIR``,
``DEEPPORT_JIT``).
"""

import torch

from deepport.backends import dtypes
from deepport.backends.hopper.support import (
    DENSE_REQUIREMENTS,
    EP_REQUIREMENTS,
    GROUPED_REQUIREMENTS,
    MLA_REQUIREMENTS,
    probe,
)
from deepport.backends.torch.determinism import DETERMINISM as _TORCH_DETERMINISM
from deepport.dispatch import Backend, OpSupport, reproducible

_FP8 = frozenset({torch.float8_e4m3fn})
_CUDA = frozenset({"cuda"})
_EP = (("moe_dispatch", "dispatch", dtypes.MOE_PAYLOAD), ("moe_combine", "combine", dtypes.MOE_COMBINE),
       ("moe_dispatch_expanded", "dispatch_expanded", dtypes.MOE_PAYLOAD),
       ("moe_combine_expanded", "combine_expanded", dtypes.MOE_COMBINE),
       ("moe_low_latency_dispatch", "dispatch_low_latency", dtypes.MOE_PAYLOAD),
       ("moe_low_latency_combine", "combine_low_latency", dtypes.MOE_COMBINE))
_TILES = reproducible("each output tile is computed by one CTA walking K in order (no split-K, no atomics)")

BACKEND = Backend(
    name="hopper",
    summary="CUDA C++ for sm_90a (TMA + wgmma MLA decode and FP8 GEMMs), NVRTC-compiled",
    version="2",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.backends.hopper.mla_decode:run", dtypes=dtypes.MLA,
                  device_kinds=_CUDA, requirements=MLA_REQUIREMENTS),
        OpSupport(op="fp8_gemm_nt", entry="deepport.backends.hopper.fp8_gemm:run", dtypes=_FP8,
                  device_kinds=_CUDA, requirements=DENSE_REQUIREMENTS),
        OpSupport(op="m_grouped_fp8_gemm_nt_contiguous", entry="deepport.backends.hopper.fp8_gemm:run_contiguous",
                  dtypes=_FP8, device_kinds=_CUDA, requirements=GROUPED_REQUIREMENTS),
        OpSupport(op="m_grouped_fp8_gemm_nt_masked", entry="deepport.backends.hopper.fp8_gemm:run_masked",
                  dtypes=_FP8, device_kinds=_CUDA, requirements=GROUPED_REQUIREMENTS),
        *(OpSupport(op=op, entry=f"deepport.backends.hopper.moe:{fn}", dtypes=kinds, device_kinds=_CUDA,
                    requirements=EP_REQUIREMENTS) for op, fn, kinds in _EP),
    ),
    priority={"cuda": 30},
    probe=probe,
    determinism={"mla_decode": reproducible("the split-KV plan depends only on the lengths and the device; each "
                                            "split writes its own partial result, merged in split order by the "
                                            "combine kernel; no atomics"),
                 "fp8_gemm_nt": _TILES, "m_grouped_fp8_gemm_nt_contiguous": _TILES,
                 "m_grouped_fp8_gemm_nt_masked": _TILES,
                 # the transport moves bytes: the claims of the torch routing and steps it runs
                 **{op: _TORCH_DETERMINISM[op] for op, _, _ in _EP}},
)
