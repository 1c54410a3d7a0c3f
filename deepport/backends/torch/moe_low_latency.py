"""Low-latency MoE dispatch and combine in torch: fixed-size buffers, no host sync, CUDA-graph capturable.

Everything is sized by ``T_max`` (``max_tokens_per_rank``), never by routing values:

- dispatch (1 collective): each rank fills a send buffer of ``world`` blocks of ``T_max`` packed rows
  ``[payload (e4m3 after the per-token cast, or bf16) | FP8 scales | int32 token index, top-k ids]``
  (rank ``r``'s block holds, in token order, the tokens selecting an expert of ``r``; unused rows
  carry token index -1) and exchanges it with one equal-split ``all_to_all_single`` (no split sizes,
  so no host data). The receiver places every distinct (received token, local expert) pair at
  ``[expert, position]`` with one ``index_put_`` (positions from a cumulative sum over the fixed
  ``world * T_max`` received rows; the comment in :func:`dispatch_low_latency` says why the slots
  that place nothing write nowhere that matters).
- combine (1 payload collective, plus one small one for the weights): the source sends each
  receiver its tokens' top-k weights in the dispatch's block layout; the receiver sums its experts'
  rows per received token in float32 (``weight * y``, the ``weighted_rows`` step over the ``K`` slots
  of each received token, unused ones sent to a trash row) and returns one float32 row per received
  token in the same fixed layout; the source sums what comes back per token (a dense gather over at
  most ``min(world, num_topk)`` rows, in rank order) and rounds once to bf16. When no token
  can have two experts on one rank (``num_topk == 1`` or one expert per rank), no weights travel:
  the receiver returns the bf16 expert row itself and the source applies its weights (half the bytes).

The per-device steps (the cast, placing rows, the weighted sums) are
:class:`~deepport.backends.torch.moe_local.LocalSteps`; the torch ones place rows from the source side
(``scatter_rows``: one fixed-size ``index_put_``), a backend without that step gets the layout-side
index (``place_rows``).

In one process (``group=None``) both ops run :mod:`deepport.backends.torch.moe_one_process` instead:
the same steps, no transport, and a handle whose routes are built only when read (what the torch custom
ops hand back to the combine).

The bytes on the wire are those of the full capacity (``world * T_max`` rows each way), whatever the
routing: the price of needing no sizes from the device. The handle's canonical host fields (counts,
compact received rows) are read from the device only when someone asks for them
(:class:`LazyRoutes`); this backend's combine never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deepport.backends.torch import moe_one_process as one_process
from deepport.backends.torch.moe_comm import RowFormat, fixed_window, same_bits, start_all_to_all
from deepport.backends.torch.moe_index import (
    column_cumsum,
    first_occurrence,
    local_ids,
    running_slot,
    selection_mask,
    slot_weight_sums,
)
from deepport.backends.torch.moe_local import TORCH, LocalSteps
from deepport.kernels.moe_args import FP8, FP8_BLOCK, MoEGroup
from deepport.kernels.moe_handle import MoEHandle, MoELowLatencyHandle
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult


@dataclass(frozen=True)
class FixedRoutes:
    """Device-only routes of one low-latency dispatch, in the fixed slot space (``S = world * T_max``
    received slots, slot ``s * T_max + i`` = the ``i``-th token rank ``s`` sent here).

    - ``send_slot``: int64 ``[T, world]``, the slot token ``t`` took in rank ``r``'s block, -1 if not sent.
    - ``recv_token``: int64 ``[S]``, source token index of each received slot, -1 for unused slots.
    - ``recv_local``: int64 ``[S, K]``, local expert ids of each received slot's top-k (-1: elsewhere,
      or an unused slot).
    - ``pair_valid``: bool ``[S, K]``, top-k slot ``k`` is the first naming its local expert: one
      (received slot, local expert) pair; ``pair_position``: int64 ``[S, K]``, that pair's row in its
      expert's part of the ``[L, S]`` layout.
    - ``count``: int64 ``[L]``, rows per local expert.
    """

    t_max: int
    send_slot: torch.Tensor
    recv_token: torch.Tensor
    recv_local: torch.Tensor
    pair_valid: torch.Tensor
    pair_position: torch.Tensor
    count: torch.Tensor


def _pairs(recv_local: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid [S, K], position [S, K], count [L])`` of the received slots' (slot, local expert) pairs:
    rows of an expert in slot order (= source rank, then token: the contract's order)."""
    valid = first_occurrence(recv_local)
    by_expert = selection_mask(torch.where(valid, recv_local, -1), num_local, 1)  # [S, L]
    position = (column_cumsum(by_expert) - 1).gather(1, recv_local.clamp(min=0))
    return valid, position, by_expert.sum(0)


