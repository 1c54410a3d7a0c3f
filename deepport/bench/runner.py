"""Running a bench: ceilings first, then per config each backend checked, timed and compared.

Per config: one set of inputs (seed), the baseline backend first, then the others. Per backend: one
call on the config (an error or ``BackendNotSupportedError`` is recorded), the two-part check of
:mod:`deepport.bench.check` (a backend that fails it is not timed), timing by
:mod:`deepport.bench.timing` with ``DEEPPORT_CHECK_VALUES=0`` (the inputs were validated by the
checked call; this makes the public call capturable in a CUDA graph where the backend allows), and
the host overhead of deepport's dispatch: the public op call's host time minus that of the backend's
implementation on an already-bound call, with the value checks on and off.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.bench import ceilings, check, timing
from deepport.bench.configs import BenchConfig, Workload
from deepport.bench.results import SCHEMA, SCHEMA_VERSION, BenchResult, summarize
from deepport.conformance.call import synchronize
from deepport.conformance.runner import concrete_device, environment
from deepport.errors import BackendNotSupportedError


def bench_environment(device: torch.device) -> dict[str, Any]:
    """The suite's record of what ran, with the commit named by ``DEEPPORT_GIT_REVISION`` when set: a copied
    work tree (a lent GPU machine's) has no ``.git`` of its own or a stale one, so the run scripts export the
    commit they were started from."""
    env = environment(device)
    named = os.environ.get("DEEPPORT_GIT_REVISION", "").strip()
    if named:
        env["deepport_git"] = named
    return env

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Request:
    """What a bench run does (checked by the CLI before anything runs)."""

    device: torch.device
    configs: Sequence[BenchConfig]
    backends: Sequence[str] | None  # None: every usable backend implementing the op, but `reference`
    baseline: str = "torch"
    quick: bool = False
    seed: int = 0
    command: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return 7 if self.quick else 20


def backends_for(config: BenchConfig, request: Request) -> list[str]:
    """The baseline first, then the requested backends (default: usable ones implementing the op)."""
    from deepport.dispatch import registry

    if request.backends is not None:
        names = list(request.backends)
    else:
        names = [b.name for b in registry.all_backends()
                 if b.unavailable_reason is None and b.support(config.op) is not None and b.name != "reference"]
    return [request.baseline] + [n for n in names if n != request.baseline]


def _poison(outputs: dict[str, torch.Tensor] | Any) -> None:
    for t in outputs.values():
        t.fill_(float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).min)


def _error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f"{type(exc).__name__}: {exc}" + (f" (at {where.filename}:{where.lineno})" if where else "")


class _ConfigRun:
    """One config: its inputs (built once, shared by every backend) and the results so far."""

    def __init__(self, config: BenchConfig, request: Request, twins: dict[tuple[str, str], check.CheckResult]):
        self.config, self.request, self.twins = config, request, twins
        self.device = request.device
        self.workload: Workload = config.build(self.device, request.seed)
        self.rotation: list[Workload] = [self.workload]
        self.baseline_outputs: dict[str, torch.Tensor] | None = None

    def result(self, backend: str, status: str, message: str = "") -> BenchResult:
        c = self.config
        return BenchResult(c.op, c.name, backend, dict(c.params), status, message, c.flops, c.bytes, c.bound)

    def run_backend(self, backend: str) -> BenchResult:
        r = self.result(backend, "ok")
        _poison(self.workload.outputs)  # nothing a previous backend wrote can pass for this one's answer
        try:
            self.workload.call(backend)()
            synchronize(self.device)
        except BackendNotSupportedError as exc:
            r.status, r.message = "not_supported", "; ".join(exc.reasons)
            return r
        except Exception as exc:
            r.status, r.message = "error", _error(exc)
            return r
        if not self._checked(backend, r):
            return r
        try:
            with timing.environment_var("DEEPPORT_CHECK_VALUES", "0"):
                measured = timing.time_calls([w.call(backend) for w in self._rotation()], self.device,
                                             samples=self.request.samples)
            r.timing = measured.summary()
            r.set_time(measured.median_us)
            r.host_overhead_us = self._overhead(backend)
        except Exception as exc:
            r.status, r.message = "error", "while timing: " + _error(exc)
        return r

    def _checked(self, backend: str, r: BenchResult) -> bool:
        c = self.config
        if c.check_case is not None:
            key = (c.check_case, backend)
            if key not in self.twins:
                self.twins[key] = check.reference_twin(c.check_case, backend, self.device, self.request.seed)
            r.check["reference_twin"] = self.twins[key].to_dict()
        if self.workload.reference_check is not None:
            try:
                r.check["reference_sample"] = self.workload.reference_check()
            except Exception as exc:
                r.check["reference_sample"] = {"passed": False, "message": "could not check: " + _error(exc)}
        if "reference_twin" not in r.check and "reference_sample" not in r.check:
            r.check["reference"] = {"passed": False, "message": "the config has no float64 reference check"}
        reference_passed = all(v.get("passed") is not False for v in r.check.values())
        outputs = {n: t.clone() for n, t in self.workload.outputs.items()}
        if backend == self.request.baseline:
            if reference_passed:  # only a baseline that passed the float64 check is a yardstick
                self.baseline_outputs = outputs
            r.check["agreement"] = {"passed": True, "message": "is the baseline"}
        elif self.baseline_outputs is None:
            r.check["agreement"] = {"passed": None, "message": "no checked baseline output to compare with"}
        else:
            r.check["agreement"] = check.agreement(outputs, self.baseline_outputs, c.agreement,
                                                   self.request.baseline, self.workload.agreement_masks).to_dict()
        failed = [f"{part}: {v.get('message') or 'failed'}" for part, v in r.check.items() if v.get("passed") is False]
        if failed:
            r.status, r.message = "check_failed", "; ".join(failed)
        return not failed

    def _rotation(self) -> list[Workload]:
        wanted = timing.copies_for_rotation(self.workload.footprint_bytes, self.device)
        while len(self.rotation) < wanted:
            self.rotation.append(self.config.build(self.device, self.request.seed + len(self.rotation)))
        return self.rotation

    def _overhead(self, backend: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        reps = 3 if self.request.quick else 30
        for label, value in (("check_values_on", "1"), ("check_values_off", "0")):
            with timing.environment_var("DEEPPORT_CHECK_VALUES", value):
                public = timing.host_time_us(self.workload.call(backend), self.device, reps)
                bound = timing.host_time_us(self.workload.bound_call(backend), self.device, reps)
            found[label] = {"public_call_us": public, "bound_call_us": bound, "dispatch_us": public - bound}
        return found


def run(request: Request, progress: Progress | None = None) -> dict[str, Any]:
    """Run the bench and return the results document (see :mod:`deepport.bench.results`)."""
    say = progress or (lambda _msg: None)
    started, t0 = _dt.datetime.now(_dt.UTC), time.perf_counter()
    device = concrete_device(request.device)  # cuda -> cuda:0: what tensors and checks report
    request = dataclasses.replace(request, device=device)
    needed = sorted({ceilings.resolve(c.ceiling, device.type) for c in request.configs}
                    | {ceilings.resolve("memory", device.type)})
    measured: dict[str, ceilings.CeilingResult] = {}
    for name in needed:
        say(f"ceiling {name}")
        measured[name] = ceilings.measure(name, device, request.quick)
    twins: dict[tuple[str, str], check.CheckResult] = {}
    results: list[BenchResult] = []
    for config in request.configs:
        found = _run_config(config, request, device, twins, say)
        ceiling = measured.get(ceilings.resolve(config.ceiling, device.type))
        _finish(found, ceiling, request.baseline)
        results += found
    finished = _dt.datetime.now(_dt.UTC)
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": request.command,
        "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
        "environment": bench_environment(device),
        "settings": {"device": str(device), "quick": request.quick, "seed": request.seed, "samples": request.samples,
                     "baseline": request.baseline, "backends": list(request.backends or []) or None,
                     **request.settings},
        "ceilings": {name: c.to_dict() for name, c in measured.items()},
        "results": [r.to_dict() for r in results],
        "summary": summarize(results),
    }


def _run_config(config: BenchConfig, request: Request, device: torch.device,
                twins: dict[tuple[str, str], check.CheckResult], say: Progress) -> list[BenchResult]:
    backends = backends_for(config, request)
    if config.world_size > 1:
        return _run_distributed(config, request, device, backends)
    try:
        state = _ConfigRun(config, request, twins)
    except Exception as exc:
        message = "could not build the inputs: " + _error(exc)
        return [BenchResult(config.op, config.name, b, dict(config.params), "error", message) for b in backends]
    found = []
    for backend in backends:
        say(f"{config.id} on {backend}")
        found.append(state.run_backend(backend))
    del state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return found


def _run_distributed(config: BenchConfig, request: Request, device: torch.device,
                     backends: list[str]) -> list[BenchResult]:
    visible = torch.cuda.device_count() if device.type == "cuda" else config.world_size
    if config.distributed is None or visible < config.world_size:
        why = ("the config has no distributed runner" if config.distributed is None
               else f"needs {config.world_size} devices, {visible} visible")
        return [BenchResult(config.op, config.name, b, dict(config.params), "skipped", why) for b in backends]
    try:
        found: list[BenchResult] = config.distributed(config, request)
        return found
    except Exception as exc:
        return [BenchResult(config.op, config.name, b, dict(config.params), "error", _error(exc)) for b in backends]


def _finish(found: list[BenchResult], ceiling: ceilings.CeilingResult | None, baseline: str) -> None:
    """Percent of the ceiling and the ratio to the baseline, for every timed result of one config."""
    base = next((r for r in found if r.backend == baseline and r.status == "ok"), None)
    for r in found:
        if r.status != "ok" or r.time_us is None:
            continue
        if ceiling is not None:
            r.set_ceiling(ceiling.name, ceiling.value, ceiling.unit)
        r.baseline = baseline
        if base is not None and base.time_us:
            r.x_baseline = base.time_us / r.time_us
