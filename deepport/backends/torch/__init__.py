"""The torch backend: vectorised PyTorch, on any torch device (CPU, CUDA, ROCm, XPU, MPS, NPU ...).

The portable fallback for every torch build. It gathers the pages in use, masks what lies past each
sequence (so poisoned tails never reach the arithmetic) and computes in float32.
"""

from deepport.backends import dtypes
from deepport.backends.torch.determinism import DETERMINISM
from deepport.dispatch import Backend, OpSupport

BACKEND = Backend(
    name="torch",
    summary="vectorised PyTorch, float32 math (any torch device)",
    version="1",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.backends.torch.mla_decode:run", dtypes=dtypes.MLA),
        OpSupport(op="fp8_gemm_nt", entry="deepport.backends.torch.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_nn", entry="deepport.backends.torch.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_tn", entry="deepport.backends.torch.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_tt", entry="deepport.backends.torch.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="moe_layout", entry="deepport.backends.torch.moe_routes:layout", dtypes=dtypes.MOE_TOPK),
        OpSupport(op="moe_dispatch", entry="deepport.backends.torch.moe_routes:dispatch", dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_combine", entry="deepport.backends.torch.moe_routes:combine", dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="moe_dispatch_expanded", entry="deepport.backends.torch.moe_layouts:dispatch_expanded",
                  dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_combine_expanded", entry="deepport.backends.torch.moe_layouts:combine_expanded",
                  dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="moe_low_latency_dispatch", entry="deepport.backends.torch.moe_layouts:dispatch_low_latency",
                  dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_low_latency_combine", entry="deepport.backends.torch.moe_layouts:combine_low_latency",
                  dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="m_grouped_fp8_gemm_nt_contiguous",
                  entry="deepport.backends.torch.fp8_grouped_gemm:run_contiguous", dtypes=dtypes.FP8),
        OpSupport(op="m_grouped_fp8_gemm_nt_masked", entry="deepport.backends.torch.fp8_grouped_gemm:run_masked",
                  dtypes=dtypes.FP8),
    ),
    priority={"*": 10},
    determinism=DETERMINISM,
)
