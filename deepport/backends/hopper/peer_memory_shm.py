"""Peer memory for CPU processes of one host: each rank's receive area is a shared-memory file.

The CPU twin of :mod:`.peer_memory_cuda`, so that the one-sided algorithm of :mod:`.peer_transport` runs
in CI on gloo ranks exactly as it runs over NVLink: the same blocks, the same counters, the same waits.
Each rank creates a file under ``/dev/shm`` (or ``directory``), maps every rank's file
(``MAP_SHARED`` through ``torch.from_file``), and unlinks its own once all have mapped it (the mappings
outlive the names; nothing is left behind, even after a crash past set-up).

Area layout: ``3 * world`` int64 flags (``data[source]``, ``ack[destination]``, ``fixed[source]``), padded
to 64 bytes, then ``world`` blocks of ``capacity`` bytes, then (with ``fixed_capacity``) the two areas of
the fixed exchange, ``world`` slots of ``fixed_capacity`` bytes each (:meth:`ShmPeerMemory.fixed_exchange`,
the algorithm of ``kernels/sm90_peer_exchange.cu`` with one writer per rank). A flag is written only by
the one peer it belongs to and only grows. Ordering: the data are written by ``copy_`` (finished before it
returns) and the flag is stored after it by the same thread; readers load the flag before the data. On x86
(total store order) that is enough; other CPUs would need explicit fences, which Python cannot issue: use
this on x86 only.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepport.backends.hopper.fixed_slots import FixedSlots
from deepport.backends.torch.moe_comm import MoECommTimeout

HEADER_ALIGN = 64


class ShmPeerMemory(FixedSlots):
    """:class:`~deepport.backends.hopper.peer_transport.PeerMemory` over shared-memory files (collective:
    every rank of ``group`` constructs it together)."""

    def __init__(self, group: Any, capacity: int, timeout_s: float = 60.0, directory: str = "/dev/shm",
                 fixed_capacity: int = 0) -> None:
        import torch.distributed as dist

        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._lay_out_slots(fixed_capacity)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.capacity, self.timeout_s = int(capacity), float(timeout_s)
        w = self.world_size
        self.header = -(-3 * w * 8 // HEADER_ALIGN) * HEADER_ALIGN
        self.fixed_at = self.header + w * self.capacity
        nbytes = self.fixed_at + 2 * w * self.slot_bytes
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
        self.flags = [a[: 3 * w * 8].view(torch.int64) for a in self.areas]
        self.sent = [0] * w  # chunks written to each peer
        self.received = [0] * w  # chunks read from each peer
        self.fixed_exchanges = 0  # fixed exchanges completed (the kernel's per-CTA counter)
        self.seq = torch.zeros(1, dtype=torch.int64)  # the same, as a tensor (fixed_targets)
        self.written_exchanges = 0  # of those, the ones whose senders wrote straight into the slots
        self.landed_exchanges = 0  # of those, the ones whose parts stayed in the slots (no copy out)
        self._targets: torch.Tensor | None = None
        self._received: torch.Tensor | None = None

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

    def signal_then_wait_data(self, peers: Sequence[int], sources: Sequence[int], what: str) -> None:
        self.signal_data(peers)
        self.wait_data(sources, what)

    def signal_acks(self, sources: Sequence[int]) -> None:
        w = self.world_size
        for s in sources:
            self.flags[s][w + self.rank] = self.received[s]

    def fixed_slot(self, owner: int, parity: int, source: int) -> torch.Tensor:
        """uint8 ``[slot_bytes]``: ``owner``'s slot for ``source`` in its area ``parity``."""
        at = self.fixed_at + (parity * self.world_size + source) * self.slot_bytes
        return self.areas[owner][at: at + self.slot_bytes]

    def fixed_exchange(self, out: torch.Tensor, send: torch.Tensor, what: str) -> None:
        """Equal-split all-to-all of the uint8 ``send`` (``[world * pair_bytes]``) into ``out`` in one step
        per rank: the algorithm of ``kernels/sm90_peer_exchange.cu`` (write into every peer's slot of the
        area of this exchange's parity, raise its fixed flag, wait for every source's, copy the slots out);
        no acknowledgement, because an area is written again only two exchanges later."""
        w, me = self.world_size, self.rank
        pair = int(send.numel()) // w
        if pair > self.fixed_capacity:
            raise ValueError(f"{what}: {pair} bytes per rank exceed the fixed exchange's {self.fixed_capacity}")
        parity = self.fixed_exchanges & 1
        for r in range(w):
            part = send[r * pair: (r + 1) * pair]
            if r == me:
                out[r * pair: (r + 1) * pair].copy_(part)
            else:
                self.fixed_slot(r, parity, me)[:pair].copy_(part)
        self._signal_wait_copy(out, pair, what, own=False)

    def fixed_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, seq)``: int64 ``[2, world]``, ``table[p, r]`` the address in this process of slot ``me`` in
        rank ``r``'s area ``p``; int64 ``[1]``, the fixed exchanges done (this one uses area ``seq & 1``). As
        :meth:`.peer_memory_cuda.CudaPeerMemory.fixed_targets`."""
        if self._targets is None:
            w = self.world_size
            self._targets = torch.tensor([[int(self.fixed_slot(r, p, self.rank).data_ptr()) for r in range(w)]
                                          for p in range(2)], dtype=torch.int64)
        return self._targets, self.seq

    def fixed_exchange_written(self, out: torch.Tensor, what: str) -> None:
        """The fixed exchange of ``out``'s size whose parts every rank has already written into the slots of
        :meth:`fixed_targets`: raise the flags, wait for the sources', copy every slot (own one included) out."""
        w = self.world_size
        pair = int(out.numel()) // w
        if pair > self.fixed_capacity or pair * w != int(out.numel()):
            raise ValueError(f"{what}: {int(out.numel())} bytes over {w} ranks exceed the fixed exchange's "
                             f"{self.fixed_capacity} per rank")
        self._signal_wait_copy(out, pair, what, own=True)
        self.written_exchanges += 1

    def fixed_received(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, seq)``: int64 ``[2, world]``, ``table[p, s]`` the address in this process of this rank's slot
        for source ``s`` in its area ``p``; int64 ``[1]``, the fixed exchanges done. As
        :meth:`.peer_memory_cuda.CudaPeerMemory.fixed_received`."""
        if getattr(self, "_received", None) is None:
            w = self.world_size
            table = [[int(self.fixed_slot(self.rank, p, s).data_ptr()) for s in range(w)] for p in range(2)]
            if any(a % 16 for row in table for a in row):  # the kernels reading there load 16-byte vectors
                raise RuntimeError(f"the fixed exchange's slots are not 16-byte aligned: {table}")
            self._received = torch.tensor(table, dtype=torch.int64)
        assert self._received is not None
        return self._received, self.seq

    def fixed_exchange_landed(self, pair_bytes: int, what: str) -> None:
        """:meth:`fixed_exchange_written` without the copy out: the parts stay in this rank's slots."""
        if not 0 <= pair_bytes <= self.fixed_capacity:
            raise ValueError(f"{what}: {pair_bytes} bytes per rank exceed the fixed exchange's {self.fixed_capacity}")
        self._signal_wait_copy(None, pair_bytes, what, own=True)
        self.written_exchanges += 1
        self.landed_exchanges += 1

    def _signal_wait_copy(self, out: torch.Tensor | None, pair: int, what: str, own: bool) -> None:
        w, me = self.world_size, self.rank
        seq, parity = self.fixed_exchanges, self.fixed_exchanges & 1
        for r in range(w):
            if r != me:
                self.flags[r][2 * w + me] = seq + 1
        self._wait([(2 * w + s, seq + 1, s) for s in range(w) if s != me], what, "fixed-exchange data")
        for s in range(w):
            if out is not None and (s != me or own):
                out[s * pair: (s + 1) * pair].copy_(self.fixed_slot(me, parity, s)[:pair])
        self.fixed_exchanges = seq + 1
        self.seq.fill_(seq + 1)
