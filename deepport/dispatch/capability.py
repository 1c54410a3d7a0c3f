"""Capabilities as data: what a backend supports for one op, and the reasons it gives when it cannot.

A backend declares one :class:`OpSupport` per op. Selection, ``explain``, the error an explicit
choice raises, ``deepport info`` and the conformance suite's ``not_supported`` verdicts all read the
same records, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from deepport.dispatch.device import DeviceInfo


class CallSignature(Protocol):
    """What dispatch knows about a call: hashable, with at least a device and a dtype."""

    @property
    def device(self) -> DeviceInfo: ...

    @property
    def dtype(self) -> torch.dtype: ...


@dataclass(frozen=True)
class Requirement:
    """One constraint on a call. ``check`` returns ``None`` when met, else what the call has instead."""

    description: str
    check: Callable[[Any], str | None]

    def reason(self, signature: Any) -> str | None:
        got = self.check(signature)
        return None if got is None else f"needs {self.description}, got {got}"


def one_of(field_name: str, allowed: Collection[object]) -> Requirement:
    """The signature's ``field_name`` must be one of ``allowed``."""
    shown = "{" + ", ".join(str(a) for a in sorted(allowed, key=str)) + "}"

    def check(sig: Any) -> str | None:
        value = getattr(sig, field_name)
        return None if value in allowed else f"{field_name}={value}"

    return Requirement(f"{field_name} in {shown}", check)


def at_most(field_name: str, limit: int) -> Requirement:
    def check(sig: Any) -> str | None:
        value = getattr(sig, field_name)
        return None if value <= limit else f"{field_name}={value}"

    return Requirement(f"{field_name} <= {limit}", check)


def multiple_of(field_name: str, step: int) -> Requirement:
    def check(sig: Any) -> str | None:
        value = getattr(sig, field_name)
        return None if value % step == 0 else f"{field_name}={value}"

    return Requirement(f"{field_name} a multiple of {step}", check)


@dataclass(frozen=True)
class Determinism:
    """A backend's claim about one op: do repeated calls with identical inputs, on one device, give
    bitwise-identical outputs?

    ``bitwise_on`` lists the device kinds (:attr:`DeviceInfo.kind`: ``"cpu"``, ``"cuda"`` ...) where the
    backend claims it, ``"*"`` for every device; empty: nowhere. ``reason`` says why: what makes the
    results reproducible (one program per output tile, sums in a fixed order) or what does not
    (floating-point atomics). ``deepport determinism`` (:mod:`deepport.conformance.determinism`) checks
    a claim by repeated runs; where nothing is claimed it reports the run-to-run spread.
    """

    reason: str
    bitwise_on: frozenset[str] = frozenset({"*"})

    def bitwise(self, device_kind: str) -> bool:
        """Whether bitwise reproducibility is claimed on devices of ``device_kind``."""
        return "*" in self.bitwise_on or device_kind in self.bitwise_on

    def describe(self) -> str:
        if "*" in self.bitwise_on:
            where = "bitwise reproducible on every device"
        elif self.bitwise_on:
            where = "bitwise reproducible on " + ", ".join(sorted(self.bitwise_on)) + " only"
        else:
            where = "not bitwise reproducible"
        return f"{where}: {self.reason}"


def reproducible(reason: str, on: Collection[str] = ("*",)) -> Determinism:
    """Bitwise reproducible run to run on the device kinds ``on`` (default: every device)."""
    return Determinism(reason, frozenset(on))


def not_reproducible(reason: str) -> Determinism:
    """No claim of bitwise reproducibility on any device (``reason``: what varies between runs)."""
    return Determinism(reason, frozenset())


def device_arch(*archs: str) -> Requirement:
    """The device's architecture tag (``sm_90``, ``cpu``, ``rocm`` ...) must be listed."""

    def check(sig: Any) -> str | None:
        arch = sig.device.arch
        return None if arch in archs else f"{arch} ({sig.device.name})"

    return Requirement(f"device arch in {{{', '.join(archs)}}}", check)


@dataclass(frozen=True)
class OpSupport:
    """A backend's support for one op.

    ``entry`` is ``"module:function"``, imported on the first run only, so declaring support costs
    no import of the backend's toolchain. ``device_kinds`` lists :attr:`DeviceInfo.kind` values, or
    is ``None`` for any torch device. ``dtypes`` are the input dtypes (the op's primary input).
    """

    op: str
    entry: str
    dtypes: frozenset[torch.dtype]
    device_kinds: frozenset[str] | None = None
    requirements: tuple[Requirement, ...] = field(default=())

    def reasons(self, signature: CallSignature) -> list[str]:
        """Every reason this support record rejects ``signature``; empty when it can run."""
        found: list[str] = []
        kind = signature.device.kind
        if self.device_kinds is not None and kind not in self.device_kinds:
            kinds = ", ".join(sorted(self.device_kinds))
            found.append(f"needs a device of kind {{{kinds}}}, got {kind} ({signature.device.name})")
        if signature.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            found.append(f"needs dtype in {{{names}}}, got {str(signature.dtype).removeprefix('torch.')}")
        found += [r for r in (req.reason(signature) for req in self.requirements) if r is not None]
        return found

    def describe(self) -> Iterable[str]:
        """Human-readable lines for docs and ``deepport info``."""
        kinds = "any torch device" if self.device_kinds is None else ", ".join(sorted(self.device_kinds))
        yield f"devices: {kinds}"
        yield "dtypes: " + ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
        for req in self.requirements:
            yield req.description