class LazyRoutes(MoEHandle):
    """A canonical :class:`MoEHandle` whose host fields (``send_counts``, ``recv_counts``,
    ``recv_src_idx``, ``recv_topk_idx``, ``num_recv_tokens_per_expert``) are read from the device on
    first access (one host sync, then cached), so a low-latency dispatch returns without waiting.
    Other backends' combines read them like any handle's."""

    def __init__(self, grp: MoEGroup, num_experts: int, hidden: int, topk_idx: torch.Tensor,
                 is_token_in_rank: torch.Tensor, fixed: FixedRoutes) -> None:
        for name, value in (("group", grp.group), ("rank", grp.rank), ("world_size", grp.world_size),
                            ("num_experts", num_experts), ("hidden", hidden), ("expert_alignment", 1),
                            ("topk_idx", topk_idx), ("is_token_in_rank", is_token_in_rank), ("fixed", fixed),
                            ("_host", {})):
            object.__setattr__(self, name, value)

    fixed: FixedRoutes
    _host: dict[str, Any]

    def _read(self, name: str) -> Any:
        if not self._host:
            f = self.fixed
            valid = f.recv_token >= 0
            per_source = valid.view(self.world_size, f.t_max).sum(1)
            host = torch.cat([self.is_token_in_rank.sum(0), per_source, f.count]).tolist()
            w = self.world_size
            kept = valid.nonzero()[:, 0]
            self._host.update(send_counts=tuple(int(v) for v in host[:w]),
                              recv_counts=tuple(int(v) for v in host[w: 2 * w]),
                              num_recv_tokens_per_expert=tuple(int(v) for v in host[2 * w:]),
                              recv_src_idx=f.recv_token[kept], recv_topk_idx=f.recv_local[kept])
        return self._host[name]

    @property
    def send_counts(self) -> tuple[int, ...]:
        value: tuple[int, ...] = self._read("send_counts")
        return value

    @property
    def recv_counts(self) -> tuple[int, ...]:
        value: tuple[int, ...] = self._read("recv_counts")
        return value

    @property
    def num_recv_tokens_per_expert(self) -> tuple[int, ...]:
        value: tuple[int, ...] = self._read("num_recv_tokens_per_expert")
        return value

    @property
    def recv_src_idx(self) -> torch.Tensor:
        value: torch.Tensor = self._read("recv_src_idx")
        return value

    @property
    def recv_topk_idx(self) -> torch.Tensor:
        value: torch.Tensor = self._read("recv_topk_idx")
        return value


