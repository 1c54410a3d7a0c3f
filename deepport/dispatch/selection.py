"""Choosing a backend for one call: a pure function of (op, call signature, shape
features, device, settings, performance table).

Order: the call's ``backend=`` argument, then :func:`deepport.use_backend`, then
``DEEPPORT_BACKEND_<OP>`` / ``DEEPPORT_BACKEND``, then the automatic choice: among the backends that can
run the call and have a priority on the device's kind, the fastest measured for the call's shape bucket
(the device family's performance table, :mod:`deepport.dispatch.perf_table`), else the highest priority.
An explicit choice that cannot run raises with its reasons and never falls back. The automatic choice
and its reason are logged (logger ``deepport.dispatch``) once per (op, signature, shape bucket).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from deepport.dispatch import perf_table, registry, settings
from deepport.dispatch.backend import Backend
from deepport.dispatch.capability import CallSignature
from deepport.errors import BackendNotSupportedError, NoBackendError, UnknownBackendError

_log = logging.getLogger("deepport.dispatch")
_auto_cache: dict[tuple[str, object, object, str, int], Automatic] = {}
_auto_lock = threading.Lock()


@dataclass(frozen=True)
class Verdict:
    """One backend's answer for one call."""

    backend: str
    reasons: tuple[str, ...]  # empty: it can run the call
    priority: int | None  # automatic-selection rank on this device kind (None: never automatic)

    @property
    def can_run(self) -> bool:
        return not self.reasons


def verdicts(op: str, signature: CallSignature) -> list[Verdict]:
    """Every registered backend's verdict, highest automatic priority first."""
    kind = signature.device.kind
    found = [
        Verdict(b.name, tuple(b.reasons(op, signature)), b.auto_priority(kind)) for b in registry.all_backends()
    ]
    # Stable: equal ranks keep registration order; never-automatic backends (None) come last.
    return sorted(found, key=lambda v: (v.priority is not None, v.priority or 0), reverse=True)


@dataclass(frozen=True)
class Automatic:
    """An automatic choice: the backend, why it won, and the measured ranking it came from (if any)."""

    backend: Backend
    priority: int | None
    reason: str
    measured: perf_table.Measured | None = None


def choose(op: str, signature: CallSignature, backend: str | None = None,
           shape: Mapping[str, int] | None = None) -> tuple[Backend, str]:
    """The backend that runs this call, and what chose it (``"argument"``, ``"$DEEPPORT_BACKEND"`` ...).

    ``shape`` is the call's shape features (``call.perf_shape`` of the op layer: ``m``, ``n``, ``k`` ...),
    which automatic selection buckets to look up measured rankings; ``None``: unknown (priority order).
    """
    if backend is not None:
        return _explicit(op, signature, backend, "the backend= argument"), "argument"
    requested = settings.requested_backend(op)
    if requested is not None:
        name, source = requested
        return _explicit(op, signature, name, source), source
    return automatic(op, signature, shape).backend, "automatic"


def _explicit(op: str, signature: CallSignature, name: str, source: str) -> Backend:
    try:
        chosen = registry.get(name)
    except UnknownBackendError:  # say where the name came from: a typo in an env var is hard to trace
        raise UnknownBackendError(name, [b.name for b in registry.all_backends()], source) from None
    reasons = chosen.reasons(op, signature)
    if reasons:
        raise BackendNotSupportedError(op, name, source, reasons)
    return chosen


