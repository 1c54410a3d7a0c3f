"""All-to-all by one-sided writes into peers' memory: the transport of the hopper backend's MoE ops.

Every rank of the group owns a receive area that every other rank can write (NVLink peer mappings of
PyTorch symmetric memory on GPUs of one host, :mod:`.peer_memory_cuda`; shared-memory files for CPU
processes of one host, :mod:`.peer_memory_shm`, which is how CI runs this algorithm). The area holds one
block of ``capacity`` bytes per source rank. An exchange (the contract of
:func:`deepport.backends.torch.moe_comm.start_all_to_all`: ``send``'s rows ``send_counts[r]`` to rank ``r``,
``out`` the rows from rank 0, then 1, ...) runs in rounds; in round ``j`` each rank

1. waits until every peer it still sends to has consumed its previous chunk (an *ack* flag per pair),
2. writes chunk ``j`` (bytes ``[j * capacity, (j + 1) * capacity)`` of what it sends to ``r``) into
   block ``me`` of each such peer ``r``, then raises the pair's *data* flag,
3. waits for the data flags of the peers it still receives from, copies their chunk ``j`` out of its
   own area into ``out``, and raises their ack flags.

Both ends of a pair know the pair's byte count (the sender from ``send_counts``, the receiver from
``recv_counts``; equal splits from the shapes), hence its number of chunks (at least one: an empty
message still signals, so a peer that never calls the op is noticed, and the flags of every pair
advance in step). Flags are counters that only grow (one per chunk), so nothing is reset between calls,
and on a GPU the expected values live in device memory (incremented by the wait kernels), so a captured
CUDA graph replays correctly. A rank's own rows are copied directly. Every wait is bounded: past the
memory's timeout it raises :class:`~deepport.backends.torch.moe_comm.MoECommTimeout` (CPU) or records
the stall and stops the device (GPU; the next host-side check raises it).

Equal splits (the low-latency layouts' exchanges) that fit the memory's ``fixed_capacity`` take the
*fixed exchange* instead: one step per rank (one kernel launch on a GPU,
``kernels/sm90_peer_exchange.cu``) that writes every peer's slot, raises one flag per pair, waits for its
sources' flags and copies its slots out, double-buffered by the exchange's parity so that no
acknowledgement is needed (a slot is written again only two fixed exchanges later, after its owner has
finished the exchange that read it). Larger or uneven exchanges use the rounds above.

A sender may also skip its send buffer: :meth:`PeerTransport.fixed_window` hands it the slots' addresses
(a :class:`~deepport.backends.torch.moe_comm.FixedWindow`: per parity and rank, where this rank's part
goes, and the device counter that selects the parity), its kernel stores each part straight into them
(its own part into its own slot), and ``window.finish`` runs the *written* fixed exchange: the same kernel
without its first copy (signal, wait, every slot copied out). Both kinds may meet in one exchange (a rank
with no tokens fills a send buffer), as both fill the same slots of the same parity. ``window.land`` ends
the written exchange without its copy out: the parts stay in this rank's slots, whose addresses it returns,
for the next kernels to read (the low-latency combine's final sum), valid until this rank's next fixed
exchange (a peer writes that area again only in the exchange after it). The triton backend's
low-latency sender and its combine's partial sums write this way.

Why it deadlocks never: each wait of round ``j`` depends only on a peer's actions of round ``j`` or
earlier, which that peer performs in the same order; a pair's chunk count is the same at both ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from deepport.backends.torch.moe_comm import FixedWindow, Pending, RowsWindow
from deepport.kernels.moe_args import MoEGroup


class PeerMemory(Protocol):
    """The one-sided memory of a group (see the module docstring). ``rank``/``world_size`` within the
    group; ``capacity`` bytes per source block."""

    rank: int
    world_size: int
    capacity: int

    def block(self, owner: int, source: int) -> torch.Tensor:
        """uint8 ``[capacity]``: ``owner``'s receive block for rows from ``source`` (a peer mapping when
        ``owner`` is another rank)."""
        ...

    def wait_acks(self, peers: Sequence[int], what: str) -> None:
        """Until each peer has acknowledged every chunk this rank has written to it."""
        ...

    def signal_data(self, peers: Sequence[int]) -> None:
        """After this rank's writes to each peer's block: one more chunk ready there (release)."""
        ...

    def wait_data(self, sources: Sequence[int], what: str) -> None:
        """Until each source's next chunk is in this rank's block for it (acquire)."""
        ...

    def signal_then_wait_data(self, peers: Sequence[int], sources: Sequence[int], what: str) -> None:
        """:meth:`signal_data` of ``peers`` then :meth:`wait_data` of ``sources`` (one flag launch on a GPU)."""
        ...

    def signal_acks(self, sources: Sequence[int]) -> None:
        """After copying each source's chunk out: its block may be written again."""
        ...


