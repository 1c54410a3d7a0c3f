"""Running cases on backends, with the harness's anti-cheating rules.

For each case: generate pristine inputs on the host from the case's seed (fresh per run); for each
backend, copy the inputs to the device, poison every output element (NaN for floats), call the
public op with ``backend=`` (so the op layer's validation and dispatch run as for a user), then
check that no input changed (bitwise), compute the float64 reference from the pristine copies
(after the first backend ran, never visible to it), make sure the case can discriminate
(:mod:`~deepport.conformance.calibration`), and compare every output.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fnmatch
import gc
import hashlib
import platform
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

import deepport
from deepport.conformance.calibration import calibrate
from deepport.conformance.case import TIERS, Case
from deepport.conformance.checker import check_output
from deepport.conformance.results import CaseResult, Status, SuiteRun
from deepport.conformance.suites import SUITES
from deepport.conformance.tolerance import Tolerance, tolerance
from deepport.dispatch import device_info, registry
from deepport.errors import BackendNotSupportedError, InvalidArgumentError

SUITE_VERSION = "2026.11.1"


def usable_backends() -> list[str]:
    """Registered backends whose toolchain is usable in this process."""
    return [b.name for b in registry.all_backends() if b.unavailable_reason is None]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def concrete_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:0`` (the current device): tensors report their index, and outputs are checked
    against the device they must be on."""
    return torch.empty(0, device=device).device


def select_cases(tier: str, ops: Sequence[str] | None = None, pattern: str | None = None) -> list[Case]:
    """The cases of ``tier`` (``full`` includes ``smoke``), optionally by op and by id glob/substring."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    unknown = set(ops or ()) - set(SUITES)
    if unknown:
        raise ValueError(f"no conformance cases for {sorted(unknown)}; ops with cases: {sorted(SUITES)}")
    chosen = []
    for op, suite in SUITES.items():
        if ops and op not in ops:
            continue
        for case in suite.cases():
            if not case.in_tier(tier):
                continue
            if pattern and not (fnmatch.fnmatch(case.id, pattern) or pattern in case.id):
                continue
            chosen.append(case)
    return chosen


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


def _bitwise_equal(got: torch.Tensor, pristine: torch.Tensor) -> bool:
    got = got.detach().cpu()
    if got.shape != pristine.shape or got.dtype != pristine.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[pristine.element_size()]
    return torch.equal(got.contiguous().view(as_int), pristine.contiguous().view(as_int))


def _inputs_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of the generated inputs (names, dtypes, shapes, strides and bytes), for the record."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()};".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stage(suite: ModuleType, case: Case, seed: int,
           device: torch.device) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Generate the inputs and keep only what the backend gets: device copies, poisoned outputs, and the
    call's non-tensor arguments. The host-side originals are dropped before the call."""
    inputs = suite.generate(case, seed)
    tensors = {n: t.to(device, copy=True) for n, t in inputs.tensors.items()}
    outputs = {n: _poisoned(shape, dtype, device) for n, (shape, dtype) in suite.output_specs(inputs).items()}
    return dataclasses.replace(inputs, tensors={}), tensors, outputs


