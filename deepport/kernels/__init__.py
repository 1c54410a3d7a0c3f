"""The abstract op interface: one module per op family, each the spec of its ops.

Every op is declared once, by its :class:`~deepport.kernels.descriptor.OpDescriptor` in ``DESCRIPTORS``
below: its contract (a module, or an object for one op of a family whose module serves several, such as
``fp8_gemm_{nt,nn,tn,tt}``), its float64 oracle (:mod:`deepport.kernels.f64`), its conformance suite,
tolerance entries and bench configs. ``OPS`` (op name -> contract), dispatch's op names, the suites, the
tolerance table and the bench config modules are derived from them. Every contract exposes ``OP`` (the
name), ``OP_VERSION``, ``bind(...)`` (validate every argument of the op but ``backend=``, return the call a
backend receives) and ``example_signature`` (:class:`OpSpec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepport.dispatch.capability import CallSignature
from deepport.kernels import fp8_gemm as _fp8_gemm
from deepport.kernels import fp8_grouped_gemm as _fp8_grouped_gemm
from deepport.kernels import mla_decode as _mla_decode
from deepport.kernels import moe_combine as _moe_combine
from deepport.kernels import moe_combine_expanded as _moe_combine_expanded
from deepport.kernels import moe_dispatch as _moe_dispatch
from deepport.kernels import moe_dispatch_expanded as _moe_dispatch_expanded
from deepport.kernels import moe_layout as _moe_layout
from deepport.kernels import moe_low_latency_combine as _moe_low_latency_combine
from deepport.kernels import moe_low_latency_dispatch as _moe_low_latency_dispatch
from deepport.kernels.descriptor import OPS, OpDescriptor, OpSpec, add_op, descriptor, descriptors, op_added

# One entry per op, literal strings (grep finds them). The order is the order deepport lists ops, runs
# suites and registers bench configs. MoE oracles: the named function is the core of the op's definition,
# which the suite composes with the others of deepport.kernels.f64.moe.
DESCRIPTORS: tuple[OpDescriptor, ...] = (
    OpDescriptor(_mla_decode, oracle="deepport.kernels.f64.mla_decode:mla_decode_f64",
                 suite="deepport.conformance.suites.mla_decode",
                 tolerances="deepport.conformance.tolerance:MLA_DECODE", bench="deepport.bench.configs.mla_decode",
                 custom_op="deepport.kernels.torch_ops.mla_decode",
                 perf_shape="deepport.kernels.mla_decode:perf_shape"),
    # fp8_gemm_nt
    OpDescriptor(_fp8_gemm.VARIANTS[0], oracle="deepport.kernels.f64.fp8_gemm:reference_f64",
                 suite="deepport.conformance.suites.fp8_gemm:SUITES",
                 tolerances="deepport.conformance.tolerance:FP8_GEMM", bench="deepport.bench.configs.fp8_gemm",
                 custom_op="deepport.kernels.torch_ops.fp8_gemm", perf_shape="deepport.kernels.fp8_gemm:perf_shape"),
    # fp8_gemm_nn
    OpDescriptor(_fp8_gemm.VARIANTS[1], oracle="deepport.kernels.f64.fp8_gemm:reference_f64",
                 suite="deepport.conformance.suites.fp8_gemm:SUITES",
                 tolerances="deepport.conformance.tolerance:FP8_GEMM", bench="deepport.bench.configs.fp8_gemm",
                 custom_op="deepport.kernels.torch_ops.fp8_gemm", perf_shape="deepport.kernels.fp8_gemm:perf_shape"),
    # fp8_gemm_tn
    OpDescriptor(_fp8_gemm.VARIANTS[2], oracle="deepport.kernels.f64.fp8_gemm:reference_f64",
                 suite="deepport.conformance.suites.fp8_gemm:SUITES",
                 tolerances="deepport.conformance.tolerance:FP8_GEMM", bench="deepport.bench.configs.fp8_gemm",
                 custom_op="deepport.kernels.torch_ops.fp8_gemm", perf_shape="deepport.kernels.fp8_gemm:perf_shape"),
    # fp8_gemm_tt
    OpDescriptor(_fp8_gemm.VARIANTS[3], oracle="deepport.kernels.f64.fp8_gemm:reference_f64",
                 suite="deepport.conformance.suites.fp8_gemm:SUITES",
                 tolerances="deepport.conformance.tolerance:FP8_GEMM", bench="deepport.bench.configs.fp8_gemm",
                 custom_op="deepport.kernels.torch_ops.fp8_gemm", perf_shape="deepport.kernels.fp8_gemm:perf_shape"),
    OpDescriptor(_moe_layout, oracle="deepport.kernels.f64.moe:layout_f64",
                 suite="deepport.conformance.suites.moe_layout",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe",
                 custom_op="deepport.kernels.torch_ops.moe"),
    OpDescriptor(_moe_dispatch, oracle="deepport.kernels.f64.moe:dispatch_f64",
                 suite="deepport.conformance.suites.moe_dispatch",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe"),
    OpDescriptor(_moe_combine, oracle="deepport.kernels.f64.moe:combine_f64",
                 suite="deepport.conformance.suites.moe_combine",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe"),
    OpDescriptor(_moe_dispatch_expanded, oracle="deepport.kernels.f64.moe:expanded_rows_f64",
                 suite="deepport.conformance.suites.moe_dispatch_expanded",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe_permute"),
    OpDescriptor(_moe_combine_expanded, oracle="deepport.kernels.f64.moe:combine_f64",
                 suite="deepport.conformance.suites.moe_combine_expanded",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe_permute"),
    OpDescriptor(_moe_low_latency_dispatch, oracle="deepport.kernels.f64.moe:packed_rows_f64",
                 suite="deepport.conformance.suites.moe_low_latency_dispatch",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe",
                 custom_op="deepport.kernels.torch_ops.moe"),
    OpDescriptor(_moe_low_latency_combine, oracle="deepport.kernels.f64.moe:combine_f64",
                 suite="deepport.conformance.suites.moe_low_latency_combine",
                 tolerances="deepport.conformance.tolerance:MOE", bench="deepport.bench.configs.moe_permute",
                 custom_op="deepport.kernels.torch_ops.moe"),
    # m_grouped_fp8_gemm_nt_contiguous
    OpDescriptor(_fp8_grouped_gemm.VARIANTS[0], oracle="deepport.kernels.f64.fp8_grouped_gemm:contiguous_f64",
                 suite="deepport.conformance.suites.fp8_grouped_gemm:SUITES",
                 tolerances="deepport.conformance.tolerance:FP8_GROUPED_GEMM",
                 bench="deepport.bench.configs.fp8_grouped_gemm",
                 custom_op="deepport.kernels.torch_ops.fp8_grouped_gemm",
                 perf_shape="deepport.kernels.fp8_grouped_gemm:contiguous_perf_shape"),
    # m_grouped_fp8_gemm_nt_masked
    OpDescriptor(_fp8_grouped_gemm.VARIANTS[1], oracle="deepport.kernels.f64.fp8_grouped_gemm:masked_rows_f64",
                 suite="deepport.conformance.suites.fp8_grouped_gemm:SUITES",
                 tolerances="deepport.conformance.tolerance:FP8_GROUPED_GEMM",
                 bench="deepport.bench.configs.fp8_grouped_gemm",
                 custom_op="deepport.kernels.torch_ops.fp8_grouped_gemm",
                 perf_shape="deepport.kernels.fp8_grouped_gemm:masked_perf_shape"),
)

for _d in DESCRIPTORS:  # OPS and dispatch's op names (dispatch never imports this package)
    add_op(_d)

__all__ = ["DESCRIPTORS", "OPS", "OpDescriptor", "OpSpec", "bind_call", "bind_for_dispatch", "descriptor",
           "descriptors", "op_added", "op_module"]


def op_module(op: str) -> OpSpec:
    """The contract of ``op`` (``ValueError`` naming deepport's ops if there is none)."""
    return descriptor(op).spec


def bind_call(op: str, *args: Any, **kwargs: Any) -> CallSignature:
    """Validate ``op``'s arguments exactly as the op does and return the call's signature."""
    return bind_for_dispatch(op, *args, **kwargs)[0]


def bind_for_dispatch(op: str, *args: Any, **kwargs: Any) -> tuple[CallSignature, Mapping[str, int] | None]:
    """Validate ``op``'s arguments exactly as the op does; return what the op hands dispatch: the call's
    signature and its shape features (``call.perf_shape``; ``None`` for an op without any)."""
    call = op_module(op).bind(*args, **kwargs)
    signature: CallSignature = call.signature
    shape: Mapping[str, int] | None = getattr(call, "perf_shape", None)
    return signature, shape
