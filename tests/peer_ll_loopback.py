"""The hopper path's low-latency MoE ops end to end, two ranks in ONE process on one GPU (issue 14's decode step).

What one GPU can say about issue 14's low-latency targets (EP=2, 128 tokens per rank, ``T_max`` 128, hidden
7168, top-8 of 256 experts: dispatch with the FP8 cast <= 40 us, combine of bf16 rows <= 50 us) before two
GPUs are lent. Rank 0 and rank 1 each run the hopper backend's own code (``moe_layouts.dispatch_low_latency``
/ ``combine_low_latency`` with the per-device steps the hopper backend picks, triton's on a GPU) on their own
stream, over two :class:`~deepport.backends.hopper.peer_memory_cuda.CudaPeerMemory` that see each other's
buffer as the peer's (``tests.peer_cuda_one_gpu._local_memories``: the real flag and exchange kernels, HBM
instead of NVLink). Each timing is a CUDA graph of ``--calls`` calls of both ranks (fork, both ranks' call,
join), replayed and timed with CUDA events: the time per call of the pair, host launches left out, as the
bench times the low-latency ops (a call bound once on static buffers, replayed).

What it is not: an NVLink figure. Both ranks share one GPU's SMs and HBM, so the exchange's bytes (0.95 MB
per pair in the dispatch) move at HBM's rate, not the link's, and each rank's kernels compete with the other's.
Over NVLink add about the bytes' time on the link (0.95 MB at ~400 GB/s: ~2.4 us); the rest (kernels, launch
gaps in the graph, flag latency within one GPU rather than across the link) is what this measures.

Checks (every run): the eager calls against the torch backend's steps over the same kind of loopback memory
(dispatch bit for bit in the rows below ``recv_count`` and ``recv_count`` itself, combine within one bf16 step),
then the graphs' outputs after their replays, poisoned with NaN / 0xFF first, against the eager ones.

``python -m tests.peer_ll_loopback [--calls N] [--tokens T] [--profile] [--fence-every-thread]`` prints a
short table and exits non-zero on a failed check; ``--profile`` adds the kernels of one graph replay of a
dispatch and of a combine of both ranks (torch.profiler: start, duration, stream); ``--fence-every-thread``
builds the exchange kernel as before 2026-12-03 (every thread fences before the flags: A/B timings).
``--ncu`` only runs every kernel with each rank alone (:func:`kernels_alone`), for ncu.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch

from deepport.bench.configs.moe import routing
from deepport.bench.configs.moe_low_latency_check import bf16_steps, combine_differences, dispatch_differences
from deepport.bench.configs.moe_low_latency_rank import StaticBuffers
from deepport.kernels import OPS, moe_args
from deepport.kernels.moe_args import MoEGroup
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from tests.peer_cuda_one_gpu import _local_memories

WORLD = 2
TARGET_US = {"dispatch": 40.0, "combine": 50.0}  # issue 14 at EP=2, 128 tokens per rank


class Ranks:
    """Both ranks' inputs, transports, static outputs and bound calls on one GPU (module docstring)."""

    def __init__(self, steps: Any, tokens: int, t_max: int, hidden: int, experts: int, topk: int,
                 seed: int, device: torch.device) -> None:
        from deepport.backends.hopper.peer_transport import PeerTransport

        self.steps, self.device, self.t_max, self.experts = steps, device, t_max, experts
        fixed = 8 * 2**20
        self.memories = _local_memories(device, 2**20, fixed)
        self.transports = [PeerTransport(m) for m in self.memories]
        for m in self.memories:  # the slot tables now (a copy to the GPU), not behind a kernel waiting for the peer
            m.fixed_targets()
            m.fixed_received()
        self.streams = [torch.cuda.Stream(device) for _ in range(WORLD)]
        self.inputs = [routing(tokens, hidden, experts, topk, seed * 100 + r, device) for r in range(WORLD)]
        local = experts // WORLD
        g = torch.Generator().manual_seed(seed * 100 + 50)
        self.y = [torch.randn(local, WORLD * t_max, hidden, generator=g).to(device, torch.bfloat16)
                  for _ in range(WORLD)]
        self.groups = [MoEGroup(f"loopback-{r}", r, WORLD, "nccl") for r in range(WORLD)]
        self.dispatch_out = [StaticBuffers(device) for _ in range(WORLD)]
        self.combine_out = [StaticBuffers(device) for _ in range(WORLD)]
        self.handles: list[Any] = [None] * WORLD
        self.dispatch_calls = [  # bound (checked) once, outside any capture; each call only takes new outputs
            dataclasses.replace(OPS["moe_low_latency_dispatch"].bind(x, idx, t_max, experts, use_fp8=True),
                                group=self.groups[r]) for r, (x, idx, _) in enumerate(self.inputs)]

    def dispatch(self, r: int) -> Any:
        """Rank ``r``'s low-latency dispatch (FP8) on the current stream, into its static outputs."""
        from deepport.backends.torch import moe_layouts
        from deepport.backends.torch.moe_comm import use_transport

        call = dataclasses.replace(self.dispatch_calls[r], alloc=self.dispatch_out[r].alloc())
        with use_transport(self.transports[r]):
            return moe_layouts.dispatch_low_latency(call, self.steps)

    def combine(self, r: int) -> torch.Tensor:
        """Rank ``r``'s low-latency combine of its ``y`` on the handle kept by :meth:`keep`."""
        from deepport.backends.torch import moe_layouts
        from deepport.backends.torch.moe_comm import use_transport

        x, idx, w = self.inputs[r]
        y, grp = self.y[r], self.groups[r]
        sig = moe_args.signature(self.device, torch.bfloat16, int(x.shape[1]), int(idx.shape[1]), self.experts, grp)
        call = MoELowLatencyCombineCall(y, idx, w, self.handles[r], grp, self.combine_out[r].alloc(), sig)
        with use_transport(self.transports[r]):
            out: torch.Tensor = moe_layouts.combine_low_latency(call, self.steps)
        return out

    def both(self, step: Callable[[int], Any]) -> list[Any]:
        """``step(r)`` of both ranks at once, each on its stream (fork from and join into the current one)."""
        here = torch.cuda.current_stream(self.device)
        got = []
        for r in range(WORLD):
            self.streams[r].wait_stream(here)
            with torch.cuda.stream(self.streams[r]):
                got.append(step(r))
        for r in range(WORLD):
            here.wait_stream(self.streams[r])
        return got

    def keep(self, results: list[Any]) -> None:
        self.handles = [res.handle for res in results]

    def load_kernels(self) -> None:
        """Launch every kernel of both ops once, each rank alone; these memories are not used afterwards.

        CUDA loads a module at a kernel's first launch and may wait for the device to go idle first. With both
        ranks in one process that can deadlock: rank 0's exchange kernel spins for rank 1's flags, which rank
        1's kernels, not launched yet, would raise. So the fixed flags are raised past any value a wait
        expects and each rank runs alone, the host waiting in between; the bytes exchanged are whatever the
        slots hold (all in range: zeros)."""
        for m in self.memories:
            m.buffer[:m.header].view(torch.int64)[2 * WORLD: 3 * WORLD].fill_(1 << 40)
        torch.cuda.synchronize(self.device)
        for _ in range(2):  # both parities
            for r in range(WORLD):
                self.handles[r] = self.dispatch(r).handle
                self.combine(r)
                torch.cuda.synchronize(self.device)


