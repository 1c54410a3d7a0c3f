"""One descriptor per op: everything deepport derives about an op comes from its :class:`OpDescriptor`.

The built-in ops are the ``DESCRIPTORS`` tuple of :mod:`deepport.kernels` (one entry per op). From the
descriptors come: ``deepport.kernels.OPS`` (name -> contract), the op names dispatch knows
(:func:`deepport.dispatch.declare_ops`), the conformance suites (``deepport.conformance.suites.SUITES``),
the tolerance table (``deepport.conformance.tolerance.TOLERANCES``), the bench config modules
(``deepport.bench.configs``) and the torch custom ops (``torch.ops.deepport.*``). Suites, tolerances,
bench configs and custom-op modules are named by strings and imported on first use, so this layer never
imports the conformance suite or the bench.

A test (or an experiment) adds an op with :func:`op_added`; every derived view sees it at once.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from deepport.dispatch import ops as dispatch_ops
from deepport.dispatch.capability import CallSignature
from deepport.dispatch.device import DeviceInfo


class OpSpec(Protocol):
    """An op's contract (its module, or an object for one op of a family whose module serves several)."""

    @property
    def OP(self) -> str: ...

    @property
    def OP_VERSION(self) -> int: ...

    @property
    def bind(self) -> Callable[..., Any]: ...

    @property
    def example_signature(self) -> Callable[[DeviceInfo], CallSignature]: ...


@dataclass(frozen=True)
class OpDescriptor:
    """One op, declared once.

    - ``spec``: the contract (:class:`OpSpec`): ``OP`` (the name), ``OP_VERSION``, ``bind(...)`` (validate
      every argument but ``backend=``, return the call a backend receives) and ``example_signature``;
      :attr:`name` and :attr:`version` are read from it;
    - ``oracle``: ``"module:function"``, the float64 definition (:mod:`deepport.kernels.f64`);
    - ``suite``: the conformance suite, ``"module"`` (the module is the suite) or ``"module:NAME"`` (an
      attribute: the suite itself, or a tuple of suites of which the one whose ``OP`` is this op);
    - ``tolerances``: ``"module:NAME"``, a mapping ``(op, output, dtype) -> Tolerance`` holding this op's
      entries (it may hold other ops' entries too: only this op's are taken);
    - ``bench``: the module exposing this op's ``CONFIGS`` (``deepport.bench.configs``), or ``None``.
      Ops of a family may share one module; it is listed once.
    - ``custom_op``: the module whose import registers this op with ``torch.library`` as
      ``torch.ops.deepport.<name>`` (functional form; an ``<name>_out`` variant where it has one), or
      ``None`` when the op cannot be one (its reason is in ``deepport.kernels.torch_ops.NOT_CUSTOM_OPS``).
      Imported by :func:`deepport.register_torch_ops` (``import deepport`` calls it); ops of a family
      may share one module.
    - ``perf_shape``: ``"module:function"`` mapping the ``params`` of a bench config of the op to the shape
      features (``{"m": .., "n": .., "k": ..}``) automatic selection buckets calls by, or ``None`` (one bucket
      for every call). The op's bound call exposes the same features as ``call.perf_shape`` and hands them
      to dispatch; ``deepport tune-table`` buckets bench results with this function.
    """

    spec: OpSpec
    oracle: str
    suite: str
    tolerances: str
    bench: str | None = None
    custom_op: str | None = None
    perf_shape: str | None = None

    @property
    def name(self) -> str:
        return self.spec.OP

    @property
    def version(self) -> int:
        return self.spec.OP_VERSION

    def load_oracle(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = load(self.oracle)
        return fn

    def load_suite(self) -> Any:
        found = load(self.suite)
        if isinstance(found, tuple):
            picked = [s for s in found if self.name == s.OP]
            if len(picked) != 1:
                raise LookupError(f"{self.suite} holds {len(picked)} suites for {self.name}, expected 1")
            return picked[0]
        if self.name != found.OP:
            raise LookupError(f"{self.suite} is the suite of {found.OP}, not of {self.name}")
        return found

    def load_perf_shape(self) -> Callable[[Mapping[str, Any]], dict[str, int]] | None:
        fn: Callable[[Mapping[str, Any]], dict[str, int]] | None = load(self.perf_shape) if self.perf_shape else None
        return fn

    def load_tolerances(self) -> dict[tuple[str, str, str], Any]:
        table: Mapping[tuple[str, str, str], Any] = load(self.tolerances)
        return {key: tol for key, tol in table.items() if key[0] == self.name}


def load(ref: str) -> Any:
    """The object a ``"module"`` or ``"module:attribute"`` string names (imported now)."""
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


_lock = threading.RLock()
_descriptors: dict[str, OpDescriptor] = {}
_generation = 0  # bumped on every change: derived views rebuild

OPS: dict[str, OpSpec] = {}
"""Every op's contract by name, derived from the descriptors (kept in step by :func:`add_op`)."""


def add_op(descriptor: OpDescriptor) -> None:
    """Declare an op: it reaches ``OPS``, dispatch's op names, and every view derived here."""
    global _generation
    with _lock:
        if descriptor.name in _descriptors:
            raise ValueError(f"an op named {descriptor.name!r} is already declared")
        _descriptors[descriptor.name] = descriptor
        OPS[descriptor.name] = descriptor.spec
        dispatch_ops.declare_ops([descriptor.name])
        _generation += 1


def remove_op(name: str) -> None:
    global _generation
    with _lock:
        if _descriptors.pop(name, None) is None:
            raise ValueError(f"no op named {name!r}")
        del OPS[name]
        dispatch_ops.withdraw_op(name)
        _generation += 1


@contextlib.contextmanager
def op_added(descriptor: OpDescriptor) -> Iterator[OpDescriptor]:
    """Declare ``descriptor``'s op for the duration of a ``with`` block (tests)."""
    add_op(descriptor)
    try:
        yield descriptor
    finally:
        remove_op(descriptor.name)


def descriptors() -> tuple[OpDescriptor, ...]:
    """Every declared op's descriptor, in declaration order."""
    with _lock:
        return tuple(_descriptors.values())


def descriptor(op: str) -> OpDescriptor:
    try:
        return _descriptors[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; deepport's ops: {', '.join(_descriptors)}") from None


K = TypeVar("K")
V = TypeVar("V")


class Derived(Mapping[K, V]):
    """A read-only mapping computed from the descriptors by ``build``, rebuilt when the ops change.

    Item assignment and deletion raise ``TypeError`` (it is a :class:`~collections.abc.Mapping`)."""

    def __init__(self, build: Callable[[tuple[OpDescriptor, ...]], dict[K, V]]) -> None:
        self._build = build
        self._cache: tuple[int, dict[K, V]] | None = None

    def _table(self) -> dict[K, V]:
        with _lock:
            cached = self._cache
            if cached is None or cached[0] != _generation:
                cached = (_generation, self._build(descriptors()))
                self._cache = cached
            return cached[1]

    def __getitem__(self, key: K) -> V:
        return self._table()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"Derived({self._table()!r})"
