"""Two processes on ONE GPU exchange bytes through the hopper peer transport (CUDA IPC mapping + flag kernel).

What a single-GPU machine can check of the NVLink path before two GPUs are lent: the flag kernel's
signal / wait / acknowledgement protocol over many chunks, graph replays advancing the device-side
counters, and the timeout record, over buffers mapped between the processes by CUDA IPC (torch 2.11's
symmetric memory refuses two ranks on one device, so the symmetric mapping itself needs two GPUs). The
group is gloo (NCCL refuses two ranks on one device); only the transport runs, not the MoE ops (which
want NCCL for CUDA tensors). The two processes' kernels are time-sliced on the GPU, so this says nothing about speed.

The fixed exchange (one launch of ``kernels/sm90_peer_exchange.cu`` per equal-split all-to-all) runs
here too: sizes from 0 bytes to a full slot, aligned and not, back to back (both parities, a rank running
ahead), and replays of a captured exchange. A trap ends a CUDA context, so one run checks one stall:
``--stall rounds`` (the flag kernel) or ``--stall fixed`` (the exchange kernel). ``--loopback`` instead
times the exchange kernel in ONE process, two "ranks" on two streams of one GPU (both areas local, so HBM
instead of NVLink): the launch-and-flag floor of the kernel, next to a plain copy of the same bytes.

``--moe`` runs the hopper backend's expert-parallel code itself on the two processes: every MoE op with
triton's per-device steps on the GPU (what ``deepport.backends.hopper.moe`` runs) over this transport, in
rounds and through the fixed exchange, against the torch backend on CPU copies of the same inputs over
gloo's ``all_to_all_single``: bit for bit, combines within one bf16 step (float32 sums in another order).

``python -m tests.peer_cuda_one_gpu [--stall rounds|fixed | --loopback | --moe]`` prints one line per check
and exits non-zero on a failure; tests/test_hopper_peer_transport.py runs it under the ``gpu`` marker.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _expected(rank: int, world: int, sizes: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 list[int], list[int]]:
    """This rank's send bytes and the bytes it must receive, from sizes[s][r] (bytes s sends r)."""
    def payload(s: int, r: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + s * 10 + r)
        return torch.randint(0, 256, (sizes[s][r],), generator=g, dtype=torch.uint8)

    send = torch.cat([payload(rank, r) for r in range(world)])
    want = torch.cat([payload(s, rank) for s in range(world)])
    return send, want, [sizes[rank][r] for r in range(world)], [sizes[s][rank] for s in range(world)]


def _fixed_checks(rank: int, world: int, transport: Any, device: torch.device) -> list[str]:
    """Equal splits through the fixed exchange: bytes against the expected ones, then graph replays."""
    out: list[str] = []
    before = int(transport.memory.fixed_counters[0])
    sizes = [0, 5, 1000, 4096, 65536, 3, 65536, 17, 40000, 1]  # per pair; the slot is 64 KiB
    sends, wants, gots = [], [], []
    for i, n in enumerate(sizes):  # back to back, no host sync in between: parities alternate under load
        send, want, _, _ = _expected(rank, world, [[n] * world] * world, 100 + i)
        got = torch.full((world * n,), 7, dtype=torch.uint8, device=device)
        transport.exchange(got, send.to(device), None, None, f"fixed {i}")
        sends.append(send)
        wants.append(want)
        gots.append(got)
    torch.cuda.synchronize(device)
    for n, want, got in zip(sizes, wants, gots, strict=True):
        out.append(f"fixed exchange of {n} bytes per pair: {'ok' if torch.equal(got.cpu(), want) else 'WRONG BYTES'}")
    done = int(transport.memory.fixed_counters[0]) - before
    out.append(f"fixed exchanges counted: {'ok' if done == len(sizes) else f'WRONG ({done})'}")
    n = 40000
    send = torch.zeros(world * n, dtype=torch.uint8, device=device)
    got = torch.zeros(world * n, dtype=torch.uint8, device=device)
    transport.exchange(got, send, None, None, "fixed warm-up")
    torch.cuda.synchronize(device)
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        transport.exchange(got, send, None, None, "fixed captured")
    for replay in range(4):  # an even and an odd parity each twice
        g = torch.Generator().manual_seed(70 + replay)
        blocks = [torch.randint(0, 256, (world, n), generator=g, dtype=torch.uint8) for _ in range(world)]
        send.copy_(blocks[rank].reshape(-1))
        torch.cuda.synchronize(device)
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize(device)
        want = torch.stack([blocks[s][rank] for s in range(world)]).reshape(-1)
        out.append(f"fixed graph replay {replay}: {'ok' if torch.equal(got.cpu(), want) else 'WRONG BYTES'}")
        dist.barrier()
    return out


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value


