"""Peer memory over NVLink for GPUs of one host: PyTorch symmetric memory plus the flag kernel.

Each rank allocates one symmetric buffer (``torch.distributed._symmetric_memory.empty`` then
``rendezvous`` over the group), which maps every peer's buffer into this process (plain peer loads and
stores over NVLink). Layout as in :mod:`.peer_memory_shm`: ``3 * world`` int64 flags (``data[source]``,
``ack[destination]``, ``fixed[source]``), padded to 64 bytes, then ``world`` blocks of ``capacity`` bytes,
then the fixed exchange's two areas of ``world`` slots of ``fixed_capacity`` bytes. Writes into a
peer's block are ``copy_`` kernels on torch's current stream; flags are raised and awaited by
``kernels/sm90_peer_flags.cu`` on the same stream, so a call never blocks the host and the low-latency
ops stay capturable in a CUDA graph (the expected flag values are counters in device memory). An
equal-split exchange that fits a slot is one launch of ``kernels/sm90_peer_exchange.cu`` instead
(:meth:`CudaPeerMemory.fixed_exchange`, :mod:`.peer_exchange_kernel`).

Never NVLink multicast: multicast objects can put a shared host's GPUs out of service. Before the first
buffer, :func:`forbid_multicast` sets ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NCCL_NVLS_ENABLE=0`` and
``NVSHMEM_DISABLE_NVLS=1`` where unset and refuses to go on when one is set otherwise; nothing here
creates a multicast object or issues a multimem instruction.

``mapping="ipc"`` maps the peers' buffers through CUDA IPC handles exchanged over the group instead
(``torch.multiprocessing``'s tensor sharing): the same bytes and flags, for ranks that symmetric memory
refuses (two processes on one GPU: the one-GPU check of this protocol, ``tests/peer_cuda_one_gpu.py``).

A wait that times out (a peer stalled, died or never called the op) records the stall in host-mapped
memory and traps; :meth:`CudaPeerMemory.raise_if_failed` (called at each op's start and where a caller
syncs) turns the record into :class:`~deepport.backends.torch.moe_comm.MoECommTimeout`. The CUDA context
is unusable after a trap, as after any device-side fault: the process must restart its GPU work.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from deepport.backends.hopper import peer_exchange_kernel
from deepport.backends.hopper.fixed_slots import FixedSlots
from deepport.backends.torch.moe_comm import MoECommTimeout

HEADER_ALIGN = 64
MAX_OPS = 64  # flags per launch (DP_PEER_MAX_OPS): one per peer, so groups of up to 65 ranks
_OP = struct.Struct("<2Q")
_TAIL = struct.Struct("<Qqii")
PARAMS_SIZE = MAX_OPS * _OP.size + _TAIL.size  # 1048 bytes, well under the 4 KiB parameter limit
SIGNAL, WAIT_NEXT, WAIT_COUNTER, SIGNAL_THEN_WAIT = 0, 1, 2, 3  # the last: | (number of signals << 8)
MULTICAST_OFF = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1"}


def forbid_multicast() -> None:
    """Set the variables that keep PyTorch, NCCL and NVSHMEM off NVLink multicast (where unset); raise
    when one is set to anything else."""
    for name, value in MULTICAST_OFF.items():
        got = os.environ.setdefault(name, value)
        if got.strip() != value:
            raise RuntimeError(f"the hopper peer transport never uses NVLink multicast: expected {name}={value}, "
                               f"got {name}={got!r} (unset it or set it to {value})")


def pack_params(ops: Sequence[tuple[int, int]], error: int, timeout_ns: int, mode: int) -> bytes:
    """The kernel's ``dp::PeerFlagParams``: ``ops`` of ``(flag address, counter address)``."""
    if not 0 < len(ops) <= MAX_OPS:
        raise ValueError(f"expected 1..{MAX_OPS} flags per launch, got {len(ops)}")
    body = b"".join(_OP.pack(f, c) for f, c in ops) + bytes(_OP.size * (MAX_OPS - len(ops)))
    return body + _TAIL.pack(error, timeout_ns, len(ops), mode)


MAPPINGS = ("symmetric", "ipc")


