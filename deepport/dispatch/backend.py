"""The record every backend publishes: its name, its availability probe, its ops and priorities."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deepport.dispatch.capability import CallSignature, Determinism, OpSupport


def _always_available() -> str | None:
    return None


@dataclass(frozen=True, eq=False)
class Backend:
    """A backend: one folder under ``deepport/backends/`` exporting ``BACKEND = Backend(...)``.

    - ``probe()`` returns ``None`` when the backend's toolchain is usable in this process, else why
      not ("pyopencl is not installed"). It runs once per process and must be cheap and side-effect
      free beyond imports.
    - ``ops`` declares, per op, what the backend supports (:class:`OpSupport`).
    - ``priority`` maps a device kind (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"xpu"`` ..., or ``"*"``
      for any other) to the backend's rank in automatic selection: higher is tried first. A kind
      absent from the map (and no ``"*"``) means the backend is never chosen automatically there,
      though it still runs when asked for explicitly.
    - ``oracle``: ``True`` for a float64 definition that is slow by design (the ``reference`` backend).
      Automatic selection still picks it when nothing else can run a call, and then logs a warning.
    - ``profiles``: the conformance profiles (``"mla_decode/core"`` ...) the backend claims, or ``None``
      to let the suite derive its claims from ``ops`` (a profile is claimed when no case of it is
      declared unsupported). A claimed profile must pass entirely (:mod:`deepport.conformance.profiles`).
    - ``identity()``: what the backend runs on as it sees it (driver, runtime, compiler, firmware
      versions, device ids), as short strings; recorded in certificates. Cheap, side-effect free.
    - ``determinism``: per op, whether repeated calls with identical inputs give bitwise-identical
      outputs, on which devices and why (:class:`Determinism`); checked by ``deepport determinism``.
      An op missing here makes no claim (built-in backends declare every op they implement).
    """

    name: str
    summary: str
    version: str
    ops: tuple[OpSupport, ...]
    priority: Mapping[str, int]
    probe: Callable[[], str | None] = field(default=_always_available)
    oracle: bool = False
    profiles: tuple[str, ...] | None = None
    identity: Callable[[], Mapping[str, str]] | None = None
    determinism: Mapping[str, Determinism] = field(default_factory=dict)

    def support(self, op: str) -> OpSupport | None:
        for s in self.ops:
            if s.op == op:
                return s
        return None

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        """``None`` when usable here, else why not (the probe's answer, computed once)."""
        try:
            return self.probe()
        except Exception as exc:  # a probe that crashes means the backend is unusable, with that reason
            return f"probe failed: {type(exc).__name__}: {exc}"

    def reasons(self, op: str, signature: CallSignature) -> list[str]:
        """Every reason this backend cannot run ``op`` for ``signature``; empty when it can."""
        if self.unavailable_reason is not None:
            return [f"unavailable: {self.unavailable_reason}"]
        support = self.support(op)
        if support is None:
            return [f"does not implement {op}"]
        return support.reasons(signature)

    def determinism_of(self, op: str) -> Determinism | None:
        """The backend's reproducibility claim for ``op`` (``None``: it declares none)."""
        return self.determinism.get(op)

    def auto_priority(self, device_kind: str) -> int | None:
        if device_kind in self.priority:
            return self.priority[device_kind]
        return self.priority.get("*")

    def implementation(self, op: str) -> Callable[..., Any]:
        """The function that runs ``op`` (imported on first use)."""
        return _load_entry(self.name, op, self._entry(op))

    def _entry(self, op: str) -> str:
        support = self.support(op)
        if support is None:
            raise LookupError(f"backend {self.name!r} does not implement {op}")
        return support.entry


@functools.cache
def _load_entry(backend: str, op: str, entry: str) -> Callable[..., Any]:
    module_name, _, attr = entry.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    return fn
