"""The abstract op interface: one module per op family, each the spec of its ops.

``OPS`` maps each op name to its module; every op module exposes ``OP`` (the name), ``OP_VERSION``,
``bind(...)`` (validate every argument of the op but ``backend=``, return the call a backend receives)
and ``example_signature``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from deepport.dispatch.capability import CallSignature
from deepport.kernels import mla_decode as _mla_decode

OPS: dict[str, ModuleType] = {
    _mla_decode.OP: _mla_decode,
}


def op_module(op: str) -> ModuleType:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; deepport's ops: {', '.join(OPS)}") from None


def bind_call(op: str, *args: Any, **kwargs: Any) -> CallSignature:
    """Validate ``op``'s arguments exactly as the op does and return the call's signature."""
    signature: CallSignature = op_module(op).bind(*args, **kwargs).signature
    return signature