def _map_symmetric(group: Any, device: torch.device, nbytes: int, header: int) -> tuple[torch.Tensor,
                                                                                       list[torch.Tensor]]:
    """This rank's symmetric buffer (flags zeroed) and every rank's, mapped here (collective)."""
    import torch.distributed as dist
    from torch.distributed import _symmetric_memory as symm_mem

    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    buffer[:header].zero_()
    with warnings.catch_warnings():  # needed before torch 2.8, deprecated (and a no-op) since
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group.group_name)
    handle = symm_mem.rendezvous(buffer, group.group_name)
    rank = dist.get_rank(group)
    areas = [buffer if r == rank else handle.get_buffer(r, (nbytes,), torch.uint8)
             for r in range(dist.get_world_size(group))]
    return buffer, areas


def _map_ipc(group: Any, device: torch.device, nbytes: int, header: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """This rank's buffer (flags zeroed) and every rank's, opened here from CUDA IPC handles gathered over
    ``group`` (collective; any backend that gathers objects, gloo included)."""
    import torch.distributed as dist
    from torch.multiprocessing.reductions import reduce_tensor

    buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)  # zeroed before a peer can map it
    shared: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(shared, reduce_tensor(buffer), group=group)  # type: ignore[no-untyped-call]
    rank = dist.get_rank(group)
    here = device.index if device.index is not None else torch.cuda.current_device()
    areas = [buffer if r == rank else rebuild(*_opened_on(args, here)) for r, (rebuild, args) in enumerate(shared)]
    return buffer, areas


IPC_DEVICE_ARG = 6
"""Where ``torch.multiprocessing.reductions.rebuild_cuda_tensor``'s arguments name the owner's device index."""


def _opened_on(args: tuple[Any, ...], device_index: int) -> tuple[Any, ...]:
    """A peer's rebuild arguments with the device to open its IPC handle on set to this rank's own GPU.

    torch opens a handle on the owner's device index (in the owner's numbering), with peer access enabled lazily
    from that device: right when both processes use one GPU, but for a peer on another GPU this process would map
    the buffer in a context of that GPU and never enable access from its own, whose kernels then fault on the
    address. Opened on this rank's device, the CUDA driver enables access from it to the owner's GPU (the usual
    way of CUDA IPC between GPUs of one host)."""
    if len(args) <= IPC_DEVICE_ARG or not isinstance(args[IPC_DEVICE_ARG], int):
        raise RuntimeError(f"unexpected CUDA IPC rebuild arguments from this torch ({len(args)} of them; expected "
                           f"the owner's device index at position {IPC_DEVICE_ARG})")
    return (*args[:IPC_DEVICE_ARG], device_index, *args[IPC_DEVICE_ARG + 1:])


def _flag_function(device_index: int) -> Any:
    from deepport.backends.hopper import jit, launch
    from deepport.backends.hopper.sources import peer_source

    source = peer_source("sm90_peer_flags.cu", "dp_peer_flags_kernel")
    key, cubin = jit.get_cubin(source, (f"-DDP_PEER_MAX_OPS={MAX_OPS}",))
    return launch.load_function(key, cubin, source.entry, device_index, 0)


