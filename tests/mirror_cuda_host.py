"""The portable path's critical path on ONE GPU over real NCCL launches: rank 0 of a mirrored world of two.

NCCL needs one GPU per rank, and two processes sharing one GPU time-slice it, which inflates every host and
span figure (``tests.staged_cuda_host``). Here one process plays rank 0 of a world of two whose peer routes
exactly as it does: the :class:`Mirror` transport hands every part rank 0 sends to rank 1 back to rank 0 as
what rank 1 sent it (so every count and size agrees), moved by a real NCCL ``all_to_all_single`` on a group of
one. So the host path is the one that runs between two GPUs: the same code, the same NCCL launch and stream
ordering, the one count read; only the bytes cross HBM instead of NVLink (a copy of tens of µs instead of the
~280 µs transfer). The payloads' contents are not the real peer's (rows "from rank 1" carry rank 1's expert
ids), so nothing is checked against the reference here; ``tests/test_mirror_host_tool.py`` checks on CPU that
the triton steps and the torch steps give the same bits under the mirror.

Per step (median of ``--calls`` calls, GPU idle before each, as ``deepport bench`` times one eager call):

- **to launch**: host µs from the call to the return of the payload exchange's launch (the largest launch of
  the call): what the GPU waits for before the payload can move;
- **read**: host µs from the call to the return of its one host read (0: no read), and **blocked** in it;
- **wall**: host µs of the whole call; **span**: CUDA-event µs of the call on the caller's stream;
- **launches**: exchanges launched per call.

Then torch.profiler's kernels per call (``tests.staged_cuda_host``'s count; GPU work besides the stand-in's
copy). At EP=2 a dispatch can end no sooner than ``to launch`` + the transfer (raw NCCL's 4096-token exchange:
320 µs from its own call, its launch included) + the work after it (the copy out), so ``to launch`` is the
host's share of the gap.

With ``--timeline``, one call of the triton dispatch as a timeline: when each piece of its host path (the
routing's functions, the backend's steps, the launches, torch's allocations and small ops, the stream calls)
started and ended, µs from the call (medians over the calls).

With ``--ops``, torch.profiler's host side of the triton dispatch: the aten ops and CUDA runtime calls by self
host time per call.

``python -m tests.mirror_cuda_host [--calls N] [--tokens T] [--cprofile STEP] [--timeline] [--ops]`` (``--tokens``:
the timed calls' tokens, default 4096; issue 14's other size is 128)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

TOKENS, HIDDEN, EXPERTS, TOPK = 4096, 7168, 256, 8


class Mirror:
    """A transport for rank 0 of a mirrored world of two: what this rank sends to each rank comes back as what
    that rank sent (the receive sizes must equal the send sizes, as they do when every rank routes alike), moved
    by one ``all_to_all_single`` on ``group`` (a real group of one: NCCL on a GPU, gloo on CPU). ``launches``
    records ``(what, bytes, perf_counter after the launch returned)``."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.launches: list[tuple[str, int, float]] = []

    def start(self, out: torch.Tensor, send: torch.Tensor, recv_counts: Any, send_counts: Any, grp: Any,
              what: str) -> Any:
        from deepport.backends.torch.moe_comm import Pending

        if (recv_counts is None) != (send_counts is None) or (
                recv_counts is not None and list(recv_counts) != list(send_counts)):
            raise RuntimeError(f"{what}: the mirror receives what it sends, got receive counts {recv_counts} "
                               f"for send counts {send_counts}")
        if out.shape != send.shape or out.dtype != send.dtype:
            raise RuntimeError(f"{what}: the mirror needs equal buffers, got {tuple(out.shape)} {out.dtype} for "
                               f"{tuple(send.shape)} {send.dtype}")
        work = dist.all_to_all_single(out, send, group=self.group, async_op=True)
        self.launches.append((what, send.numel() * send.element_size(), time.perf_counter()))
        return Pending(what, grp, work, out, send)


def mirrored(call: Any, group: Any) -> Any:
    """``call`` (a bound MoE call of a group of one) as rank 0 of a world of two on ``group``'s communicator."""
    from deepport.kernels.moe_args import MoEGroup

    return dataclasses.replace(call, group=MoEGroup(group, 0, 2, str(dist.get_backend(group))))