def automatic(op: str, signature: CallSignature, shape: Mapping[str, int] | None = None) -> Automatic:
    """The automatic choice for a call (what ``choose`` returns when nothing names a backend), with its reason.

    Among the backends that can run the call and have an automatic priority on the device's kind: the
    first of the performance table's ranking for the call's (device family, op, shape bucket) when the
    table has one (:mod:`deepport.dispatch.perf_table`), else the highest priority. ``DEEPPORT_SELECTION=
    priority`` turns the table off. Cached per (op, signature, bucket); logged once per entry.
    """
    generation = registry.generation()
    mode = settings.selection_mode()
    table = perf_table.table_for(signature.device) if mode == "measured" else None
    labels = table.bucket(op, shape) if table is not None else None
    key = (op, signature, labels, table.origin if table is not None else mode, generation)
    cached = _auto_cache.get(key)
    if cached is not None:
        return cached
    found = verdicts(op, signature)
    runnable = [v for v in found if v.can_run and v.priority is not None]
    if not runnable:
        raise NoBackendError(op, {v.backend: v.reasons or ("not chosen automatically on this device",)
                                  for v in found})
    measured = table.lookup(op, labels, signature.device.name) if table is not None and labels else None
    names = {v.backend: v for v in runnable}
    ranked = [f for f in measured.ranking if f.backend in names] if measured is not None else []
    if measured is not None and ranked:
        winner = names[ranked[0].backend]
        reason = _measured_reason(measured, ranked, signature.device.name)
    else:
        winner = runnable[0]
        reason = _priority_reason(op, signature, mode, table, labels, measured, runnable)
    chosen = registry.get(winner.backend)
    # Ranked before the winner yet not chosen: those could not run this call.
    skipped = "; ".join(f"{v.backend}: {', '.join(v.reasons)}" for v in found[:found.index(winner)] if not v.can_run)
    level = logging.WARNING if chosen.oracle else logging.INFO
    _log.log(level, "deepport: %s [%s] on %s -> %s (priority %s): %s%s%s", op, signature,
             signature.device.describe(), winner.backend, winner.priority, reason,
             f"; passed over {skipped}" if skipped else "",
             "; this is the float64 NumPy oracle, slow by design" if chosen.oracle else "")
    result = Automatic(chosen, winner.priority, reason, measured if ranked else None)
    with _auto_lock:
        for stale in [k for k in _auto_cache if k[4] != generation]:  # the registry changed since
            del _auto_cache[stale]
        _auto_cache[key] = result
    return result


def _measured_reason(measured: perf_table.Measured, ranked: list[perf_table.Figure], device_name: str) -> str:
    first, fastest = ranked[0], min(ranked, key=lambda f: f.time_us)
    where = measured.device if measured.device == device_name else f"{measured.device} (this device: {device_name})"
    what = f"{measured.op} {measured.bucket} on {where}"
    if fastest is not first:
        head = (f"{first.backend}: within {measured.tie_tolerance:.0%} of the fastest measured for {what} "
                f"({first.describe()} vs {fastest.describe()}; ties keep the priority order")
    else:
        others = ", ".join(f.describe() for f in ranked[1:])
        head = (f"{first.backend}: fastest measured for {what} ({first.time_us:.1f} us "
                + (f"vs {others}" if others else "; no other measured backend can run it"))
    blocked = [f for f in measured.ranking if f not in ranked and f.time_us < first.time_us]
    if blocked:
        head += "; faster but cannot run this call: " + ", ".join(f.describe() for f in blocked)
    if len(measured.configs) > 1:
        head += f"; geometric mean over {len(measured.configs)} configs"
    return head + f"; bench {', '.join(measured.runs) or 'unknown'})"


def _priority_reason(op: str, signature: CallSignature, mode: str, table: perf_table.Table | None,
                     labels: tuple[str, str] | None, measured: perf_table.Measured | None,
                     runnable: list[Verdict]) -> str:
    order = "priority order " + ">".join(v.backend for v in runnable)
    device = signature.device
    if mode != "measured":
        return f"DEEPPORT_SELECTION={mode}: {order}"
    if table is None:
        return f"no performance table for {perf_table.family(device)}: {order}"
    if measured is not None:
        return (f"none of the backends measured for {op} {measured.bucket} ({', '.join(measured.backends)}) "
                f"can run this call: {order}")
    if labels is None and op in table.buckets:
        return f"no shape features for the {op} buckets of the {table.family} table: {order}"
    return f"no measurement for {op}{' ' + labels[1] if labels else ''} on {device.name}: {order}"
