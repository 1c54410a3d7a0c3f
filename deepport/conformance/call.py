"""The backend's side of a case: stage the inputs, poison the outputs, call the public op.

This half runs where the backend runs: in the harness's process, or in a spawned worker
(:mod:`~deepport.conformance.isolation`). It never computes or sees the reference; the judging half
(:mod:`~deepport.conformance.runner`) regenerates the pristine inputs and does that afterwards.

Outputs are caller-allocated: after the call, each tensor the harness passed must still describe the
same memory (device, dtype, shape, strides, offset, data and storage pointers) and that memory is what
gets judged, so a backend that rebinds ``out`` to fresh memory (``out.set_(...)``) fails even though
the tensor object would show a right answer (:func:`written_in_place`).
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


def _buffer_identity(t: torch.Tensor) -> tuple[object, ...]:
    """Where a tensor's elements live: device, dtype, shape, strides, storage offset and, for a non-empty
    tensor, its data pointer and its storage's base pointer and size."""
    where: tuple[object, ...] = (t.device, t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
    if t.numel() == 0:
        return where
    return (*where, t.data_ptr(), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A second tensor over exactly ``t``'s memory: it keeps showing the caller's buffer whatever the
    backend does to the ``t`` object itself (``set_``, ``resize_``, ``as_strided_``)."""
    return t.as_strided(tuple(t.shape), t.stride(), t.storage_offset())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def written_in_place(name: str, given: torch.Tensor, identity: tuple[object, ...],
                     caller_view: torch.Tensor) -> str | None:
    """Why output ``name`` was not written into the buffer the caller passed (``None`` if it was).

    The op writes into caller-allocated memory: a backend that rebinds the tensor object to fresh memory
    (``out.set_(fresh)``) leaves the caller's buffer stale for anyone holding it (a preallocated
    workspace, a captured CUDA graph, a view). So the object must still describe the same memory
    (``identity``, taken before the call) and show the same bits as ``caller_view``, a view of it."""
    now = _buffer_identity(given)
    if now != identity:
        return (f"output `{name}` was not written in place: the tensor passed as `{name}` now points at other "
                f"memory (before the call {identity}, after {now}; e.g. `{name}.set_(...)`), so the caller's "
                f"buffer was not written")
    if not _same_bits(given, caller_view):
        return f"output `{name}` differs from the memory the caller passed (rebound to other storage)"
    return None


def fresh_outputs(suite: ModuleType, inputs: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The case's output buffers on ``device``: poisoned, then the suite's prefill (if any)."""
    outputs = {n: poisoned(shape, dtype, device) for n, (shape, dtype) in suite.output_specs(inputs).items()}
    prefill = getattr(suite, "prefill_outputs", None)
    if prefill is not None:  # content the op must leave where it writes nothing (e.g. rows past masked_m)
        prefill(inputs, outputs)
    return outputs


def stage(suite: ModuleType, case: Case, seed: int,
          device: torch.device) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Generate the inputs and keep only what the backend gets: device copies, poisoned outputs and the
    call's non-tensor arguments (``suite.invoke(call_spec, tensors, backend, outputs)``). The host-side
    originals are dropped before the call."""
    inputs = suite.generate(case, seed)
    tensors = {n: t.to(device, copy=True) for n, t in inputs.tensors.items()}
    outputs = fresh_outputs(suite, inputs, device)
    return dataclasses.replace(inputs, tensors={}), tensors, outputs


def call_backend(suite: ModuleType, case: Case, seed: int, backend: str, device: torch.device,
                 repro: str, *, to_host: bool = False) -> CallOutcome:
    """Stage ``case`` for ``backend`` on ``device``, call the public op once, and report what happened.

    ``duration_s`` covers staging and the call. With ``to_host`` the outputs are moved to the host
    (for a worker process to send them back).
    """
    started = time.perf_counter()
    try:
        call_spec, tensors, outputs = stage(suite, case, seed, device)
    except Exception as exc:
        return CallOutcome(Status.INTERNAL_ERROR, f"could not generate or stage inputs: {exc!r}",
                           time.perf_counter() - started)
    identities = {n: _buffer_identity(t) for n, t in outputs.items()}
    caller_views = {n: _alias(t) for n, t in outputs.items()}  # the caller's memory, whatever `t` becomes
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
    rebound = [why for n, t in outputs.items()
               if (why := written_in_place(n, t, identities[n], caller_views[n])) is not None]
    if rebound:
        return CallOutcome(Status.FAIL, "; ".join(rebound) + f" {repro}", duration)
    outputs = caller_views  # judge the caller's memory itself
    digests = {n: tensor_sha256(t) for n, t in tensors.items()}
    late = after_return(outputs, returned)
    if late:
        return CallOutcome(Status.FAIL, "; ".join(late) + f" {repro}", duration)
    outputs = returned
    if to_host:
        outputs = {n: t.detach().cpu() for n, t in outputs.items()}
    return CallOutcome(None, "", duration, outputs, "cpu" if to_host else str(device), digests)
