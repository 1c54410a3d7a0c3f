"""The records a bench run produces and their JSON form (``bench.json``).

Schema (``schema_version`` 1)::

    {
      "schema": "deepport.bench", "schema_version": 1,
      "command": str, "started": ISO-8601, "finished": ISO-8601, "duration_s": float,
      "environment": {"python", "torch", "torch_cuda", "deepport_git", "device": {"name", ...}, ...},
      "settings": {"device", "quick", "seed", "samples", "baseline", "backends", "ops", "config_pattern"},
      "ceilings": {name: {"name", "unit", "how", "value" | null, "error" | null, "timing": {...}}},
      "results": [BenchResult.to_dict(), ...],
      "summary": {"ok": n, "check_failed": n, "error": n, "not_supported": n, "skipped": n}
    }

A result's ``status``: ``ok`` (checked, then timed), ``check_failed`` (not timed), ``error`` (the backend
raised), ``not_supported`` (the backend declares it cannot run the call), ``skipped`` (e.g. a
multi-process config on too few devices). Only ``ok`` results carry figures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "deepport.bench"
SCHEMA_VERSION = 1
STATUSES = ("ok", "check_failed", "error", "not_supported", "skipped")
FAILING = ("check_failed", "error")


@dataclass
class BenchResult:
    """One backend on one config."""

    op: str
    config: str
    backend: str
    params: dict[str, Any]
    status: str
    message: str = ""
    flops: float = 0.0
    bytes: float = 0.0
    bound: str = "memory"  # which figure is compared with the ceiling: "memory" (GB/s) or "compute" (TFLOP/s)
    check: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] | None = None
    time_us: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    ceiling: str | None = None
    ceiling_value: float | None = None
    ceiling_unit: str | None = None
    pct_of_ceiling: float | None = None
    baseline: str | None = None
    x_baseline: float | None = None  # baseline time / this time: > 1 is faster than the baseline
    host_overhead_us: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def set_time(self, time_us: float) -> None:
        """Record the median time and the rates derived from it."""
        self.time_us = time_us
        self.tflops = self.flops / time_us / 1e6 if self.flops else None
        self.gbps = self.bytes / time_us / 1e3 if self.bytes else None

    def set_ceiling(self, name: str, value: float | None, unit: str) -> None:
        self.ceiling, self.ceiling_value, self.ceiling_unit = name, value, unit
        figure = self.gbps if self.bound == "memory" else self.tflops
        if value and figure is not None:
            self.pct_of_ceiling = 100.0 * figure / value


def summarize(results: list[BenchResult]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def write(document: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load(path: Path) -> dict[str, Any]:
    """Read a ``bench.json``; raises ``ValueError`` naming the problem when it is not one."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a deepport bench results file (schema {SCHEMA!r})")
    return document
