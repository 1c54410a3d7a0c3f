"""Normal MoE layout, dispatch and combine in vectorised torch: per direction one small count exchange
and one payload collective (``all_to_all_single`` of packed byte rows, :mod:`.moe_comm`).

Dispatch (per call: 2 collectives, 1 host sync):

1. counts: rank ``r`` gets a ``[1 + num_local_experts]`` row from every rank (tokens sent to ``r``,
   and per expert of ``r`` the tokens selecting it), one small ``all_to_all_single``; the one host
   sync reads the send, receive and per-expert counts at once (the result's sizes and
   ``num_recv_tokens_per_expert`` are host values by contract).
2. payload: one row per (token, destination rank), ordered by destination then token index, packed
   as ``[payload | FP8 scales | int32 token index, top-k ids (, top-k weight bits)]``; receivers get
   rows grouped by source rank, each block in token order: the contract's canonical order with no
   sorting. Rows a rank keeps for itself skip the collective (copied straight into the outputs while
   the collective runs), so the wire moves only the other ranks' rows.

Combine: one collective back along the reverse routes (the received rows themselves when no weights
come along, else packed ``[x | weights]`` rows), summed per token in float32 and rounded once to bf16.

The two local steps around the exchanges, gathering the payload rows to send and summing returned rows
per token, are the optional ``take_rows_into`` or ``take_rows`` / ``sum_rows`` of a
:class:`~deepport.backends.torch.moe_local.LocalSteps` (another backend's kernels, e.g. triton's or
opencl's); without
them the rows are gathered straight into the packed send rows and summed with torch.

With a backend's ``rows_to_blocks`` / ``blocks_to_rows`` the dispatch needs neither: over a peer transport's
window the rows go straight into the peers' memory, over ``all_to_all_single`` straight into their place in the
collective's send buffer (:func:`~deepport.backends.torch.moe_comm.staged_rows_window`; the other ranks' rows
before the host read, while the count exchange runs: :func:`_early_send`), and are copied out of where they
landed, their routes derived on the way. With ``DEEPPORT_MOE_WIRE=split``, where the exchange moves separate
tensors (NCCL's point-to-point), the payload rows and their side rows (scales, metadata) travel apart in one
grouped launch, the payload straight into the output (:class:`SplitWire`, :func:`_split_exchange`: no copy of
the payload after the exchange, but a grouped launch that costs the host more than one collective). On a
GPU the one host read runs on a side stream (:func:`_read_counts`), so it does not wait for the early send.
With ``rank_rows_at`` the combine sends the rows straight
from the caller's tensor and sums them where they landed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepport.backends.torch import moe_chunks
from deepport.backends.torch.moe_comm import (
    ROW_ALIGN,
    Pending,
    RowFormat,
    RowsWindow,
    all_to_all_rows,
    collective_transport,
    exchange_table,
    moves_parts,
    offers_rows_window,
    rows_window,
    rows_window_capacity,
    same_bits,
    staged_rows_window,
    start_all_to_all,
    start_parts,
)
from deepport.backends.torch.moe_index import column_cumsum, compact, first_occurrence, local_ids, selection_mask
from deepport.backends.torch.moe_local import (
    TORCH,
    BlockOutputs,
    CountedParts,
    LocalSteps,
    PeerRows,
    RoutePrelude,
    sum_rows,
)
from deepport.kernels.moe_args import Alloc, MoEGroup, align_up, dense
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_handle import MoEHandle
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall

__all__ = ["Received", "combine", "dispatch", "layout", "local_ids", "resend", "return_positions", "return_rows",
           "return_rows_weighted", "route", "selection_mask", "send_tokens", "sum_per_token"]


def layout(call: MoELayoutCall) -> MoELayout:
    idx, experts, ranks = call.topk_idx, call.num_experts, call.num_ranks
    in_rank = selection_mask(idx, ranks, experts // ranks)
    per_expert = selection_mask(idx, experts, 1).sum(0, dtype=torch.int32)
    return MoELayout(in_rank.sum(0, dtype=torch.int32), per_expert, in_rank)


@dataclass
class Received:
    """What a dispatch brought to this rank, rows in canonical order (source rank, then token).

    ``data``/``scales`` are the call's outputs when the route unpacked, else strided views into the
    received packed rows (valid until the caller drops them; one zero row more with ``zero_row``).
    ``per_expert`` is the device copy of ``handle.num_recv_tokens_per_expert``."""

    data: torch.Tensor  # [num_recv, hidden], payload dtype
    scales: torch.Tensor | None
    local_idx: torch.Tensor  # int64 [num_recv, num_topk]
    weights: torch.Tensor | None  # float32 [num_recv, num_topk], zero on non-local slots
    handle: MoEHandle
    per_expert: torch.Tensor  # int64 [num_local_experts]
    local_out: torch.Tensor | None = None  # the local ids again, in a tensor of the caller's alloc
    weights_out: bool = False  # whether ``weights`` came from the caller's alloc (no copy needed)


def send_tokens(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Token index of each sent row in send order (destination rank, then token), from a bool
    ``[T, world]`` mask (``is_token_in_rank``); ``count`` (the number of true entries, when the host
    knows it) avoids a host sync."""
    if count is None:
        return mask.t().nonzero()[:, 1]
    return compact(mask.t(), count) % max(int(mask.shape[0]), 1)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``dst[i] = src[rows[i]]`` (all rows when ``rows`` is None), bit for bit, through integer views."""
    d, s = same_bits(dst, src)
    if rows is None:
        d.copy_(s)
    else:
        torch.index_select(s, 0, rows, out=d)


def _steps_for(part: str, local: LocalSteps) -> LocalSteps:
    """The steps that gather ``part`` of the packed rows: the backend's, except that the int32 metadata goes
    through torch unless the backend's ``take_rows_into`` (a bit copy of any row type) takes it; torch's
    gather into the strided metadata part took 17 us per 4096-token dispatch on an H200 (2026-12-02)."""
    return local if part != "meta" or local.take_rows_into is not None else TORCH


def _take_rows(local: LocalSteps, dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[i] = src[rows[i]]`` for payload rows: the backend's ``take_rows_into`` or ``take_rows`` step when
    it has one."""
    if local.take_rows_into is not None:
        d, s = same_bits(dst, src)
        local.take_rows_into(s, rows, d)
    elif local.take_rows is None:
        _copy_rows(dst, src, rows)
    else:
        _copy_rows(dst, local.take_rows(src, rows))


