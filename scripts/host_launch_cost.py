"""Host cost of the calls the EP ops are made of, on this machine: ``torch.empty``, a tiny torch kernel, a
tiny Triton kernel, ``clone``, a CUDA graph's replay (microseconds per call, medians of 5 rounds of 2000 calls;
the replays also one at a time after a synchronize, as the EP host harness calls them). With ``--busy``, a
second process keeps the same GPU busy meanwhile (as the one-GPU two-process harness does), to see whether
sharing the GPU inflates the launches; with ``--busy-launch`` the second process launches small kernels
back to back instead (as the harness's other rank does while this one launches).

``python3 scripts/host_launch_cost.py [--busy | --busy-launch]``
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _tiny(x_ptr, n: tl.constexpr):  # type: ignore[no-untyped-def]
    i = tl.arange(0, n)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1)


@triton.jit  # type: ignore[untyped-decorator]
def _wide(x_ptr, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,  # type: ignore[no-untyped-def]
          p1, p2, p3, p4, n: tl.constexpr, c1: tl.constexpr, c2: tl.constexpr):
    i = tl.arange(0, n)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + a1 + a20 + c1 + c2)


def _guard() -> None:
    with torch.cuda.device(0):
        pass


def _busy(stop: mp.Event, launches: bool) -> None:  # type: ignore[valid-type]
    torch.cuda.init()  # type: ignore[no-untyped-call]
    x = torch.zeros(1024, device="cuda")
    while not stop.is_set():  # type: ignore[attr-defined]
        if launches:
            for _ in range(200):
                x.add_(1)
        else:
            torch.cuda._sleep(10_000_000)  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def _per_call_us(fn: object, n: int = 2000) -> float:
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        rounds.append((time.perf_counter() - t0) * 1e6 / n)
    torch.cuda.synchronize()
    return statistics.median(rounds)


def _synced_us(fn: object, n: int = 300) -> float:
    """Median host time of one call made right after a synchronize (the GPU idle for this process)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _graph(x: torch.Tensor, kernels: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _tiny[(1,)](x, 1024)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for _ in range(kernels):
            _tiny[(1,)](x, 1024)
    graph.replay()
    return graph


def _sum_table() -> Callable[[], None]:
    """The normal combine's per-call table kernel (``moe_sum_graph._Program.prepare``) at issue 14's 4096-token
    size, EP=2, alone in this process."""
    from deepport.backends.triton.moe_sum_graph import _Program

    device = torch.device("cuda")
    program = _Program(4096, 7168, 2, 0, 64 << 20, torch.bfloat16, torch.bfloat16, device)
    rows = torch.zeros(8000, 7168, dtype=torch.bfloat16, device=device)
    out = torch.empty(4096, 7168, dtype=torch.bfloat16, device=device)
    in_rank = torch.rand(4096, 2, device=device) > 0.3
    sends = [3000, 5000]
    program.prepare(rows, out, in_rank, sends)
    return lambda: program.prepare(rows, out, in_rank, sends)


def main() -> None:
    stop = mp.get_context("spawn").Event()
    proc = None
    if "--busy" in sys.argv or "--busy-launch" in sys.argv:
        proc = mp.get_context("spawn").Process(target=_busy, args=(stop, "--busy-launch" in sys.argv))
        proc.start()
        time.sleep(5)
    x = torch.zeros(1024, device="cuda")
    big = torch.zeros(128, 7168, dtype=torch.bfloat16, device="cuda")
    _tiny[(1,)](x, 1024)
    wide_args = (x, *range(3, 23), x, x, x, x, 1024, 2, 3)
    compiled = _wide[(1,)](*wide_args)
    run_compiled = compiled[(1, 1, 1)]
    cases = {"torch.empty [128, 7168] bf16": lambda: torch.empty((128, 7168), dtype=torch.bfloat16, device="cuda"),
             "triton kernel, 25 runtime args": lambda: _wide[(1,)](*wide_args),
             "the same, compiled kernel's runner": lambda: run_compiled(*wide_args),
             "with torch.cuda.device(0): (nothing)": _guard,
             "x.add_(1) (1024 floats)": lambda: x.add_(1),
             "triton tiny kernel": lambda: _tiny[(1,)](x, 1024),
             "clone [128, 7168] bf16": lambda: big.clone(),
             "torch.cuda.current_stream()": lambda: torch.cuda.current_stream()}
    cases["moe combine's table kernel (prepare)"] = _sum_table()
    for kernels in (1, 8):
        cases[f"graph replay, {kernels} triton kernels"] = _graph(x, kernels).replay
    for name, fn in cases.items():
        print(f"{name:<36} {_per_call_us(fn):7.2f} us per call{' (GPU shared)' if proc else ''}")
    for name, fn in cases.items():
        if name.startswith(("graph", "triton tiny", "x.add_", "moe")):
            print(f"{name + ', after a sync':<48} {_synced_us(fn):7.2f} us{' (GPU shared)' if proc else ''}")
    if proc:
        stop.set()
        proc.join()


if __name__ == "__main__":
    main()
