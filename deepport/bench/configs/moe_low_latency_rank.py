"""What one rank does in a multi-rank low-latency MoE bench config (:mod:`deepport.bench.configs.moe_low_latency`).

Inputs of rank ``r`` (``spec``: the config's params, the backends, the seed, the samples): its
``tokens`` rows (:func:`deepport.bench.configs.moe.routing`, seed ``seed * 100 + r``), and the expert
outputs the combine sums, random bf16 ``[L, R * T_max, hidden]`` (seed ``seed * 100 + 50 + r``; rows past
an expert's count are never read). The ``reference`` backend's dispatch (FP8 as ``use_fp8`` says) and
combine of them on the group are the yardstick. Then, per backend:

1. **the checked call**: the public op with ``backend=`` (default allocator). Dispatch: its outputs
   against the reference's; combine: on the backend's own dispatch's handle, against the reference's
   combine (rules: :mod:`deepport.bench.configs.moe_low_latency_check`). Every rank's findings are
   gathered: a backend that differs on any rank is ``check_failed`` (with them) and is not timed; one
   that raises is ``not_supported`` or ``error``.
2. **the timing**: the backend's implementation on calls bound once each (the op's ``bind``) on static
   buffers (:class:`StaticBuffers`, passed as ``alloc=``), by :func:`deepport.bench.rank_timing.time_on_ranks`
   (on GPUs a CUDA graph of the calls, replayed; the low-latency ops never sync with the host and
   allocate nothing of a data-dependent size, so they capture).
3. **the replay's output** (what the timed calls wrote in the static buffers) against the checked
   call's, by the same rule: a timed call that computes something else fails the check after all.

Last, the raw collective: ``all_to_all_single`` of ``R * T_max`` rows each way (``T_max`` per rank pair,
equal splits, as the op's fixed buffers), each row the op's payload
(:func:`deepport.bench.counting.moe_low_latency_row_bytes`), timed the same way and reported as backend
``<process group backend>_all_to_all`` (``nccl_all_to_all`` on GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import deepport
from deepport.bench import counting, rank_timing
from deepport.bench.configs import moe_low_latency_check as check
from deepport.bench.configs.moe import routing
from deepport.bench.timing import Timing
from deepport.errors import BackendNotSupportedError
from deepport.kernels import OPS
from deepport.kernels.moe_args import Alloc
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchResult

DISPATCH, COMBINE = "moe_low_latency_dispatch", "moe_low_latency_combine"
AGAINST = "the reference backend's outputs on the same group and inputs, every rank"


class StaticBuffers:
    """Output buffers shared by every call bound to them: the ``k``-th tensor a call's allocator (from
    :meth:`alloc`, one per bound call) asks for is the ``k``-th buffer, made at the first ask and then
    reused, so the calls always write the same memory (what a CUDA graph needs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: list[torch.Tensor] = []

    def alloc(self) -> Alloc:
        """A new allocator for one bound call (it hands out buffer 0, 1, ... in turn)."""
        taken = 0

        def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nonlocal taken
            if taken == len(self.buffers):
                self.buffers.append(torch.empty(shape, dtype=dtype, device=self.device))
            t = self.buffers[taken]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"static buffer {taken}: expected {dtype} {tuple(shape)} (what this call asks "
                                 f"for), got {t.dtype} {tuple(t.shape)} (what the first call asked for)")
            taken += 1
            return t

        return take


def raw_name(device: torch.device) -> str:
    """The backend name of the raw collective: ``nccl_all_to_all`` on GPUs, ``gloo_all_to_all`` on CPUs."""
    return ("nccl" if device.type == "cuda" else "gloo") + "_all_to_all"