def steps(group: Any, device: torch.device, tokens: int = TOKENS, hidden: int = HIDDEN, experts: int = EXPERTS,
          topk: int = TOPK) -> list[tuple[str, Callable[[], Any]]]:
    """The timed calls: the raw exchange of the dispatch's payload bytes, the op layer, and the normal
    dispatch and combine of the triton backend (its routing up to the read in one step, a CUDA graph on a GPU;
    step by step with the early send, and stored after the read) and of the torch steps, each the backend's
    implementation on a mirrored call (value checks off)."""
    from deepport.backends.torch import moe_routes
    from deepport.backends.torch.moe_local import TORCH
    from deepport.backends.triton.moe_routes import ROUTES
    from deepport.bench.configs.moe import routing
    from deepport.dispatch import selection
    from deepport.kernels import OPS, moe_combine, moe_dispatch

    x, idx, w = routing(tokens, hidden, experts, topk, 2000, device)
    first = moe_routes.dispatch(mirrored(moe_dispatch.bind(x, idx, w, experts, group=group), group), ROUTES)
    handle = first.handle
    assert isinstance(first.recv_x, torch.Tensor)
    y = first.recv_x
    payload = int(handle.send_counts[1]) * hidden * 2
    send = torch.empty(payload, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)

    def raw() -> None:  # the payload's bytes alone, one launch, as the bench's raw NCCL row
        dist.all_to_all_single(recv, send, group=group)

    def op_layer() -> Any:
        call = OPS["moe_dispatch"].bind(x, idx, w, experts, group=group)
        return selection.choose("moe_dispatch", call.signature, "triton")

    def dispatch(local: Any, late: bool = False) -> Callable[[], Any]:
        def run() -> Any:
            call = mirrored(moe_dispatch.bind(x, idx, w, experts, group=group), group)
            if not late:
                return moe_routes.dispatch(call, local)
            saved = moe_routes.EARLY_SEND_BYTES
            moe_routes.EARLY_SEND_BYTES = 0
            try:
                return moe_routes.dispatch(call, local)
            finally:
                moe_routes.EARLY_SEND_BYTES = saved
        return run

    def combine(local: Any) -> Callable[[], Any]:
        def run() -> Any:
            return moe_routes.combine(mirrored(moe_combine.bind(y, handle), group), local)
        return run

    assert ROUTES.route_prelude is not None
    prelude = ROUTES.route_prelude

    def rows_after(idx: Any, num_experts: int, grp: Any, what: str, peers: Any = None) -> Any:
        return prelude(idx, num_experts, grp, what, None)  # the routing's graph without the others' rows

    return [("raw exchange (payload bytes)", raw), ("op layer (bind + choose)", op_layer),
            ("triton: dispatch", dispatch(ROUTES)),
            ("triton: dispatch, rows stored after the read",
             dispatch(dataclasses.replace(ROUTES, route_prelude=rows_after))),
            ("triton: dispatch, step by step", dispatch(dataclasses.replace(ROUTES, route_prelude=None))),
            ("triton: dispatch, step by step, late send",
             dispatch(dataclasses.replace(ROUTES, route_prelude=None), True)),
            ("triton: combine", combine(ROUTES)), ("torch: dispatch", dispatch(TORCH)),
            ("torch: combine", combine(TORCH))]


def one_call(step: Callable[[], Any], mirror: Mirror, device: torch.device) -> dict[str, float]:
    """One call of ``step`` with the GPU idle before it: the module docstring's figures."""
    from tests.peer_cuda_host import timed_reads

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    mirror.launches.clear()
    spans: list[tuple[float, float]] = []
    with timed_reads(spans):
        t0 = time.perf_counter()
        if cuda:
            start.record()
        step()
        if cuda:
            end.record()
        t1 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    us = 1e6
    biggest = max(mirror.launches, key=lambda launch: launch[1], default=None)
    return {"to launch": 0.0 if biggest is None else (biggest[2] - t0) * us,
            "read": (spans[-1][1] - t0) * us if spans else 0.0, "blocked": sum(b - a for a, b in spans) * us,
            "wall": (t1 - t0) * us, "span": start.elapsed_time(end) * 1e3 if cuda else 0.0,
            "launches": float(len(mirror.launches))}


def table(group: Any, mirror: Mirror, device: torch.device, calls: int,
          chosen: list[tuple[str, Callable[[], Any]]]) -> list[str]:
    lines = [f"{'step':<42} {'to launch':>9} {'read':>8} {'blocked':>8} {'wall':>8} {'span':>8} {'launches':>8}"
             f"   (us, median of {calls})"]
    for name, step in chosen:
        for _ in range(3):
            step()
        rows = [one_call(step, mirror, device) for _ in range(calls)]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        lines.append(f"{name:<42} {med['to launch']:>9.1f} {med['read']:>8.1f} {med['blocked']:>8.1f} "
                     f"{med['wall']:>8.1f} {med['span']:>8.1f} {med['launches']:>8.0f}")
    return lines