def _graph_us(step: Callable[[], Any], calls: int, replays: int = 5) -> float:
    """Median over ``replays`` of one replay of ``calls`` captured calls, per call (us)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def oracle(ranks: Ranks) -> list[torch.Tensor]:
    """Each rank's combine in float64 from its handle's routes (``FixedRoutes``): for every received (slot,
    local expert) pair on rank ``q``, expert output row ``y_q[l, position]`` times the source token's weight
    of expert ``q * L + l`` (summed over its top-k), added to that token's row on its source rank."""
    local = ranks.experts // WORLD
    out = [torch.zeros(int(x.shape[0]), int(x.shape[1]), dtype=torch.float64, device=ranks.device)
           for x, _, _ in ranks.inputs]
    for q in range(WORLD):
        f = ranks.handles[q].source.fixed
        slot, k = f.pair_valid.nonzero(as_tuple=True)
        src, token = slot // f.t_max, f.recv_token[slot]
        lid, row = f.recv_local[slot, k], f.pair_position[slot, k]
        for s in range(WORLD):
            mine = src == s
            t, e = token[mine], q * local + lid[mine]
            _, idx, w = ranks.inputs[s]
            weight = ((idx[t] == e[:, None]) * w[t]).sum(1).double()
            out[s].index_add_(0, t, ranks.y[q][lid[mine], row[mine]].double() * weight[:, None])
    return out


