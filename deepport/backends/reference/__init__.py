"""The reference backend: NumPy float64, the executable definition of every op (the oracle).

Runs on any torch device by copying what it reads to the host. Slow by design; automatic selection
picks it only when nothing else can run a call, and says so.
"""

import torch

from deepport.backends.reference.moe_support import MOE_OPS
from deepport.dispatch import Backend, OpSupport

BACKEND = Backend(
    name="reference",
    summary="NumPy float64 oracle (any device, through host copies)",
    version="1",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.kernels.f64.mla_decode:run",
                  dtypes=frozenset({torch.bfloat16, torch.float16})),
        *(OpSupport(op=f"fp8_gemm_{layout}", entry="deepport.kernels.f64.fp8_gemm:run",
                    dtypes=frozenset({torch.float8_e4m3fn})) for layout in ("nt", "nn", "tn", "tt")),
        *MOE_OPS,
        OpSupport(op="m_grouped_fp8_gemm_nt_contiguous",
                  entry="deepport.kernels.f64.fp8_grouped_gemm:run_contiguous",
                  dtypes=frozenset({torch.float8_e4m3fn})),
        OpSupport(op="m_grouped_fp8_gemm_nt_masked",
                  entry="deepport.kernels.f64.fp8_grouped_gemm:run_masked",
                  dtypes=frozenset({torch.float8_e4m3fn})),
    ),
    priority={"*": 0},
    oracle=True,
)
