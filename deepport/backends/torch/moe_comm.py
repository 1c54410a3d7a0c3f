"""The transport of the torch MoE backend: ``torch.distributed.all_to_all_single``, one call per direction.

Rows travel as raw bytes (``uint8``), so bf16, e4m3, int32 and float32 move bit-exactly on every
torch.distributed backend (gloo, NCCL, ...), within one host or across hosts alike. Several per-row
tensors that travel together (payload, FP8 scales, routing metadata) are packed side by side into one
byte row (:class:`RowFormat`), so a direction costs one collective. A world of one (``group=None``)
copies.

Separate tensors (the triton dispatch's payload rows straight into their output, their side rows apart) move in
one grouped launch of point-to-point sends and receives, :func:`start_parts` (``batch_isend_irecv``; NCCL runs it
as one group, as it runs ``all_to_all_single``), where :func:`moves_parts` says so.

Another transport (the hopper backend's one-sided writes into peers' memory over NVLink,
:mod:`deepport.backends.hopper.peer_transport`) takes over every exchange of the calls made inside
:func:`use_transport`: the routing code above it is unchanged, only the bytes travel another way.

Failures: a collective that fails or times out (a peer that stalled, died or never called the op)
raises :class:`MoECommError` (a ``TimeoutError`` when the backend reports a timeout) naming the op,
the collective, this rank and the group size. The limit is the process group's ``timeout``
(``init_process_group(timeout=...)`` / ``new_group(timeout=...)``). On NCCL a collective runs
asynchronously: a stalled peer surfaces at the next host sync (the normal dispatch's count
exchange), or through NCCL's watchdog, which aborts the communicator after the same timeout.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from deepport.kernels.moe_args import MoEGroup, dense

ROW_ALIGN = 16  # bytes: packed rows start 16-byte aligned (vectorised copies)
_WIDE = (torch.int64, torch.int32, torch.int16, torch.uint8)


class MoECommError(RuntimeError):
    """A collective of an MoE op failed (see the module docstring)."""


class MoECommTimeout(MoECommError, TimeoutError):
    """A collective of an MoE op timed out: a peer stalled, died or never joined it."""


def _fail(what: str, collective: str, grp: MoEGroup, exc: BaseException) -> MoECommError:
    text = str(exc)
    timed_out = "timeout" in text.lower() or "timed out" in text.lower()
    cls = MoECommTimeout if timed_out else MoECommError
    why = ("a peer stalled, died or never called the op; the limit is the process group's timeout "
           "(init_process_group(timeout=...) or new_group(timeout=...))" if timed_out else
           "every rank of the group must call the op collectively, with the same experts, hidden size and dtypes")
    return cls(f"{what}: {collective} over {grp.world_size} ranks failed on rank {grp.rank} ({grp.comm}): "
               f"{why}. Backend said: {text}")


def _guarded(what: str, collective: str, grp: MoEGroup, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (RuntimeError, TimeoutError) as exc:
        raise _fail(what, collective, grp, exc) from exc


@dataclass
class Pending:
    """An all-to-all in flight (``async_op``): :meth:`wait` before reading its output (on NCCL this
    orders the caller's stream after the collective; it does not block the host)."""

    what: str
    grp: MoEGroup
    work: Any
    out: torch.Tensor
    send: torch.Tensor | None = None  # held until the collective is done with it
    held: tuple[torch.Tensor, ...] = ()  # the same, for the parts of start_parts
    collective: str = "all_to_all_single"

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            _guarded(self.what, self.collective, self.grp, self.work.wait)
        return self.out


class Transport(Protocol):
    """Moves the rows of one all-to-all (the contract of :func:`start_all_to_all`, ``grp`` a real group). A
    transport may also offer ``start_parts`` (the contract of :func:`start_parts`), ``rows_window`` and
    ``fixed_window`` (below)."""

    def start(self, out: torch.Tensor, send: torch.Tensor, recv_counts: Sequence[int] | None,
              send_counts: Sequence[int] | None, grp: MoEGroup, what: str) -> Pending: ...


_ACTIVE: contextvars.ContextVar[Transport | None] = contextvars.ContextVar("deepport_moe_transport", default=None)


@contextlib.contextmanager
def use_transport(transport: Transport) -> Iterator[None]:
    """Inside the block, every exchange of a multi-rank MoE call goes through ``transport`` instead of
    ``torch.distributed.all_to_all_single`` (per thread / task: a context variable)."""
    token = _ACTIVE.set(transport)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def start_all_to_all(out: torch.Tensor, send: torch.Tensor, recv_counts: Sequence[int] | None,
                     send_counts: Sequence[int] | None, grp: MoEGroup, what: str) -> Pending:
    """Launch ``all_to_all_single(out, send, recv_counts, send_counts)`` on ``grp`` without waiting
    (``None`` counts: equal splits, no host data at all; a world of one copies). Both tensors are
    contiguous with the same row size. Inside :func:`use_transport`, that transport moves the rows."""
    if grp.group is None:
        out.copy_(send)
        return Pending(what, grp, None, out)
    transport = _ACTIVE.get()
    if transport is not None:
        return transport.start(out, send, recv_counts, send_counts, grp, what)
    import torch.distributed as dist  # local: a torch build without distributed still imports this module

    def launch() -> Any:
        return dist.all_to_all_single(out, send, output_split_sizes=None if recv_counts is None else list(recv_counts),
                                      input_split_sizes=None if send_counts is None else list(send_counts),
                                      group=grp.group, async_op=True)

    return Pending(what, grp, _guarded(what, "all_to_all_single", grp, launch), out, send)


@dataclass(frozen=True)
class FixedWindow:
    """Where a sender stores an equal-split exchange straight into the receivers' memory (a transport with
    one-sided writes offers it, :func:`fixed_window`): part ``r`` (``pair_bytes``) of this rank's send buffer
    goes to the address ``table[seq & 1, r]`` (int64 ``[2, world]`` on the device, this rank's own part
    included), where ``seq`` (int64 ``[1]`` on the device) is read by the writing kernel, so a captured graph
    writes the right area at every replay. Once every part is stored (kernels on the current stream),
    ``finish(out)`` completes the exchange into ``out`` (uint8 ``[world * pair_bytes]``) exactly as
    ``all_to_all_single`` of those parts would, and returns it."""

    table: torch.Tensor
    seq: torch.Tensor
    pair_bytes: int
    finish: Callable[[torch.Tensor], torch.Tensor]
    # where offered: complete the exchange without copying its parts out; returns ``(received, seq)``, int64
    # ``[2, world]`` on the device, ``received[p, s]`` where source ``s``'s part lies in area ``p`` (this rank's
    # memory, 16-byte aligned), and the counter, which the exchange advanced: kernels after it on the stream read
    # area ``(seq - 1) & 1``. Valid until this rank's next exchange through the same memory.
    land: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


def fixed_window(pair_bytes: int, grp: MoEGroup, what: str) -> FixedWindow | None:
    """The active transport's :class:`FixedWindow` for an equal split of ``pair_bytes`` per rank on ``grp``,
    or None (``all_to_all_single``, one process, or a transport or size without one): then fill a send
    buffer and call :func:`start_all_to_all`."""
    transport = _ACTIVE.get()
    offer = getattr(transport, "fixed_window", None)
    if grp.group is None or offer is None:
        return None
    window: FixedWindow | None = offer(pair_bytes, grp, what)
    return window


@dataclass(frozen=True)
class RowsWindow:
    """One all-to-all of uneven sizes whose sender stores straight into the receivers' memory and whose
    receiver reads what arrived where it landed (a transport with one-sided writes offers it:
    :func:`rows_window`). ``send[r]``: uint8 ``[send_bytes[r]]``, where this rank's part for rank ``r`` goes
    (None for this rank: its own rows never travel). Once they are written (kernels on the current stream),
    ``receive()`` returns per source ``s`` the uint8 ``[recv_bytes[s]]`` of what ``s`` sent (None for this
    rank), valid until ``release()``, which the caller calls (once) after copying them out. ``landing``: where
    offered, those parts before they arrive (what ``receive()`` will return; nothing in them yet)."""

    send: list[torch.Tensor | None]
    receive: Callable[[], list[torch.Tensor | None]]
    release: Callable[[], None]
    begin: Callable[[], None] | None = None  # where offered: start moving what was written (receive() waits)
    landing: list[torch.Tensor | None] | None = None


def offers_rows_window(grp: MoEGroup) -> bool:
    """Whether :func:`rows_window` may hand out a window on ``grp`` (an active transport that offers them)."""
    return grp.group is not None and getattr(_ACTIVE.get(), "rows_window", None) is not None


def active_transport() -> Transport | None:
    """The transport :func:`use_transport` made active in this context, or None (``all_to_all_single``)."""
    return _ACTIVE.get()


def rows_window_capacity(grp: MoEGroup) -> int | None:
    """The most bytes per part a :func:`rows_window` on ``grp`` takes (the active transport's block), or None
    when it offers no windows."""
    transport = _ACTIVE.get()
    if not offers_rows_window(grp):
        return None
    capacity = getattr(transport, "window_capacity", None)
    return None if capacity is None else int(capacity)


def exchanges_in_one_step(pair_bytes: int, grp: MoEGroup) -> bool:
    """Whether the active transport moves an equal split of ``pair_bytes`` per rank on ``grp`` in one device
    step of fixed addresses (a peer memory's fixed exchange), which a CUDA graph may capture."""
    check = getattr(_ACTIVE.get(), "one_step_exchange", None)
    return grp.group is not None and check is not None and bool(check(pair_bytes))


def raise_if_transport_failed(what: str) -> None:
    """Raise the active transport's :class:`MoECommTimeout` where one of its device-side waits has recorded a
    stall (no device sync); nothing for transports that cannot record one."""
    check = getattr(_ACTIVE.get(), "raise_if_failed", None)
    if check is not None:
        check(what)


def rows_window(send_bytes: Sequence[int], recv_bytes: Sequence[int], grp: MoEGroup, what: str) -> RowsWindow | None:
    """The active transport's :class:`RowsWindow` for parts of ``send_bytes[r]`` to and ``recv_bytes[s]`` from
    each rank (zero for this rank), or None (``all_to_all_single``, one process, or parts too large for the
    transport's memory): then pack a send buffer and call :func:`start_all_to_all`."""
    transport = _ACTIVE.get()
    offer = getattr(transport, "rows_window", None)
    if grp.group is None or offer is None:
        return None
    window: RowsWindow | None = offer(send_bytes, recv_bytes, grp, what)
    return window


def collective_transport(grp: MoEGroup) -> bool:
    """Whether the exchanges of a call on ``grp`` are collectives of buffers: ``torch.distributed.all_to_all_single``
    (no transport made active by :func:`use_transport`) or an active transport that moves whole buffers only
    (no :func:`rows_window`); then :func:`staged_rows_window` applies."""
    return grp.group is not None and getattr(_ACTIVE.get(), "rows_window", None) is None


def staged_rows_window(send_bytes: Sequence[int], recv_bytes: Sequence[int], device: torch.device, grp: MoEGroup,
                       what: str, send: torch.Tensor | None = None) -> RowsWindow:
    """A :class:`RowsWindow` over one all-to-all (:func:`collective_transport`): ``send[r]`` are the parts of one
    contiguous send buffer (in rank order, as the collective takes them; None for this rank and for empty
    parts), ``receive()`` runs the one collective (the caller's stream then waits for it; the host does not) and
    returns the parts of one receive buffer, by source; ``begin()`` starts the collective earlier, so that work
    on the caller's stream after it (this rank's own rows) runs while it travels. The sender writes its rows
    straight into their place in the send buffer and the receiver reads them where they landed: no packing
    gather and no copy out beyond the caller's own. Every part starts at a multiple of its rows' bytes from a
    fresh allocation (so 16-byte aligned rows stay aligned). ``send``: a uint8 buffer of at least
    ``sum(send_bytes)`` bytes to send from instead (its parts already written, e.g. before the host knew the
    sizes: :func:`~deepport.backends.torch.moe_routes.route`'s early send)."""
    me = grp.rank
    total = sum(send_bytes)
    if send is not None and (send.dtype != torch.uint8 or send.dim() != 1 or int(send.shape[0]) < total):
        raise RuntimeError(f"{what}: the send buffer must be uint8 [>= {total}], got {send.dtype} "
                           f"{tuple(send.shape)} (more rows to send than the buffer was made for)")
    sending = torch.empty(total, dtype=torch.uint8, device=device) if send is None else send[:total]
    recv = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=device)

    def parts(buf: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        at = 0
        for r, size in enumerate(sizes):
            out.append(None if r == me or size == 0 else buf[at: at + size])
            at += size
        return out

    pending: list[Pending] = []

    def begin() -> None:  # the collective starts once the caller's stream has written the send buffer
        if not pending:
            pending.append(start_all_to_all(recv, sending, list(recv_bytes), list(send_bytes), grp, what))

    def receive() -> list[torch.Tensor | None]:
        begin()
        pending[0].wait()
        return parts(recv, recv_bytes)

    def release() -> None:
        pending.clear()  # the collective holds its own references until it is done (the stream waits on it)

    return RowsWindow(parts(sending, send_bytes), receive, release, begin, parts(recv, recv_bytes))


class _AllWorks:
    """Several works of one grouped launch, waited on together."""

    def __init__(self, works: Sequence[Any]) -> None:
        self.works = list(works)

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def moves_parts(grp: MoEGroup, device: torch.device) -> bool:
    """Whether :func:`start_parts` moves separate tensors on ``grp``: every rank decides alike (a property of the
    group, the device type and the active transport). True for ``torch.distributed`` point-to-point (NCCL, or
    gloo on CPU tensors; not gloo on CUDA tensors, which its point-to-point does not take) with no transport
    made active, or an active transport that has ``start_parts``."""
    if grp.group is None:
        return False
    transport = _ACTIVE.get()
    if transport is not None:
        return getattr(transport, "start_parts", None) is not None
    import torch.distributed as dist

    return device.type == "cpu" or str(dist.get_backend(grp.group)) != "gloo"


def start_parts(recv: Sequence[torch.Tensor | None], send: Sequence[torch.Tensor | None], grp: MoEGroup,
                what: str) -> Pending:
    """Move ``send[r]`` to rank ``r`` into its ``recv[s]`` for this rank ``s``, for every part ``i`` of the
    lists at once, without waiting (:func:`moves_parts` says where it applies). ``send`` and ``recv``: ``P *
    world`` entries, part ``i`` of rank ``r`` at ``i * world + r``: uint8 1-D tensors (any place in larger
    tensors: a slice of an output) or None for nothing, this rank's own always None; a receive's size is what
    its sender sends. NCCL: one group of point-to-point sends and receives (as ``all_to_all_single`` is inside),
    so the parts travel side by side; part ``i`` uses tag ``i``. Inside :func:`use_transport`, that transport's
    ``start_parts`` moves them. :meth:`Pending.wait` orders the caller's stream after the moves."""
    transport = _ACTIVE.get()
    if transport is not None:
        offer = getattr(transport, "start_parts", None)
        if offer is None:
            raise RuntimeError(f"{what}: the active transport moves whole buffers only (no start_parts)")
        started: Pending = offer(recv, send, grp, what)
        return started
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d  # the ops P2POp accepts (a probe may wrap dist's)

    world, me = grp.world_size, grp.rank
    ops = []
    for at, (out, src) in enumerate(zip(recv, send, strict=True)):
        peer, tag = at % world, at // world
        if peer == me and (out is not None or src is not None):
            raise RuntimeError(f"{what}: this rank's own part never travels (part {tag})")
        if src is not None and src.numel():
            ops.append(dist.P2POp(c10d.isend, src, peer, grp.group, tag))
        if out is not None and out.numel():
            ops.append(dist.P2POp(c10d.irecv, out, peer, grp.group, tag))
    if not ops:  # nothing to move to or from any rank: no launch (point-to-point needs no peer's call)
        return Pending(what, grp, None, torch.empty(0, dtype=torch.uint8))
    works = _guarded(what, "batch_isend_irecv", grp, lambda: dist.batch_isend_irecv(ops))
    return Pending(what, grp, _AllWorks(works), torch.empty(0, dtype=torch.uint8), None,
                   tuple(op.tensor for op in ops), "batch_isend_irecv")


def exchange_table(table: torch.Tensor, grp: MoEGroup, what: str) -> Pending:
    """Row ``r`` of the int64 ``[world, C]`` ``table`` goes to rank ``r``; the result's row ``s`` came
    from rank ``s``. One small collective, no host sync (wait on the result)."""
    send = table.to(torch.int64).contiguous()
    return start_all_to_all(torch.empty_like(send), send, None, None, grp, what)


def exchange_counts(send_counts: torch.Tensor, grp: MoEGroup) -> list[int]:
    """``send_counts[r]`` rows go to rank ``r``; returns how many rows arrive from each rank (host ints:
    one host sync)."""
    got = exchange_table(send_counts.reshape(-1, 1), grp, "exchange_counts").wait()
    return [int(v) for v in got.reshape(-1).tolist()]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    row_bytes = t.element_size()
    for d in t.shape[1:]:
        row_bytes *= int(d)
    return dense(t).view(torch.uint8).reshape(int(t.shape[0]), row_bytes)


def all_to_all_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], grp: MoEGroup,
                    out: torch.Tensor | None = None, what: str = "all_to_all_rows") -> torch.Tensor:
    """Rows ``send[sum(send_counts[:r]) : ...]`` go to rank ``r``; the result holds the rows from rank 0,
    then rank 1, ... (``sum(recv_counts)`` rows shaped like ``send``'s rows), written into ``out`` when
    given (contiguous, right shape and dtype). One collective."""
    shape = (sum(recv_counts), *send.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=send.dtype, device=send.device)
    if grp.group is None:
        out.copy_(send)
        return out
    target = dense(out)  # a fresh buffer only if `out` has odd strides on size-1 dimensions
    src, dst = _as_bytes(send), _as_bytes(target)
    if src.shape[1] != dst.shape[1]:
        raise RuntimeError(f"all_to_all_rows: row sizes differ ({src.shape[1]} vs {dst.shape[1]} bytes)")
    start_all_to_all(dst, src, recv_counts, send_counts, grp, what).wait()
    if target is not out:
        out.copy_(target)
    return out


