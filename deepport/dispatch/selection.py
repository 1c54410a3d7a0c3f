"""Choosing a backend for one call: a pure function of (op, call signature, device, settings).

Order: the call's ``backend=`` argument, then :func:`deepport.use_backend`, then
``DEEPPORT_BACKEND_<OP>`` / ``DEEPPORT_BACKEND``, then the automatic priority list for the
device's kind. An explicit choice that cannot run raises with its reasons and never falls back.
The automatic choice is logged (logger ``deepport.dispatch``) once per (op, signature).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from deepport.dispatch import registry, settings
from deepport.dispatch.backend import Backend
from deepport.dispatch.capability import CallSignature
from deepport.errors import BackendNotSupportedError, NoBackendError, UnknownBackendError

_log = logging.getLogger("deepport.dispatch")
_auto_cache: dict[tuple[str, object, int], Backend] = {}
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


def choose(op: str, signature: CallSignature, backend: str | None = None) -> tuple[Backend, str]:
    """The backend that runs this call, and what chose it (``"argument"``, ``"$DEEPPORT_BACKEND"`` ...)."""
    if backend is not None:
        return _explicit(op, signature, backend, "the backend= argument"), "argument"
    requested = settings.requested_backend(op)
    if requested is not None:
        name, source = requested
        return _explicit(op, signature, name, source), source
    return _automatic(op, signature), "automatic"


def _explicit(op: str, signature: CallSignature, name: str, source: str) -> Backend:
    try:
        chosen = registry.get(name)
    except UnknownBackendError:  # say where the name came from: a typo in an env var is hard to trace
        raise UnknownBackendError(name, [b.name for b in registry.all_backends()], source) from None
    reasons = chosen.reasons(op, signature)
    if reasons:
        raise BackendNotSupportedError(op, name, source, reasons)
    return chosen


def _automatic(op: str, signature: CallSignature) -> Backend:
    generation = registry.generation()
    key = (op, signature, generation)
    cached = _auto_cache.get(key)
    if cached is not None:
        return cached
    found = verdicts(op, signature)
    runnable = [v for v in found if v.can_run and v.priority is not None]
    if not runnable:
        raise NoBackendError(op, {v.backend: v.reasons or ("not chosen automatically on this device",)
                                  for v in found})
    winner = runnable[0]
    # Ranked before the winner yet not chosen: those could not run this call.
    skipped = "; ".join(f"{v.backend}: {', '.join(v.reasons)}" for v in found[:found.index(winner)])
    chosen = registry.get(winner.backend)
    level = logging.WARNING if chosen.oracle else logging.INFO
    _log.log(level, "deepport: %s [%s] on %s -> %s (priority %s)%s%s", op, signature, signature.device.describe(),
             winner.backend, winner.priority, f"; passed over {skipped}" if skipped else "",
             "; this is the float64 NumPy oracle, slow by design" if chosen.oracle else "")
    with _auto_lock:
        for stale in [k for k in _auto_cache if k[2] != generation]:  # the registry changed since
            del _auto_cache[stale]
        _auto_cache[key] = chosen
    return chosen