def _moe_worker(rank: int, world: int, init: str, results: Any) -> None:
    """The hopper EP path (triton steps + peer transport) on the GPU against torch over gloo on the CPU."""
    from deepport.backends.hopper.peer_memory_cuda import CudaPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch.moe_comm import use_transport
    from deepport.kernels import moe_args
    from tests.moe_ep_probe import _same, bf16_ulps
    from tests.moe_peer_jobs import _graph_replays, _outputs

    out: list[str] = []
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        group = dist.group.WORLD
        # the ops refuse CUDA tensors on a gloo group (gloo cannot move them); here every byte goes through
        # the peer transport instead, and the group only names the ranks, so accept them
        checked = moe_args.resolve_group
        moe_args.resolve_group = lambda g, d: checked(g, torch.device("cpu"))  # type: ignore[assignment]
        memory = CudaPeerMemory(group, device, capacity=8192, timeout_s=60.0, mapping="ipc", fixed_capacity=1 << 20)
        transport = PeerTransport(memory)
        cases = [dict(hidden=256, experts=16, topk=4, t_max=16, world=2, tokens=(13, 9)),
                 dict(hidden=512, experts=8, topk=8, t_max=24, world=2, tokens=(0, 21), dup=0.3),
                 dict(hidden=256, experts=16, topk=4, t_max=16, world=2, tokens=(11, 6), fp8=True)]
        # the fixed exchange, then every exchange in rounds; cases 0 and 2 (FP8) also with the normal dispatch's
        # payload in 3 collectives (DEEPPORT_MOE_CHUNKS: token ranges, here over the peer transport's rounds)
        runs = [(i, p, fixed, 1, "1") for i, p in enumerate(cases) for fixed in (1 << 20, 0)]
        runs += [(i, cases[i], 1 << 20, 3, "1") for i in (0, 2)]
        # case 0 four times more: the dispatch's routing and exchange and the combine's sums of a repeated shape
        # captured as CUDA graphs and replayed (moe_route_graph, moe_sum_graph), then once with the graphs off
        # (the same kernels one by one while the graphs wait) and once replayed again; each call checked
        runs += [(0, cases[0], 1 << 20, 1, g) for g in ("1", "1", "0", "1")]
        for i, p, fixed, chunks, graphs in runs:
            memory.fixed_capacity = fixed
            want = _outputs(group, torch.device("cpu"), p, 40 + i, rank, backend="torch")
            os.environ["DEEPPORT_MOE_CHUNKS"] = str(chunks)
            os.environ["DEEPPORT_MOE_GRAPHS"] = graphs
            try:
                with use_transport(transport):
                    got = {k: _to_cpu(v) for k, v in _outputs(group, device, p, 40 + i, rank, backend="triton").items()}
            finally:
                os.environ.pop("DEEPPORT_MOE_CHUNKS", None)
                os.environ.pop("DEEPPORT_MOE_GRAPHS", None)
            bad: list[str] = []
            for name, ref in want.items():
                if "combine" in name and "weights" not in name:
                    if bf16_ulps(got[name], ref) > 1:
                        bad.append(f"{name} more than one bf16 step off")
                else:
                    _same(name, got[name], ref, bad)
            how = ("fixed exchange" if fixed else "rounds") + (f", {chunks} payload chunks" if chunks > 1 else "") + \
                (", graphs off" if graphs == "0" else "")
            label = f"moe ops case {i} ({how}, {len(want)} outputs)"
            out.append(f"{label}: {'ok' if not bad else 'WRONG ' + '; '.join(bad[:4])}")
        out.append(f"an older dispatch's results after a newer one of the same shape: "
                   f"{_kept_after_next(group, device, transport, cases[0], rank)}")
        from deepport.backends.triton import moe_route_graph, moe_sum_graph

        calls, graphs = moe_sum_graph.usage(transport)  # cases 0 and 1 repeat their shapes: captured at the 2nd call
        out.append(f"normal combine sums through the table: {calls} calls, {graphs} shapes replayed as CUDA graphs "
                   f"({'ok' if graphs >= 1 and calls >= 3 else 'WRONG: expected a captured shape'})")
        calls, graphs, exchanges, captured = moe_route_graph.usage(transport)  # case 0's fixed-exchange runs of
        # one payload chunk: the routing captured at the 2nd call, the exchange at the 3rd (over the routing's graph)
        good = graphs >= 1 and calls >= 3 and captured >= 1 and exchanges >= 3
        out.append(f"normal dispatch routing in one step: {calls} calls, {graphs} shapes replayed as CUDA graphs; "
                   f"the exchange through the blocks: {exchanges} calls, {captured} formats replayed "
                   f"({'ok' if good else 'WRONG: expected captured graphs'})")
        written = memory.written_exchanges
        # per fixed-exchange run of cases 0 (six times) and 1: two dispatches (rank 0 has no tokens in case 1:
        # none there) and one combine whose weights and partial sums went straight into the peers' slots
        expected = 28 if rank else 26
        out.append(f"low-latency exchanges written straight into the peer's slots: {written} "
                   f"({'ok' if written == expected else f'WRONG: expected {expected}'})")
        # the profile's own memory: blocks and slots of the sizes the hopper backend lays out by default
        # (issue 14's 4096-token exchanges through 64 MiB blocks, the low-latency ones through 8 MiB slots)
        big = CudaPeerMemory(group, device, capacity=64 << 20, timeout_s=60.0, mapping="ipc", fixed_capacity=8 << 20)
        big_transport = PeerTransport(big)
        with use_transport(big_transport):  # issue 14's low-latency sizes captured in a graph, replayed on new data
            replays = _graph_replays(rank, group, device, backend="triton", reference="triton")
        verdict = "ok" if not replays and big.written_exchanges else "WRONG " + "; ".join(replays)
        out.append(f"low-latency dispatch + combine, graph replays against eager calls (written exchange "
                   f"{big.written_exchanges}x): {verdict}")
        out += _kernel_profile(group, device, big_transport)
        torch.cuda.synchronize(device)
        dist.barrier()
    except Exception:
        out.append("FAILED: " + traceback.format_exc())
    results[rank] = out


