"""Replaying recorded cases on this machine: does the backend give the same verdict on the same inputs?

A certificate records each case's seed (derived from the run seed) and the sha256 of the inputs it
ran on. :func:`replay` picks a random sample of the recorded (case, backend) pairs, runs each again
with the recorded run seed — in an isolated worker process, so a crash is a ``crash`` — and compares
the verdict and the inputs' digest with the record. A backend that passed only on the certifying
machine's luck, or a record edited after the run, shows up as a mismatch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepport.conformance.isolation import BackendWorker, load_plugins
from deepport.conformance.runner import concrete_device, run_case, select_cases
from deepport.dispatch import registry


class ReplayError(RuntimeError):
    """The sample cannot be replayed here (the backend or the device is missing)."""


@dataclass(frozen=True)
class Replayed:
    """One replayed (case, backend): the recorded and the new status and input digest."""

    case_id: str
    backend: str
    recorded_status: str
    status: str
    recorded_inputs: str | None
    inputs: str | None
    message: str

    @property
    def matches(self) -> bool:
        same_inputs = self.recorded_inputs is None or self.inputs is None or self.recorded_inputs == self.inputs
        return self.status == self.recorded_status and same_inputs

    def line(self) -> str:
        if self.matches:
            return f"{self.case_id} on {self.backend}: {self.status} as recorded"
        if self.status != self.recorded_status:
            return (f"{self.case_id} on {self.backend}: recorded {self.recorded_status}, replayed {self.status}: "
                    f"{self.message}")
        return (f"{self.case_id} on {self.backend}: inputs sha256 {self.inputs} differs from the recorded "
                f"{self.recorded_inputs}")


def _inputs_sha(metrics: Any) -> str | None:
    inputs = metrics.get("inputs") if isinstance(metrics, Mapping) else None
    sha = inputs.get("sha256") if isinstance(inputs, Mapping) else None
    return sha if isinstance(sha, str) else None


def replay_device(results: Mapping[str, Any], device: str | None = None) -> torch.device:
    """``device``, else the recorded device's type (``cuda``, ``cpu`` ...) on this machine."""
    recorded = (results.get("environment") or {}).get("device") or {}
    name = device or str(recorded.get("type") or "cpu")
    try:
        return concrete_device(torch.device(name))
    except (RuntimeError, AssertionError) as exc:
        raise ReplayError(f"cannot replay on device {name!r} here: {exc}") from None


def sample(results: Mapping[str, Any], n: int, rng: random.Random | None = None) -> list[Mapping[str, Any]]:
    """``n`` case records drawn at random (all of them if there are fewer)."""
    records = [r for r in results.get("cases", []) if isinstance(r, Mapping)]
    if n >= len(records):
        return list(records)
    return (rng or random.SystemRandom()).sample(records, n)


def replay(results: Mapping[str, Any], n: int, *, plugins: Sequence[str] = (), device: str | None = None,
           timeout_s: float = 600.0, rng: random.Random | None = None) -> list[Replayed]:
    """Re-run ``n`` sampled case records of ``results`` here, each backend in its own worker process."""
    load_plugins(plugins)
    chosen = sample(results, n, rng)
    names = sorted({str(r["backend"]) for r in chosen})
    for name in names:
        try:
            reason = registry.get(name).unavailable_reason
        except Exception as exc:
            raise ReplayError(f"backend {name!r} is not registered here ({exc}); pass its --plugin") from None
        if reason is not None:
            raise ReplayError(f"backend {name!r} cannot run here: {reason}")
    dev = replay_device(results, device)
    run_seed = int(results["run_seed"])
    cases = {c.id: c for c in select_cases("full")}
    replayed = []
    with contextlib.ExitStack() as stack:
        workers = {b: stack.enter_context(BackendWorker(plugins, timeout_s)) for b in names}
        for rec in chosen:
            case = cases.get(str(rec["case_id"]))
            if case is None:
                raise ReplayError(f"case {rec['case_id']!r} is not in the installed suite")
            (result,) = run_case(case, [str(rec["backend"])], dev, run_seed, workers)
            replayed.append(Replayed(case.id, result.backend, str(rec["status"]), result.status.value,
                                     _inputs_sha(rec.get("metrics")), _inputs_sha(result.metrics), result.message))
    return replayed
