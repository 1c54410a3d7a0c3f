"""A group of rank processes joined by ``torch.distributed``, for multi-rank conformance cases.

``world_size`` plain Python processes (``subprocess``, not ``multiprocessing``: the harness may itself
run inside a daemonic isolation worker, which may not have ``multiprocessing`` children) join one
process group (gloo for CPU, NCCL for CUDA with GPU ``rank`` per rank) through a file store, then
run jobs: the parent sends every rank the same job (a ``"module:function"`` and keyword arguments),
each rank returns a picklable result. Tensors cross the process boundary only as
``(dtype, shape, bytes)`` (:func:`pack` / :func:`unpack`). One group per device type is
started on first use and reused for every case (a job of a smaller world runs on the first ranks, in
their subgroup); a job that fails to answer within ``timeout_s``
(a hung collective) kills the group and raises :class:`TimeoutError`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

import torch

START_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 120.0
Packed = tuple[str, tuple[int, ...], bytes]


def pack(t: torch.Tensor) -> Packed:
    """A tensor as ``(dtype name, shape, raw bytes)`` (bit-exact, any dtype, no shared memory)."""
    t = t.detach().to("cpu").contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(int(d) for d in t.shape), t.view(torch.uint8).numpy().tobytes()


def unpack(p: Packed) -> torch.Tensor:
    dtype_name, shape, raw = p
    dtype = getattr(torch, dtype_name)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


class RankGroup:
    """``world_size`` rank processes in one torch.distributed group on ``device_type``."""

    def __init__(self, world_size: int, device_type: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        self.world_size, self.device_type, self.timeout_s = world_size, device_type, timeout_s
        key = os.urandom(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self._listener.address
        self._store_dir = tempfile.mkdtemp(prefix="deepport-ranks-")
        self._store = os.path.join(self._store_dir, "store")  # the file store creates it
        self._procs = [
            subprocess.Popen([sys.executable, "-m", "deepport.conformance.rank_worker", host, str(port), key.hex(),
                              str(rank), str(world_size), device_type, self._store, str(timeout_s)],
                             stdin=subprocess.DEVNULL)
            for rank in range(world_size)
        ]
        self._conns: list[Connection | None] = [None] * world_size
        accepted = threading.Thread(target=self._accept_all, daemon=True)
        accepted.start()
        accepted.join(START_TIMEOUT_S)
        if accepted.is_alive() or any(c is None for c in self._conns):
            self.close()
            raise TimeoutError(f"{world_size} rank processes did not start within {START_TIMEOUT_S:g} s")
        for rank, conn in enumerate(self._conns):
            assert conn is not None
            if not conn.poll(START_TIMEOUT_S) or conn.recv() != ("ready", rank):
                self.close()
                raise RuntimeError(f"rank {rank} failed to join the {device_type} process group")

    def _accept_all(self) -> None:
        for _ in range(self.world_size):
            conn = self._listener.accept()
            rank = conn.recv()
            self._conns[int(rank)] = conn

    def alive(self) -> bool:
        return all(p.poll() is None for p in self._procs)

    def run(self, target: str, world: int | None = None, **kwargs: Any) -> list[Any]:
        """Run ``target(rank=, group=, device=, **kwargs)`` on the first ``world`` ranks (default all), with
        ``group`` their process group; results indexed by rank.

        A rank that raises, dies or stays silent past the timeout fails the job at once and kills the
        group (the others may be blocked in a collective it never joined); the next job restarts it."""
        world = self.world_size if world is None else world
        conns = [c for c in self._conns[:world] if c is not None]
        for conn in conns:
            conn.send((target, world, kwargs))
        results: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(results) < world:
            ready = wait([c for r, c in enumerate(conns) if r not in results], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} of "
                                   f"{world} did not answer within {self.timeout_s:g} s (a hung collective?)")
            for ready_conn in ready:
                rank = next(r for r, c in enumerate(conns) if c is ready_conn)
                try:
                    status, value = conns[rank].recv()
                except (EOFError, OSError) as exc:
                    self.kill()
                    raise RuntimeError(f"rank {rank} of {world} died: {exc!r}") from None
                if status != "ok":
                    self.kill()
                    raise RuntimeError(f"rank {rank} of {world}: {value}")
                results[rank] = value
        return [results[r] for r in range(world)]

    def kill(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(None)
                conn.close()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self._conns = [None] * self.world_size
        self._listener.close()
        shutil.rmtree(self._store_dir, ignore_errors=True)


_groups: dict[str, RankGroup] = {}
MAX_WORLD = 4  # the largest world of the suites: one group of this size serves every smaller world too


def rank_group(world_size: int, device_type: str) -> RankGroup:
    """A started group on ``device_type`` with at least ``world_size`` ranks (run jobs with
    ``world=world_size``). One group per device type, as large as the suites need and the machine
    allows (one GPU per rank on CUDA), started on first use and restarted when it died."""
    group = _groups.get(device_type)
    if group is not None and group.alive() and group.world_size >= world_size:
        return group
    if group is not None:
        group.kill()
    available = torch.cuda.device_count() if device_type == "cuda" else MAX_WORLD
    group = _groups[device_type] = RankGroup(max(world_size, min(MAX_WORLD, available)), device_type)
    return group


@atexit.register
def close_all() -> None:
    while _groups:
        _, group = _groups.popitem()
        group.close()