def _kept_after_next(group: Any, device: torch.device, transport: Any, p: dict[str, Any], rank: int) -> str:
    """Two normal dispatches of one shape (the graphs' buffers reused): the first's outputs and handle must not
    change when the second runs (its copies are its own), and its combine must still give its own sums."""
    import deepport
    from deepport.backends.torch.moe_comm import use_transport
    from tests.moe_ep_probe import _inputs

    memory = transport.memory
    memory.fixed_capacity = 1 << 20
    a, b = _inputs(rank, p, 90), _inputs(rank, p, 91)
    with use_transport(transport):
        first = deepport.moe_dispatch(a["x"].to(device), a["topk_idx"].to(device), a["topk_weights"].to(device),
                                      int(p["experts"]), group=group, backend="triton")
        before = [t.cpu().clone() for t in (first.recv_x, first.recv_topk_idx, first.recv_topk_weights,
                                            first.handle.topk_idx, first.handle.is_token_in_rank,
                                            first.handle.recv_src_idx, first.handle.recv_topk_idx)]
        summed = deepport.moe_combine(first.recv_x, first.handle, backend="triton").combined_x.cpu()
        deepport.moe_dispatch(b["x"].to(device), b["topk_idx"].to(device), b["topk_weights"].to(device),
                              int(p["experts"]), group=group, backend="triton")
        after = [t.cpu() for t in (first.recv_x, first.recv_topk_idx, first.recv_topk_weights, first.handle.topk_idx,
                                   first.handle.is_token_in_rank, first.handle.recv_src_idx,
                                   first.handle.recv_topk_idx)]
        again = deepport.moe_combine(first.recv_x, first.handle, backend="triton").combined_x.cpu()
    changed = [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if not torch.equal(x, y)]
    if changed or not torch.equal(summed, again):
        return f"WRONG: outputs {changed} changed, combine {'same' if torch.equal(summed, again) else 'differs'}"
    return "ok"


