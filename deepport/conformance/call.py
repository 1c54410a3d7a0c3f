"""The backend's side of a case: stage the inputs, poison the outputs, call the public op.

This half runs where the backend runs: in the harness's process, or in a spawned worker
(:mod:`~deepport.conformance.isolation`). It never computes or sees the reference; the judging half
(:mod:`~deepport.conformance.runner`) regenerates the pristine inputs and does that afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from deepport.conformance.case import Case
from deepport.conformance.rehearsal import rehearse
from deepport.conformance.results import Status
from deepport.conformance.snapshot import after_return, snapshot
from deepport.errors import BackendNotSupportedError, InvalidArgumentError


@dataclass
class CallOutcome:
    """What one call produced. ``status`` is ``None`` when the call returned normally (to be judged).

    ``outputs`` are the harness-allocated output tensors the backend wrote into (moved to the host when
    they cross a process boundary: ``output_device`` says where they are); ``input_digests`` are
    :func:`tensor_sha256` of each input the backend was given, taken after the call.
    """

    status: Status | None
    message: str
    duration_s: float
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    output_device: str = "cpu"
    input_digests: dict[str, str] = field(default_factory=dict)


def tensor_sha256(t: torch.Tensor) -> str:
    """Digest of one tensor: dtype, shape, strides and the bytes of its elements in logical order."""
    t = t.detach().cpu()
    digest = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:{t.stride()};".encode())
    digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of a case's inputs (names, dtypes, shapes, strides and bytes), recorded per case so that a
    verifier can regenerate the inputs from the seed and compare."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()};".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer every element of which fails unless written: NaN for floats, the minimum for ints."""
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


def _stage(suite: ModuleType, case: Case, seed: int,
           device: torch.device) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Generate the inputs and keep only what the backend gets: device copies, poisoned outputs and the
    call's non-tensor arguments. The host-side originals are dropped before the call."""
    inputs = suite.generate(case, seed)
    tensors = {n: t.to(device, copy=True) for n, t in inputs.tensors.items()}
    outputs = {n: poisoned(shape, dtype, device) for n, (shape, dtype) in suite.output_specs(inputs).items()}
    prefill = getattr(suite, "prefill_outputs", None)
    if prefill is not None:  # content the op must leave where it writes nothing (e.g. rows past masked_m)
        prefill(inputs, outputs)
    return dataclasses.replace(inputs, tensors={}), tensors, outputs


def call_backend(suite: ModuleType, case: Case, seed: int, backend: str, device: torch.device,
                 repro: str, *, to_host: bool = False) -> CallOutcome:
    """Stage ``case`` for ``backend`` on ``device``, call the public op once, and report what happened.

    ``duration_s`` covers staging and the call. With ``to_host`` the outputs are moved to the host
    (for a worker process to send them back).
    """
    started = time.perf_counter()
    try:
        call_spec, tensors, outputs = _stage(suite, case, seed, device)
    except Exception as exc:
        return CallOutcome(Status.INTERNAL_ERROR, f"could not generate or stage inputs: {exc!r}",
                           time.perf_counter() - started)
    try:
        rehearse(suite, call_spec, tensors, backend, outputs)  # same buffers, other contents, first
        suite.invoke(call_spec, tensors, backend, outputs)
        returned = snapshot(outputs)  # what the caller's stream sees at return (judged below)
        synchronize(device)
    except BackendNotSupportedError as exc:
        return CallOutcome(Status.NOT_SUPPORTED, "; ".join(exc.reasons), time.perf_counter() - started)
    except InvalidArgumentError as exc:
        return CallOutcome(Status.INTERNAL_ERROR, f"the suite generated an invalid call: {exc}",
                           time.perf_counter() - started)
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return CallOutcome(Status.ERROR, f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno}) {repro}",
                           time.perf_counter() - started)
    duration = time.perf_counter() - started
    digests = {n: tensor_sha256(t) for n, t in tensors.items()}
    late = after_return(outputs, returned)
    if late:
        return CallOutcome(Status.FAIL, "; ".join(late) + f" {repro}", duration)
    outputs = returned
    if to_host:
        outputs = {n: t.detach().cpu() for n, t in outputs.items()}
    return CallOutcome(None, "", duration, outputs, "cpu" if to_host else str(device), digests)