def _from_oracle(got: torch.Tensor, exact: torch.Tensor) -> str:
    """How far a bf16 output lies from the float64 sums rounded once: the elements more than one bf16 step
    away, their largest distance in steps and their largest error over the sums' rms (the bench's combine
    check allows 2^-16: float32 sums of nearly cancelling terms)."""
    steps = bf16_steps(got, exact.to(torch.bfloat16))
    far = steps > 1
    rms = float(exact.pow(2).mean().sqrt())
    if not bool(far.any()):
        return "all within 1 bf16 step"
    err = float((got.double() - exact).abs()[far].max())
    return (f"{int(far.sum())} elements past 1 bf16 step (up to {int(steps.max())}), their |err| <= "
            f"{err / rms:.1e} x rms")


def _clone(recv_x: Any) -> Any:
    return tuple(t.clone() for t in recv_x) if isinstance(recv_x, tuple) else recv_x.clone()


def _poison(results: list[Any], combined: list[torch.Tensor]) -> None:
    for res in results:
        data, scales = res.recv_x if isinstance(res.recv_x, tuple) else (res.recv_x, None)
        data.view(torch.uint8).fill_(0xFF)
        if scales is not None:
            scales.fill_(float("nan"))
        res.recv_count.fill_(-1)
    for out in combined:
        out.fill_(float("nan"))


def _graph_timeline(step: Callable[[], Any]) -> list[str]:
    """The kernels of one replay of a graph of one ``step()``, in start order: us from the first start,
    duration, stream, name."""
    from torch.profiler import ProfilerActivity, profile

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if not events:
        return ["  (no kernels recorded)"]
    t0 = events[0].time_range.start
    end = max(e.time_range.end for e in events)
    lines = [f"  {e.time_range.start - t0:7.1f} {e.device_time:7.1f}  s{e.thread:<4} {e.name[:70]}" for e in events]
    return [*lines, f"  span {end - t0:.1f} us, {len(events)} kernels"]


