"""Host time to launch the dispatch's payload exchange on NCCL, one GPU: one ``all_to_all_single`` against the
split wire's grouped point-to-point launch (``batch_isend_irecv`` of four parts: payload and side rows, sent and
received), the same four parts through the process group's own coalescing calls (a private API), and
``all_to_all`` of tensor lists.

A group of one NCCL rank sends 58.7 MB (4096 rows of 7168 bf16) and 328 kB of side rows to itself, so it runs on
one GPU. The dispatch launches this exchange after its one host read, and nothing of the payload moves before
the launch returns, so its host time is on the critical path. Per way, two rounds of 50 calls: the median host
time of the launch call alone, and the GPU time from an event recorded before it to one after the wait.

``python -m tests.nccl_launch_host``
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    from torch.distributed import distributed_c10d as c10d

    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29566", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    n = 4096 * 7168 * 2
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    y = torch.zeros_like(x)
    side = torch.randint(0, 255, (4096 * 80,), dtype=torch.uint8, device=device)
    side_in = torch.zeros_like(side)
    group = dist.group.WORLD
    assert group is not None

    def single() -> list[Any]:
        return [dist.all_to_all_single(y, x, [n], [n], async_op=True)]

    def grouped() -> list[Any]:
        ops = [dist.P2POp(c10d.isend, x, 0, None, 0), dist.P2POp(c10d.isend, side, 0, None, 1),
               dist.P2POp(c10d.irecv, y, 0, None, 0), dist.P2POp(c10d.irecv, side_in, 0, None, 1)]
        return list(dist.batch_isend_irecv(ops))

    def coalesced() -> list[Any]:
        group._start_coalescing(device)
        group.send([x], 0, 0)
        group.send([side], 0, 1)
        group.recv([y], 0, 0)
        group.recv([side_in], 0, 1)
        return [group._end_coalescing(device)]

    def lists() -> list[Any]:
        return [dist.all_to_all([y], [x], async_op=True)]

    ways: list[tuple[str, Callable[[], list[Any]]]] = [
        ("all_to_all_single", single), ("batch_isend_irecv, 4 parts", grouped),
        ("process group coalescing, 4 parts", coalesced), ("all_to_all of lists", lists)]
    bad = []
    for round_ in (1, 2):
        for name, launch in ways:
            host, gpu = [], []
            for _ in range(50):
                y.zero_()
                torch.cuda.synchronize()
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before.record()
                t = time.perf_counter()
                works = launch()
                host.append((time.perf_counter() - t) * 1e6)
                for work in works:
                    work.wait()
                after.record()
                torch.cuda.synchronize()
                gpu.append(before.elapsed_time(after) * 1e3)
            if not torch.equal(y, x):
                bad.append(name)
            print(f"round {round_}: {name:<36} host launch median {statistics.median(host):6.1f} us "
                  f"(min {min(host):6.1f}), GPU median {statistics.median(gpu):6.1f} us")
    dist.destroy_process_group()
    print("bytes: " + ("equal every way" if not bad else "WRONG after " + ", ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