class CudaPeerMemory(FixedSlots):
    """:class:`~deepport.backends.hopper.peer_transport.PeerMemory` over symmetric memory (collective:
    every rank of ``group`` constructs it together, each on its own GPU), or with ``mapping="ipc"`` over
    CUDA IPC handles (ranks may share a GPU)."""

    def __init__(self, group: Any, device: torch.device, capacity: int, timeout_s: float,
                 mapping: str = "symmetric", fixed_capacity: int = 0) -> None:
        import torch.distributed as dist

        forbid_multicast()
        if capacity <= 0 or capacity % 16:
            raise ValueError(f"capacity must be a positive multiple of 16 bytes, got {capacity}")
        self._lay_out_slots(fixed_capacity)
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
        self.device = device
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if self.world_size - 1 > MAX_OPS:
            raise ValueError(f"the peer transport handles up to {MAX_OPS + 1} ranks, got {self.world_size}")
        self.capacity, self.timeout_ns = int(capacity), int(timeout_s * 1e9)
        w = self.world_size
        self.header = -(-3 * w * 8 // HEADER_ALIGN) * HEADER_ALIGN
        self.fixed_at = self.header + w * self.capacity
        nbytes = self.fixed_at + 2 * w * self.slot_bytes
        self.buffer, self.areas = (_map_symmetric if mapping == "symmetric" else _map_ipc)(group, device, nbytes,
                                                                                       self.header)
        self.flag_base = [int(a.data_ptr()) for a in self.areas]
        # chunks sent to / received from / acknowledged to each peer: device counters (graph replays advance them)
        self.counters = torch.zeros((3, w), dtype=torch.int64, device=device)
        self.fixed_counters = torch.zeros(peer_exchange_kernel.CTAS, dtype=torch.int64, device=device)
        self._fixed_function: Any = None
        self._targets: torch.Tensor | None = None
        self.written_exchanges = 0  # written fixed exchanges issued from the host (a captured one counts once)
        self.landed_exchanges = 0  # of those, the ones that left the parts in the slots
        self.error = torch.zeros(4, dtype=torch.int64, pin_memory=True)
        self._params: dict[tuple[tuple[tuple[int, int], ...], int, int, int], bytes] = {}  # packed flag launches
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone signals
        self.function = _flag_function(device.index if device.index is not None else torch.cuda.current_device())
        self._received: torch.Tensor | None = None
        if self.slot_bytes:
            self.fixed_targets()  # now, not inside a caller's graph capture
            self.fixed_received()

    def _flag(self, owner: int, slot: int) -> int:
        return self.flag_base[owner] + 8 * slot

    def _counter(self, row: int, peer: int) -> int:
        return int(self.counters.data_ptr()) + 8 * (row * self.world_size + peer)

    def _launch(self, ops: list[tuple[int, int]], mode: int) -> None:
        from deepport.backends.hopper import launch

        error = int(self.error.data_ptr())
        key = (tuple(ops), mode, error, self.timeout_ns)  # the addresses are fixed for the memory's life
        params = self._params.get(key)
        if params is None:  # pack each launch's struct once
            params = self._params[key] = pack_params(ops, error, self.timeout_ns, mode)
        launch.launch(self.function, 1, 32 * -(-len(ops) // 32), 0, params, self.device)

    def block(self, owner: int, source: int) -> torch.Tensor:
        at = self.header + source * self.capacity
        return self.areas[owner][at: at + self.capacity]

    def wait_acks(self, peers: Sequence[int], what: str) -> None:
        self.raise_if_failed(what)
        w = self.world_size
        self._launch([(self._flag(self.rank, w + r), self._counter(0, r)) for r in peers], WAIT_COUNTER)

    def signal_data(self, peers: Sequence[int]) -> None:
        self._launch([(self._flag(r, self.rank), self._counter(0, r)) for r in peers], SIGNAL)

    def wait_data(self, sources: Sequence[int], what: str) -> None:
        self._launch([(self._flag(self.rank, s), self._counter(1, s)) for s in sources], WAIT_NEXT)

    def signal_then_wait_data(self, peers: Sequence[int], sources: Sequence[int], what: str) -> None:
        """:meth:`signal_data` of ``peers`` then :meth:`wait_data` of ``sources`` in one launch."""
        signals = [(self._flag(r, self.rank), self._counter(0, r)) for r in peers]
        waits = [(self._flag(self.rank, s), self._counter(1, s)) for s in sources]
        if not signals or not waits or len(signals) + len(waits) > MAX_OPS:
            if signals:
                self.signal_data(peers)
            if waits:
                self.wait_data(sources, what)
            return
        self._launch(signals + waits, SIGNAL_THEN_WAIT | (len(signals) << 8))

    def signal_acks(self, sources: Sequence[int]) -> None:
        w = self.world_size
        self._launch([(self._flag(s, w + self.rank), self._counter(2, s)) for s in sources], SIGNAL)

    def fixed_exchange(self, out: torch.Tensor, send: torch.Tensor, what: str) -> None:
        """Equal-split all-to-all of the uint8 ``send`` (``[world * pair_bytes]``) into ``out``: one launch of
        ``kernels/sm90_peer_exchange.cu`` on torch's current stream (capturable; module docstring of
        :mod:`.peer_transport` for the protocol)."""
        if int(out.numel()) != int(send.numel()):
            raise ValueError(f"{what}: a fixed exchange sends and receives the same bytes, got send "
                             f"{int(send.numel())} and out {int(out.numel())}")
        self._launch_fixed(out, int(send.data_ptr()), what)

    def fixed_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, seq)`` for a sender that writes its parts straight into the slots (then
        :meth:`fixed_exchange_written`): int64 ``[2, world]`` on this GPU, ``table[p, r]`` the address (mapped
        here) of slot ``me`` in rank ``r``'s area ``p``; int64 ``[1]`` on this GPU, the fixed exchanges done
        (this one uses area ``seq & 1``; advanced by the exchange kernel, so graph replays move on)."""
        if self._targets is None:  # made at the first call, which must not be inside a graph capture
            w, me = self.world_size, self.rank
            addresses = [[int(self.areas[r].data_ptr()) + self.fixed_at + (p * w + me) * self.slot_bytes
                          for r in range(w)] for p in range(2)]
            self._targets = torch.tensor(addresses, dtype=torch.int64, device=self.device)
        return self._targets, self.fixed_counters[:1]

    def fixed_exchange_written(self, out: torch.Tensor, what: str) -> None:
        """The fixed exchange of ``out``'s size whose parts every rank has already stored into the slots of
        :meth:`fixed_targets` (on this stream): signal, wait, copy the slots (own one included) into ``out``."""
        self._launch_fixed(out, 0, what)
        self.written_exchanges += 1

    def fixed_received(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, seq)`` for the kernels after :meth:`fixed_exchange_landed`: int64 ``[2, world]`` on this GPU,
        ``table[p, s]`` the address of this rank's slot for source ``s`` in its area ``p``; int64 ``[1]``, the
        fixed exchanges done (after an exchange, its parts lie in area ``(seq - 1) & 1``)."""
        if getattr(self, "_received", None) is None:  # made at the first call, which must not be inside a capture
            w, at = self.world_size, int(self.areas[self.rank].data_ptr()) + self.fixed_at
            table = [[at + (p * w + s) * self.slot_bytes for s in range(w)] for p in range(2)]
            if any(a % 16 for row in table for a in row):  # the kernels reading there load 16-byte vectors
                raise RuntimeError(f"the fixed exchange's slots are not 16-byte aligned: {table}")
            self._received = torch.tensor(table, dtype=torch.int64, device=self.device)
        assert self._received is not None
        return self._received, self.fixed_counters[:1]

    def fixed_exchange_landed(self, pair_bytes: int, what: str) -> None:
        """The written fixed exchange of ``pair_bytes`` per rank without its copy out: signal and wait; the
        parts stay in this rank's slots (:meth:`fixed_received`) for the kernels after it on this stream."""
        self._launch_fixed(None, 0, what, pair_bytes)
        self.written_exchanges += 1
        self.landed_exchanges = getattr(self, "landed_exchanges", 0) + 1

    def _launch_fixed(self, out: torch.Tensor | None, send: int, what: str, pair_bytes: int = -1) -> None:
        self.raise_if_failed(what)
        w = self.world_size
        total = pair_bytes * w if out is None else int(out.numel())
        pair = total // w
        if pair > self.fixed_capacity or pair * w != total or pair < 0:
            raise ValueError(f"{what}: a fixed exchange of {total} bytes over {w} ranks does not fit "
                             f"slots of {self.fixed_capacity} bytes per rank")
        if self._fixed_function is None:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._fixed_function = peer_exchange_kernel.function(index)
        areas = [int(a.data_ptr()) + self.fixed_at for a in self.areas]
        flags = [base + 16 * w for base in self.flag_base]
        params = peer_exchange_kernel.pack_params(
            areas, flags, send, 0 if out is None else int(out.data_ptr()), int(self.fixed_counters.data_ptr()),
            int(self.error.data_ptr()), pair, self.slot_bytes, self.timeout_ns, self.rank)
        peer_exchange_kernel.launch_fixed_exchange(self._fixed_function, params, self.device)

    def raise_if_failed(self, what: str) -> None:
        """Raise :class:`MoECommTimeout` when a wait kernel has recorded a stall (reads pinned memory: no sync)."""
        failed, op, seen, target = (int(v) for v in self.error.tolist())
        if failed:
            which = f"fixed exchange waiting for rank {-1 - op}" if op < 0 else f"wait #{op}"
            raise MoECommTimeout(
                f"{what}: peer transport over {self.world_size} ranks timed out on rank {self.rank} after "
                f"{self.timeout_ns / 1e9:g} s ({which}: flag {seen}, expected {target}): a peer stalled, died or "
                f"never called the op; the GPU stopped this stream with a trap, so this process's CUDA context "
                f"must be recreated")