def run(calls: int = 20, tokens: int = 128, profile: bool = False) -> list[str]:
    from deepport.backends.hopper.moe import steps_for
    from deepport.backends.torch.moe_local import TORCH

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    shape = dict(tokens=tokens, t_max=128, hidden=7168, experts=256, topk=8, seed=7, device=device)
    variants = (steps_for(device), TORCH, dataclasses.replace(steps_for(device), scatter_row_pair=None),
                dataclasses.replace(steps_for(device), token_rows_landed=None),
                dataclasses.replace(steps_for(device), low_latency_return_window=None),
                dataclasses.replace(steps_for(device), low_latency_receive_landed=None))
    for steps in variants:
        Ranks(steps, **shape).load_kernels()  # type: ignore[arg-type]
    path, torch_steps, per_part, copied, weights_copied, rows_copied = (
        Ranks(steps, **shape) for steps in variants)  # type: ignore[arg-type]
    lines = [f"hopper path's steps: {type(path.steps).__name__} {getattr(path.steps, 'name', '')}".rstrip()]
    bad = False
    for ranks in (path, torch_steps, per_part, copied, weights_copied, rows_copied):  # eager, twice: both parities
        for _ in range(2):
            ranks.keep(ranks.both(ranks.dispatch))
            ranks.both(ranks.combine)
    torch.cuda.synchronize()
    got = path.both(path.dispatch)
    want = torch_steps.both(torch_steps.dispatch)
    path.keep(got)
    torch_steps.keep(want)
    combined = path.both(path.combine)
    combined_want = torch_steps.both(torch_steps.combine)
    torch.cuda.synchronize()
    for r in range(WORLD):
        found = dispatch_differences(got[r].recv_x, got[r].recv_count, want[r].recv_x, want[r].recv_count)
        found += combine_differences(combined[r], combined_want[r])
        bad = bad or bool(found)
        lines.append(f"rank {r} eager, against the torch steps: {'ok' if not found else 'WRONG ' + '; '.join(found)}")
    for name, ranks, outs in (("hopper path", path, combined), ("torch steps", torch_steps, combined_want)):
        exact = oracle(ranks)
        lines.append(f"{name}'s combine from the float64 sums: "
                     + "; ".join(f"rank {r} {_from_oracle(outs[r], exact[r])}" for r in range(WORLD)))
    kept = [(_clone(g.recv_x), g.recv_count.clone()) for g in got]
    kept_combined = [c.clone() for c in combined]
    rows = []
    for name, ranks, step in (("dispatch", path, "d"), ("combine", path, "c"), ("dispatch + combine", path, "dc"),
                              ("dispatch, one scatter per part", per_part, "d"),
                              ("dispatch, rows copied out of the slots", rows_copied, "d"),
                              ("combine, sums copied out of the slots", copied, "c"),
                              ("combine, weights through a send buffer", weights_copied, "c"),
                              ("dispatch, torch steps", torch_steps, "d"), ("combine, torch steps", torch_steps, "c")):
        def call(ranks: Ranks = ranks, step: str = step) -> None:
            if "d" in step:
                results = ranks.both(ranks.dispatch)
                if "c" in step:
                    ranks.keep(results)
            if "c" in step:
                ranks.both(ranks.combine)

        if ranks is path:
            _poison(got, combined)
        us = _graph_us(call, calls)
        rows.append((name, us))
        if ranks is path:
            torch.cuda.synchronize()
            for r in range(WORLD):
                ok = True
                if "d" in step:
                    ok = not dispatch_differences(got[r].recv_x, got[r].recv_count, *kept[r])
                if "c" in step:
                    ok = ok and not combine_differences(combined[r], kept_combined[r])
                if not ok:
                    bad = True
                    lines.append(f"rank {r} {name}: graph replays' outputs WRONG (against the eager call's)")
            path.handles = [g.handle for g in got]
    lines.append(f"{'two ranks on one GPU, ' + str(tokens) + ' tokens/rank':<34} {'us per call':>12} {'target':>8}")
    for name, us in rows:
        target = TARGET_US.get(name)
        lines.append(f"{name:<34} {us:>12.1f} {'<= ' + format(target, 'g') if target else '':>8}")
    if profile:
        lines.append("both ranks' dispatch, one graph replay (start us, took us, stream, kernel):")
        lines += _graph_timeline(lambda: path.both(path.dispatch))
        path.handles = [g.handle for g in got]
        lines.append("both ranks' combine, one graph replay:")
        lines += _graph_timeline(lambda: path.both(path.combine))
    lines.append("checks: " + ("FAILED" if bad else "ok"))
    return lines


def kernels_alone(rounds: int = 3) -> int:
    """Every kernel of both ops, each rank alone with the fixed flags raised (:meth:`Ranks.load_kernels`),
    ``rounds`` times: for a profiler that serialises kernels (ncu), under which the two ranks' exchange kernels
    would wait for each other forever. The bytes are whatever the slots hold; nothing is checked."""
    from deepport.backends.hopper.moe import steps_for

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ranks = Ranks(steps_for(device), tokens=128, t_max=128, hidden=7168, experts=256, topk=8, seed=7, device=device)
    for _ in range(rounds):
        ranks.load_kernels()
    print(f"kernels alone: {rounds} rounds of both parities and both ranks")
    return 0


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    if "--fence-every-thread" in sys.argv:  # the exchange kernel before 2026-12-03 (A/B timings)
        from deepport.backends.hopper import peer_exchange_kernel

        peer_exchange_kernel.OPTIONS = (*peer_exchange_kernel.OPTIONS, "-DDP_FX_FENCE_EVERY_THREAD=1")
        print("exchange kernel: every thread fences before the flags")
    if "--ncu" in sys.argv:  # under ncu, which runs one kernel at a time: each rank alone, flags raised
        return kernels_alone()
    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 20
    tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 128
    lines = run(calls, tokens, "--profile" in sys.argv)
    print("\n".join(lines))
    return 1 if any("WRONG" in line or "FAILED" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
