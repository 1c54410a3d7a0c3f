"""Exception types raised by deepport.

Every error names what it is about and says expected versus got. The hierarchy lets callers catch
what they can act on:

- :class:`InvalidArgumentError` (a ``ValueError``): an argument breaks the op's contract. Raised by
  the op layer before any backend runs. :class:`ArgumentTypeError` (also a ``TypeError``) is the
  subclass for a wrong Python type or tensor dtype.
- :class:`BackendNotSupportedError` (a ``RuntimeError``): the backend chosen explicitly (argument,
  context or environment) cannot run this exact call; carries the backend's reasons.
- :class:`NoBackendError` (a ``RuntimeError``): automatic selection found no backend able to run the
  call; carries every backend's reasons.
- :class:`UnknownBackendError` (a ``KeyError``-like ``ValueError``): a backend name nobody registered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class DeepportError(Exception):
    """Base class of every error deepport raises on purpose."""


class InvalidArgumentError(DeepportError, ValueError):
    """An argument breaks the op's contract (shape, stride, device, value range)."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"`{argument}`: {message}")


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong Python type or tensor dtype."""


class UnknownBackendError(DeepportError, ValueError):
    """A backend name that no registered backend carries."""

    def __init__(self, name: str, known: Sequence[str], source: str | None = None) -> None:
        self.name = name
        self.source = source
        named_by = f" (named by {source})" if source else ""
        super().__init__(f"unknown backend {name!r}{named_by}; registered backends: {', '.join(known)}")


class BackendNotSupportedError(DeepportError, RuntimeError):
    """An explicitly chosen backend cannot run this call. Never followed by a silent fallback."""

    def __init__(self, op: str, backend: str, source: str, reasons: Sequence[str]) -> None:
        self.op = op
        self.backend = backend
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in reasons)
        super().__init__(
            f"backend {backend!r} (chosen by {source}) cannot run {op} for this call:\n{lines}"
        )


class NoBackendError(DeepportError, RuntimeError):
    """Automatic selection found no registered backend able to run the call."""

    def __init__(self, op: str, reasons: Mapping[str, Sequence[str]]) -> None:
        self.op = op
        self.reasons = {k: list(v) for k, v in reasons.items()}
        lines = "\n".join(f"  {name}: {'; '.join(rs)}" for name, rs in reasons.items())
        super().__init__(f"no backend can run {op} for this call:\n{lines}")
