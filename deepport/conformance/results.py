"""The records a conformance run produces, and their JSON form (``results.json``).

``results.json`` is the artifact; the JUnit XML and Markdown summary are derived from it. Schema
(``schema_version`` 1)::

    {
      "schema": "deepport.conformance.results", "schema_version": 1,
      "suite_version": str, "generator_version": int, "tier": "smoke" | "full",
      "run_seed": int,            # every case seed derives from it; --seed reproduces a run
      "command": str, "started": ISO-8601, "finished": ISO-8601, "duration_s": float,
      "environment": {"python", "platform", "deepport", "numpy", "torch", "device": {...}, ...},
      "backends": {name: {"version", "summary", "available", "unavailable_reason"}},
      "selection": {"ops": [...] | null, "case_pattern": str | null},  # filters; empty = whole tier
      "isolation": "process" | "none",   # whether each backend ran in its own worker process
      "waivers": [{"case", "backend", "reason", "category"}, ...],  # applied (never when certifying)
      "summary": {backend: {op: {status: count}}},
      "cases": [CaseResult.to_dict(), ...]
    }
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA = "deepport.conformance.results"
SCHEMA_VERSION = 1


class Status(enum.StrEnum):
    """Outcome of one case on one backend."""

    PASS = "pass"
    FAIL = "fail"  # ran, but an output (or an input it must not touch) is wrong
    NOT_SUPPORTED = "not_supported"  # the backend declares it cannot run this call (with reasons)
    ERROR = "error"  # the backend raised
    INTERNAL_ERROR = "internal_error"  # the suite itself is at fault (e.g. a case failed calibration)
    CRASH = "crash"  # the isolated worker process running the backend died (a kernel fault, an abort)
    TIMEOUT = "timeout"  # the isolated call ran past the per-call limit (a hang); its worker was killed

    def __str__(self) -> str:
        return self.value


@dataclass
class CaseResult:
    """One (case, backend) outcome.

    ``metrics`` maps each output name (``"out"``, ``"lse"``) to its measured errors (``max_abs_err``,
    ``max_rel_err``, ``calc_diff``, ``mismatches`` ...); ``tolerance`` maps each output name to the
    bounds applied. ``message`` says why a case did not pass, with the seed to reproduce it.
    """

    case_id: str
    op: str
    backend: str
    tier: str
    profile: str  # "core" or "extension"
    features: tuple[str, ...]
    params: Mapping[str, Any]
    seed: int
    status: Status
    duration_s: float
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    tolerance: dict[str, dict[str, Any]] = field(default_factory=dict)
    message: str = ""
    waiver: dict[str, str] | None = None  # the vendor's expected-failure entry matching this case, if any

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["waiver"] is None:
            del d["waiver"]
        d["status"] = self.status.value
        d["features"] = list(self.features)
        d["params"] = dict(self.params)  # a Case keeps them read-only; JSON wants a plain dict
        return d


@dataclass
class SuiteRun:
    """A whole run: identity of what ran where, and every case result."""

    suite_version: str
    generator_version: int
    tier: str
    run_seed: int
    command: str
    started: str
    finished: str
    duration_s: float
    environment: dict[str, Any]
    backends: dict[str, dict[str, Any]]
    cases: list[CaseResult]
    selection: dict[str, Any] = field(default_factory=dict)  # filters of this run: ops, case pattern
    isolation: str = "none"  # "process": each backend ran in its own spawned worker; "none": in-process
    waivers: list[dict[str, Any]] = field(default_factory=list)  # entries applied (deepport.conformance.waivers)

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{backend: {op: {status: count}}}`` with every status present (zeros included)."""
        table: dict[str, dict[str, dict[str, int]]] = {}
        for r in self.cases:
            per_op = table.setdefault(r.backend, {}).setdefault(r.op, {s.value: 0 for s in Status})
            per_op[r.status.value] += 1
        return table

    def passed(self) -> bool:
        """True when every case passed, except extension cases the backend declared unsupported.

        ``not_supported`` is an honest answer for an extension (beyond upstream's shapes), but a
        backend that cannot run a core case does not pass: the core profile is what a port promises.
        A case matched by a waiver passes only by not passing (strict: an unexpected pass fails).
        """
        def ok(r: CaseResult) -> bool:
            if r.waiver is not None:
                return r.status is not Status.PASS
            return r.status is Status.PASS or (r.status is Status.NOT_SUPPORTED and r.profile != "core")

        return all(ok(r) for r in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "suite_version": self.suite_version,
            "generator_version": self.generator_version,
            "tier": self.tier,
            "run_seed": self.run_seed,
            "command": self.command,
            "started": self.started,
            "finished": self.finished,
            "duration_s": self.duration_s,
            "environment": self.environment,
            "backends": self.backends,
            "selection": self.selection,
            "isolation": self.isolation,
            "waivers": self.waivers,
            "summary": self.summary(),
            "cases": [r.to_dict() for r in self.cases],
        }