class RankInputs:
    """One rank's inputs and the reference backend's outputs on them (module docstring)."""

    def __init__(self, rank: int, spec: dict[str, Any], device: torch.device, group: Any) -> None:
        self.spec, self.group = spec, group
        t_max, experts = spec["max_tokens_per_rank"], spec["num_experts"]
        self.x, self.idx, self.w = routing(spec["tokens"], spec["hidden"], experts, spec["topk"],
                                           spec["seed"] * 100 + rank, device)
        self.ref = self.dispatch("reference")
        local = experts // spec["world_size"]
        g = torch.Generator().manual_seed(spec["seed"] * 100 + 50 + rank)
        self.y = torch.randn(local, spec["world_size"] * t_max, spec["hidden"], generator=g).to(device, torch.bfloat16)
        self.ref_combined = deepport.moe_low_latency_combine(self.y, self.idx, self.w, self.ref.handle,
                                                             backend="reference")

    def dispatch(self, backend: str, alloc: Alloc | None = None) -> MoELowLatencyDispatchResult:
        s = self.spec
        return deepport.moe_low_latency_dispatch(self.x, self.idx, s["max_tokens_per_rank"], s["num_experts"],
                                                 group=self.group, use_fp8=s["use_fp8"], backend=backend,
                                                 alloc=alloc)


def differences(op: str, got: Any, inputs: RankInputs) -> list[str]:
    """How ``got`` (a dispatch result, or a combine's output) differs from the reference's."""
    if op == DISPATCH:
        return check.dispatch_differences(got.recv_x, got.recv_count, inputs.ref.recv_x, inputs.ref.recv_count)
    return check.combine_differences(got, inputs.ref_combined)


def _gathered(found: tuple[str, str], group: Any) -> list[tuple[str, str]]:
    """Every rank's ``(status, message)``, in rank order."""
    import torch.distributed as dist

    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, found, group=group)
    return [(str(s), str(m)) for s, m in every]


def _checked_call(op: str, backend: str, inputs: RankInputs) -> tuple[str, str, Any]:
    """``(status, message, what the combine is bound on)`` of this rank's checked call (step 1)."""
    try:
        if op == DISPATCH:
            got: Any = inputs.dispatch(backend)
            handle = None
        else:
            handle = inputs.dispatch(backend).handle
            got = deepport.moe_low_latency_combine(inputs.y, inputs.idx, inputs.w, handle, backend=backend)
    except BackendNotSupportedError as exc:
        return "not_supported", "; ".join(exc.reasons), None
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}", None
    found = differences(op, got, inputs)
    return ("check_failed" if found else "ok"), "; ".join(found), (got, handle)


def static_calls(op: str, backend: str, inputs: RankInputs, handle: Any,
                 device: torch.device) -> Callable[[], Callable[[], Any]]:
    """``fresh()`` for :func:`deepport.bench.rank_timing.time_on_ranks`: each call the backend's
    implementation of ``op`` on a call bound once (the op's ``bind``) on the same :class:`StaticBuffers`;
    the combine is bound on ``handle`` (the backend's own dispatch's)."""
    from deepport.dispatch import registry

    impl = registry.get(backend).implementation(op)
    buffers = StaticBuffers(device)
    spec = inputs.spec

    def bind() -> Any:
        if op == DISPATCH:
            return OPS[op].bind(inputs.x, inputs.idx, spec["max_tokens_per_rank"], spec["num_experts"],
                                group=inputs.group, use_fp8=spec["use_fp8"], alloc=buffers.alloc())
        return OPS[op].bind(inputs.y, inputs.idx, inputs.w, handle, alloc=buffers.alloc())

    def fresh() -> Callable[[], Any]:
        bound = bind()
        return lambda: impl(bound)

    return fresh


