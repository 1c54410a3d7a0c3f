"""Host cost of the calls the EP ops are made of, on this machine: ``torch.empty``, a tiny torch kernel, a
tiny Triton kernel, ``clone`` (microseconds per call, medians of 5 rounds of 2000 calls). With ``--busy``, a
second process keeps the same GPU busy meanwhile (as the one-GPU two-process harness does), to see whether
sharing the GPU inflates the launches.

``python3 scripts/host_launch_cost.py [--busy]``
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time

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


def _busy(stop: mp.Event) -> None:  # type: ignore[valid-type]
    torch.cuda.init()  # type: ignore[no-untyped-call]
    while not stop.is_set():  # type: ignore[attr-defined]
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


def main() -> None:
    stop = mp.get_context("spawn").Event()
    proc = None
    if "--busy" in sys.argv:
        proc = mp.get_context("spawn").Process(target=_busy, args=(stop,))
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
    for name, fn in cases.items():
        print(f"{name:<32} {_per_call_us(fn):7.2f} us per call{' (GPU shared)' if proc else ''}")
    if proc:
        stop.set()
        proc.join()


if __name__ == "__main__":
    main()