@runtime_checkable
class FixedExchangeMemory(PeerMemory, Protocol):
    """A :class:`PeerMemory` that also moves an equal-split exchange of up to ``fixed_capacity`` bytes per
    rank in one step (see the module docstring); ``fixed_capacity == 0``: it does not."""

    fixed_capacity: int

    def fixed_exchange(self, out: torch.Tensor, send: torch.Tensor, what: str) -> None:
        """uint8 ``send`` (``[world * pair_bytes]``, contiguous) to ``out`` (the same size): rank ``r`` gets
        bytes ``[r * pair_bytes, (r + 1) * pair_bytes)``; ``out``'s part ``s`` is what rank ``s`` sent."""
        ...


@runtime_checkable
class FixedWindowMemory(FixedExchangeMemory, Protocol):
    """A :class:`FixedExchangeMemory` whose senders may store their parts straight into the slots (the
    *written* fixed exchange, :class:`~deepport.backends.torch.moe_comm.FixedWindow`)."""

    def fixed_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, seq)``: int64 ``[2, world]``, the address (mapped here) of slot ``me`` in rank ``r``'s area
        ``p`` at ``[p, r]``; int64 ``[1]``, the fixed exchanges done (the next one uses area ``seq & 1``)."""
        ...

    def fixed_exchange_written(self, out: torch.Tensor, what: str) -> None:
        """The fixed exchange of ``out``'s size whose parts every rank has stored into the slots of
        :meth:`fixed_targets`: signal, wait, every slot (this rank's own included) into ``out``."""
        ...


@runtime_checkable
class LandingMemory(FixedWindowMemory, Protocol):
    """A :class:`FixedWindowMemory` whose written exchange may leave the parts where they landed (no copy out):
    the kernels after it read them from this rank's slots (``FixedWindow.land``)."""

    def fixed_received(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, seq)``: int64 ``[2, world]``, ``table[p, s]`` the address (here) of this rank's slot for
        source ``s`` in its area ``p``; int64 ``[1]``, the fixed exchanges done (after an exchange its parts lie
        in area ``(seq - 1) & 1``)."""
        ...

    def fixed_exchange_landed(self, pair_bytes: int, what: str) -> None:
        """The written fixed exchange of ``pair_bytes`` per rank, signal and wait only."""
        ...


@dataclass(frozen=True)
class Plan:
    """Byte layout of one exchange: per rank, where its part starts in ``send``/``out`` and its size."""

    send_offsets: tuple[int, ...]
    send_bytes: tuple[int, ...]
    recv_offsets: tuple[int, ...]
    recv_bytes: tuple[int, ...]
    capacity: int

    def chunks(self, nbytes: int) -> int:
        """Chunks of a message of ``nbytes`` (one for an empty message: it still signals)."""
        return max(1, -(-nbytes // self.capacity))

    @property
    def rounds(self) -> int:
        return max(self.chunks(b) for b in (*self.send_bytes, *self.recv_bytes))


def _offsets(sizes: Sequence[int]) -> tuple[int, ...]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return tuple(out)


def plan(out: torch.Tensor, send: torch.Tensor, recv_counts: Sequence[int] | None,
         send_counts: Sequence[int] | None, world: int, capacity: int) -> Plan:
    """The byte plan of ``all_to_all_single(out, send, recv_counts, send_counts)`` (``None``: equal splits)."""
    row = send.element_size()
    for d in send.shape[1:]:
        row *= int(d)
    n_send, n_out = int(send.shape[0]), int(out.shape[0])
    sends = [n_send // world] * world if send_counts is None else [int(c) for c in send_counts]
    recvs = [n_out // world] * world if recv_counts is None else [int(c) for c in recv_counts]
    if len(sends) != world or len(recvs) != world or sum(sends) != n_send or sum(recvs) != n_out:
        raise ValueError(f"all-to-all split sizes do not match the tensors: send {n_send} rows as {sends}, "
                         f"out {n_out} rows as {recvs}, world {world}")
    send_b, recv_b = [c * row for c in sends], [c * row for c in recvs]
    return Plan(_offsets(send_b), tuple(send_b), _offsets(recv_b), tuple(recv_b), capacity)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("the peer transport moves contiguous tensors only")
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


class PeerTransport:
    """:class:`deepport.backends.torch.moe_comm.Transport` over a :class:`PeerMemory` (module docstring)."""

    def __init__(self, memory: PeerMemory) -> None:
        self.memory = memory
        # the memory's one-step path for equal splits, where it has one (its fixed_capacity is read per call)
        self.fixed = memory if isinstance(memory, FixedExchangeMemory) else None
        self.window_memory = memory if isinstance(memory, FixedWindowMemory) else None
        self.rows_windows = 0  # exchanges handed out as a RowsWindow (tests and profiles count them)
        self.window_capacity: int | None = int(memory.capacity)  # the most bytes per part of a rows_window

    def one_step_exchange(self, pair_bytes: int) -> bool:
        """Whether an equal-split exchange of ``pair_bytes`` per rank takes the memory's one-launch fixed
        exchange (as :meth:`exchange` decides)."""
        fixed = self.fixed
        return self.memory.world_size > 1 and fixed is not None and 0 < pair_bytes <= fixed.fixed_capacity

    def raise_if_failed(self, what: str) -> None:
        """The memory's record of a stalled wait as :class:`MoECommTimeout` (where it keeps one)."""
        check = getattr(self.memory, "raise_if_failed", None)
        if check is not None:
            check(what)

    def rows_window(self, send_bytes: Sequence[int], recv_bytes: Sequence[int], grp: MoEGroup,
                    what: str) -> RowsWindow | None:
        """Round 0 of the rounds above with the caller's kernels as its copies
        (:class:`~deepport.backends.torch.moe_comm.RowsWindow`): wait for the peers' acknowledgements now;
        the caller stores its part for ``r`` into block ``me`` of ``r``; ``receive`` raises the data flags,
        waits for the sources' and hands out this rank's blocks; ``release`` acknowledges them. None when a
        part exceeds a block (several rounds) or this rank's own part is not zero."""
        mem = self.memory
        me, world = mem.rank, mem.world_size
        if (grp.rank, grp.world_size) != (me, world):
            raise ValueError(f"{what}: the peer memory belongs to rank {me} of {world}, the call to rank "
                             f"{grp.rank} of {grp.world_size}")
        if world < 2 or len(send_bytes) != world or len(recv_bytes) != world or send_bytes[me] or recv_bytes[me] \
                or max(*send_bytes, *recv_bytes) > mem.capacity:
            return None
        peers = [r for r in range(world) if r != me]
        mem.wait_acks(peers, what)  # every pair has one chunk, empty or not: an empty message still signals
        self.rows_windows += 1

        def receive() -> list[torch.Tensor | None]:
            mem.signal_then_wait_data(peers, peers, what)
            return [None if s == me else mem.block(me, s)[: int(recv_bytes[s])] for s in range(world)]

        return RowsWindow([None if r == me else mem.block(r, me)[: int(send_bytes[r])] for r in range(world)],
                          receive, lambda: mem.signal_acks(peers))

    def fixed_window(self, pair_bytes: int, grp: MoEGroup, what: str) -> FixedWindow | None:
        """Where a sender stores an equal split of ``pair_bytes`` per rank straight into the peers' slots
        (:class:`~deepport.backends.torch.moe_comm.FixedWindow`), or None when the memory has no such slots
        or they are too small (the caller then exchanges a send buffer)."""
        mem = self.window_memory
        if mem is None or grp.world_size < 2 or not 0 < pair_bytes <= mem.fixed_capacity:
            return None
        if (grp.rank, grp.world_size) != (mem.rank, mem.world_size):
            raise ValueError(f"{what}: the peer memory belongs to rank {mem.rank} of {mem.world_size}, the call "
                             f"to rank {grp.rank} of {grp.world_size}")
        table, seq = mem.fixed_targets()

        def finish(out: torch.Tensor) -> torch.Tensor:
            flat = _flat_bytes(out)
            if int(flat.numel()) != pair_bytes * mem.world_size:
                raise ValueError(f"{what}: the written exchange fills {pair_bytes * mem.world_size} bytes, got an "
                                 f"output of {int(flat.numel())}")
            mem.fixed_exchange_written(flat, what)
            return out

        land = None
        if isinstance(mem, LandingMemory):
            landing = mem

            def land() -> tuple[torch.Tensor, torch.Tensor]:
                received = landing.fixed_received()  # first: made once, never after a launch that waits on peers
                landing.fixed_exchange_landed(pair_bytes, what)
                return received

        return FixedWindow(table, seq, pair_bytes, finish, land)

    def start(self, out: torch.Tensor, send: torch.Tensor, recv_counts: Sequence[int] | None,
              send_counts: Sequence[int] | None, grp: MoEGroup, what: str) -> Pending:
        mem = self.memory
        if (grp.rank, grp.world_size) != (mem.rank, mem.world_size):
            raise ValueError(f"{what}: the peer memory belongs to rank {mem.rank} of {mem.world_size}, the call "
                             f"to rank {grp.rank} of {grp.world_size}")
        self.exchange(out, send, recv_counts, send_counts, what)
        return Pending(what, grp, None, out)

    def exchange(self, out: torch.Tensor, send: torch.Tensor, recv_counts: Sequence[int] | None,
                 send_counts: Sequence[int] | None, what: str) -> None:
        mem = self.memory
        me, world, cap = mem.rank, mem.world_size, mem.capacity
        p = plan(out, send, recv_counts, send_counts, world, cap)
        src, dst = _flat_bytes(send), _flat_bytes(out)
        if p.recv_bytes[me] != p.send_bytes[me]:
            raise ValueError(f"{what}: this rank sends itself {p.send_bytes[me]} bytes but expects {p.recv_bytes[me]}")
        fixed = self.fixed
        equal = recv_counts is None and send_counts is None and int(src.numel()) == int(dst.numel())
        if equal and world > 1 and fixed is not None and fixed.fixed_capacity > 0 and \
                p.send_bytes[me] <= fixed.fixed_capacity:
            fixed.fixed_exchange(dst, src, what)
            return
        if p.send_bytes[me]:
            dst[p.recv_offsets[me]: p.recv_offsets[me] + p.recv_bytes[me]].copy_(
                src[p.send_offsets[me]: p.send_offsets[me] + p.send_bytes[me]])
        peers = [r for r in range(world) if r != me]
        for j in range(p.rounds):
            dests = [r for r in peers if p.chunks(p.send_bytes[r]) > j]
            if dests:
                mem.wait_acks(dests, what)
                for r in dests:
                    lo, hi = j * cap, min((j + 1) * cap, p.send_bytes[r])
                    if hi > lo:
                        mem.block(r, me)[: hi - lo].copy_(src[p.send_offsets[r] + lo: p.send_offsets[r] + hi])
            sources = [s for s in peers if p.chunks(p.recv_bytes[s]) > j]
            if dests or sources:
                mem.signal_then_wait_data(dests, sources, what)  # one flag launch on a GPU
            if sources:
                for s in sources:
                    lo, hi = j * cap, min((j + 1) * cap, p.recv_bytes[s])
                    if hi > lo:
                        dst[p.recv_offsets[s] + lo: p.recv_offsets[s] + hi].copy_(mem.block(me, s)[: hi - lo])
                mem.signal_acks(sources)
