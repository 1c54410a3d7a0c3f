"""Every backend's verdict on one bound call, and which one would run it (``deepport.explain`` binds the
call in the op layer, :mod:`deepport.kernels.explain`, then asks here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from deepport.dispatch import perf_table, selection
from deepport.dispatch.capability import CallSignature
from deepport.errors import DeepportError


@dataclass(frozen=True)
class Explanation:
    op: str
    signature: CallSignature
    verdicts: tuple[selection.Verdict, ...]
    chosen: str | None  # the backend this call would run on, None if it would raise
    source: str  # what chose it ("automatic", "argument", "$DEEPPORT_BACKEND" ...) or the error
    reason: str = ""  # an automatic choice: why this backend (measured ranking or priority order)
    measured: perf_table.Measured | None = None  # the measured ranking an automatic choice followed

    def __str__(self) -> str:
        lines = [f"{self.op} on {self.signature.device.describe()}", f"  call: {self.signature}"]
        for v in self.verdicts:
            mark = "->" if v.backend == self.chosen else "  "
            prio = "-" if v.priority is None else str(v.priority)
            state = "can run" if v.can_run else "cannot run: " + "; ".join(v.reasons)
            figure = self.measured.figure(v.backend) if self.measured is not None else None
            timed = f"  measured {figure.time_us:.1f} us" if figure is not None else ""
            lines.append(f"  {mark} {v.backend:<12} priority {prio:>3}  {state}{timed}")
        lines.append(f"  chosen: {self.chosen or 'none'} ({self.source})")
        if self.reason:
            lines.append(f"  why: {self.reason}")
        return "\n".join(lines)


def explain_signature(op: str, signature: CallSignature, backend: str | None = None,
                      shape: Mapping[str, int] | None = None) -> Explanation:
    """Every backend's verdict on a bound call of ``op`` (its ``signature`` and shape features ``shape``), and
    the one that would run it with ``backend=`` as given. :func:`deepport.explain` binds the op's arguments,
    then calls this."""
    found = tuple(selection.verdicts(op, signature))
    try:
        chosen, source = selection.choose(op, signature, backend, shape)
        name: str | None = chosen.name
    except DeepportError as exc:
        return Explanation(op, signature, found, None, f"{type(exc).__name__}: {exc}")
    if source != "automatic":
        return Explanation(op, signature, found, name, source)
    auto = selection.automatic(op, signature, shape)  # cached by choose: no second log line
    return Explanation(op, signature, found, name, source, auto.reason, auto.measured)