def _kernel_profile(group: Any, device: torch.device, transport: Any, calls: int = 5) -> list[str]:
    """The GPU kernels of the hopper path's ops at issue 14's sizes (hidden 7168, top-8 of 256, EP=2: the
    low-latency ops at 128 tokens with the FP8 dispatch, the normal ops at 4096 bf16 tokens) under
    torch.profiler: per call, how many kernels and their summed time, the transport's own kernels (the
    exchange, flags) apart. The two processes time-slice the GPU, so a kernel that waits for the peer is
    inflated by the other's turn; the rest is this rank's own compute: the floor the op's time cannot go
    under, however fast the exchange (for the normal ops it includes the copies of the rounds, which move
    the bytes, and the host waits for the counts are not kernel time)."""
    import deepport
    from deepport.bench.configs.moe import routing

    rank = dist.get_rank(group)
    x, idx, w = routing(128, 7168, 256, 8, 1000 + rank, device)
    y = torch.randn(128, 2 * 128, 7168, device=device).to(torch.bfloat16)
    xn, idxn, wn = routing(4096, 7168, 256, 8, 2000 + rank, device)

    lines = []
    for backend in ("triton", "torch"):  # the hopper path's steps, then the torch backend's (the portable path)
        def ll_dispatch(backend: str = backend) -> Any:
            return deepport.moe_low_latency_dispatch(x, idx, 128, 256, group=group, use_fp8=True, backend=backend)

        def ll_dispatch_buffered(backend: str = backend) -> Any:  # triton's sender into a send buffer, as before
            window, transport.window_memory = transport.window_memory, None
            try:
                return ll_dispatch(backend)
            finally:
                transport.window_memory = window

        def dispatch(backend: str = backend) -> Any:
            return deepport.moe_dispatch(xn, idxn, wn, 256, group=group, backend=backend)

        with _transport(transport):
            handle, normal = ll_dispatch().handle, dispatch()
        def without_windows(step: Any) -> Any:  # send and receive buffers, the transport's copies
            def run() -> Any:
                transport.rows_window = lambda *args: None
                capacity, transport.window_capacity = transport.window_capacity, None
                try:
                    return step()
                finally:
                    del transport.rows_window
                    transport.window_capacity = capacity
            return run

        def combine(b: str = backend, r: Any = normal) -> Any:
            return deepport.moe_combine(r.recv_x, r.handle, backend=b)

        steps = [("low-latency dispatch", ll_dispatch),
                 *([("low-latency dispatch via a send buffer", ll_dispatch_buffered)] if backend == "triton" else []),
                 ("low-latency combine", lambda b=backend, h=handle: deepport.moe_low_latency_combine(
                     y, idx, w, h, backend=b)),
                 ("dispatch 4096", dispatch),
                 *([("dispatch 4096 via buffers", without_windows(dispatch))] if backend == "triton" else []),
                 ("combine 4096", combine),
                 *([("combine 4096 via buffers", without_windows(combine))] if backend == "triton" else [])]
        lines += _profile_steps(group, device, transport, backend, steps, calls)
    return lines


def _transport(transport: Any) -> Any:
    from deepport.backends.torch.moe_comm import use_transport

    return use_transport(transport)