def _targets(send_slot: torch.Tensor, idx: torch.Tensor, num_local: int, t_max: int) -> torch.Tensor:
    """int64 ``[T, Q]``: the send-buffer row of each (token, destination) pair, ``world * T_max``
    (the trash row) for pairs not sent. ``Q = world`` when ``world <= K`` (one pair per rank), else
    ``Q = K`` (one pair per slot; two slots on one rank name the same row, written twice alike)."""
    world = int(send_slot.shape[1])
    trash = world * t_max
    if world <= int(idx.shape[1]):
        ranks = torch.arange(world, device=idx.device)[None, :]
        return torch.where(send_slot >= 0, ranks * t_max + send_slot, trash)
    rank_of = torch.where(idx >= 0, idx // num_local, 0)
    slot = send_slot.gather(1, rank_of)
    return torch.where(idx >= 0, rank_of * t_max + slot, trash)  # [T, K] (T may be 0)


def _scatter_rows(dst: torch.Tensor, targets: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[targets[t, q]] = src[t]`` for every ``q`` (bit for bit; ``dst`` may be a strided view)."""
    d, s = same_bits(dst, src)
    t, q = (int(v) for v in targets.shape)
    d.index_put_((targets,), s[:, None, :].expand(t, q, int(s.shape[1])))


def row_ids_of(slots: int, k: int, device: torch.device) -> torch.Tensor:
    """int64 ``[S, K]``: ``s`` in every column of row ``s``."""
    return torch.arange(slots, device=device)[:, None].expand(slots, k)


def _fixed_exchange(send: torch.Tensor, grp: MoEGroup, what: str) -> torch.Tensor:
    """Equal-split all-to-all of ``send`` (``[world * T_max, ...]``, contiguous): no host data."""
    out = torch.empty_like(send)
    return start_all_to_all(out, send, None, None, grp, what).wait()


def dispatch_low_latency(call: MoELowLatencyDispatchCall, local: LocalSteps = TORCH) -> MoELowLatencyDispatchResult:
    grp, x = call.group, call.x
    idx = call.topk_idx.to(torch.int64)
    t, hidden, k = int(x.shape[0]), int(x.shape[1]), int(idx.shape[1])
    world, me, t_max = grp.world_size, grp.rank, call.max_tokens_per_rank
    num_local = call.num_experts // world
    slots, dev = world * t_max, x.device
    one_kernel = local.low_latency_send_rows is not None and world > 1  # routes, cast and rows in one kernel
    data, scales = local.cast_fp8(x) if call.use_fp8 and not one_kernel else (x, None)
    if grp.world_size == 1:  # one process: the routing alone defines the layout (moe_one_process)
        return one_process.dispatch(call, data, scales, local)
    dtype = FP8 if call.use_fp8 else x.dtype
    parts = [("x", torch.uint8, hidden * dtype.itemsize)]
    if call.use_fp8:
        parts.append(("scales", torch.float32, hidden // FP8_BLOCK))
    fmt = RowFormat.of([*parts, ("meta", torch.int32, 1 + k)])
    window = fixed_window(t_max * fmt.row_bytes, grp, "moe_low_latency_dispatch") \
        if local.low_latency_send_window is not None and one_kernel and t > 0 else None
    kept_idx = None  # the handle's copy of the routing, where the sender writes it
    landed = None  # (received, seq): where the rows lie in this rank's slots, read there by the receiver's steps
    recv = None
    if window is not None:  # the rows go straight into the receivers' memory: no send buffer
        assert local.low_latency_send_window is not None
        kept_idx = torch.empty((t, k), dtype=torch.int64, device=dev)
        in_rank, send_slot, _ = local.low_latency_send_window(x, idx, world, num_local, t_max, fmt, window,
                                                              call.use_fp8, kept_idx)
        if window.land is not None and call.use_fp8 and local.low_latency_receive_landed is not None and \
                local.scatter_row_pair_landed is not None:
            landed = window.land()
        else:
            recv = window.finish(fmt.empty(slots, dev))
    else:
        in_rank, send_slot, recv = _send(call, fmt, idx, data, scales, one_kernel, local)
    # receiver: (slot, local expert) pairs -> [expert, position]
    recv_x = call.alloc((num_local, slots, hidden), dtype)
    recv_s = None
    if call.use_fp8:
        storage = call.alloc((num_local, hidden // FP8_BLOCK, slots), torch.float32)
        recv_s = storage.transpose(1, 2)  # column-major in the last two dimensions
    recv_count = call.alloc((num_local,), torch.int32)
    if landed is not None:  # the backend's steps read the rows in this rank's slots
        assert local.low_latency_receive_landed is not None and local.scatter_row_pair_landed is not None
        assert recv_s is not None
        landed_count = torch.empty(num_local, dtype=torch.int32, device=dev)
        received, seq = landed
        recv_token, recv_local, valid, position, count, target, packed_rows = local.low_latency_receive_landed(
            received, seq, t_max, fmt, me, num_local, recv_count, landed_count)
        local.scatter_row_pair_landed(received, seq, t_max, fmt, [("x", recv_x), ("scales", recv_s)], target)
        return _dispatched(call, grp, idx, in_rank, send_slot, kept_idx, recv_x, recv_s, recv_count, landed_count,
                           FixedRoutes(t_max, send_slot, recv_token, recv_local, valid, position, count), packed_rows)
    assert recv is not None
    recv_meta = fmt.part(recv, "meta")
    placed = [(fmt.part(recv, "x").view(dtype), recv_x)]  # rows of the payload's dtype, as the steps expect
    if recv_s is not None:
        placed.append((fmt.part(recv, "scales"), recv_s))
    kept_count = None  # the handle's copy of recv_count, where the receive step writes it
    if local.low_latency_receive is not None and local.scatter_rows is not None:  # the backend's fused routes
        kept_count = torch.empty(num_local, dtype=torch.int32, device=dev)
        recv_token, recv_local, valid, position, count, target, packed_rows = local.low_latency_receive(
            recv_meta, me, num_local, recv_count, kept_count)
        if local.scatter_row_pair is not None:
            local.scatter_row_pair(placed, target)  # -1 targets skipped
        else:
            for src, dst in placed:
                local.scatter_rows(src, dst, target)
    else:
        recv_token, recv_local, valid, position, count, packed_rows = _receive(
            recv_meta, placed, me, num_local, t_max, world, local)
        recv_count.copy_(count)
    return _dispatched(call, grp, idx, in_rank, send_slot, kept_idx, recv_x, recv_s, recv_count, kept_count,
                       FixedRoutes(t_max, send_slot, recv_token, recv_local, valid, position, count), packed_rows)


def _dispatched(call: MoELowLatencyDispatchCall, grp: MoEGroup, idx: torch.Tensor, in_rank: torch.Tensor,
                send_slot: torch.Tensor, kept_idx: torch.Tensor | None, recv_x: torch.Tensor,
                recv_s: torch.Tensor | None, recv_count: torch.Tensor, kept_count: torch.Tensor | None,
                fixed: FixedRoutes, packed_rows: torch.Tensor) -> MoELowLatencyDispatchResult:
    """The dispatch's result and handle (copies of ``idx`` and ``recv_count`` where a step did not write them)."""
    x_out: Any = recv_x if recv_s is None else (recv_x, recv_s)
    routes = LazyRoutes(grp, call.num_experts, int(call.x.shape[1]), idx.clone() if kept_idx is None else kept_idx,
                        in_rank, fixed)
    handle = MoELowLatencyHandle(routes, call.max_tokens_per_rank,
                                 recv_count.clone() if kept_count is None else kept_count, packed_rows)
    return MoELowLatencyDispatchResult(x_out, recv_count, handle)


def _send(call: MoELowLatencyDispatchCall, fmt: RowFormat, idx: torch.Tensor, data: torch.Tensor,
          scales: torch.Tensor | None, one_kernel: bool, local: LocalSteps
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sender's side through a fixed send buffer (plus a trash row; unused rows marked by token index
    -1), then the exchange: ``(in_rank, send_slot, received rows)``."""
    grp, x = call.group, call.x
    t, world, t_max = int(idx.shape[0]), grp.world_size, call.max_tokens_per_rank
    num_local, slots, dev = call.num_experts // world, world * t_max, x.device
    send = fmt.empty(slots + 1, dev)
    if one_kernel:
        assert local.low_latency_send_rows is not None
        in_rank, send_slot, _ = local.low_latency_send_rows(
            x, idx, world, num_local, t_max, fmt.part(send, "meta"), fmt.part(send, "x"),
            fmt.part(send, "scales") if call.use_fp8 else None)
    else:
        in_rank = selection_mask(idx, world, num_local)
        send_slot = running_slot(in_rank)
        fmt.part(send, "meta")[:, 0].fill_(-1)
        targets = _targets(send_slot, idx, num_local, t_max)
        meta = torch.cat([torch.arange(t, device=dev, dtype=torch.int32)[:, None], idx.to(torch.int32)], dim=1)
        _scatter_rows(fmt.part(send, "x"), targets, data)
        if scales is not None:
            _scatter_rows(fmt.part(send, "scales"), targets, scales)
        _scatter_rows(fmt.part(send, "meta"), targets, meta)
    return in_rank, send_slot, _fixed_exchange(send[:slots], grp, "moe_low_latency_dispatch")


def _receive(recv_meta: torch.Tensor, placed: list[tuple[torch.Tensor, torch.Tensor]], me: int, num_local: int,
             t_max: int, world: int, local: LocalSteps) -> tuple[torch.Tensor, ...]:
    """The receiver's routes with torch ops (``LocalSteps.low_latency_receive``'s contract, without
    ``target``) and the placement of each ``(received rows, layout)`` in ``placed``."""
    slots, k, dev = world * t_max, int(recv_meta.shape[1]) - 1, recv_meta.device
    recv_token = recv_meta[:, 0].to(torch.int64)
    recv_local = torch.where(recv_token[:, None] >= 0, local_ids(recv_meta[:, 1:].to(torch.int64), me, num_local),
                             -1)
    valid, position, count = _pairs(recv_local, num_local)
    own = recv_local.clamp(min=0) * slots + position  # the pair's row in [L * S]
    # Every slot k of a row writes that row's payload (one index_put_ of fixed size): a valid pair to its
    # own place, any other slot to the row's first valid place (the same bytes again), and a row with
    # no valid pair (an unused slot) to row count[0] of expert 0, past that expert's count: unused
    # slots exist only when fewer than S tokens arrived, so count[0] < S. No write lands where it matters.
    first = valid.to(torch.int8).argmax(1, keepdim=True)
    anchor = torch.where(valid.any(1, keepdim=True), own.gather(1, first), count[:1, None].expand(slots, 1))
    target = torch.where(valid, own, anchor)
    if local.scatter_rows is not None:
        for src, dst in placed:
            local.scatter_rows(src, dst, target)
    else:  # the same placement seen from the layout: the received slot of each [expert, position]
        by_row = torch.full((num_local * slots + 1,), -1, dtype=torch.int64, device=dev)
        by_row.index_put_((torch.where(valid, own, num_local * slots),), row_ids_of(slots, k, dev))
        for src, dst in placed:
            local.place_rows(src, dst, by_row[: num_local * slots].view(num_local, slots), False)
    # canonical packed_src_row: the compact received row (source block prefix + slot) of each pair
    per_source = (recv_token >= 0).view(world, t_max).sum(1)
    prefix = torch.cumsum(per_source, 0) - per_source
    row_ids = torch.arange(slots, device=dev)
    compact_row = prefix[row_ids // t_max] + row_ids % t_max
    packed = torch.full((num_local * slots + 1,), -1, dtype=torch.int64, device=dev)
    packed.index_put_((torch.where(valid, own, num_local * slots),), compact_row[:, None].expand(slots, k))
    return recv_token, recv_local, valid, position, count, packed[: num_local * slots].view(num_local, slots)


def fixed_routes(handle: MoELowLatencyHandle) -> FixedRoutes:
    """The fixed-slot routes of ``handle``: this backend's own (no sync), or rebuilt from the canonical
    fields of another backend's handle (host syncs allowed there)."""
    routes = handle.routes
    if isinstance(routes, LazyRoutes):
        return routes.fixed
    world, t_max, num_local = routes.world_size, handle.max_tokens_per_rank, routes.num_local_experts
    slots, dev, k = world * t_max, routes.device, routes.num_topk
    counts = torch.tensor(routes.recv_counts, dtype=torch.int64, device=dev)
    prefix = torch.cumsum(counts, 0) - counts
    source = torch.repeat_interleave(torch.arange(world, device=dev), counts, output_size=routes.num_recv)
    fixed_of = source * t_max + torch.arange(routes.num_recv, device=dev) - prefix[source]
    recv_token = torch.full((slots,), -1, dtype=torch.int64, device=dev)
    recv_token[fixed_of] = routes.recv_src_idx
    recv_local = torch.full((slots, k), -1, dtype=torch.int64, device=dev)
    recv_local[fixed_of] = routes.recv_topk_idx
    valid, position, count = _pairs(recv_local, num_local)
    return FixedRoutes(t_max, running_slot(routes.is_token_in_rank), recv_token, recv_local, valid, position, count)


def combine_low_latency(call: MoELowLatencyCombineCall, local: LocalSteps = TORCH) -> torch.Tensor:
    h, grp = call.handle, call.group
    if h.world_size == 1:  # one process (any backend's handle): moe_one_process, from packed_src_row alone
        return one_process.combine(call, local)
    routes, f = h.routes, fixed_routes(call.handle)
    idx = call.topk_idx.to(torch.int64)
    t, k = int(idx.shape[0]), int(idx.shape[1])
    world, num_local, t_max = routes.world_size, routes.num_local_experts, f.t_max
    slots, hidden, dev = world * t_max, int(call.y.shape[2]), call.y.device
    y_rows = call.y.view(num_local * slots, hidden)
    single = k == 1 or num_local == 1  # each received slot has at most one local expert
    fused = (local.low_latency_return is not None and local.low_latency_pairs is not None
             and local.token_rows_into is not None)
    if fused:  # the backend's kernels for both sides' terms; partial and final sums by token_rows_into
        return _combine_fused(call, f, y_rows, single, local)
    targets = _targets(f.send_slot, idx, num_local, t_max)  # [T, Q] send rows, trash = slots
    rows = torch.where(f.pair_valid, f.recv_local.clamp(min=0) * slots + f.pair_position, 0)  # [S, K] in y
    if single:  # return that expert's bf16 row; the source applies its weights
        back = _fixed_exchange(_single_rows(y_rows, rows, f), grp, "moe_low_latency_combine")  # bf16 rows
        rank_of = torch.where(idx >= 0, idx // num_local, -1)
        dest = torch.arange(int(targets.shape[1]), device=dev)[None, :].expand(t, -1)
        weight = slot_weight_sums(rank_of, call.topk_weights, dest if world <= k else rank_of)  # [T, Q]
    else:  # the source's weights go to the receivers, float32 partial sums come back
        w_send = torch.empty((slots + 1, k), dtype=torch.float32, device=dev)
        _scatter_rows(w_send, targets, call.topk_weights)
        w_recv = _fixed_exchange(w_send[:slots], grp, "moe_low_latency_combine (weights)")
        pair_w = slot_weight_sums(f.recv_local, w_recv, torch.where(f.pair_valid, f.recv_local, -1))  # [S, K]
        if local.token_rows_into is not None:  # each slot's terms in slot order, -1 for the invalid ones
            partial = torch.empty((slots, hidden), dtype=torch.float32, device=dev)
            local.token_rows_into(y_rows, torch.where(f.pair_valid, rows, -1), pair_w, partial)
        else:
            into = torch.where(f.pair_valid, row_ids_of(slots, k, dev), slots).reshape(-1)  # invalid: a trash row
            pair_w = torch.where(f.pair_valid, pair_w, 0.0).reshape(-1)
            partial = local.weighted_rows(y_rows, rows.reshape(-1), into, pair_w, slots + 1)[:slots]
        back = _fixed_exchange(partial, grp, "moe_low_latency_combine")
        weight = torch.ones(targets.shape, dtype=torch.float32, device=dev)
    sent = targets < slots
    if world > k:  # one pair per slot: count each destination rank once
        rank_of = torch.where(idx >= 0, idx // num_local, -1)
        sent = sent & first_occurrence(rank_of)
    out = call.alloc((t, hidden), torch.bfloat16)
    if local.token_rows_into is not None:  # per token, its rows of `back` in rank order, rounded once
        local.token_rows_into(back, torch.where(sent, targets, -1), weight, out)
        return out
    picked = back.index_select(0, torch.where(sent, targets, 0).reshape(-1)).view(t, int(targets.shape[1]), hidden)
    total = torch.where(sent[:, :, None], picked.to(torch.float32) * weight[:, :, None], 0.0)
    out.copy_(total.sum(1))
    return out


def _single_rows(y_rows: torch.Tensor, rows: torch.Tensor, f: FixedRoutes) -> torch.Tensor:
    """bf16 ``[S, hidden]``: each received slot's one expert row (``rows [S, K]``, valid where ``f.pair_valid``);
    unused slots get some row, never read."""
    first = f.pair_valid.to(torch.int8).argmax(1, keepdim=True)
    return y_rows.index_select(0, rows.clamp(min=0).gather(1, first)[:, 0])


def _weights_out(call: MoELowLatencyCombineCall, f: FixedRoutes, idx: torch.Tensor, num_local: int, slots: int,
                 local: LocalSteps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused combine's weights to the ranks holding the experts: ``(rows, pair_w)`` of the receiver's terms
    and ``(table, weight)`` of the sender's. Written into the receivers' slots and read there where the transport
    lands a window and the backend has both steps for it, else through a send buffer and the exchange's copy."""
    assert local.low_latency_return is not None and local.low_latency_pairs is not None
    grp, k, dev = call.group, int(idx.shape[1]), idx.device
    window = fixed_window(f.t_max * k * 4, grp, "moe_low_latency_combine (weights)") \
        if local.low_latency_return_window is not None and local.low_latency_pairs_landed is not None else None
    if window is not None and window.land is not None:
        assert local.low_latency_return_window is not None and local.low_latency_pairs_landed is not None
        table, weight = local.low_latency_return_window(idx, call.topk_weights, f.send_slot, num_local, f.t_max,
                                                        window)
        received, seq = window.land()
        rows, pair_w = local.low_latency_pairs_landed(f.recv_local, f.pair_valid, f.pair_position, received, seq,
                                                      f.t_max)
        return rows, pair_w, table, weight
    w_send = torch.empty((slots, k), dtype=torch.float32, device=dev)
    table, weight = local.low_latency_return(idx, call.topk_weights, f.send_slot, num_local, f.t_max, w_send)
    w_recv = _fixed_exchange(w_send, grp, "moe_low_latency_combine (weights)")
    rows, pair_w = local.low_latency_pairs(f.recv_local, f.pair_valid, f.pair_position, w_recv)
    return rows, pair_w, table, weight


def _combine_fused(call: MoELowLatencyCombineCall, f: FixedRoutes, y_rows: torch.Tensor, single: bool,
                   local: LocalSteps) -> torch.Tensor:
    """:func:`combine_low_latency` with the backend's ``low_latency_return`` (sender) and ``low_latency_pairs``
    (receiver) steps: the same terms in the same order, a few kernels instead of about 35 torch ops."""
    assert local.low_latency_return is not None and local.low_latency_pairs is not None
    assert local.token_rows_into is not None
    grp, idx = call.group, call.topk_idx.to(torch.int64)
    num_local, slots, hidden = call.handle.routes.num_local_experts, int(f.recv_token.shape[0]), int(y_rows.shape[1])
    dev = y_rows.device
    if single:  # that expert's bf16 row back; the source applies its weights
        rows, _ = local.low_latency_pairs(f.recv_local, f.pair_valid, f.pair_position, None)
        back = _fixed_exchange(_single_rows(y_rows, rows, f), grp, "moe_low_latency_combine")
        table, weight = local.low_latency_return(idx, call.topk_weights, f.send_slot, num_local, f.t_max, None)
    else:  # weights out, float32 partial sums back
        rows, pair_w, table, weight = _weights_out(call, f, idx, num_local, slots, local)
        window = fixed_window(f.t_max * hidden * 4, grp, "moe_low_latency_combine") \
            if local.token_rows_window is not None and hidden % 4 == 0 else None
        if window is not None:  # the partial sums straight into their source ranks' memory
            assert local.token_rows_window is not None
            local.token_rows_window(y_rows, rows, pair_w, window, f.t_max)
            if window.land is not None and local.token_rows_landed is not None:  # summed where they landed
                received, seq = window.land()
                out = call.alloc((int(idx.shape[0]), hidden), torch.bfloat16)
                local.token_rows_landed(weight, table, weight, received, seq, f.t_max, out)  # float32 rows
                return out
            back = window.finish(torch.empty((slots, hidden), dtype=torch.float32, device=dev))
        else:
            partial = torch.empty((slots, hidden), dtype=torch.float32, device=dev)
            local.token_rows_into(y_rows, rows, pair_w, partial)
            back = _fixed_exchange(partial, grp, "moe_low_latency_combine")
    out = call.alloc((int(idx.shape[0]), hidden), torch.bfloat16)
    local.token_rows_into(back, table, weight, out)  # per token, its rows of `back` in rank order, rounded once
    return out
