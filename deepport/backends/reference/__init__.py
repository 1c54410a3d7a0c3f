"""The reference backend: the float64 oracles of :mod:`deepport.kernels.f64`, run as a backend.

Runs on any torch device by copying what it reads to the host. Slow by design (``oracle=True``):
automatic selection picks it only when nothing else can run a call, and says so. The single-process
ops run the oracles' own ``run`` functions; the MoE ops (``moe.py``) gather the whole world's inputs
(``moe_gather.py``) and apply the oracles to them.
"""

from deepport.backends import dtypes
from deepport.dispatch import Backend, OpSupport, reproducible

_FLOAT64 = reproducible("float64 NumPy on the host, in a fixed order")

BACKEND = Backend(
    name="reference",
    summary="NumPy float64 oracle (any device, through host copies)",
    version="1",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.kernels.f64.mla_decode:run", dtypes=dtypes.MLA),
        OpSupport(op="fp8_gemm_nt", entry="deepport.kernels.f64.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_nn", entry="deepport.kernels.f64.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_tn", entry="deepport.kernels.f64.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_tt", entry="deepport.kernels.f64.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="moe_layout", entry="deepport.backends.reference.moe:layout", dtypes=dtypes.MOE_TOPK),
        OpSupport(op="moe_dispatch", entry="deepport.backends.reference.moe:dispatch", dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_combine", entry="deepport.backends.reference.moe:combine", dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="moe_dispatch_expanded", entry="deepport.backends.reference.moe:dispatch_expanded",
                  dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_combine_expanded", entry="deepport.backends.reference.moe:combine_expanded",
                  dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="moe_low_latency_dispatch", entry="deepport.backends.reference.moe:dispatch_low_latency",
                  dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_low_latency_combine", entry="deepport.backends.reference.moe:combine_low_latency",
                  dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="m_grouped_fp8_gemm_nt_contiguous", entry="deepport.kernels.f64.fp8_grouped_gemm:run_contiguous",
                  dtypes=dtypes.FP8),
        OpSupport(op="m_grouped_fp8_gemm_nt_masked", entry="deepport.kernels.f64.fp8_grouped_gemm:run_masked",
                  dtypes=dtypes.FP8),
    ),
    priority={"*": 0},
    oracle=True,
    determinism={s: _FLOAT64 for s in (
        "mla_decode", "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "m_grouped_fp8_gemm_nt_contiguous",
        "m_grouped_fp8_gemm_nt_masked", "moe_layout", "moe_dispatch", "moe_combine", "moe_dispatch_expanded",
        "moe_combine_expanded", "moe_low_latency_dispatch", "moe_low_latency_combine")},
)
