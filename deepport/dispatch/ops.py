"""The op names dispatch knows, as data: the op layer (:mod:`deepport.kernels`) declares them here.

Dispatch never imports the op layer (the arrow points the other way), so ``use_backend(<op>=...)`` checks
its keywords against this list instead of ``deepport.kernels.OPS``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

_lock = threading.Lock()
_ops: dict[str, None] = {}  # an ordered set: declaration order is the order error messages list


def declare_ops(names: Iterable[str]) -> None:
    """Add op names (idempotent: declaring a known name again changes nothing)."""
    with _lock:
        for name in names:
            _ops.setdefault(name, None)


def withdraw_op(name: str) -> None:
    """Forget one op name (a toy op declared by a test)."""
    with _lock:
        _ops.pop(name, None)


def known_ops() -> tuple[str, ...]:
    """Every declared op name, in declaration order."""
    with _lock:
        return tuple(_ops)
