"""Every backend's verdict on one bound call, and which one would run it (``deepport.explain`` binds the
call in the op layer, :mod:`deepport.kernels.explain`, then asks here)."""

from __future__ import annotations

from dataclasses import dataclass

from deepport.dispatch import selection
from deepport.dispatch.capability import CallSignature
from deepport.errors import DeepportError


@dataclass(frozen=True)
class Explanation:
    op: str
    signature: CallSignature
    verdicts: tuple[selection.Verdict, ...]
    chosen: str | None  # the backend this call would run on, None if it would raise
    source: str  # what chose it ("automatic", "argument", "$DEEPPORT_BACKEND" ...) or the error

    def __str__(self) -> str:
        lines = [f"{self.op} on {self.signature.device.describe()}", f"  call: {self.signature}"]
        for v in self.verdicts:
            mark = "->" if v.backend == self.chosen else "  "
            prio = "-" if v.priority is None else str(v.priority)
            state = "can run" if v.can_run else "cannot run: " + "; ".join(v.reasons)
            lines.append(f"  {mark} {v.backend:<12} priority {prio:>3}  {state}")
        lines.append(f"  chosen: {self.chosen or 'none'} ({self.source})")
        return "\n".join(lines)


def explain_signature(op: str, signature: CallSignature, backend: str | None = None) -> Explanation:
    """Every backend's verdict on a bound call of ``op`` (its ``signature``), and the one that would run it
    with ``backend=`` as given. :func:`deepport.explain` binds the op's arguments, then calls this."""
    found = tuple(selection.verdicts(op, signature))
    try:
        chosen, source = selection.choose(op, signature, backend)
        name: str | None = chosen.name
    except DeepportError as exc:
        name, source = None, f"{type(exc).__name__}: {exc}"
    return Explanation(op, signature, found, name, source)