def bench_backend(op: str, backend: str, inputs: RankInputs, moved: int, device: torch.device) -> dict[str, Any]:
    """One backend on every rank: checked call, timing, replay check (module docstring); rank 0's record."""
    status, message, kept = _checked_call(op, backend, inputs)
    every = _gathered((status, message), inputs.group)
    for worst in ("error", "not_supported", "check_failed"):
        bad = [f"rank {r}: {m}" for r, (s, m) in enumerate(every) if s == worst]
        if bad:
            failed = {"reference_backend": {"passed": False, "message": "; ".join(bad), "against": AGAINST}}
            return {"backend": backend, "status": worst, "bytes": moved, "message": "; ".join(bad),
                    "check": failed if worst == "check_failed" else {}}
    checked, handle = kept
    fresh = static_calls(op, backend, inputs, handle, device)
    timing, replayed = rank_timing.time_on_ranks(fresh, device, inputs.group, samples=inputs.spec["samples"],
                                                 calls_per_graph=inputs.spec["calls_per_graph"])
    if op == DISPATCH:
        found = check.dispatch_differences(replayed.recv_x, replayed.recv_count, checked.recv_x, checked.recv_count)
    else:
        found = check.combine_differences(replayed, checked)
    every = _gathered(("check_failed" if found else "ok", "; ".join(found)), inputs.group)
    bad = [f"rank {r}: the timed calls' output differs from the checked call's: {m}"
           for r, (s, m) in enumerate(every) if s != "ok"]
    parts: dict[str, Any] = {"reference_backend": {"passed": True, "against": AGAINST},
                             "timed_output": {"passed": not bad, "message": "; ".join(bad),
                                              "against": "the checked call's output, every rank"}}
    if bad:
        return {"backend": backend, "status": "check_failed", "bytes": moved, "message": "; ".join(bad),
                "check": parts}
    return {"backend": backend, "status": "ok", "bytes": moved, "timing": _timing_row(timing), "check": parts}


def _timing_row(timing: Timing) -> dict[str, Any]:
    return {"method": timing.method, "samples_us": timing.samples_us, "calls_per_sample": timing.calls_per_sample,
            "notes": timing.notes}


def bench_raw(spec: dict[str, Any], moved: int, device: torch.device, group: Any) -> dict[str, Any]:
    """The raw collective of the same fixed rows (module docstring); rank 0's record."""
    import torch.distributed as dist

    rows = spec["world_size"] * spec["max_tokens_per_rank"]
    fp8 = spec["op"] == DISPATCH and spec["use_fp8"]
    if fp8:  # e4m3 bytes and float32 scales travel as bytes
        row_bytes = counting.moe_low_latency_row_bytes(spec["hidden"], fp8=True)
        payload = torch.randint(0, 256, (rows, row_bytes), dtype=torch.uint8, device=device)
    else:
        payload = torch.randn(rows, spec["hidden"], device=device).to(torch.bfloat16)
    received = torch.empty_like(payload)

    def fresh() -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            dist.all_to_all_single(received, payload, group=group)
            return received

        return run

    timing, _ = rank_timing.time_on_ranks(fresh, device, group, samples=spec["samples"],
                                          calls_per_graph=spec["calls_per_graph"])
    return {"backend": raw_name(device), "status": "ok", "bytes": moved, "timing": _timing_row(timing),
            "check": {"passed": True, "note": f"raw collective: equal splits of {spec['max_tokens_per_rank']} rows "
                      f"per rank pair, {tuple(payload.shape[1:])} {payload.dtype} rows, the op's bytes"}}


def run_rank(rank: int, spec: dict[str, Any], device: torch.device, group: Any) -> list[dict[str, Any]]:
    """Every backend of ``spec``, then the raw collective, on this rank (module docstring)."""
    op = spec["op"]
    fp8 = op == DISPATCH and spec["use_fp8"]
    moved = counting.moe_low_latency_bytes(spec["world_size"], spec["max_tokens_per_rank"], spec["hidden"], fp8)
    inputs = RankInputs(rank, spec, device, group)
    rows = [bench_backend(op, backend, inputs, moved, device) for backend in spec["backends"]]
    rows.append(bench_raw(spec, moved, device, group))
    return rows
