"""Measured backend rankings as data: which backend was fastest for an op, a shape bucket and a GPU.

A performance table is one JSON file per device family (``deepport/dispatch/perf_tables/<family>.json``,
written by ``deepport tune-table`` from ``deepport bench`` results). Automatic selection reads it to order
the backends that can run a call; with no entry for the call it falls back to the backends' priorities.

The family of a device is :func:`family` of its :class:`~deepport.dispatch.device.DeviceInfo`:
``nvidia-sm90`` (every compute capability 9.0 GPU: H100, H200, H800), else ``<vendor>-<kind>`` or the kind
alone (``cpu``, ``amd-rocm``, ``intel-xpu``). Within a family's table the rankings are kept per device
name (``"NVIDIA H200"``); a device of the family without figures for a bucket uses those of the first device
listed that has them, and says so.

Shape buckets: the op layer hands dispatch a call's shape features as a small ``{name: int}`` mapping
(``m``, ``n``, ``k`` of a GEMM ...; ``call.perf_shape`` in :mod:`deepport.kernels`). Each op's bucket
rule is data in the table: ``{"ranges": {"m": [64, 128, 1024]}, "exact": ["n", "k"]}`` puts a call with
``m = 100, n = 2112, k = 7168`` in bucket ``64<m<=128 n=2112 k=7168``; when that exact shape was not
measured the ranges-only bucket ``64<m<=128`` (every measured shape of that M range together) is used.

Schema (``schema_version`` 1)::

    {
      "schema": "deepport.perf_table", "schema_version": 1, "family": "nvidia-sm90",
      "generated_by": str, "tie_tolerance": 0.03,
      "runs": {run_id: {"started": ISO-8601, "commit": str, "device": str, "command": str, ...}},
      "buckets": {op: {"ranges": {feature: [upper edges, ascending]}, "exact": [feature, ...]}},
      "devices": {device_name: {op: {bucket_label: {
          "configs": [bench config names],
          "ranking": [{"backend": str, "time_us": float, "tflops": float | null, "gbps": float | null,
                       "run": run_id}, ...]}}}}
    }

``ranking`` lists the backends that passed their check on every config of the bucket, fastest first
(``time_us``: the geometric mean over the configs); backends within ``tie_tolerance`` of a faster one
keep their priority order.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepport.dispatch.device import DeviceInfo
from deepport.errors import InvalidArgumentError

SCHEMA = "deepport.perf_table"
SCHEMA_VERSION = 1
TABLE_DIR = Path(__file__).resolve().parent / "perf_tables"
TABLE_ENV = "DEEPPORT_PERF_TABLE"


def family_key(vendor: str, kind: str, arch: str) -> str:
    """The family a device belongs to: ``nvidia-sm90`` for an arch tag ``sm_90``, else ``<vendor>-<kind>``
    (the kind alone when vendor and kind are the same word, as for ``cpu``)."""
    if arch.startswith("sm_"):
        return f"{vendor}-sm{arch.removeprefix('sm_')}"
    return kind if vendor == kind else f"{vendor}-{kind}"


@functools.cache
def family(device: DeviceInfo) -> str:
    return family_key(device.vendor, device.kind, device.arch)


@dataclass(frozen=True)
class BucketRule:
    """How one op's calls are bucketed: ``ranges`` (feature, ascending upper edges) and ``exact`` features."""

    ranges: tuple[tuple[str, tuple[int, ...]], ...]
    exact: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BucketRule:
        ranges = tuple((str(name), tuple(int(e) for e in edges)) for name, edges in data.get("ranges", {}).items())
        for name, edges in ranges:
            if list(edges) != sorted(set(edges)):
                raise ValueError(f"bucket edges of {name!r} must be strictly ascending, got {list(edges)}")
        return cls(ranges, tuple(str(name) for name in data.get("exact", ())))

    def to_json(self) -> dict[str, Any]:
        return {"ranges": {name: list(edges) for name, edges in self.ranges}, "exact": list(self.exact)}

    def labels(self, shape: Mapping[str, int]) -> tuple[str, str] | None:
        """``(exact label, ranges-only label)`` of a call's shape, or ``None`` when a feature is missing."""
        try:
            parts = [range_label(name, edges, int(shape[name])) for name, edges in self.ranges]
            exact = [f"{name}={int(shape[name])}" for name in self.exact]
        except KeyError:
            return None
        coarse = " ".join(parts) or "any"
        return (" ".join([*parts, *exact]) or "any"), coarse


