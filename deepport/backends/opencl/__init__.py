"""The OpenCL backend: OpenCL C 1.2 kernels launched with pyopencl, on any OpenCL device.

The portable fallback every GPU vendor's driver can run (AMD, Intel, Arm Mali, Qualcomm Adreno, Apple,
NVIDIA, and PoCL on CPUs), and the template a vendor without Triton or torch support ports from.
Kernels use no extension: no fp16 arithmetic, no subgroups; bf16 and e4m3 travel as ``ushort`` /
``uchar`` and are converted by integer bit operations (``bf16_fp8.h``), float16 through
``vload_half`` / ``vstore_half_rte``, all math is float32, reductions go through local memory.

- Device: ``DEEPPORT_OPENCL_DEVICE`` (a substring of ``"<platform> / <device>"``), else the fastest GPU,
  else the CPU (:mod:`.runtime`). ``deepport info`` lists every OpenCL device (:func:`toolchain_info`).
- Inputs: torch tensors on any device, copied through the host to the OpenCL device and back
  (:mod:`.transfer`); automatic selection considers it on the CPU only, below the torch backend.
- Tiles and work-group sizes come from the device's reported local memory and work-group limits.
"""

from typing import Any

from deepport.backends import dtypes
from deepport.backends.opencl.runtime import describe_devices, unavailable_reason
from deepport.dispatch import Backend, Determinism, OpSupport, reproducible


def identity() -> dict[str, str]:
    """The OpenCL device this backend runs on, as its driver reports it (recorded in certificates)."""
    for row in describe_devices():
        if row["selected"]:
            return {"opencl_device": str(row["device"]), "opencl_version": str(row["version"]),
                    "opencl_c": str(row["opencl_c"]), "driver": str(row["driver"]),
                    "compute_units": str(row["compute_units"])}
    return {}


def toolchain_info() -> dict[str, Any]:
    """What ``deepport info`` shows for this backend: every OpenCL device, and which one it uses."""
    return {"opencl_devices": describe_devices()}


_FIXED = reproducible("each work-item sums in a fixed order, reductions go through local memory in a fixed "
                      "tree; counts are integer atomics; rows are ordered by a stable sort on the host; the "
                      "routing's slot-weight sums are dense fixed-order torch reductions")
DETERMINISM: dict[str, Determinism] = {
    op: _FIXED for op in ("mla_decode", "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
                          "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "moe_layout",
                          "moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded",
                          "moe_low_latency_dispatch", "moe_low_latency_combine")
}

BACKEND = Backend(
    name="opencl",
    summary="OpenCL C 1.2 kernels via pyopencl (any OpenCL device; host copies)",
    version="1",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.backends.opencl.mla_decode:run", dtypes=dtypes.MLA),
        OpSupport(op="fp8_gemm_nt", entry="deepport.backends.opencl.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_nn", entry="deepport.backends.opencl.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_tn", entry="deepport.backends.opencl.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="fp8_gemm_tt", entry="deepport.backends.opencl.fp8_gemm:run", dtypes=dtypes.FP8),
        OpSupport(op="m_grouped_fp8_gemm_nt_contiguous", entry="deepport.backends.opencl.fp8_gemm:run_contiguous",
                  dtypes=dtypes.FP8),
        OpSupport(op="m_grouped_fp8_gemm_nt_masked", entry="deepport.backends.opencl.fp8_gemm:run_masked",
                  dtypes=dtypes.FP8),
        # MoE: the local steps as kernels; routing and rank-to-rank movement through torch.distributed
        OpSupport(op="moe_layout", entry="deepport.backends.opencl.moe:layout", dtypes=dtypes.MOE_TOPK),
        OpSupport(op="moe_dispatch", entry="deepport.backends.opencl.moe:dispatch", dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_combine", entry="deepport.backends.opencl.moe:combine", dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="moe_dispatch_expanded", entry="deepport.backends.opencl.moe:dispatch_expanded",
                  dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_combine_expanded", entry="deepport.backends.opencl.moe:combine_expanded",
                  dtypes=dtypes.MOE_COMBINE),
        OpSupport(op="moe_low_latency_dispatch", entry="deepport.backends.opencl.moe:dispatch_low_latency",
                  dtypes=dtypes.MOE_PAYLOAD),
        OpSupport(op="moe_low_latency_combine", entry="deepport.backends.opencl.moe:combine_low_latency",
                  dtypes=dtypes.MOE_COMBINE),
    ),
    priority={"cpu": 5},
    probe=unavailable_reason,
    determinism=DETERMINISM,
    identity=identity,
)