def _timed_pieces() -> list[tuple[Any, str]]:
    """``(owner, attribute)`` of every piece :func:`timeline` times."""
    from deepport.backends.torch import moe_chunks, moe_comm, moe_routes
    from deepport.backends.triton.moe_route_send import PeerStore

    routes = ["_row_format", "_split_wire", "exchange_table", "_count_reader", "_early_send", "_store_peers",
              "_read_counts", "_dispatch_blocks", "staged_rows_window", "_addresses", "device_ints", "dense",
              "local_ids", "MoEHandle", "Received"]
    return ([(moe_routes, name) for name in routes] + [(moe_comm, "start_all_to_all"), (moe_chunks, "payload_chunks")]
            + [(PeerStore, "prepare"), (PeerStore, "finish")]
            + [(torch, name) for name in ("empty", "zeros", "cumsum", "cat", "tensor", "full")]
            + [(torch.Tensor, name) for name in ("to", "contiguous", "clone", "sum", "tolist", "record_stream",
                                                  "copy_", "fill_")]
            + [(torch.cuda.Stream, name) for name in ("wait_event", "wait_stream", "record_event")]
            + [(torch.cuda.Event, "record"), (torch.cuda, "current_stream"), (torch.cuda, "stream")])


def dispatch_runner(group: Any, device: torch.device, tokens: int = TOKENS, hidden: int = HIDDEN,
                    experts: int = EXPERTS, topk: int = TOPK) -> Callable[[Any], Any]:
    """A mirrored normal dispatch on given local steps (value checks off by the caller)."""
    from deepport.backends.torch import moe_routes
    from deepport.bench.configs.moe import routing
    from deepport.kernels import moe_dispatch

    x, idx, w = routing(tokens, hidden, experts, topk, 2000, device)

    def run(local: Any) -> Any:
        return moe_routes.dispatch(mirrored(moe_dispatch.bind(x, idx, w, experts, group=group), group), local)

    return run


def timeline(step: Callable[[Any], Any], device: torch.device, calls: int, local_steps: Any) -> list[str]:
    """``step(local)`` (a dispatch on ``local_steps``' steps, wrapped) ``calls`` times with every piece of
    :func:`_timed_pieces` and the backend's steps wrapped with a timer: per piece (by name and order of entry),
    the median start and end in µs from the call's start, nested calls indented under their caller."""
    from deepport.backends.triton import moe_routes as triton_routes

    events: list[tuple[str, float, float]] = []
    depth = [0]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            at = len(events)
            events.append(("  " * depth[0] + name, 0.0, 0.0))  # in order of entry, indented by nesting
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                events[at] = (events[at][0], t0, time.perf_counter())
        return run

    saved = [(owner, name, getattr(owner, name)) for owner, name in _timed_pieces()]
    routes = triton_routes.ROUTES
    wrapped = {f: timed(f"steps.{f}", getattr(routes, f)) for f in ("route_prelude", "layout_table", "rows_to_blocks",
                                                                      "blocks_to_rows", "receive_meta")
               if getattr(routes, f) is not None}
    runs: list[list[tuple[str, float, float]]] = []
    try:
        for owner, name, fn in saved:
            setattr(owner, name, timed(f"{getattr(owner, '__name__', owner)}.{name}", fn))
        local = dataclasses.replace(local_steps, **wrapped)
        for i in range(calls + 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            events.clear()
            t0 = time.perf_counter()
            step(local)
            t1 = time.perf_counter()
            if i >= 3:
                runs.append([(name, a - t0, b - t0) for name, a, b in events] + [("(call)", 0.0, t1 - t0)])
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    lines = [f"timeline of one triton dispatch (medians of {calls} calls, us from the call; nested pieces indented):",
             f"    {'start':>8} {'end':>8} {'took':>7}  piece"]
    for i, (name, _, _) in enumerate(runs[0]):
        same = [r[i] for r in runs if len(r) == len(runs[0]) and r[i][0] == name]
        a = statistics.median(e[1] for e in same) * 1e6
        b = statistics.median(e[2] for e in same) * 1e6
        lines.append(f"    {a:8.1f} {b:8.1f} {b - a:7.1f}  {name.replace('deepport.backends.', '')}")
    return lines


def host_ops(step: Callable[[], Any], device: torch.device, calls: int = 10) -> list[str]:
    """torch.profiler (CPU and CUDA activity) over ``calls`` calls of ``step``: the host's ops and runtime calls
    by self CPU time, per call."""
    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            step()
            torch.cuda.synchronize(device)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:30]
    lines = [f"host ops of the triton dispatch (torch.profiler, {calls} calls; self host us per call, calls per call):"]
    lines += [f"    {e.self_cpu_time_total / calls:8.1f} {e.count / calls:5.1f}  {e.key[:90]}" for e in rows]
    return lines