# --- packed rows -------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[n, ...]``, dense after the first dimension, as views into packed rows are) as
    ``[n, row bytes / w]`` of the widest integer type ``w`` that divides its row size, row stride and
    offset: the view bit-moving ops (``index_select``, ``index_put_``, ``copy_``) run fastest on."""
    n, width = int(t.shape[0]), 1
    for d in t.shape[1:]:
        width *= int(d)
    if t.numel() == 0:  # nothing to move (and empty tensors may carry any strides)
        return torch.empty((n, width * t.element_size()), dtype=torch.uint8, device=t.device)
    if int(t.shape[-1]) == 1 and t.stride(-1) != 1:  # a size-1 dimension's stride means nothing
        t = t.as_strided(tuple(t.shape), (*t.stride()[:-1], 1))
    raw = t if t.dim() == 2 else t.reshape(n, width)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    row, offset = int(raw.shape[1]), raw.storage_offset()
    stride = int(raw.stride(0))
    for wide in _WIDE:
        size = wide.itemsize
        if row % size == 0 and stride % size == 0 and offset % size == 0:
            return raw.view(wide)
    return raw


def same_bits(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bits` views of ``a`` and ``b`` (same row size) in one integer type, for moving rows between them."""
    x, y = bits(a), bits(b)
    if x.dtype != y.dtype:
        x, y = x.view(torch.uint8), y.view(torch.uint8)
    return x, y


