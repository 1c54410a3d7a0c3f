"""Timing a collective call on every rank of a process group, each sample the slowest rank's time.

:func:`time_on_ranks` is called by every rank with the same arguments (it runs collectives of its own:
barriers, and a max over ranks per sample). ``fresh()`` returns a new closure for one call (for an op,
bound once on static buffers: such a closure may be run once only, since a bound call's checked
allocator refuses to hand out the same memory twice); every closure a rank makes writes the same
buffers, so the output of the last run is where the replays write theirs too.

- CUDA: ``calls_per_graph`` closures captured in one CUDA graph (after ``warmup`` eager calls on the
  capture stream); a sample = a barrier, then CUDA events around one replay, divided by the calls in it
  (launch overhead excluded), the max over ranks. Every rank captures; if any rank's capture fails (a
  call synchronises, reads a value on the host ...), every rank says why in the notes and times with
  events around a loop of ``calls_per_graph`` eager calls instead (which includes host launch overhead).
- CPU (and other devices): a barrier, then ``time.perf_counter`` around one call, the max over ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from deepport.bench.timing import Timing

T = TypeVar("T")
Fresh = Callable[[], Callable[[], T]]


def _slowest(us: float, device: torch.device, group: Any) -> float:
    """The max of ``us`` over the group's ranks."""
    import torch.distributed as dist

    t = torch.tensor([us], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _everyone(ok: bool, device: torch.device, group: Any) -> bool:
    """Whether ``ok`` holds on every rank of the group."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(int(flag.item()))


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def time_on_ranks(fresh: Fresh[T], device: torch.device, group: Any, *, samples: int, calls_per_graph: int = 20,
                  warmup: int = 3) -> tuple[Timing, T]:
    """Time one call on every rank (module docstring); returns the timing (slowest rank per sample) and
    the output of the last call run (for a graph: the captured call's, which every replay rewrites)."""
    if samples < 1 or calls_per_graph < 1:
        raise ValueError(f"expected samples >= 1 and calls_per_graph >= 1, got {samples} and {calls_per_graph}")
    if device.type == "cuda":
        return _time_cuda(fresh, device, group, samples, calls_per_graph, warmup)
    return _time_host(fresh, device, group, samples, warmup)


def _time_host(fresh: Fresh[T], device: torch.device, group: Any, samples: int, warmup: int) -> tuple[Timing, T]:
    import torch.distributed as dist

    last: Any = None
    for _ in range(warmup):
        last = fresh()()
    found = []
    for _ in range(samples):
        call = fresh()  # binding is not timed
        dist.barrier(group)
        start = time.perf_counter()
        last = call()
        found.append(_slowest((time.perf_counter() - start) * 1e6, device, group))
    return Timing("host_perf_counter_barrier_max_over_ranks", found), last


def _time_cuda(fresh: Fresh[T], device: torch.device, group: Any, samples: int, per_graph: int,
               warmup: int) -> tuple[Timing, T]:
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up on the capture stream (library handles, communicators, workspaces)
        for _ in range(warmup):
            fresh()()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    calls = [fresh() for _ in range(per_graph)]
    graph = torch.cuda.CUDAGraph()
    why_not = ""
    last: Any = None
    try:
        # thread_local: other threads (the process group's watchdog) may call CUDA while this one captures
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):  # raises if a call can't
            for call in calls:
                last = call()
    except Exception as exc:
        why_not = f"CUDA graph capture failed on this rank ({type(exc).__name__}: {str(exc)[:200]})"
        torch.cuda.synchronize(device)  # raises if the failed capture broke the context
    if not _everyone(not why_not, device, group):
        del graph
        return _time_cuda_loop(fresh, device, group, samples, per_graph,
                               why_not or "CUDA graph capture failed on another rank")
    graph.replay()
    torch.cuda.synchronize(device)
    found = []
    for _ in range(samples):
        _barrier(device, group)
        start, end = _event(), _event()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        found.append(_slowest(start.elapsed_time(end) * 1e3 / per_graph, device, group))
    return Timing("cuda_graph_barrier_max_over_ranks", found, per_graph), last


def _time_cuda_loop(fresh: Fresh[T], device: torch.device, group: Any, samples: int, per_loop: int,
                    why_not: str) -> tuple[Timing, T]:
    found = []
    last: Any = None
    for _ in range(samples):
        calls = [fresh() for _ in range(per_loop)]  # binding is not timed
        _barrier(device, group)
        start, end = _event(), _event()
        start.record()
        for call in calls:
            last = call()
        end.record()
        end.synchronize()
        found.append(_slowest(start.elapsed_time(end) * 1e3 / per_loop, device, group))
    note = f"{why_not}; events around a loop of eager calls include host launch overhead"
    return Timing("cuda_events_barrier_max_over_ranks", found, per_loop, notes=[note]), last


def _barrier(device: torch.device, group: Any) -> None:
    """Every rank idle and past this point before the next sample starts."""
    import torch.distributed as dist

    torch.cuda.synchronize(device)
    dist.barrier(group)
    torch.cuda.synchronize(device)
