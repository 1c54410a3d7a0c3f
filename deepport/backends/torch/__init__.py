"""The torch backend: vectorised PyTorch, on any torch device (CPU, CUDA, ROCm, XPU, MPS, NPU ...).

The portable fallback for every torch build. It gathers the pages in use, masks what lies past each
sequence (so poisoned tails never reach the arithmetic) and computes in float32.
"""

import torch

from deepport.backends.torch.moe_support import MOE_OPS
from deepport.dispatch import Backend, OpSupport

BACKEND = Backend(
    name="torch",
    summary="vectorised PyTorch, float32 math (any torch device)",
    version="1",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.backends.torch.mla_decode:run",
                  dtypes=frozenset({torch.bfloat16, torch.float16})),
        *(OpSupport(op=f"fp8_gemm_{layout}", entry="deepport.backends.torch.fp8_gemm:run",
                    dtypes=frozenset({torch.float8_e4m3fn})) for layout in ("nt", "nn", "tn", "tt")),
        *MOE_OPS,
        OpSupport(op="m_grouped_fp8_gemm_nt_contiguous",
                  entry="deepport.backends.torch.fp8_grouped_gemm:run_contiguous",
                  dtypes=frozenset({torch.float8_e4m3fn})),
        OpSupport(op="m_grouped_fp8_gemm_nt_masked",
                  entry="deepport.backends.torch.fp8_grouped_gemm:run_masked",
                  dtypes=frozenset({torch.float8_e4m3fn})),
    ),
    priority={"*": 10},
)
