"""Run-to-run reproducibility: each case run N times with identical inputs, outputs compared bit for bit.

For each backend and selected case: the inputs are generated once from the case's seed and copied to the
device once; then ``repeats`` times, fresh output buffers (poisoned, prefilled like a conformance call) are
handed to the public op with the same input tensors, and the outputs are copied to the host. Every run's
outputs are compared with the first run's bit for bit (NaN included). A case is ``identical`` when every
run matched; otherwise ``differs``, with the number of differing elements and the largest absolute and
relative (to the output's largest magnitude) difference seen: the run-to-run spread.

The backend's claim (``Backend.determinism``, :class:`~deepport.dispatch.Determinism`) for the op on the
device's kind decides the verdict: a claimed-bitwise case that differs fails, as does any error or a
backend that changed its inputs; where nothing is claimed the spread is reported and does not fail.
Multi-rank MoE cases run every repetition on the rank group, like a conformance call; ``not_supported``
calls (a backend's declared limits, too few GPUs) are reported as such.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.conformance.call import fresh_outputs, synchronize, tensor_sha256
from deepport.conformance.case import Case
from deepport.conformance.plugins import load_plugins
from deepport.conformance.runner import concrete_device, default_device, environment, select_cases
from deepport.conformance.suites import SUITES
from deepport.dispatch import device_info, registry
from deepport.errors import BackendNotSupportedError

IDENTICAL, DIFFERS, NOT_SUPPORTED, ERROR = "identical", "differs", "not_supported", "error"


@dataclass
class Spread:
    """Run-to-run differences of one output over all runs, against the first run."""

    name: str
    elements: int
    differing: int = 0  # the most elements that differed (bitwise) in any one run
    max_abs: float = 0.0  # largest |run - first| over finite pairs; inf where only one of them is finite
    max_rel: float = 0.0  # max_abs over the first run's largest finite magnitude

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DeterminismResult:
    """One backend on one case, run ``runs`` times."""

    case_id: str
    op: str
    backend: str
    device_kind: str
    claimed: bool | None  # bitwise reproducibility claimed on this device kind; None: no declaration
    reason: str | None
    status: str
    runs: int
    seconds: float
    spreads: list[Spread] = field(default_factory=list)
    message: str = ""

    @property
    def failed(self) -> bool:
        """An error, or a difference the backend claimed could not happen."""
        return self.status == ERROR or (self.status == DIFFERS and bool(self.claimed))

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "spreads"},
                "failed": self.failed, "spreads": [s.to_dict() for s in self.spreads]}


@dataclass
class DeterminismRun:
    tier: str
    run_seed: int
    repeats: int
    environment: dict[str, Any]
    results: list[DeterminismResult]

    @property
    def failed(self) -> list[DeterminismResult]:
        return [r for r in self.results if r.failed]

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "run_seed": self.run_seed, "repeats": self.repeats,
                "environment": self.environment, "results": [r.to_dict() for r in self.results]}


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def _compare(spread: Spread, first: torch.Tensor, run: torch.Tensor) -> None:
    """Fold the differences of ``run`` against ``first`` (host tensors of one output) into ``spread``."""
    if first.shape != run.shape or first.dtype != run.dtype:
        spread.differing, spread.max_abs, spread.max_rel = spread.elements, float("inf"), float("inf")
        return
    differ = _bits(first) != _bits(run)
    count = int(differ.sum())
    if count == 0:
        return
    spread.differing = max(spread.differing, count)
    if not first.dtype.is_floating_point:
        spread.max_abs = max(spread.max_abs, float((first[differ].long() - run[differ].long()).abs().max()))
        spread.max_rel = spread.max_abs / max(1.0, float(first.long().abs().max()))
        return
    a, b = first.float(), run.float()
    both = torch.isfinite(a) & torch.isfinite(b)
    gap = float((a - b)[both & differ].abs().max()) if bool((both & differ).any()) else 0.0
    if bool((differ & ~both).any()):  # NaN or inf on one side only, or NaN payload bits
        gap = float("inf")
    scale = float(a[torch.isfinite(a)].abs().max()) if bool(torch.isfinite(a).any()) else 0.0
    spread.max_abs = max(spread.max_abs, gap)
    spread.max_rel = max(spread.max_rel, gap / scale if scale > 0 else (float("inf") if gap > 0 else 0.0))


def repeat_case(case: Case, backend: str, device: torch.device, seed: int, repeats: int) -> DeterminismResult:
    """Run ``case`` ``repeats`` times on ``backend`` with the same input tensors; compare the outputs."""
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2, got {repeats}")
    suite = SUITES[case.op]
    kind = device_info(device).kind
    claim = registry.get(backend).determinism_of(case.op)
    result = DeterminismResult(case.id, case.op, backend, kind, None if claim is None else claim.bitwise(kind),
                               None if claim is None else claim.reason, IDENTICAL, 0, 0.0)
    started = time.perf_counter()
    try:
        inputs = suite.generate(case, seed)
        tensors = {n: t.to(device, copy=True) for n, t in inputs.tensors.items()}
        before = {n: tensor_sha256(t) for n, t in tensors.items()}
        call_spec = dataclasses.replace(inputs, tensors={})
        first: dict[str, torch.Tensor] = {}
        for run in range(repeats):
            outputs = fresh_outputs(suite, inputs, device)
            suite.invoke(call_spec, tensors, backend, outputs)
            synchronize(device)
            host = {n: t.detach().cpu() for n, t in outputs.items()}
            result.runs += 1
            if run == 0:
                first = host
                result.spreads = [Spread(n, int(t.numel())) for n, t in host.items()]
                continue
            for spread in result.spreads:
                _compare(spread, first[spread.name], host[spread.name])
        changed = [n for n, t in tensors.items() if tensor_sha256(t) != before[n]]
    except BackendNotSupportedError as exc:
        result.status, result.message = NOT_SUPPORTED, "; ".join(exc.reasons)
        result.spreads = []
        return result
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.status = ERROR
        result.message = f"run {result.runs + 1}: {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        return result
    finally:
        result.seconds = time.perf_counter() - started
    if changed:
        result.status, result.message = ERROR, f"the call modified its inputs {changed}"
    elif any(s.differing for s in result.spreads):
        result.status = DIFFERS
    return result


def run_determinism(
    backends: Sequence[str],
    tier: str = "smoke",
    *,
    device: torch.device | str | None = None,
    repeats: int = 20,
    run_seed: int | None = None,
    ops: Sequence[str] | None = None,
    case_pattern: str | None = None,
    plugins: Sequence[str] = (),
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[DeterminismResult], None] | None = None,
) -> DeterminismRun:
    """Every selected case of the ops each backend implements, ``repeats`` times per backend.

    Unknown backend names raise before anything runs; ``run_seed`` defaults to a fresh random seed."""
    load_plugins(plugins)
    dev = concrete_device(default_device() if device is None else device)
    known = {name: registry.get(name) for name in backends}  # raises UnknownBackendError
    seed = secrets.randbits(63) if run_seed is None else int(run_seed)
    chosen = select_cases(tier, ops, case_pattern)
    plan = [(case, name) for name in backends for case in chosen if known[name].support(case.op) is not None]
    if on_start is not None:
        on_start(len(plan))
    results = []
    for case, name in plan:
        result = repeat_case(case, name, dev, case.seed(seed), repeats)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return DeterminismRun(tier, seed, repeats, environment(dev), results)


def claims_table(backends: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Every declared claim (or its absence) of each registered backend's ops, as rows for docs."""
    rows: list[dict[str, str]] = []
    for backend in registry.all_backends():
        if backends and backend.name not in backends:
            continue
        for support in backend.ops:
            claim = backend.determinism_of(support.op)
            rows.append({"backend": backend.name, "op": support.op,
                         "bitwise_on": "undeclared" if claim is None else
                         ("every device" if "*" in claim.bitwise_on else ", ".join(sorted(claim.bitwise_on)) or "none"),
                         "reason": "" if claim is None else claim.reason})
    return rows


def summary(results: Sequence[DeterminismResult]) -> Mapping[tuple[str, str], dict[str, Any]]:
    """Per (backend, op): case counts by status, the claim, and the worst spread seen."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        row = table.setdefault((r.backend, r.op), {IDENTICAL: 0, DIFFERS: 0, NOT_SUPPORTED: 0, ERROR: 0,
                                                   "claimed": r.claimed, "failed": 0, "max_abs": 0.0,
                                                   "max_rel": 0.0, "runs": 0})
        row[r.status] += 1
        row["failed"] += int(r.failed)
        row["runs"] = max(row["runs"], r.runs)
        for s in r.spreads:
            row["max_abs"] = max(row["max_abs"], s.max_abs)
            row["max_rel"] = max(row["max_rel"], s.max_rel)
    return table