def sum_per_token(local: LocalSteps, rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[n, ...]`` per-token sums of ``rows`` (the backend's ``sum_rows`` step when it has one)."""
    return (local.sum_rows or sum_rows)(rows, dst, n)


def _meta(idx: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """int32 ``[T, 1 + K (+ K)]``: token index, global top-k ids (, weight bits): what a receiver needs."""
    cols = [torch.arange(idx.shape[0], device=idx.device, dtype=torch.int32)[:, None], idx.to(torch.int32)]
    if weights is not None:
        cols.append(weights.view(torch.int32))
    return torch.cat(cols, dim=1)


def _row_format(data: torch.Tensor, scales: torch.Tensor | None, meta_width: int) -> RowFormat:
    parts = [("x", torch.uint8, int(data.shape[1]) * data.element_size())]
    if scales is not None:
        parts.append(("scales", torch.float32, int(scales.shape[1])))
    if meta_width:
        parts.append(("meta", torch.int32, meta_width))
    return RowFormat.of(parts)


def _exchange(fmt: RowFormat, sources: dict[str, torch.Tensor], in_rank: torch.Tensor, sends: list[int],
              recvs: list[int], grp: MoEGroup, outs: dict[str, torch.Tensor] | None, what: str,
              zero_row: bool = False, local: LocalSteps = TORCH) -> torch.Tensor | None:
    """Move each token's parts ``sources[name]`` (``[T, ...]``) to the ranks of ``in_rank`` (``[T, world]``)
    in one collective. With ``outs`` (``[num_recv, ...]`` per part) the received rows are written
    there, this rank's own rows straight from ``sources`` while the collective runs; without, every
    row goes through the collective and the packed ``[num_recv, row_bytes]`` buffer is returned (with
    ``zero_row``, one more row of zero bytes after them). Payload parts (all but ``meta``) are gathered by
    ``local``'s ``take_rows`` step when it has one."""
    me, t = grp.rank, int(in_rank.shape[0])
    direct = outs is not None  # own rows skip the collective (a world of one moves nothing at all)
    mask = in_rank.t()
    wire_sends, wire_recvs = list(sends), list(recvs)
    if direct:
        mask = mask.clone()
        mask[me].fill_(False)
        wire_sends[me] = wire_recvs[me] = 0
    rows = compact(mask, sum(wire_sends)) % max(t, 1)
    window = None if outs is None else rows_window([c * fmt.row_bytes for c in wire_sends],
                                                   [c * fmt.row_bytes for c in wire_recvs], grp, what)
    if window is not None:
        assert outs is not None
        _exchange_window(window, fmt, sources, in_rank, rows, sends, recvs, wire_sends, me, outs, local)
        return None
    send = fmt.empty(sum(wire_sends), in_rank.device)
    for name, src in sources.items():
        _take_rows(_steps_for(name, local), fmt.part(send, name), src, rows)
    n = sum(wire_recvs)
    buf = fmt.empty(n + int(zero_row), in_rank.device)
    if zero_row:
        buf[n].zero_()
    recv = buf[:n]
    pending = start_all_to_all(recv, send, wire_recvs, wire_sends, grp, what)
    if outs is None:
        pending.wait()
        return buf
    start = sum(recvs[:me])
    if direct:  # overlaps the collective
        mine = compact(in_rank[:, me], sends[me])
        for name, src in sources.items():
            _take_rows(_steps_for(name, local), outs[name][start: start + recvs[me]], src, mine)
    pending.wait()
    for name, out in outs.items():
        got = fmt.part(recv, name)
        if direct:
            _copy_rows(out[:start], got[:start])
            _copy_rows(out[start + recvs[me]:], got[start:])
        else:
            _copy_rows(out, got)
    return None


def _exchange_window(window: RowsWindow, fmt: RowFormat, sources: dict[str, torch.Tensor], in_rank: torch.Tensor,
                     rows: torch.Tensor, sends: list[int], recvs: list[int], wire_sends: list[int], me: int,
                     outs: dict[str, torch.Tensor], local: LocalSteps) -> None:
    """:func:`_exchange` with ``outs`` through a :class:`RowsWindow`: each destination's rows gathered straight
    into its memory (no send buffer), this rank's own rows into ``outs`` meanwhile, and each source's rows
    copied into ``outs`` from where they landed (no receive buffer)."""
    at = 0
    for r, count in enumerate(wire_sends):
        part = window.send[r]
        if count and part is not None:
            dst = part.view(count, fmt.row_bytes)
            for name, src in sources.items():
                _take_rows(_steps_for(name, local), fmt.part(dst, name), src, rows[at: at + count])
        at += count
    start = sum(recvs[:me])
    mine = compact(in_rank[:, me], sends[me])
    for name, src in sources.items():
        _take_rows(_steps_for(name, local), outs[name][start: start + recvs[me]], src, mine)
    got = window.receive()
    at = 0
    for s, count in enumerate(recvs):
        block = got[s]
        if count and block is not None:
            view = block.view(count, fmt.row_bytes)
            for name, out in outs.items():
                _copy_rows(out[at: at + count], fmt.part(view, name))
        at += count
    window.release()


WIRE_ENV = "DEEPPORT_MOE_WIRE"


@dataclass(frozen=True)
class SplitWire:
    """The staged dispatch's rows in two parts that travel side by side (:func:`_split_exchange`): ``x`` the
    payload rows alone, exactly the output's rows, so they land straight in it; ``side`` each row's FP8 scales
    and int32 metadata (token index, top-k ids, weight bits), from which the receiver makes the routes."""

    x: RowFormat
    side: RowFormat


def _split_wire(data: torch.Tensor, fmt: RowFormat, grp: MoEGroup) -> SplitWire | None:
    """The :class:`SplitWire` of ``fmt``'s rows (the packed wire) where the staged dispatch sends them so: the
    exchange moves separate tensors (:func:`~deepport.backends.torch.moe_comm.moves_parts`), the payload rows
    are whole multiples of 16 bytes, and ``DEEPPORT_MOE_WIRE`` is ``split`` (the default ``packed``: one packed
    row per token and destination in one ``all_to_all_single``, copied out of the receive buffer after it). Off by
    default: on an H200 host NCCL's ``batch_isend_irecv`` of four parts took ~95 us of host time to launch
    against ~40 us for one ``all_to_all_single``, and that launch follows the host read on the critical path,
    while the copy out it saves is ~31 us of GPU time (``docs/EXPERT_PARALLEL.md``). Every rank decides alike: the
    setting, like ``DEEPPORT_MOE_CHUNKS``, must be the same on every rank."""
    setting = os.environ.get(WIRE_ENV, "").strip() or "packed"
    if setting not in ("split", "packed"):
        raise ValueError(f"{WIRE_ENV} must be 'split' or 'packed', got {setting!r}")
    row = int(data.shape[1]) * data.element_size()
    if setting == "packed" or row % ROW_ALIGN or not moves_parts(grp, data.device):
        return None
    side = [(name, dtype, width) for name, dtype, width in zip(fmt.names, fmt.dtypes, fmt.widths, strict=True)
            if name != "x"]
    return SplitWire(RowFormat.of([("x", torch.uint8, row)]), RowFormat.of(side))


def _store_peers(formats: tuple[RowFormat, ...], data: torch.Tensor, scales: torch.Tensor | None,
                 idx: torch.Tensor, weights: torch.Tensor | None, in_rank: torch.Tensor, sent: torch.Tensor,
                 rows: int, places: torch.Tensor | None, me: int, num_local: int, local: LocalSteps,
                 outs: BlockOutputs | None = None) -> tuple[CountedParts, CountedParts | None]:
    """The other ranks' rows stored by ``local.rows_to_blocks`` into send buffers of ``rows`` rows, placed by
    ``sent`` (int64 ``[R]`` on the device, the rows for each rank), one buffer per format: the packed rows
    (``(fmt,)``), or a :class:`SplitWire`'s payload rows and side rows (``(wire.x, wire.side)``, the second
    entry). ``outs``: the outputs where they exist already (after the host read; nothing of them is written)."""
    assert local.rows_to_blocks is not None
    parts = []
    for f in formats:
        part = CountedParts(torch.empty(rows * f.row_bytes, dtype=torch.uint8, device=data.device), sent)
        local.rows_to_blocks(data, scales, idx, weights, in_rank, f, part, me, num_local, outs, 0, places, "peers")
        parts.append(part)
    return parts[0], parts[1] if len(parts) > 1 else None


def _split_exchange(wire: SplitWire, data: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor,
                    weights: torch.Tensor | None, in_rank: torch.Tensor, sends: list[int], recvs: list[int],
                    counts: torch.Tensor, sent: torch.Tensor, grp: MoEGroup, num_local: int, x_out: torch.Tensor,
                    rest: Callable[[torch.Tensor], BlockOutputs], cumsum: torch.Tensor | None, local: LocalSteps,
                    what: str, early: tuple[CountedParts, CountedParts | None] | None) -> BlockOutputs:
    """The staged dispatch with a :class:`SplitWire`: each other rank's payload rows travel straight into their
    place in ``outs.x`` and their side rows into one small receive buffer, both in one grouped launch
    (:func:`~deepport.backends.torch.moe_comm.start_parts`); this rank's own rows are stored into ``outs`` while
    they travel; then one small kernel makes the routes (and copies the scales) from the side rows. No copy of
    the payload after the exchange. ``x_out``: the payload's output (``[n, H]``), made first so that the exchange
    starts before the other outputs are made (``rest(x_out)``, returned). ``early``: the send buffers
    :func:`_early_send` filled before the host read (else they are filled now, at their exact size)."""
    assert local.rows_to_blocks is not None and local.blocks_to_rows is not None
    me, world = grp.rank, grp.world_size
    outs = None
    if early is None or early[1] is None:  # stored now (the outputs exist first: nothing of them is written)
        outs = rest(x_out)
        early = _store_peers((wire.x, wire.side), data, scales, idx, weights, in_rank, sent,
                             sum(c for r, c in enumerate(sends) if r != me), cumsum, me, num_local, local, outs)
    xs, ss = early
    assert ss is not None
    xb, sb = wire.x.row_bytes, wire.side.row_bytes
    send: list[torch.Tensor | None] = [None] * (2 * world)
    recv: list[torch.Tensor | None] = [None] * (2 * world)
    at = 0
    for r, c in enumerate(sends):
        if r != me and c:
            send[r], send[world + r] = xs.buffer[at * xb: (at + c) * xb], ss.buffer[at * sb: (at + c) * sb]
            at += c
    side_in = torch.empty((sum(recvs) - recvs[me]) * sb, dtype=torch.uint8, device=data.device)
    landing = x_out.view(torch.uint8).view(-1)
    sides: list[torch.Tensor | None] = []
    row, got = 0, 0
    for s, c in enumerate(recvs):
        mine = s == me or c == 0
        sides.append(None if mine else side_in[got * sb: (got + c) * sb])
        if not mine:
            recv[s], recv[world + s] = landing[row * xb: (row + c) * xb], sides[s]
            got += c
        row += c
    pending = start_parts(recv, send, grp, what)
    if outs is None:
        outs = rest(x_out)
    local.rows_to_blocks(data, scales, idx, weights, in_rank, wire.x, xs, me, num_local, outs, sum(recvs[:me]),
                         cumsum, "own")
    pending.wait()
    local.blocks_to_rows(_addresses(sides, data.device, False), counts, wire.side, me, num_local, outs)
    return outs


def _dispatch_blocks(fmt: RowFormat, data: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor,
                     weights: torch.Tensor | None, in_rank: torch.Tensor, sends: list[int], recvs: list[int],
                     counts: torch.Tensor, grp: MoEGroup, num_local: int, make: Alloc, local: LocalSteps,
                     what: str, prelude: RoutePrelude | None = None, idx_dtype: torch.dtype = torch.int64,
                     places: torch.Tensor | None = None,
                     early: tuple[CountedParts, CountedParts | None] | None = None, wire: SplitWire | None = None,
                     sent: torch.Tensor | None = None) -> BlockOutputs | None:
    """:func:`route`'s exchange through a :class:`RowsWindow` with ``local``'s ``rows_to_blocks`` and
    ``blocks_to_rows`` steps (two kernels: every row straight into its destination's part, every received row
    out of this rank's parts, the routes made from the metadata on the way), or None, nothing started, when
    the transport offers no window for these sizes. ``counts``: the device column of the received counts per
    source; ``places``: the running count of ``in_rank`` by rank (int64 ``[R, T]``) where the caller made it;
    ``prelude``: what ``local.route_prelude`` left, where it ran (its running counts; with a
    ``local.blocks_exchange`` step the whole exchange is that step's, and it also fills the caller's weights
    and, for an ``idx_dtype`` of int64, local ids, and the handle's copies of ``in_rank`` and ``idx``); ``early``:
    the send buffers :func:`_early_send` already filled with the other ranks' rows (a collective transport);
    ``wire``: their rows split in two (:func:`_split_exchange`; ``sent``, the device column of the rows sent to
    each rank, places them). Without a ``wire`` the bytes in the parts are those of :func:`_exchange_window`'s,
    so ranks on either path agree."""
    assert local.rows_to_blocks is not None and local.blocks_to_rows is not None
    me, n, k = grp.rank, sum(recvs), int(idx.shape[1])
    send_bytes = [0 if r == me else c * fmt.row_bytes for r, c in enumerate(sends)]
    recv_bytes = [0 if s == me else c * fmt.row_bytes for s, c in enumerate(recvs)]
    staged = collective_transport(grp)  # all_to_all_single: the window's parts are one send and one receive buffer
    capacity = rows_window_capacity(grp)
    if not staged and (capacity is None or max(send_bytes + recv_bytes) > capacity):
        return None  # what rows_window would say: several rounds

    device = data.device

    def outputs(copies: bool, x: torch.Tensor | None = None) -> BlockOutputs:  # copies: the caller's tensors and
        t = int(idx.shape[0])                                                    # the handle's copies too
        return BlockOutputs(make((n, int(data.shape[1])), data.dtype) if x is None else x,
                            None if scales is None else make((n, int(scales.shape[1])), torch.float32),
                            torch.empty(n, dtype=torch.int64, device=device),
                            torch.empty((n, k), dtype=torch.int64, device=device),
                            None if weights is None else make((n, k), torch.float32),  # the caller's: no copy
                            make((n, k), torch.int64) if copies and idx_dtype == torch.int64 else None,
                            torch.empty((t, grp.world_size), dtype=torch.bool, device=device) if copies else None,
                            torch.empty((t, k), dtype=torch.int64, device=device) if copies else None)

    if prelude is not None and local.blocks_exchange is not None and not staged:  # the backend's whole exchange
        outs = outputs(True)
        if local.blocks_exchange(prelude, fmt, data, scales, weights, sends, recvs, outs, grp, num_local, what):
            return outs
    start, cumsum = sum(recvs[:me]), places if prelude is None else prelude.cumsum
    if staged and wire is not None and sent is not None:  # the payload's output first: its exchange starts at once
        return _split_exchange(wire, data, scales, idx, weights, in_rank, sends, recvs, counts, sent, grp, num_local,
                               make((n, int(data.shape[1])), data.dtype), lambda x: outputs(False, x), cumsum, local,
                               what, early)
    packed = None if early is None or early[1] is not None else early[0]
    window = staged_rows_window(send_bytes, recv_bytes, device, grp, what, None if packed is None else packed.buffer) \
        if staged else rows_window(send_bytes, recv_bytes, grp, what)
    if window is None:
        return None
    if packed is not None and window.begin is not None:  # the others' rows are in the send buffer: begin (before
        window.begin()                                   # the outputs are made), then the own rows
        outs = outputs(False)
        finish = local.finish_sent  # after a prelude that stored the others' rows: the backend's two steps at once
        if prelude is None or prelude.sent is None or finish is None or not finish(prelude, outs, start, window):
            local.rows_to_blocks(data, scales, idx, weights, in_rank, fmt, packed, me, num_local, outs, start,
                                 cumsum, "own")
            local.blocks_to_rows(_addresses(window.receive(), device, False), counts, fmt, me, num_local, outs)
        window.release()
        return outs
    outs = outputs(False)
    bases = _addresses(window.send, device, not staged)
    if window.begin is None:
        local.rows_to_blocks(data, scales, idx, weights, in_rank, fmt, bases, me, num_local, outs, start, cumsum,
                             "all")
    else:  # the others' rows, the exchange started, then this rank's own rows while they travel
        local.rows_to_blocks(data, scales, idx, weights, in_rank, fmt, bases, me, num_local, outs, start, cumsum,
                             "peers")
        window.begin()
        local.rows_to_blocks(data, scales, idx, weights, in_rank, fmt, bases, me, num_local, outs, start, cumsum,
                             "own")
    local.blocks_to_rows(_addresses(window.receive(), device, not staged), counts, fmt, me, num_local, outs)
    window.release()
    return outs


_READERS: dict[int, torch.cuda.Stream] = {}


def _count_reader(device: torch.device, grp: MoEGroup) -> tuple[torch.cuda.Stream, torch.cuda.Event] | None:
    """On a GPU over ``all_to_all_single`` (:func:`~deepport.backends.torch.moe_comm.collective_transport`): a side
    stream of this device (one per device, reused) and an event recorded now on the caller's stream, for
    :func:`_read_counts`; None elsewhere (the read waits for the caller's stream)."""
    if device.type != "cuda" or not collective_transport(grp):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _READERS.get(index)
    if stream is None:
        stream = _READERS[index] = torch.cuda.Stream(torch.device("cuda", index))  # type: ignore[no-untyped-call]
    ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
    ready.record(torch.cuda.current_stream(torch.device("cuda", index)))
    return stream, ready


def _read_counts(counts: Pending, table: torch.Tensor, num_local: int, chunks: int,
                 reader: tuple[torch.cuda.Stream, torch.cuda.Event] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The dispatch's one host read: ``(got, per_expert, host)``, the received count tables (int64 ``[R, C]``,
    by source), the rows per local expert (int64 ``[L]``) and on the host the rows sent to and received from each
    rank, the rows per local expert and the ranges' counts. With a ``reader`` (:func:`_count_reader`) the read
    runs on its side stream after the event: the host waits for the count exchange and the table only, not for
    the work queued on the caller's stream since (the early send), so the host prepares and starts the payload's
    exchange while that work runs; the caller's stream then waits for the side stream (no host wait)."""
    def read() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        got = counts.wait()
        per_expert = got[:, 1: 1 + num_local].sum(0)
        ranged = [table[:, 1 + num_local:].reshape(-1), got[:, 1 + num_local:].reshape(-1)] if chunks > 1 else []
        return got, per_expert, torch.cat([table[:, 0], got[:, 0], per_expert, *ranged]).tolist()  # the one sync

    if reader is None:
        return read()
    stream, ready = reader
    main = torch.cuda.current_stream(stream.device)
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        got, per_expert, host = read()
    main.wait_stream(stream)
    per_expert.record_stream(main)  # made on the side stream, used on the caller's
    return got, per_expert, host


EARLY_SEND_BYTES = 1 << 30
"""The largest send buffer :func:`route` makes before its host read (:func:`_early_send`); above it the send
buffer is made after the read, at its exact size."""


def _early_send(fmt: RowFormat, data: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor,
                weights: torch.Tensor | None, in_rank: torch.Tensor, table: torch.Tensor, places: torch.Tensor,
                grp: MoEGroup, num_local: int, local: LocalSteps,
                wire: SplitWire | None = None) -> tuple[CountedParts, CountedParts | None] | None:
    """Over ``all_to_all_single``, the other ranks' packed rows stored by ``local.rows_to_blocks`` (part
    ``"peers"``) while the count exchange runs, before the host knows how many there are: into a buffer of the
    most a rank can send (each token to at most ``min(K, R - 1)`` other ranks), rank ``r``'s part after the
    rows of the ranks before it as the table's first column counts them, this rank's left out
    (:class:`~deepport.backends.torch.moe_local.CountedParts`: the host's parts after its read, from the same
    table). The host's read then waits on this kernel and the count exchange side by side, and after it the
    payload collective starts at once. After a ``route_prelude`` step (its read already done) the same store
    places the rows without a table of addresses and lets the exchange start before the outputs are made. With a
    ``wire``, the payload and the side rows into one buffer each (:func:`_store_peers`). None, nothing started,
    when nothing can be sent or the bound passes
    :data:`EARLY_SEND_BYTES`."""
    rows = int(idx.shape[0]) * min(int(idx.shape[1]), grp.world_size - 1)
    bound = rows * (fmt.row_bytes if wire is None else wire.x.row_bytes + wire.side.row_bytes)
    if bound == 0 or bound > EARLY_SEND_BYTES:
        return None
    formats = (fmt,) if wire is None else (wire.x, wire.side)
    return _store_peers(formats, data, scales, idx, weights, in_rank, table[:, 0].to(torch.int64), rows, places,
                        grp.rank, num_local, local)


def _addresses(parts: list[torch.Tensor | None], device: torch.device, fixed: bool = True) -> torch.Tensor:
    """int64 device ``[R]``: where each part starts (0 for None), made once per set of addresses when they are
    ``fixed`` (a peer transport's blocks), else per call (a staged window's fresh buffers)."""
    addresses = tuple(0 if p is None else int(p.data_ptr()) for p in parts)
    return _block_addresses(addresses, device) if fixed else device_ints(addresses, device)


def device_ints(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 ``values`` on ``device`` without making the host wait: through pinned memory on a GPU (an
    asynchronous copy; the pinned buffer is reused only once the copy is done), a plain tensor elsewhere."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def route(data: torch.Tensor, scales: torch.Tensor | None, topk_idx: torch.Tensor, weights: torch.Tensor | None,
          num_experts: int, grp: MoEGroup, alignment: int, alloc: Alloc | None = None, unpack: bool = True,
          zero_row: bool = False, what: str = "moe_dispatch", local: LocalSteps = TORCH) -> Received:
    """Send every token once to each rank holding one of its experts (module docstring). With
    ``unpack`` the payload lands in tensors from ``alloc`` (default ``torch.empty``); without, the
    received rows stay packed and ``data``/``scales`` view them, followed by one row of zeros when
    ``zero_row`` (``[num_recv + 1, ...]``: a gather reads it where a row must be zero). ``local.take_rows``
    (when given) gathers the payload rows to send."""
    idx = topk_idx.to(torch.int64)
    t, k = int(idx.shape[0]), int(idx.shape[1])
    world, me, num_local = grp.world_size, grp.rank, num_experts // grp.world_size
    chunks = moe_chunks.payload_chunks() if unpack and world > 1 else 1  # every rank reads the same setting
    blocks = unpack and chunks == 1 and local.rows_to_blocks is not None and local.blocks_to_rows is not None and \
        (offers_rows_window(grp) or collective_transport(grp))
    dense_scales = None if scales is None else dense(scales)
    fmt = _row_format(data, dense_scales, 1 + k + (0 if weights is None else k))
    wire = _split_wire(data, fmt, grp) if blocks and collective_transport(grp) else None
    peers = None  # the others' packed rows, which the prelude step may store before its read (the early send's)
    if blocks and wire is None and collective_transport(grp) and \
            0 < t * min(k, world - 1) * fmt.row_bytes <= EARLY_SEND_BYTES:
        peers = PeerRows(fmt, data, dense_scales, weights)
    pre = local.route_prelude(idx, num_experts, grp, what, peers) if blocks and local.route_prelude is not None \
        else None

    def own(t: torch.Tensor) -> torch.Tensor:  # the handle keeps in_rank: the prelude's is its step's buffer
        return t if pre is None else t.clone()

    places: torch.Tensor | None = None
    early: tuple[CountedParts, CountedParts | None] | None = None
    if pre is not None:  # the backend's routing up to the host read in one step (the same count exchange)
        in_rank, table, got, per_expert = pre.in_rank, pre.table, pre.got, pre.per_expert
        host: list[int] = [*pre.sends, *pre.recvs, *pre.per_expert_host]
        meta = None
        if pre.sent is not None:  # the step stored the others' rows before its read: the exchange starts now
            early = (pre.sent, None)
        elif collective_transport(grp):  # the others' rows placed by the device's counts (no table of addresses),
            early = _early_send(fmt, data, dense_scales, idx, weights, in_rank, table, pre.cumsum, grp,  # so the
                                num_local, local, wire)  # exchange starts before the outputs are made
    else:
        if local.layout_table is not None:  # the backend's one kernel, the table as the count exchange sends it
            in_rank, table = local.layout_table(idx, num_experts, world)
        elif local.layout_counts is not None:  # the backend's one kernel
            in_rank, per_rank, per_exp = local.layout_counts(idx, num_experts, world)
            table = torch.cat([per_rank.to(torch.int64)[:, None], per_exp.to(torch.int64).view(world, num_local)],
                              dim=1)
        else:
            by_expert = selection_mask(idx, num_experts, 1)
            in_rank = by_expert.view(t, world, num_local).any(2)
            table = torch.cat([in_rank.sum(0)[:, None], by_expert.sum(0).view(world, num_local)], dim=1)
        if chunks > 1:  # per token range, the tokens each rank gets: in the same count exchange
            table = torch.cat([table, moe_chunks.chunk_counts(in_rank, chunks)], dim=1)
        counts = exchange_table(table, grp, f"{what} (counts)")
        reader = _count_reader(data.device, grp)  # from here the caller's stream is not waited for by the read
        # overlapping the count exchange: the packed rows' metadata, or for the blocks path (which makes its own)
        # the running count of in_rank by rank (each row's place), the scan along the contiguous transpose
        meta = None if blocks else _meta(idx, weights)
        places = torch.cumsum(in_rank.view(torch.uint8).t().contiguous(), 1, dtype=torch.int64) if blocks else None
        if blocks and places is not None and collective_transport(grp):  # the others' rows, before the read
            early = _early_send(fmt, data, dense_scales, idx, weights, in_rank, table, places, grp, num_local, local,
                                wire)
        got, per_expert, host = _read_counts(counts, table, num_local, chunks, reader)
    sends, recvs = [int(v) for v in host[:world]], [int(v) for v in host[world: 2 * world]]
    at = 2 * world + num_local
    send_chunks = [host[at + r * chunks: at + (r + 1) * chunks] for r in range(world)]
    recv_chunks = [host[at + (world + s) * chunks: at + (world + s + 1) * chunks] for s in range(world)]
    n, hidden = sum(recvs), int(data.shape[1])
    make = alloc or (lambda shape, dtype: torch.empty(shape, dtype=dtype, device=data.device))
    if blocks:
        found = _dispatch_blocks(fmt, data, dense_scales, idx, weights, in_rank, sends, recvs, got[:, 0], grp,
                                 num_local, make, local, what, pre, topk_idx.dtype, places, early, wire,
                                 None if wire is None else table[:, 0].to(torch.int64))  # the split wire's places
        if found is not None:
            copies = None if pre is None else pre.copies  # the prelude step's copies for the handle, where made
            kept_in_rank = found.in_rank if found.in_rank is not None else \
                copies[0] if copies is not None else own(in_rank)
            kept_idx = found.idx if found.idx is not None else copies[1] if copies is not None else idx.clone()
            handle = MoEHandle(grp.group, me, world, num_experts, hidden, alignment, kept_idx, kept_in_rank,
                               tuple(sends), tuple(recvs), found.src, found.local,
                               tuple(host[2 * world: 2 * world + num_local]))  # tolist's ints
            return Received(found.x, found.scales, found.local, found.weights, handle, per_expert, found.local_out,
                            True)
        meta = _meta(idx, weights)
    assert meta is not None
    sources = {"x": data, "meta": meta, **({} if dense_scales is None else {"scales": dense_scales})}
    if unpack:
        outs = {"x": make((n, hidden), data.dtype),
                "meta": torch.empty((n, int(meta.shape[1])), dtype=torch.int32, device=data.device)}
        if dense_scales is not None:
            outs["scales"] = make((n, int(dense_scales.shape[1])), torch.float32)
        if chunks > 1:
            moe_chunks.exchange_chunked(fmt, sources, in_rank, sends, recvs, send_chunks, recv_chunks, grp, outs,
                                        what, lambda part, dst, src, rows: _take_rows(_steps_for(part, local), dst,
                                                                                     src, rows), _copy_rows)
        else:
            _exchange(fmt, sources, in_rank, sends, recvs, grp, outs, what, local=local)
        recv_x, recv_s, recv_meta = outs["x"], outs.get("scales"), outs["meta"]
    else:
        buf = _exchange(fmt, sources, in_rank, sends, recvs, grp, None, what, zero_row, local)
        assert buf is not None
        recv_x = fmt.part(buf, "x").view(data.dtype)
        recv_s = None if dense_scales is None else fmt.part(buf, "scales")
        recv_meta = fmt.part(buf, "meta")[:n]
    if local.receive_meta is not None:  # the backend's one kernel
        recv_src, recv_local, recv_w = local.receive_meta(recv_meta, me, num_local, k, weights is not None)
    else:
        recv_src, recv_local, recv_w = recv_meta[:, 0].to(torch.int64), local_ids(
            recv_meta[:, 1: 1 + k].to(torch.int64), me, num_local), None
        if weights is not None:
            raw = recv_meta[:, 1 + k:].view(torch.float32)
            recv_w = torch.where(recv_local >= 0, raw, torch.zeros_like(raw))
    handle = MoEHandle(grp.group, me, world, num_experts, hidden, alignment, idx.clone(), own(in_rank), tuple(sends),
                       tuple(recvs), recv_src, recv_local,
                       tuple(int(v) for v in host[2 * world: 2 * world + num_local]))
    return Received(recv_x, recv_s, recv_local, recv_w, handle, per_expert)


def resend(data: torch.Tensor, scales: torch.Tensor | None, handle: MoEHandle, grp: MoEGroup,
           alloc: Alloc, local: LocalSteps = TORCH) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached dispatch: the same routes, new payload, one collective and no host sync (a bf16 payload
    is received straight into its output; FP8 data and scales travel packed)."""
    sends, recvs = list(handle.send_counts), list(handle.recv_counts)
    n, hidden = handle.num_recv, int(data.shape[1])
    out = alloc((n, hidden), data.dtype)
    if scales is None:
        rows = send_tokens(handle.is_token_in_rank, sum(sends))
        send = torch.empty((sum(sends), hidden), dtype=data.dtype, device=data.device)
        _take_rows(local, send, data, rows)
        all_to_all_rows(send, sends, recvs, grp, out, "moe_dispatch (cached)")
        return out, None
    dense_scales = dense(scales)
    out_s = alloc((n, int(dense_scales.shape[1])), torch.float32)
    _exchange(_row_format(data, dense_scales, 0), {"x": data, "scales": dense_scales}, handle.is_token_in_rank,
              sends, recvs, grp, {"x": out, "scales": out_s}, "moe_dispatch (cached)", local=local)
    return out, out_s


def dispatch(call: MoEDispatchCall, local: LocalSteps = TORCH) -> MoEDispatchResult:
    if call.handle is not None:
        data, scales = resend(call.data, call.scales, call.handle, call.group, call.alloc, local)
        return MoEDispatchResult(data if scales is None else (data, scales), None, None, None, call.handle)
    assert call.topk_idx is not None
    got = route(call.data, call.scales, call.topk_idx, call.topk_weights, call.num_experts, call.group,
                call.expert_alignment, call.alloc, local=local)
    n, k = got.local_idx.shape
    recv_idx = got.local_out
    if recv_idx is None or recv_idx.dtype != call.topk_idx.dtype:
        recv_idx = call.alloc((int(n), int(k)), call.topk_idx.dtype)
        recv_idx.copy_(got.local_idx)
    recv_w = got.weights if got.weights_out else None
    if got.weights is not None and recv_w is None:
        recv_w = call.alloc((int(n), int(k)), torch.float32)
        recv_w.copy_(got.weights)
    a = call.expert_alignment
    counts = list(got.handle.num_recv_tokens_per_expert) if a == 1 else [align_up(c, a) for c in
                                                                        got.handle.num_recv_tokens_per_expert]
    recv_x = got.data if got.scales is None else (got.data, got.scales)
    return MoEDispatchResult(recv_x, recv_idx, recv_w, counts, got.handle)


FLOAT_ACCUMULATING_SUM = ("cpu", "cuda")
"""Devices whose ``sum`` of bf16 inputs accumulates in float32 and rounds once to a bf16 output (torch's
``opmath``/``acc_type`` of bf16 is float on both; ``test_bf16_sum_accumulates_in_float32`` pins it)."""


def return_positions(handle: MoEHandle, missing: int) -> torch.Tensor:
    """int64 ``[T, Q]``: for each token, the rows of the returned buffer (blocks by rank, tokens in order)
    that belong to it, one per rank it reached, ``missing`` elsewhere. ``Q = world`` when ``world <=
    num_topk``, else ``Q = num_topk`` (one entry per slot, each rank counted at its first slot)."""
    in_rank = handle.is_token_in_rank
    per_rank = in_rank.sum(0)
    rows = torch.where(in_rank, (torch.cumsum(per_rank, 0) - per_rank)[None, :] + column_cumsum(in_rank) - 1,
                       missing)
    if handle.world_size <= handle.num_topk:
        return rows
    rank_of = torch.where(handle.topk_idx >= 0, handle.topk_idx // handle.num_local_experts, -1)
    return torch.where(first_occurrence(rank_of), rows.gather(1, rank_of.clamp(min=0)), missing)


def return_rows(rows: torch.Tensor, handle: MoEHandle, grp: MoEGroup, what: str = "moe_combine",
                out: torch.Tensor | None = None, local: LocalSteps = TORCH) -> torch.Tensor:
    """Send per-received-token rows back to their sources (one collective, ``rows`` themselves on the
    wire) and sum per token in float32: ``[num_recv, ...]`` -> float32 ``[num_tokens, ...]``.

    float32 rows are summed with ``index_add_``; 16-bit rows are gathered per token (at most ``min(world,
    num_topk)`` rows, a zero row where a rank holds none) and reduced with one ``sum`` in rank order
    (deterministic) that converts on load. With ``out`` (bf16 ``[num_tokens, ...]``) on a device whose
    reductions accumulate 16-bit inputs in float32 (:data:`FLOAT_ACCUMULATING_SUM`), the sum writes the
    rounded result straight into ``out`` (no float32 intermediate) and returns it. With ``out`` and 16-bit
    rows, a ``local.token_rows_into`` step sums each token's rows (in rank order) straight into ``out``;
    otherwise a ``local.sum_rows`` step, when given, sums every dtype."""
    sends, recvs = list(handle.recv_counts), list(handle.send_counts)
    n, t = sum(recvs), handle.num_tokens
    if out is not None and rows.dtype != torch.float32 and local.sum_in_place is not None and \
            local.sum_in_place(rows, handle, grp, out, what):
        return out
    if out is not None and out.is_contiguous() and rows.dtype != torch.float32 and local.token_rows_at is not None:
        window = _rows_back_window(rows, handle, grp, what)
        if window is not None:  # summed where the rows landed
            _sum_in_place(window, rows, handle, out, local)
            return out
    if out is not None and out.is_contiguous() and rows.dtype != torch.float32 and local.rank_rows_at is not None \
            and collective_transport(grp) and _sum_staged(rows, handle, grp, out, local, what):
        return out
    if out is not None and out.is_contiguous() and rows.dtype != torch.float32 and local.token_rows_into is not None:
        # per token, its returned rows in rank order, summed in float32 and rounded once by one kernel: the
        # bits of the sum_rows path below (same terms, same order), without its sort by token
        back = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        all_to_all_rows(rows.contiguous(), sends, recvs, grp, out=back, what=what)
        table = return_positions(handle, -1)
        width = int(torch.Size(rows.shape[1:]).numel())
        local.token_rows_into(back.view(n, width), table, torch.ones(table.shape, dtype=torch.float32,
                                                                     device=rows.device), out.view(t, width))
        return out
    if rows.dtype == torch.float32 or local.sum_rows is not None:
        back = all_to_all_rows(rows.contiguous(), sends, recvs, grp, what=what)
        return sum_per_token(local, back, send_tokens(handle.is_token_in_rank, n), t)
    buf = torch.empty((n + 1, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    buf[n].zero_()
    all_to_all_rows(rows.contiguous(), sends, recvs, grp, out=buf[:n], what=what)
    pos = return_positions(handle, n)
    picked = buf.index_select(0, pos.reshape(-1)).view(t, int(pos.shape[1]), *rows.shape[1:])
    if out is not None and rows.device.type in FLOAT_ACCUMULATING_SUM:
        return torch.sum(picked, 1, dtype=out.dtype, out=out)
    return picked.sum(1, dtype=torch.float32)


def _rows_back_window(rows: torch.Tensor, handle: MoEHandle, grp: MoEGroup, what: str) -> RowsWindow | None:
    """A :class:`RowsWindow` for :func:`return_rows`' collective (this rank's own rows stay), or None."""
    me = grp.rank
    width = rows.element_size() * int(torch.Size(rows.shape[1:]).numel())
    sends, recvs = list(handle.recv_counts), list(handle.send_counts)
    if width % 16 or int(rows.data_ptr()) % 16 or not rows.is_contiguous():
        return None
    return rows_window([0 if r == me else c * width for r, c in enumerate(sends)],
                       [0 if s == me else c * width for s, c in enumerate(recvs)], grp, what)


_BLOCKS: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}


def _block_addresses(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 ``addresses`` on ``device``, made once per memory (a peer transport's blocks stay put)."""
    key = (addresses, str(device))
    found = _BLOCKS.get(key)
    if found is None:
        found = _BLOCKS[key] = torch.tensor(addresses, dtype=torch.int64).to(device)
    return found


def _sum_in_place(window: RowsWindow, rows: torch.Tensor, handle: MoEHandle, out: torch.Tensor,
                  local: LocalSteps) -> None:
    """:func:`return_rows` through ``window``: each part copied straight into its source's memory, then each
    token's rows summed (in rank order, as the ``token_rows_into`` path) where they are: this rank's own rows
    in ``rows``, the others in this rank's blocks; no receive buffer."""
    assert local.token_rows_at is not None
    me, t = handle.rank, handle.num_tokens
    sends = list(handle.recv_counts)
    cols = int(torch.Size(rows.shape[1:]).numel())
    flat = rows.view(int(rows.shape[0]), cols)
    width = flat.element_size() * cols
    at = 0
    for r, count in enumerate(sends):
        part = window.send[r]
        if count and part is not None:
            _copy_rows(part.view(count, width), flat[at: at + count])
        at += count
    got = window.receive()
    in_rank = handle.is_token_in_rank
    blocks = _block_addresses(tuple(0 if g is None else int(g.data_ptr()) for g in got), in_rank.device)
    own = int(flat.data_ptr()) + sum(sends[:me]) * width  # this rank's rows for itself never left `rows`
    if local.rank_rows_at is not None and handle.world_size <= handle.num_topk:  # the addresses made in the kernel
        local.rank_rows_at(flat, in_rank, blocks, me, own, out.view(t, cols))
        window.release()
        return
    base = torch.where(torch.arange(len(got), device=in_rank.device) == me, own, blocks)
    addresses = torch.where(in_rank, base[None, :] + (column_cumsum(in_rank) - 1) * width, -1)  # [T, world]
    if handle.world_size > handle.num_topk:  # one entry per slot, each rank at its first slot
        rank_of = torch.where(handle.topk_idx >= 0, handle.topk_idx // handle.num_local_experts, -1)
        addresses = torch.where(first_occurrence(rank_of), addresses.gather(1, rank_of.clamp(min=0)), -1)
    local.token_rows_at(flat, addresses, torch.ones(addresses.shape, dtype=torch.float32, device=out.device),
                        out.view(t, cols))
    window.release()


def _sum_staged(rows: torch.Tensor, handle: MoEHandle, grp: MoEGroup, out: torch.Tensor, local: LocalSteps,
                what: str) -> bool:
    """:func:`return_rows` over ``all_to_all_single`` with ``local.rank_rows_at``: the rows go back straight from
    ``rows`` (this rank's own rows stay there when they are its first or last part, as always on two ranks; a
    middle part travels to itself, as the collective's inputs are one contiguous range), and each token's rows
    are summed where they are (in rank order: the bits of the ``token_rows_into`` path); False, nothing
    started, where it does not apply (more ranks than top-k slots, rows not dense and 16-byte aligned)."""
    assert local.rank_rows_at is not None
    me, world, t = grp.rank, grp.world_size, handle.num_tokens
    cols = int(torch.Size(rows.shape[1:]).numel())
    width = rows.element_size() * cols
    if world > handle.num_topk or width == 0 or width % 16 or int(rows.data_ptr()) % 16 or not rows.is_contiguous():
        return False
    sends, recvs = list(handle.recv_counts), list(handle.send_counts)
    start, mine = sum(sends[:me]), sends[me]
    flat = rows.view(int(rows.shape[0]), cols)
    send = flat
    if me == 0 or me == world - 1:  # own rows at an end: the others are one range without them
        send = flat[mine:] if me == 0 else flat[:start]
        sends[me] = recvs[me] = 0
    recv = torch.empty((sum(recvs), cols), dtype=rows.dtype, device=rows.device)
    pending = start_all_to_all(recv.view(torch.uint8), send.view(torch.uint8), recvs, sends, grp, what)
    base = int(recv.data_ptr())
    bases = tuple(base + sum(recvs[:s]) * width for s in range(world))
    own = int(flat.data_ptr()) + start * width  # this rank's rows for itself are read where they are
    blocks = device_ints(bases, rows.device)
    pending.wait()
    local.rank_rows_at(flat, handle.is_token_in_rank, blocks, me, own, out.view(t, cols))
    return True


def return_rows_weighted(rows: torch.Tensor, weights: torch.Tensor, handle: MoEHandle, grp: MoEGroup,
                         what: str = "moe_combine", local: LocalSteps = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`return_rows` of ``rows`` and ``weights`` together, packed ``[rows | weights]`` in one
    collective; this rank's own rows skip it and are summed straight from the inputs (with a
    ``local.sum_rows`` step: summed by it together with the received rows, own rows first)."""
    t, me = handle.num_tokens, grp.rank
    sends, recvs = list(handle.recv_counts), list(handle.send_counts)
    width = int(torch.Size(rows.shape[1:]).numel())
    flat = rows.reshape(int(rows.shape[0]), width)
    fmt = RowFormat.of([("x", rows.dtype, int(flat.shape[1])), ("w", torch.float32, int(weights.shape[1]))])
    start, mine = sum(sends[:me]), sends[me]
    keep = torch.ones(int(rows.shape[0]), dtype=torch.bool, device=rows.device)
    keep[start: start + mine].fill_(False)
    mask = handle.is_token_in_rank.t().clone()
    mask[me].fill_(False)
    wire_sends, wire_recvs = list(sends), list(recvs)
    wire_sends[me] = wire_recvs[me] = 0
    picked = compact(keep, sum(wire_sends))
    send = fmt.empty(sum(wire_sends), rows.device)
    _copy_rows(fmt.part(send, "x"), flat, picked)
    _copy_rows(fmt.part(send, "w"), weights, picked)
    recv = fmt.empty(sum(wire_recvs), rows.device)
    pending = start_all_to_all(recv, send, wire_recvs, wire_sends, grp, what)
    own = compact(handle.is_token_in_rank[:, me], mine)  # overlaps the collective
    tokens = compact(mask, sum(wire_recvs)) % max(t, 1)
    if local.sum_rows is not None:
        pending.wait()
        dst = torch.cat([own, tokens])
        total = local.sum_rows(torch.cat([flat[start: start + mine], fmt.part(recv, "x")]), dst, t)
        total_w = local.sum_rows(torch.cat([weights[start: start + mine], fmt.part(recv, "w")]), dst, t)
        return total.view(t, *rows.shape[1:]), total_w
    total = torch.zeros((t, int(flat.shape[1])), dtype=torch.float32, device=rows.device)
    total_w = torch.zeros((t, int(weights.shape[1])), dtype=torch.float32, device=rows.device)
    total.index_add_(0, own, flat[start: start + mine].to(torch.float32))
    total_w.index_add_(0, own, weights[start: start + mine])
    pending.wait()
    total.index_add_(0, tokens, fmt.part(recv, "x").to(torch.float32))
    total_w.index_add_(0, tokens, fmt.part(recv, "w"))
    return total.view(t, *rows.shape[1:]), total_w


def combine(call: MoECombineCall, local: LocalSteps = TORCH) -> MoECombineResult:
    h = call.handle
    out = call.alloc((h.num_tokens, int(call.x.shape[1])), torch.bfloat16)
    if call.topk_weights is None:
        total = return_rows(call.x, h, call.group, out=out, local=local)
        if total is not out:
            out.copy_(total)
        return MoECombineResult(out, None)
    total, total_w = return_rows_weighted(call.x, call.topk_weights, h, call.group, local=local)
    out.copy_(total)
    weights = call.alloc((h.num_tokens, h.num_topk), torch.float32)
    weights.copy_(total_w)
    return MoECombineResult(out, weights)