def _profile_steps(group: Any, device: torch.device, transport: Any, backend: str, steps: list[tuple[str, Any]],
                   calls: int) -> list[str]:
    lines = []
    with _transport(transport):
        for name, step in steps:
            step()
            torch.cuda.synchronize(device)
            dist.barrier()
            ops = os.environ.get("DEEPPORT_PROFILE_OPS", "") in name and "DEEPPORT_PROFILE_OPS" in os.environ
            activities = [torch.profiler.ProfilerActivity.CUDA, *([torch.profiler.ProfilerActivity.CPU] if ops else [])]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(calls):
                    step()
                torch.cuda.synchronize(device)
            if ops:  # which torch ops launched the kernels (DEEPPORT_PROFILE_OPS=<part of a step's name>)
                lines += [f"ops of {name} ({backend} steps):",
                          prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)]
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            exchange = [e for e in kernels if "dp_fixed_exchange" in e.name or "dp_peer_flags" in e.name]
            rest = [e for e in kernels if e not in exchange]
            own = sum(e.device_time for e in rest) / calls
            by_name: dict[str, list[float]] = {}
            for e in rest:
                by_name.setdefault(e.name, []).append(e.device_time)
            lines.append(f"profile {name} ({backend} steps): {len(kernels) / calls:.0f} kernels per "
                         f"call, {len(exchange) / calls:.0f} of the transport; own compute {own:.1f} us per call; "
                         f"transport kernels {sum(e.device_time for e in exchange) / calls:.1f} us (time-sliced)")
            for kname, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]:  # every kernel, nearly
                lines.append(f"    {len(times) / calls:4.1f} x {sum(times) / calls:7.1f} us  {kname[:100]}")
            dist.barrier()
    return lines


def _worker(rank: int, world: int, init: str, results: Any, stall: str = "rounds") -> None:
    from deepport.backends.hopper.peer_memory_cuda import CudaPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch.moe_comm import MoECommTimeout

    out: list[str] = []
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        # torch's symmetric memory refuses two ranks on one device: map the buffers through CUDA IPC instead
        memory = CudaPeerMemory(dist.group.WORLD, device, capacity=4096, timeout_s=30.0, mapping="ipc",
                                fixed_capacity=65536)
        transport = PeerTransport(memory)
        out += _fixed_checks(rank, world, transport, device)
        memory.fixed_capacity = 0  # what follows runs in rounds (the flag kernel)
        # 1. variable sizes, several chunks, an empty message, several calls on one memory
        cases = [[[100, 5000], [9000, 0]], [[0, 0], [0, 0]], [[4096, 4097], [1, 12288]]]
        for seed, sizes in enumerate(cases):
            send, want, sends, recvs = _expected(rank, world, sizes, seed)
            got = torch.full((sum(recvs),), 7, dtype=torch.uint8, device=device)
            transport.exchange(got, send.to(device), recvs, sends, f"case {seed}")
            torch.cuda.synchronize(device)
            out.append(f"exchange {sizes}: {'ok' if torch.equal(got.cpu(), want) else 'WRONG BYTES'}")
        # 2. a captured exchange replayed on new data (the counters must advance per replay)
        n = 6000
        send = torch.zeros(world * n, dtype=torch.uint8, device=device)
        got = torch.zeros(world * n, dtype=torch.uint8, device=device)
        transport.exchange(got, send, None, None, "warm-up")
        torch.cuda.synchronize(device)
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            transport.exchange(got, send, None, None, "captured")
        for replay in range(3):
            g = torch.Generator().manual_seed(50 + replay)
            blocks = [torch.randint(0, 256, (world, n), generator=g, dtype=torch.uint8) for _ in range(world)]
            send.copy_(blocks[rank].reshape(-1))
            torch.cuda.synchronize(device)
            dist.barrier()  # both ranks refilled before either replays
            graph.replay()
            torch.cuda.synchronize(device)
            want = torch.stack([blocks[s][rank] for s in range(world)]).reshape(-1)
            out.append(f"graph replay {replay}: {'ok' if torch.equal(got.cpu(), want) else 'WRONG BYTES'}")
            dist.barrier()  # both ranks checked before the next refill
        # 3. a stalled peer: rank 1 stays away; rank 0's wait (flag kernel or exchange kernel) traps and
        # leaves the record
        if rank == 0:
            short = CudaPeerMemory.__new__(CudaPeerMemory)
            short.__dict__.update(memory.__dict__)
            short.timeout_ns = int(2e9)
            short.fixed_capacity = 65536 if stall == "fixed" else 0
            try:
                PeerTransport(short).exchange(torch.zeros(2, dtype=torch.uint8, device=device),
                                              torch.zeros(2, dtype=torch.uint8, device=device), None, None, "stall")
                torch.cuda.synchronize(device)
                out.append("stall: returned (WRONG)")
            except RuntimeError as exc:  # the trap surfaces as a CUDA error at the sync
                try:
                    short.raise_if_failed("stall")
                    out.append(f"stall: CUDA error without a record (WRONG): {exc}")
                except MoECommTimeout as timeout:
                    named = ("fixed exchange waiting for rank 1" in str(timeout)) == (stall == "fixed")
                    out.append(f"stall: {'ok' if named else 'WRONG WAIT'} ({timeout})")
        else:
            out.append("stall: stayed away")
        dist.barrier()  # rank 1 stays alive (its memory mapped) until rank 0 has seen the stall
    except Exception:
        out.append("FAILED: " + traceback.format_exc())
    results[rank] = out


