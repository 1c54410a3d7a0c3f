"""``deepport.explain``: every backend's verdict on one call, and which one would run it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def explain(op: str, *args: Any, **kwargs: Any) -> Explanation:
    """Every backend's verdict on ``op(*args, **kwargs)``, without running it.

    Takes exactly the arguments of the op (``backend=`` included); validates them like the op does,
    so an invalid call raises the same :class:`~deepport.errors.InvalidArgumentError`.
    """
    from deepport.kernels import bind_call

    backend = kwargs.pop("backend", None)
    signature = bind_call(op, *args, **kwargs)
    found = tuple(selection.verdicts(op, signature))
    try:
        chosen, source = selection.choose(op, signature, backend)
        name: str | None = chosen.name
    except DeepportError as exc:
        name, source = None, f"{type(exc).__name__}: {exc}"
    return Explanation(op, signature, found, name, source)