def range_label(name: str, edges: Sequence[int], value: int) -> str:
    """``m<=64``, ``64<m<=128`` ... ``m>1024``: the range of ``edges`` that holds ``value``."""
    lower: int | None = None
    for edge in edges:
        if value <= edge:
            return f"{name}<={edge}" if lower is None else f"{lower}<{name}<={edge}"
        lower = edge
    return f"{name}>{lower}" if lower is not None else name


@dataclass(frozen=True)
class Figure:
    """One backend's measured figure in a bucket."""

    backend: str
    time_us: float
    tflops: float | None
    gbps: float | None
    run: str

    def describe(self) -> str:
        return f"{self.backend} {self.time_us:.1f} us"


@dataclass(frozen=True)
class Measured:
    """The measured ranking that applies to one call: where it came from and the figures, fastest first."""

    op: str
    bucket: str
    device: str  # the device the figures were measured on
    ranking: tuple[Figure, ...]
    configs: tuple[str, ...]
    runs: tuple[str, ...]
    tie_tolerance: float

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(f.backend for f in self.ranking)

    def figure(self, backend: str) -> Figure | None:
        return next((f for f in self.ranking if f.backend == backend), None)


@dataclass(frozen=True)
class Table:
    """A parsed performance table (one device family)."""

    family: str
    origin: str  # the file it was read from
    tie_tolerance: float
    runs: Mapping[str, Mapping[str, Any]]
    buckets: Mapping[str, BucketRule]
    devices: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], origin: str) -> Table:
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"expected schema {SCHEMA!r} version {SCHEMA_VERSION}, got {data.get('schema')!r} "
                             f"version {data.get('schema_version')!r}")
        buckets = {str(op): BucketRule.from_json(rule) for op, rule in data.get("buckets", {}).items()}
        return cls(str(data["family"]), origin, float(data.get("tie_tolerance", 0.03)), data.get("runs", {}),
                   buckets, data.get("devices", {}))

    def bucket(self, op: str, shape: Mapping[str, int] | None) -> tuple[str, str] | None:
        """The call's ``(exact, ranges-only)`` bucket labels (``("any", "any")`` for a rule without features),
        ``None`` if the table has no rule for the op or the call's shape lacks a feature the rule needs."""
        rule = self.buckets.get(op)
        return None if rule is None else rule.labels(shape or {})

    def lookup(self, op: str, labels: tuple[str, str], device_name: str) -> Measured | None:
        """The ranking for a bucket: this device's exact bucket, then its ranges-only bucket, then the same
        two of each other device of the family in table order (the first that has a ranking)."""
        names = [device_name] if device_name in self.devices else []
        names += [name for name in self.devices if name != device_name]
        for name in names:
            for label in dict.fromkeys(labels):
                entry = self.devices[name].get(op, {}).get(label)
                if entry and entry.get("ranking"):
                    ranking = tuple(Figure(str(f["backend"]), float(f["time_us"]), f.get("tflops"), f.get("gbps"),
                                           str(f.get("run", ""))) for f in entry["ranking"])
                    runs = tuple(dict.fromkeys(f.run for f in ranking if f.run))
                    return Measured(op, label, name, ranking, tuple(entry.get("configs", ())), runs,
                                    self.tie_tolerance)
        return None


def load(path: Path) -> Table:
    """Read and parse one table file (``ValueError`` naming the file if it is not a valid table)."""
    try:
        data = json.loads(path.read_text())
        return Table.from_json(data, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a deepport performance table: {exc}") from None


@functools.cache
def _shipped(family_name: str) -> Table | None:
    path = TABLE_DIR / f"{family_name}.json"
    return load(path) if path.is_file() else None


@functools.cache
def _from_env(path: str) -> Table:
    try:
        return load(Path(path))
    except ValueError as exc:
        raise InvalidArgumentError(f"${TABLE_ENV}", str(exc)) from None


def table_for(device: DeviceInfo) -> Table | None:
    """The table that applies to ``device``: the file named by ``$DEEPPORT_PERF_TABLE`` when its family is
    the device's, else the one shipped for the family, else ``None``."""
    name = family(device)
    override = os.environ.get(TABLE_ENV, "").strip()
    if override:
        table = _from_env(override)
        if table.family == name:
            return table
    return _shipped(name)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))