def _run_backend(suite: ModuleType, case: Case, backend: str, device: torch.device, seed: int,
                 run_seed: int) -> CaseResult:
    """One backend on one case, isolated from the suite's answers and from every other backend.

    1. Generate the inputs from ``(case, seed)``, stage device copies, poison the outputs, drop the
       host originals; 2. call the public op; 3. regenerate the pristine inputs (objects the backend
       never saw), check its copies are bitwise unchanged, compute the float64 reference, calibrate
       the case, compare. Nothing of this run outlives the function, so a later backend cannot find
       this one's outputs or the reference in memory. ``duration_s`` covers staging and the call.
    """
    started = time.perf_counter()
    result = CaseResult(case.id, case.op, backend, case.tier, case.profile, case.features, case.params, seed,
                        Status.PASS, 0.0)
    repro = (f"(case seed {seed}; reproduce: deepport certify --backend {backend} --tier {case.tier} "
             f"--device {device} --case '{case.id}' --seed {run_seed})")
    try:
        call_spec, tensors, outputs = _stage(suite, case, seed, device)
    except Exception as exc:
        result.status, result.message = Status.INTERNAL_ERROR, f"could not generate or stage inputs: {exc!r}"
        result.duration_s = time.perf_counter() - started
        return result
    try:
        suite.invoke(call_spec, tensors, backend, outputs)
        _synchronize(device)
    except BackendNotSupportedError as exc:
        result.status, result.message = Status.NOT_SUPPORTED, "; ".join(exc.reasons)
    except InvalidArgumentError as exc:
        result.status, result.message = Status.INTERNAL_ERROR, f"the suite generated an invalid call: {exc}"
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.status = Status.ERROR
        result.message = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno}) {repro}"
    result.duration_s = time.perf_counter() - started
    if result.status is not Status.PASS:
        return result

    pristine = suite.generate(case, seed)
    result.metrics["inputs"] = {"sha256": _inputs_sha256(pristine.tensors)}
    failures = [f"input `{n}` was modified by the call" for n, t in tensors.items()
                if not _bitwise_equal(t, pristine.tensors[n])]
    specs = suite.output_specs(pristine)
    dtypes = {n: spec[1] for n, spec in specs.items()}
    tolerances: dict[str, Tolerance] = {n: tolerance(suite.OP, n, suite.dtype_name(pristine)) for n in specs}
    references = suite.reference(pristine)
    problems = calibrate(references, dtypes, tolerances, seed)
    if problems:
        result.status = Status.INTERNAL_ERROR
        result.message = "case failed calibration: " + "; ".join(problems)
        return result
    for name, reference in references.items():
        check = check_output(name, outputs[name], reference, dtype=dtypes[name], device=device,
                             tol=tolerances[name])
        result.metrics[name] = check.metrics
        result.tolerance[name] = tolerances[name].to_dict()
        failures += check.failures
    if failures:
        result.status, result.message = Status.FAIL, "; ".join(failures) + " " + repro
    return result


def run_case(case: Case, backends: Sequence[str], device: torch.device | str, run_seed: int) -> list[CaseResult]:
    """Run one case on each backend: the same inputs (same seed) for all, each run isolated."""
    suite = SUITES[case.op]
    seed = case.seed(run_seed)
    dev = concrete_device(device)
    results = []
    for backend in backends:
        results.append(_run_backend(suite, case, backend, dev, seed, run_seed))
        gc.collect()  # this backend's outputs and the reference are gone before the next one runs
    return results


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Identity of what ran: software versions and the device, as the frameworks report them."""
    info = device_info(device)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "deepport": deepport.__version__,
        "deepport_git": _git_revision(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "device": {"type": info.type, "index": info.index, "kind": info.kind, "vendor": info.vendor,
                   "name": info.name, "arch": info.arch, "multiprocessors": info.multiprocessors},
    }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def run_suite(
    backends: Sequence[str],
    tier: str,
    *,
    device: torch.device | str | None = None,
    run_seed: int | None = None,
    ops: Sequence[str] | None = None,
    case_pattern: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    command: str = "",
) -> SuiteRun:
    """Run every selected case on every backend and return the whole record.

    ``run_seed`` defaults to a fresh random seed (recorded in the result, printed with each failure);
    pass it back to reproduce a run. ``on_start(total)`` and ``on_result(result)`` drive progress
    display. Unknown backend names raise before anything runs.
    """
    dev = concrete_device(default_device() if device is None else device)
    known = {b.name: b for b in registry.all_backends()}
    for name in backends:
        registry.get(name)  # raises UnknownBackendError with the registered names
    seed = secrets.randbits(63) if run_seed is None else int(run_seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"run_seed must be in [0, 2**64), got {seed}")
    chosen = select_cases(tier, ops, case_pattern)
    if on_start is not None:
        on_start(len(chosen) * len(backends))
    started, t0 = _now(), time.perf_counter()
    results: list[CaseResult] = []
    for case in chosen:
        for r in run_case(case, backends, dev, seed):
            results.append(r)
            if on_result is not None:
                on_result(r)
    backend_info: dict[str, dict[str, Any]] = {
        n: {"version": known[n].version, "summary": known[n].summary,
            "available": known[n].unavailable_reason is None, "unavailable_reason": known[n].unavailable_reason}
        for n in backends
    }
    generator_versions = {op: s.GENERATOR_VERSION for op, s in SUITES.items()}
    return SuiteRun(SUITE_VERSION, max(generator_versions.values()), tier, seed, command, started, _now(),
                    time.perf_counter() - t0, environment(dev), backend_info, results,
                    {"ops": list(ops) if ops else None, "case_pattern": case_pattern})


def results_by_status(run: SuiteRun) -> Mapping[str, list[CaseResult]]:
    grouped: dict[str, list[CaseResult]] = {}
    for r in run.cases:
        grouped.setdefault(r.status.value, []).append(r)
    return grouped