def _local_memories(device: torch.device, capacity: int, fixed: int) -> list[Any]:
    """Two ranks' :class:`CudaPeerMemory` in ONE process: each "peer" buffer is the other rank's local buffer
    (no group, no mapping), the real flag and exchange kernels."""
    from deepport.backends.hopper import peer_memory_cuda as pm

    world = 2
    header = -(-3 * world * 8 // pm.HEADER_ALIGN) * pm.HEADER_ALIGN
    bufs = [torch.zeros(header + world * capacity + 2 * world * fixed, dtype=torch.uint8, device=device)
            for _ in range(world)]
    error = torch.zeros(4, dtype=torch.int64, pin_memory=True)
    function = pm._flag_function(device.index or 0)
    memories = []
    for rank in range(world):
        m = pm.CudaPeerMemory.__new__(pm.CudaPeerMemory)
        m.__dict__.update(device=device, rank=rank, world_size=world, capacity=capacity, timeout_ns=int(5e9),
                          slot_bytes=fixed, _limit=fixed, header=header, fixed_at=header + world * capacity,
                          buffer=bufs[rank],
                          areas=bufs, flag_base=[int(b.data_ptr()) for b in bufs], error=error, function=function,
                          counters=torch.zeros((3, world), dtype=torch.int64, device=device),
                          fixed_counters=torch.zeros(pm.peer_exchange_kernel.CTAS, dtype=torch.int64, device=device),
                          _fixed_function=None, _targets=None, written_exchanges=0, _params={})
        memories.append(m)
    return memories


def _graph_time_us(step: Any, iters: int) -> float:
    """Mean time of ``step()`` captured ``iters`` times in one CUDA graph (host launch costs left out)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            step()
    graph.replay()  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def loopback(pair_bytes: tuple[int, ...] = (0, 65536, 950784, 3670016), iters: int = 50) -> list[str]:
    """Two ranks' exchanges in one process, on two streams of one GPU, captured in a CUDA graph and timed
    with CUDA events: the fixed exchange (one kernel per rank) next to the chunked rounds (flag kernels and
    copies, one chunk per message here) and a plain ``copy_`` of the bytes each rank moves (``2 *
    pair_bytes``: out to the peer and in from it). Both ranks share one GPU and HBM stands in for NVLink,
    so these are the fixed costs and a floor, not NVLink's rate."""
    from deepport.backends.hopper.peer_transport import PeerTransport

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    world, slot = 2, max(pair_bytes) // 16 * 16 + 16
    streams = [torch.cuda.Stream(device) for _ in range(world)]
    lines = []
    for kind in ("fixed", "written", "rounds"):
        memories = _local_memories(device, slot, 0 if kind == "rounds" else slot)
        transports = [PeerTransport(m) for m in memories]
        for n in pair_bytes:
            sends = [torch.randint(0, 256, (world * n,), dtype=torch.uint8, device=device) for _ in range(world)]
            outs = [torch.full_like(x, 7) for x in sends]
            if kind == "written":  # the senders' parts already in both parities' slots: the exchange kernel alone
                for q in range(world):
                    for r in range(world):
                        for parity in range(2):
                            at = memories[q].fixed_at + (parity * world + r) * slot
                            memories[q].buffer[at: at + n].copy_(sends[r][q * n: (q + 1) * n])

            def both(sends: list[torch.Tensor] = sends, outs: list[torch.Tensor] = outs,
                     transports: list[PeerTransport] = transports, kind: str = kind) -> None:
                here = torch.cuda.current_stream(device)
                for r in range(world):  # fork: both ranks at once
                    streams[r].wait_stream(here)
                    with torch.cuda.stream(streams[r]):
                        if kind == "written":
                            transports[r].memory.fixed_exchange_written(outs[r], "loopback")  # type: ignore[attr-defined]
                        else:
                            transports[r].exchange(outs[r], sends[r], None, None, "loopback")
                for r in range(world):  # join
                    here.wait_stream(streams[r])

            both()
            torch.cuda.synchronize(device)
            us = _graph_time_us(both, iters)
            ok = all(torch.equal(outs[r].view(world, n)[q], sends[q].view(world, n)[r])
                     for r in range(world) for q in range(world)) if n else True
            fixed_runs = int(memories[0].fixed_counters[0])
            ok = ok and not int(memories[0].error[0]) and (fixed_runs > 0) == (kind != "rounds")
            line = f"loopback {kind} {n} bytes per pair: {'ok' if ok else 'WRONG'}, {us:.1f} us per exchange"
            if kind == "fixed" and n:
                big = torch.empty(2 * n, dtype=torch.uint8, device=device)
                dst = torch.empty_like(big)
                line += f"; copy_ of {2 * n} bytes {_graph_time_us(functools.partial(dst.copy_, big), iters):.1f} us"
            lines.append(line)
    return lines


def run_ranks(worker: Any, extra: tuple[Any, ...], world: int = 2, timeout_s: float = 300) -> list[str]:
    """``worker(rank, world, init, results, *extra)`` in ``world`` spawned processes (a file rendezvous);
    each puts its lines into ``results[rank]``. Returns them as ``rank r: line``, a rank that died or hung
    past ``timeout_s`` as ``no result (died)``."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        results = ctx.Manager().dict()
        procs = [ctx.Process(target=worker, args=(r, world, f"file://{tmp}/rendezvous", results, *extra))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
            if p.is_alive():
                p.kill()
        return [f"rank {r}: {line}" for r in range(world) for line in results.get(r, ["no result (died)"])]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if "--loopback" in sys.argv:
        if "--ctas" in sys.argv:  # another grid for the exchange kernel (a sweep; every rank must use the same)
            from deepport.backends.hopper import peer_exchange_kernel as k

            k.CTAS = int(sys.argv[sys.argv.index("--ctas") + 1])
            k.OPTIONS = (*tuple(o for o in k.OPTIONS if not o.startswith("-DDP_FX_CTAS=")), f"-DDP_FX_CTAS={k.CTAS}")
            print(f"exchange kernel grid: {k.CTAS} CTAs")
        if "--fence-every-thread" in sys.argv:  # the exchange kernel before 2026-12-03 (A/B timings)
            from deepport.backends.hopper import peer_exchange_kernel as k

            k.OPTIONS = (*k.OPTIONS, "-DDP_FX_FENCE_EVERY_THREAD=1")
            print("exchange kernel: every thread fences before the flags")
        lines = loopback()
        print("\n".join(lines))
        return 1 if any("WRONG" in line for line in lines) else 0
    stall = sys.argv[sys.argv.index("--stall") + 1] if "--stall" in sys.argv else "rounds"
    if stall not in ("rounds", "fixed"):
        print(f"--stall takes rounds or fixed, got {stall!r}")
        return 2
    lines = run_ranks(_moe_worker, ()) if "--moe" in sys.argv else run_ranks(_worker, (stall,))
    print("\n".join(lines))
    bad = [line for line in lines if "WRONG" in line or "FAILED" in line or "no result" in line]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