def check_prelude(group: Any, device: torch.device) -> str:
    """The triton dispatch with its routing in one step (eager, captured, replayed: three calls on fresh inputs of
    one shape, then a fourth whose payload starts 2 bytes past an aligned address) against the same dispatch step
    by step, bit for bit: outputs and handle."""
    from deepport.backends.torch import moe_routes
    from deepport.backends.triton import moe_route_graph
    from deepport.backends.triton.moe_routes import ROUTES
    from deepport.bench.configs.moe import routing
    from deepport.kernels import moe_dispatch

    stepwise = dataclasses.replace(ROUTES, route_prelude=None)
    assert ROUTES.route_prelude is not None
    prelude, stored = ROUTES.route_prelude, [0]

    def counted(*args: Any) -> Any:  # counts the calls whose step stored the others' rows too
        found = prelude(*args)
        stored[0] += found is not None and found.sent is not None
        return found

    assert ROUTES.finish_sent is not None
    finish, finished = ROUTES.finish_sent, [0]

    def finish_counted(*args: Any) -> bool:  # counts the calls whose own rows and copy out took that step
        ran = finish(*args)
        finished[0] += ran
        return ran

    graph = dataclasses.replace(ROUTES, route_prelude=counted, finish_sent=finish_counted)
    bad = []
    before = moe_route_graph.usage(moe_comm_transport())
    for seed in (11, 12, 13, 14):
        x, idx, w = routing(TOKENS, HIDDEN, EXPERTS, TOPK, seed, device)
        if seed == 14:  # then a payload 2 bytes past an aligned address: no store before the read, narrower words
            room = torch.empty(x.numel() + 8, dtype=x.dtype, device=device)
            x = room[1: 1 + x.numel()].view(x.shape).copy_(x)
        a, b = (moe_routes.dispatch(mirrored(moe_dispatch.bind(x, idx, w, EXPERTS, group=group), group), steps)
                for steps in (graph, stepwise))
        pairs = [(a.recv_x, b.recv_x), (a.recv_topk_idx, b.recv_topk_idx), (a.recv_topk_weights, b.recv_topk_weights),
                 (a.handle.recv_src_idx, b.handle.recv_src_idx), (a.handle.is_token_in_rank, b.handle.is_token_in_rank)]
        if a.num_recv_tokens_per_expert != b.num_recv_tokens_per_expert or not all(
                torch.equal(p.view(torch.int16) if p.dtype == torch.bfloat16 else p, q.view(torch.int16)
                            if q.dtype == torch.bfloat16 else q) for p, q in pairs):  # type: ignore[union-attr]
            bad.append(f"seed {seed}")
    after = moe_route_graph.usage(moe_comm_transport())
    return (f"checks (routing in one step vs step by step, 4 calls): {'ok' if not bad else 'WRONG ' + ', '.join(bad)}; "
            f"prelude calls {after[0] - before[0]}, graphs {after[1]}, others' rows stored in it {stored[0]}, "
            f"finished in one step {finished[0]}")


def moe_comm_transport() -> Any:
    from deepport.backends.torch import moe_comm

    return moe_comm.active_transport()


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    from deepport.backends.torch import moe_comm
    from tests.peer_cuda_host import _cprofile
    from tests.staged_cuda_host import _kernels

    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 20
    tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else TOKENS
    profile = sys.argv[sys.argv.index("--cprofile") + 1] if "--cprofile" in sys.argv else ""
    os.environ["DEEPPORT_CHECK_VALUES"] = "0"
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29567", rank=0, world_size=1, device_id=device)
    group = dist.group.WORLD
    mirror = Mirror(group)
    try:
        with moe_comm.use_transport(mirror):  # type: ignore[arg-type]
            print(check_prelude(group, device))
            chosen = steps(group, device, tokens)
            print(f"issue 14's sizes: {tokens} tokens, hidden {HIDDEN}, top-{TOPK} of {EXPERTS}, rank 0 of a "
                  "mirrored EP=2, NCCL launches on one GPU")
            print("\n".join(table(group, mirror, device, calls, chosen)))
            if "--timeline" in sys.argv:
                from deepport.backends.triton.moe_routes import ROUTES

                print("\n".join(timeline(dispatch_runner(group, device, tokens), device, calls, ROUTES)))
            if "--ops" in sys.argv:
                print("\n".join(host_ops(dict(chosen)["triton: dispatch"], device)))
            for name, step in chosen:
                if name.endswith("dispatch") or name.endswith("combine"):
                    print("\n".join(_kernels(name, step, device)))
                if profile and profile in name:
                    print("\n".join(_cprofile(step, device, calls)))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
