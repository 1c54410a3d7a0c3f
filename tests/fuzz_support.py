"""Shared machinery of the property-based fuzz tests (``tests/test_*_fuzz.py``).

Each fuzz test draws a small *valid* call of an op, mutates exactly one thing into an invalid call, and
requires, through :func:`assert_refused`:

- a deepport error (:class:`InvalidArgumentError`, or its subclass :class:`ArgumentTypeError`, both
  :class:`DeepportError`) whose ``argument`` is the mutated argument and whose message starts with it;
- no backend implementation was looked up or run (:func:`spying_on_backends` replaces
  ``Backend.implementation`` for every backend, so none can run unseen);
- no input changed (every tensor reachable from the arguments is compared bit for bit with a clone).

Runs are deterministic (``derandomize=True``, no example database). ``DEEPPORT_FUZZ_EXAMPLES`` sets the
examples per fuzz test (default :data:`DEFAULT_EXAMPLES`); ``DEEPPORT_FUZZ_EXAMPLES=10000`` is the
long run (see docs/VALIDATION.md for the measured counts and times).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

from deepport.dispatch import Backend
from deepport.errors import DeepportError, InvalidArgumentError

DEFAULT_EXAMPLES = 1000
INT32_MAX = 2**31 - 1


def examples(default: int = DEFAULT_EXAMPLES) -> int:
    """Examples per fuzz test: ``$DEEPPORT_FUZZ_EXAMPLES`` or ``default``."""
    return int(os.environ.get("DEEPPORT_FUZZ_EXAMPLES", default))


def fuzz_settings(default: int = DEFAULT_EXAMPLES) -> settings:
    """Deterministic settings for CI: fixed derandomized search, no database, no deadline."""
    return settings(max_examples=examples(default), derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# ---- calls -------------------------------------------------------------------------------------------------------

@dataclass
class Call:
    """One op call: ``fn(*args, **kwargs)``; ``runs`` is whether a valid call reaches a backend."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    runs: bool = True
    note: str = ""

    def replace(self, position: int | str, value: Any) -> Call:
        """A copy with positional argument ``position`` (int) or keyword ``position`` (str) replaced."""
        if isinstance(position, int):
            args = list(self.args)
            args[position] = value
            return dataclasses.replace(self, args=tuple(args))
        return dataclasses.replace(self, kwargs={**self.kwargs, position: value})

    def invoke(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``value`` (tensors, tuples, lists, dicts, dataclass records)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in tensors_in(getattr(value, f.name))]
    return []


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of ``t``'s storage as a uint8 tensor (a view: a zero-stride view of 2^31 logical
    elements costs only its storage; NaNs and -0.0 compare bit for bit)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def snapshot(call: Call) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, copy of its storage's bytes)`` for every tensor with data among the call's arguments."""
    return [(t, _storage_bytes(t).clone()) for t in tensors_in((call.args, call.kwargs)) if t.device.type != "meta"]


def assert_unchanged(before: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for t, copy in before:
        assert torch.equal(_storage_bytes(t), copy), f"an input changed: {t.dtype} {tuple(t.shape)}"


# ---- backends ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def spying_on_backends() -> Iterator[list[tuple[str, str]]]:
    """Replace every backend's implementation lookup with a recorder that does nothing; yields the log of
    ``(backend, op)`` lookups. Used around each example (not a fixture: hypothesis runs many examples)."""
    log: list[tuple[str, str]] = []

    def implementation(self: Backend, op: str) -> Callable[..., Any]:
        log.append((self.name, op))

        def run(*args: Any, **kwargs: Any) -> None:
            return None

        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Backend, "implementation", implementation)
        yield log


def assert_refused(call: Call, names: str | tuple[str, ...]) -> InvalidArgumentError:
    """``call`` raises a deepport argument error naming one of ``names``, runs no backend, changes no input."""
    expected = (names,) if isinstance(names, str) else names
    before = snapshot(call)
    with spying_on_backends() as log:
        try:
            call.invoke()
        except InvalidArgumentError as err:
            error = err
        else:
            raise AssertionError(f"accepted an invalid call ({call.note}); expected an error naming {expected}")
    assert isinstance(error, DeepportError)
    assert error.argument in expected, f"{call.note}: named {error.argument!r}, expected {expected}: {error}"
    assert str(error).startswith(f"`{error.argument}`: "), str(error)
    assert log == [], f"{call.note}: a backend implementation was looked up: {log}"
    assert_unchanged(before)
    return error


def assert_reaches_backend(call: Call) -> list[tuple[str, str]]:
    """A valid ``call`` passes validation, looks up exactly one implementation (or none, for the documented
    no-op sizes), and changes no input."""
    before = snapshot(call)
    with spying_on_backends() as log:
        call.invoke()
    assert len(log) == (1 if call.runs else 0), f"{call.note}: implementation lookups {log}"
    assert_unchanged(before)
    return log


# ---- tensor mutations shared by every op ---------------------------------------------------------------------------

def strided_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, stride 2 in the last dimension (needs ``t.shape[-1] > 1`` to be refused)."""
    wide = torch.zeros(*t.shape[:-1], 2 * int(t.shape[-1]), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, not contiguous (stride 2 in dimension 0; needs ``t.shape[0] > 1``)."""
    wide = torch.zeros(2 * int(t.shape[0]), *t.shape[1:], dtype=t.dtype, device=t.device)
    view = wide[::2]
    view.copy_(t)
    return view


NOT_TENSORS: tuple[Any, ...] = (None, 3, 1.5, "tensor", [1, 2], (1, 2))


def sharing_memory(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(copy of t, other)``: ``other`` is a new contiguous tensor of ``shape``/``dtype`` whose bytes overlap
    the copy's (both non-empty), starting ``shift`` bytes (rounded down to 8, kept inside the copy) in."""
    size_t = t.numel() * t.element_size()
    size_o = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    buffer = torch.zeros(size_t + size_o + 16, dtype=torch.uint8)
    copy = buffer[:size_t].view(t.dtype).view(t.shape)
    copy.copy_(t)
    start = min(shift, size_t - 1) // 8 * 8
    other = buffer[start:start + size_o].view(dtype).view(shape)
    return copy, other
