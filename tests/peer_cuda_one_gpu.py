"""Two processes on ONE GPU exchange bytes through the hopper peer transport (CUDA IPC mapping + flag kernel).

What a single-GPU machine can check of the NVLink path before two GPUs are lent: the flag kernel's
signal / wait / acknowledgement protocol over many chunks, graph replays advancing the device-side
counters, and the timeout record, over buffers mapped between the processes by CUDA IPC (torch 2.11's
symmetric memory refuses two ranks on one device, so the symmetric mapping itself needs two GPUs). The
group is gloo (NCCL refuses two ranks on one device); only the transport runs, not the MoE ops (which
want NCCL for CUDA tensors). The two processes' kernels are time-sliced on the GPU, so this says nothing about speed.

``python -m tests.peer_cuda_one_gpu`` prints one line per check and exits non-zero on a failure;
tests/test_hopper_peer_transport.py runs it under the ``gpu`` marker.
"""

from __future__ import annotations

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


def _worker(rank: int, world: int, init: str, results: Any) -> None:
    from deepport.backends.hopper.peer_memory_cuda import CudaPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch.moe_comm import MoECommTimeout

    out: list[str] = []
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        # torch's symmetric memory refuses two ranks on one device: map the buffers through CUDA IPC instead
        memory = CudaPeerMemory(dist.group.WORLD, device, capacity=4096, timeout_s=30.0, mapping="ipc")
        transport = PeerTransport(memory)
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
        # 3. a stalled peer: rank 1 stays away; rank 0's wait traps and leaves the record
        if rank == 0:
            short = CudaPeerMemory.__new__(CudaPeerMemory)
            short.__dict__.update(memory.__dict__)
            short.timeout_ns = int(2e9)
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
                    out.append(f"stall: ok ({timeout})")
        else:
            out.append("stall: stayed away")
        dist.barrier()  # rank 1 stays alive (its memory mapped) until rank 0 has seen the stall
    except Exception:
        out.append("FAILED: " + traceback.format_exc())
    results[rank] = out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        manager = mp.get_context("spawn").Manager()
        results = manager.dict()
        procs = [mp.get_context("spawn").Process(target=_worker, args=(r, world, init, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            if p.is_alive():
                p.kill()
        lines = [f"rank {r}: {line}" for r in range(world) for line in results.get(r, ["no result (died)"])]
    print("\n".join(lines))
    bad = [line for line in lines if "WRONG" in line or "FAILED" in line or "no result" in line]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
