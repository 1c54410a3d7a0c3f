"""The abstract op interface: one module per op family, each the spec of its ops.

``OPS`` maps each op name to its spec: a module, or an object for one op of a family whose module
serves several (``fp8_gemm_{nt,nn,tn,tt}``). Every spec exposes ``OP`` (the name), ``OP_VERSION``,
``bind(...)`` (validate every argument of the op but ``backend=``, return the call a backend receives)
and ``example_signature`` (:class:`OpSpec`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from deepport.dispatch import ops as _dispatch_ops
from deepport.dispatch.capability import CallSignature
from deepport.dispatch.device import DeviceInfo
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


class OpSpec(Protocol):
    """What deepport needs of an op's spec (an op module satisfies it)."""

    @property
    def OP(self) -> str: ...

    @property
    def OP_VERSION(self) -> int: ...

    @property
    def bind(self) -> Callable[..., Any]: ...

    @property
    def example_signature(self) -> Callable[[DeviceInfo], CallSignature]: ...


OPS: dict[str, OpSpec] = {
    _mla_decode.OP: _mla_decode,
    _moe_layout.OP: _moe_layout,
    _moe_dispatch.OP: _moe_dispatch,
    _moe_combine.OP: _moe_combine,
    _moe_dispatch_expanded.OP: _moe_dispatch_expanded,
    _moe_combine_expanded.OP: _moe_combine_expanded,
    _moe_low_latency_dispatch.OP: _moe_low_latency_dispatch,
    _moe_low_latency_combine.OP: _moe_low_latency_combine,
    **{variant.OP: variant for variant in _fp8_gemm.VARIANTS},
    **{variant.OP: variant for variant in _fp8_grouped_gemm.VARIANTS},
}

_dispatch_ops.declare_ops(OPS)  # dispatch learns the op names as data (it never imports this package)


def op_module(op: str) -> OpSpec:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; deepport's ops: {', '.join(OPS)}") from None


def bind_call(op: str, *args: Any, **kwargs: Any) -> CallSignature:
    """Validate ``op``'s arguments exactly as the op does and return the call's signature."""
    signature: CallSignature = op_module(op).bind(*args, **kwargs).signature
    return signature