@dataclass(frozen=True)
class RowFormat:
    """Per-row tensors side by side in one ``uint8`` row: part ``name`` holds ``width`` elements of
    ``dtype`` at byte ``offset`` (aligned to its element size; the payload first, 16-byte aligned).
    ``row_bytes`` is a multiple of 16."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    widths: tuple[int, ...]
    offsets: tuple[int, ...]
    row_bytes: int

    @staticmethod
    def of(parts: Sequence[tuple[str, torch.dtype, int]]) -> RowFormat:
        offsets, at = [], 0
        for _, dtype, width in parts:
            size = dtype.itemsize
            at = -(-at // size) * size
            offsets.append(at)
            at += size * width
        return RowFormat(tuple(p[0] for p in parts), tuple(p[1] for p in parts), tuple(p[2] for p in parts),
                         tuple(offsets), -(-max(at, 1) // ROW_ALIGN) * ROW_ALIGN)

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        return torch.empty((rows, self.row_bytes), dtype=torch.uint8, device=device)

    def part(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """Part ``name`` of the ``[rows, row_bytes]`` buffer (or ``[..., row_bytes]``) as a strided
        ``[..., width]`` view of its dtype (writes go into ``buf``)."""
        i = self.names.index(name)
        size = self.dtypes[i].itemsize
        raw = buf[..., self.offsets[i]: self.offsets[i] + size * self.widths[i]]
        return raw if self.dtypes[i] == torch.uint8 else raw.view(self.dtypes[i])
