"""Run-time settings: the ``use_backend`` context and the ``DEEPPORT_*`` environment variables.

Environment variables (all share the ``DEEPPORT_`` prefix; read at each call, never cached; a
``DEEPPORT_PERF_TABLE`` file is read once per process):

=============================  ======  ========  ==========================================================
variable                       type    default   meaning
=============================  ======  ========  ==========================================================
``DEEPPORT_BACKEND``           str     unset     backend for every op (an explicit choice: raises if it
                                                 cannot run a call, never falls back)
``DEEPPORT_BACKEND_<OP>``      str     unset     backend for one op, e.g. ``DEEPPORT_BACKEND_MLA_DECODE``;
                                                 wins over ``DEEPPORT_BACKEND``
``DEEPPORT_CHECK_VALUES``      0/1     1         check index values (sequence lengths against the block
                                                 table, block ids in range) before each call. Costs one
                                                 device-to-host sync; set 0 only for CUDA-graph capture of
                                                 inputs you have validated yourself
``DEEPPORT_SELECTION``         str     measured  how automatic selection orders the backends that can
                                                 run a call: ``measured`` (the performance table's ranking
                                                 for the call's shape bucket where it has one, else
                                                 priority) or ``priority`` (priorities only, table off)
``DEEPPORT_PERF_TABLE``        path    unset     a performance table (``deepport tune-table``) used instead
                                                 of the shipped one for its device family
=============================  ======  ========  ==========================================================
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType

from deepport.dispatch import ops
from deepport.errors import InvalidArgumentError

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context_choice: ContextVar[Mapping[str, str]] = ContextVar("deepport_backend_choice", default=_EMPTY)

ANY_OP = "*"


@contextlib.contextmanager
def use_backend(name: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Choose backends for calls made inside the ``with`` block (this thread / task only).

    ``use_backend("torch")`` picks one backend for every op; ``use_backend(mla_decode="reference")``
    picks per op; both forms combine (the per-op choice wins within one block), and an inner block
    overrides an outer one: an inner ``use_backend("torch")`` also replaces an outer per-op choice.
    The choice is explicit: a call the backend cannot run raises
    :class:`deepport.errors.BackendNotSupportedError`. An op name deepport does not have raises
    :class:`deepport.errors.InvalidArgumentError` at once (a misspelt op would otherwise do nothing).
    """
    known = ops.known_ops()  # declared by deepport.kernels (dispatch never imports the op layer)
    for op in per_op:
        if op not in known:
            raise InvalidArgumentError(op, f"expected an op name ({', '.join(known)}) as keyword of use_backend, "
                                       f"got {op!r}")
    merged = {} if name is not None else dict(_context_choice.get())
    if name is not None:
        merged[ANY_OP] = name
    merged.update(per_op)
    token = _context_choice.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _context_choice.reset(token)


def op_env_var(op: str) -> str:
    return f"DEEPPORT_BACKEND_{op.upper()}"


def requested_backend(op: str) -> tuple[str, str] | None:
    """The explicitly requested backend for ``op`` outside the call's own argument, with its source."""
    ctx = _context_choice.get()
    if op in ctx:
        return ctx[op], f"use_backend({op}=...)"
    if ANY_OP in ctx:
        return ctx[ANY_OP], "use_backend(...)"
    for var in (op_env_var(op), "DEEPPORT_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value:
            return value, f"${var}"
    return None


SELECTION_MODES = ("measured", "priority")


def selection_mode() -> str:
    """``measured`` (default) or ``priority``, from ``DEEPPORT_SELECTION`` (an unknown value raises)."""
    value = os.environ.get("DEEPPORT_SELECTION", "").strip().lower() or SELECTION_MODES[0]
    if value not in SELECTION_MODES:
        raise InvalidArgumentError("$DEEPPORT_SELECTION", f"expected one of {', '.join(SELECTION_MODES)}, "
                                   f"got {value!r}")
    return value


def check_values() -> bool:
    """Whether the op layer checks index values (``DEEPPORT_CHECK_VALUES``, default on)."""
    return os.environ.get("DEEPPORT_CHECK_VALUES", "1").strip().lower() not in {"0", "false", "no", "off"}
