"""Peer memory for CPU processes of one host: each rank's receive area is a shared-memory file.

The CPU twin of :mod:`.peer_memory_cuda`, so that the one-sided algorithm of :mod:`.peer_transport` runs
in CI on gloo ranks exactly as it runs over NVLink: the same blocks, the same counters, the same waits.
Each rank creates a file under ``/dev/shm`` (or ``directory``), maps every rank's file
(``MAP_SHARED`` through ``torch.from_file``), and unlinks its own once all have mapped it (the mappings
outlive the names; nothing is left behind, even after a crash past set-up).

Area layout: ``2 * world`` int64 flags (``data[source]``, ``ack[destination]``), padded to 64 bytes, then
``world`` blocks of ``capacity`` bytes. A flag is written only by the one peer it belongs to and only
grows. Ordering: the data are written by ``copy_`` (finished before it returns) and the flag is stored
after it by the same thread; readers load the flag before the data. On x86 (total store order) that is
enough; other CPUs would need explicit fences, which Python cannot issue: use this on x86 only.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepport.backends.torch.moe_comm import MoECommTimeout

HEADER_ALIGN = 64


class ShmPeerMemory:
    """:class:`~deepport.backends.hopper.peer_transport.PeerMemory` over shared-memory files (collective:
    every rank of ``group`` constructs it together)."""

    def __init__(self, group: Any, capacity: int, timeout_s: float = 60.0, directory: str = "/dev/shm") -> None:
        import torch.distributed as dist

        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.capacity, self.timeout_s = int(capacity), float(timeout_s)
        w = self.world_size
        self.header = -(-2 * w * 8 // HEADER_ALIGN) * HEADER_ALIGN
        nbytes = self.header + w * self.capacity
        token = [uuid.uuid4().hex if self.rank == 0 else ""]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
        names = [Path(directory) / f"deepport-peer-{token[0]}-{r}" for r in range(w)]
        mine = names[self.rank]
        with open(mine, "wb") as f:
            f.truncate(nbytes)  # zero-filled: every flag starts at 0
        dist.barrier(group=group)
        try:
            self.areas = [torch.from_file(str(n), shared=True, size=nbytes, dtype=torch.uint8) for n in names]
            dist.barrier(group=group)
        finally:
            os.unlink(mine)
        self.flags = [a[: 2 * w * 8].view(torch.int64) for a in self.areas]
        self.sent = [0] * w  # chunks written to each peer
        self.received = [0] * w  # chunks read from each peer

    def block(self, owner: int, source: int) -> torch.Tensor:
        at = self.header + source * self.capacity
        return self.areas[owner][at: at + self.capacity]

    def _wait(self, slots: Sequence[tuple[int, int, int]], what: str, kind: str) -> None:
        """Spin until ``flags[me][slot] >= value`` for each ``(slot, value, peer)``; past the timeout raise."""
        own = self.flags[self.rank]
        deadline = time.monotonic() + self.timeout_s
        pause = 0.0
        for slot, value, peer in slots:
            while int(own[slot]) < value:
                if time.monotonic() > deadline:
                    raise MoECommTimeout(
                        f"{what}: peer transport over {self.world_size} ranks timed out on rank {self.rank} after "
                        f"{self.timeout_s:g} s waiting for rank {peer}'s {kind} (flag {int(own[slot])}, expected "
                        f"{value}): a peer stalled, died or never called the op")
                time.sleep(pause)
                pause = min(1e-3, pause * 2 + 1e-6)

    def wait_acks(self, peers: Sequence[int], what: str) -> None:
        w = self.world_size
        self._wait([(w + r, self.sent[r], r) for r in peers], what, "acknowledgement")

    def signal_data(self, peers: Sequence[int]) -> None:
        for r in peers:
            self.sent[r] += 1
            self.flags[r][self.rank] = self.sent[r]

    def wait_data(self, sources: Sequence[int], what: str) -> None:
        for s in sources:
            self.received[s] += 1
        self._wait([(s, self.received[s], s) for s in sources], what, "data")

    def signal_acks(self, sources: Sequence[int]) -> None:
        w = self.world_size
        for s in sources:
            self.flags[s][w + self.rank] = self.received[s]
