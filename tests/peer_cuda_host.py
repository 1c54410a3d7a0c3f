"""Where the host's time goes in the expert-parallel ops' eager calls: two processes, on one GPU or two.

With two GPUs each rank has its own, over NCCL, and the hopper path is the hopper backend itself
(``DEEPPORT_HOPPER_EP=1``: symmetric memory over NVLink), the torch backend's exchanges NCCL's. With one GPU
both ranks share it over a gloo group and the CUDA-IPC peer transport (triton's steps over it: the hopper
path's work), the torch backend's exchanges through the same transport.

``deepport bench`` times the normal MoE ops (issue 14's 4096-token configs) with CUDA events around one
eager call, the argument checks included, so the host's work counts wherever the GPU waits for it. Each
call reads its counts on the host once (and once more for the value checks of ``topk_idx`` unless
``DEEPPORT_CHECK_VALUES=0``); after the last read the GPU can run no faster than the host launches the rest.

Per call, on each rank, this splits the host's wall time at its device-to-host reads (``tolist``,
``item``, ``bool`` of a tensor, timed while the step runs):

- **before**: from the call to its first read (launching the routing kernels, the checks);
- **blocked**: inside the reads (waiting for the GPU, the peer's count exchange, the copy);
- **between**: host work between two reads;
- **after**: from the last read's return to the call's return (launching everything that moves the
  payload and fills the outputs);

and gives the CUDA-event span of the call on this rank's stream. With one GPU the two processes time-slice
it, so *blocked* and the span are upper bounds there; *before*, *between* and *after* are this rank's own
host work: the op cannot take less than ``before + after`` plus the GPU work that must follow the last
read. Issue 14's sizes (hidden 7168, top-8 of 256, EP=2).

``python -m tests.peer_cuda_host [--calls N] [--cprofile STEP]`` prints a table per rank (medians over N
calls, default 20); with ``--cprofile``, rank 0 also runs the steps whose name contains ``STEP`` (value
checks off) under cProfile and prints the host functions behind them; with ``DEEPPORT_HOST_SPLIT=1`` first
the inclusive host time of the pieces of the hopper path's dispatch and combine (each piece wrapped with
a timer).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tests.peer_cuda_one_gpu import run_ranks

READS = ("tolist", "item", "__bool__", "__int__", "__float__")


@contextmanager
def timed_reads(spans: list[tuple[float, float]]) -> Iterator[None]:
    """Inside the block, every ``Tensor.tolist``/``item``/``__bool__`` of a CUDA tensor and every
    ``torch.cuda.Event.synchronize`` (the wait before a read of pinned memory) appends its ``(entry, exit)``
    ``time.perf_counter`` times to ``spans``."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str) -> Callable[..., Any]:
        real = saved[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type != "cuda":
                return real(self, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                return real(self, *args, **kwargs)
            finally:
                spans.append((t0, time.perf_counter()))

        return read

    event_sync = torch.cuda.Event.synchronize

    def waited(self: torch.cuda.Event) -> None:  # a read of pinned memory after its event: the wait is the read
        t0 = time.perf_counter()
        try:
            event_sync(self)
        finally:
            spans.append((t0, time.perf_counter()))

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    torch.cuda.Event.synchronize = waited  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
        torch.cuda.Event.synchronize = event_sync  # type: ignore[method-assign]


def split_call(step: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """One call of ``step`` (GPU idle before it): microseconds before / blocked / between / after its reads,
    its host wall time and the CUDA-event span, and how many reads it made."""
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    spans: list[tuple[float, float]] = []
    with timed_reads(spans):
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        t1 = time.perf_counter()
    torch.cuda.synchronize(device)
    us = 1e6
    blocked = sum(b - a for a, b in spans)
    before = (spans[0][0] - t0) if spans else t1 - t0
    after = (t1 - spans[-1][1]) if spans else 0.0
    return {"before": before * us, "blocked": blocked * us, "between": (t1 - t0 - blocked - before - after) * us,
            "after": after * us, "wall": (t1 - t0) * us, "span": start.elapsed_time(end) * 1e3,
            "reads": float(len(spans))}


def median_split(step: Callable[[], Any], device: torch.device, calls: int) -> dict[str, float]:
    """:func:`split_call`'s figures, medians over ``calls`` calls after 3 untimed ones, the ranks meeting at a
    barrier before each (``step`` is collective)."""
    for _ in range(3):
        step()
    rows = []
    for _ in range(calls):
        dist.barrier()
        rows.append(split_call(step, device))
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _steps(group: Any, device: torch.device, hopper: str) -> list[tuple[str, Callable[[], Any]]]:
    """The calls timed: the op layer alone, then each op of the hopper path (``hopper``: the backend that runs
    it) and of the torch backend."""
    import deepport
    from deepport.bench.configs.moe import routing

    rank = dist.get_rank(group)
    xn, idxn, wn = routing(4096, 7168, 256, 8, 2000 + rank, device)
    x, idx, w = routing(128, 7168, 256, 8, 1000 + rank, device)
    y = torch.randn(128, 2 * 128, 7168, device=device).to(torch.bfloat16)
    from deepport.dispatch import selection
    from deepport.kernels import OPS

    def op_layer(op: str, *args: Any, **kwargs: Any) -> Callable[[], Any]:  # the public op minus the backend's work
        def run() -> Any:
            call = OPS[op].bind(*args, **kwargs)
            return selection.choose(op, call.signature, hopper)
        return run

    first = deepport.moe_dispatch(xn, idxn, wn, 256, group=group, backend=hopper)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("op layer only: dispatch 4096", op_layer("moe_dispatch", xn, idxn, wn, 256, group=group)),
        ("op layer only: combine 4096", op_layer("moe_combine", first.recv_x, first.handle)),
    ]
    def graphs_off(step: Callable[[], Any]) -> Callable[[], Any]:  # the same kernels launched one by one
        def run() -> Any:
            os.environ["DEEPPORT_MOE_GRAPHS"] = "0"
            try:
                return step()
            finally:
                os.environ.pop("DEEPPORT_MOE_GRAPHS", None)
        return run

    normal = deepport.moe_dispatch(xn, idxn, wn, 256, group=group, backend=hopper)
    steps += [(f"{hopper} (graphs off): dispatch 4096", graphs_off(functools.partial(
        deepport.moe_dispatch, xn, idxn, wn, 256, group=group, backend=hopper))),
              (f"{hopper} (graphs off): combine 4096", graphs_off(functools.partial(
                  deepport.moe_combine, normal.recv_x, normal.handle, backend=hopper)))]
    for backend in (hopper, "torch"):
        normal = deepport.moe_dispatch(xn, idxn, wn, 256, group=group, backend=backend)
        ll = deepport.moe_low_latency_dispatch(x, idx, 128, 256, group=group, use_fp8=True, backend=backend)
        steps += [
            (f"{backend}: dispatch 4096", functools.partial(deepport.moe_dispatch, xn, idxn, wn, 256, group=group,
                                                            backend=backend)),
            (f"{backend}: combine 4096", functools.partial(deepport.moe_combine, normal.recv_x, normal.handle,  # type: ignore[arg-type]
                                                           backend=backend)),
            (f"{backend}: low-latency dispatch 128", functools.partial(
                deepport.moe_low_latency_dispatch, x, idx, 128, 256, group=group, use_fp8=True, backend=backend)),
            (f"{backend}: low-latency combine 128", functools.partial(
                deepport.moe_low_latency_combine, y, idx, w, ll.handle, backend=backend)),
        ]
    return steps


def _cprofile(step: Callable[[], Any], device: torch.device, calls: int) -> list[str]:
    """The host's Python functions behind ``calls`` calls of ``step`` (cProfile, by cumulative time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize(device)
        prof.enable()
        step()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    text2 = io.StringIO()
    pstats.Stats(prof, stream=text2).sort_stats("tottime").print_stats(30)
    return ["cProfile (cumulative):", text.getvalue(), "cProfile (own time):", text2.getvalue()]


def _split(group: Any, device: torch.device, calls: int, backend: str) -> list[str]:
    """Inclusive host time of the pieces of the hopper path's 4096-token dispatch and combine (``backend``, value
    checks off), per call: each piece's module or class attribute wrapped with a timer for the duration of the
    calls (a CUDA graph's replay and a Triton launch among them)."""
    import dataclasses

    import deepport
    from deepport.backends.torch import moe_routes as torch_routes
    from deepport.backends.triton import fast_launch, moe_route_graph, moe_sum_graph
    from deepport.backends.triton import moe_routes as triton_routes
    from deepport.bench.configs.moe import routing
    from deepport.dispatch import selection
    from deepport.kernels import moe_combine, moe_dispatch

    spent: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return run

    rank = dist.get_rank(group)
    xn, idxn, wn = routing(4096, 7168, 256, 8, 2000 + rank, device)
    patches = [(moe_dispatch, "bind"), (moe_combine, "bind"), (selection, "choose"), (torch_routes, "route"),
               (torch_routes, "exchange_table"), (torch_routes, "rows_window"), (torch_routes, "_dispatch_blocks"),
               (torch_routes, "_meta"), (torch_routes, "MoEHandle"), (torch_routes, "return_rows"),
               (torch.cuda.CUDAGraph, "replay"), (fast_launch.FastLaunch, "__call__"),
               (moe_sum_graph._Program, "prepare"), (moe_route_graph._Exchange, "prepare"),
               (moe_route_graph, "_store"), (torch.Tensor, "copy_")]
    saved = [(m, a, getattr(m, a)) for m, a in patches]
    routes = triton_routes.ROUTES
    steps = {f: timed(f, getattr(routes, f)) for f in ("layout_table", "rows_to_blocks", "blocks_to_rows",
                                                        "route_prelude", "blocks_exchange", "sum_in_place")
             if getattr(routes, f, None) is not None}
    lines = []
    try:
        for m, a, fn in saved:
            setattr(m, a, timed(f"{getattr(m, '__name__', m)}.{a}", fn))
        triton_routes.ROUTES = dataclasses.replace(routes, **steps)
        normal = deepport.moe_dispatch(xn, idxn, wn, 256, group=group, backend=backend)
        ops = {"dispatch": functools.partial(deepport.moe_dispatch, xn, idxn, wn, 256, group=group, backend=backend),
               "combine": functools.partial(deepport.moe_combine, normal.recv_x, normal.handle, backend=backend)}
        for op, call in ops.items():
            for _ in range(3):
                call()
            spent.clear()
            walls: list[float] = []
            reads: list[tuple[float, float]] = []
            with timed_reads(reads):
                for _ in range(calls):
                    dist.barrier()
                    torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    call()
                    walls.append(time.perf_counter() - t0)
                    torch.cuda.synchronize(device)
            spent["(host reads: blocked)"] = sum(b - a for a, b in reads)
            lines.append(f"split of {backend} {op} 4096 (checks off), us per call over {calls} calls; wall "
                         f"{1e6 * sum(walls) / calls:.1f}, median {1e6 * statistics.median(walls):.1f} "
                         f"(inclusive times, nested):")
            lines += [f"    {1e6 * v / calls:9.1f}  {k}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])]
    finally:
        for m, a, fn in saved:
            setattr(m, a, fn)
        triton_routes.ROUTES = routes
    return lines


def _worker(rank: int, world: int, init: str, results: Any, calls: int, profile: str = "") -> None:
    from deepport.backends.hopper.peer_memory_cuda import CudaPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch.moe_comm import use_transport
    from deepport.kernels import moe_args

    out: list[str] = []
    try:
        if torch.cuda.device_count() >= world:  # a GPU per rank, as on an EP machine: NCCL, the hopper backend
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            os.environ["DEEPPORT_HOPPER_EP"] = "1"
            dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=120))
            group, hopper = dist.group.WORLD, "hopper"
            context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:  # both ranks on one GPU (time-sliced): gloo names the ranks, the CUDA-IPC peer transport moves bytes
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
            dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=120))
            group, hopper = dist.group.WORLD, "triton"
            checked = moe_args.resolve_group  # CUDA tensors on a gloo group: only the peer transport moves bytes
            moe_args.resolve_group = lambda g, d: checked(g, torch.device("cpu"))  # type: ignore[assignment]
            memory = CudaPeerMemory(group, device, capacity=64 << 20, timeout_s=60.0, mapping="ipc",
                                    fixed_capacity=8 << 20)
            context = use_transport(PeerTransport(memory))
        with context:
            steps = _steps(group, device, hopper)
            out.append(f"{'step':<40} {'checks':>6} {'reads':>5} {'before':>8} {'blocked':>8} {'between':>8} "
                       f"{'after':>8} {'wall':>8} {'span':>8}   (us, median of {calls})")
            if os.environ.get("DEEPPORT_HOST_SPLIT"):
                os.environ["DEEPPORT_CHECK_VALUES"] = "0"
                out += _split(group, device, calls, hopper)
            for checks in ("1", "0"):
                os.environ["DEEPPORT_CHECK_VALUES"] = checks
                for name, step in steps:
                    med = median_split(step, device, calls)
                    if profile and profile in name and checks == "0":  # collective calls: both ranks
                        found = _cprofile(step, device, calls)
                        out += found if rank == 0 else []
                    out.append(f"{name:<40} {checks:>6} {med['reads']:>5.0f} {med['before']:>8.1f} "
                               f"{med['blocked']:>8.1f} {med['between']:>8.1f} {med['after']:>8.1f} "
                               f"{med['wall']:>8.1f} {med['span']:>8.1f}")
        torch.cuda.synchronize(device)
        dist.barrier()
    except Exception:
        out.append("FAILED: " + traceback.format_exc())
    results[rank] = out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 20
    profile = sys.argv[sys.argv.index("--cprofile") + 1] if "--cprofile" in sys.argv else ""
    lines = run_ranks(_worker, (calls, profile), timeout_s=400)
    print("\n".join(lines))
    return 1 if any("FAILED" in line or "no result" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
