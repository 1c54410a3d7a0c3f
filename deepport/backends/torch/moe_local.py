"""The local (single-device) data movement of the MoE ops, as replaceable steps.

:mod:`deepport.backends.torch.moe_routes`, :mod:`deepport.backends.torch.moe_layouts` and
:mod:`deepport.backends.torch.moe_low_latency` do the routing and the multi-rank exchange and call these
steps for the per-device work; another backend passes its own :class:`LocalSteps` (the triton and opencl
backends' kernels) and reuses everything else.

- ``place_rows(src, dst, index, zero_missing)``: ``dst[g, i] = src[index[g, i]]`` for every
  ``index >= 0`` (whole rows, bit for bit); ``-1`` rows are zeroed when ``zero_missing`` and
  unspecified otherwise (left as they are, or overwritten). ``src [n, C]`` (rows may be strided, as
  views into packed received rows are), ``dst [G, R, C]`` with any strides, ``index`` int64 ``[G, R]``.
- ``weighted_rows(y, src_pos, dst_row, weights, num_rows)``: float32 ``[num_rows, C]`` with
  ``out[dst_row[j]] += weights[j] * y[src_pos[j]]`` (``y [n, C]`` bf16, the others ``[k]``).
- ``weighted_rows_into(y, src_pos, dst_row, weights, out)`` (optional): ``weighted_rows`` written
  straight into ``out`` (bf16 ``[num_rows, C]``, contiguous), each float32 sum rounded once to bf16
  (round to nearest even); the same bits as ``out.copy_(weighted_rows(...))`` but for NaN payloads,
  without the float32 rows in memory. Without it the one-process expanded combine does exactly that copy.
- ``token_rows_into(y, table, weights, out)`` (optional): bf16 or float32 ``out [T, C]`` (contiguous), row
  ``t`` the float32 sum in column order of ``weights[t, j] * y[table[t, j]]`` over ``table[t, j] >= 0``
  (``table`` int64 ``[T, K]``, ``weights`` float32 ``[T, K]``), rounded once to bf16 for a bf16 ``out``:
  ``weighted_rows_into`` (or ``weighted_rows``) for sums whose terms the caller already holds per
  destination row, in order (the one-process combines, the low-latency combine's partial sums), so no sort
  by destination is needed. The same bits as ``weighted_rows_into`` / ``weighted_rows`` over the same terms
  in the same order.
- ``token_table(src_row, expert, token_of, topk_idx, row_weights, tokens)`` (optional): the terms per token
  of a one-process expanded combine, exactly what
  :func:`deepport.backends.torch.moe_one_process_expanded.rows_per_token` returns from the handle's
  ``expanded_src_row``, ``m_indices``, ``recv_src_idx``, ``recv_topk_idx`` and ``weights``: int64
  ``[tokens, K]``, each token's expanded rows in ascending order with ``-1`` first, and their float32
  weights (anything where ``-1``). Without it the combine builds the table with torch ops.
- ``low_latency_layout(topk_idx, num_experts, capacity, count)`` (optional): the one-process low-latency
  layout of ``topk_idx [T, K]`` (``T <= capacity``): ``(src, packed)``, int64 ``[E, capacity]``, what
  :func:`deepport.backends.torch.moe_one_process.packed_sources` and the received rows give: ``src[e, p]``
  the ``p``-th token (ascending) selecting expert ``e`` in any slot, ``packed[e, p]`` that token's rank
  among the tokens selecting any expert, both ``-1`` past the count, which it writes into ``count`` (int32
  ``[E]``). Without it the one-process dispatch computes them with torch ops.
- ``low_latency_positions(topk_idx, capacity)`` (optional): int64 ``[T, K]``, the packed row
  ``e * capacity + p`` that slot ``k`` of token ``t`` (expert ``e``) reads in the one-process low-latency
  combine, ``-1`` for a ``-1`` slot. Without it the combine derives them from the handle with torch ops.
- ``scatter_row_pair(parts, targets)`` (optional): ``scatter_rows`` of each ``(src, dst)`` of ``parts`` (one or
  two parts of the same rows: the low-latency dispatch's payload and scales) under the same ``targets``, in
  one step. Without it the dispatch calls ``scatter_rows`` per part.
- ``low_latency_receive(meta, rank, num_local, count32, count32_copy)`` (optional, with a ``scatter_rows`` that skips
  targets -1): the receiver's routes of a multi-rank low-latency dispatch from the received slots' int32
  ``meta [S, 1 + K]`` (source token, -1 for an unused slot, then the global top-k ids; routed slots fill
  each source's block from its start): ``(recv_token [S], recv_local [S, K], valid [S, K], position [S, K],
  count [L], target [S, K], packed [L, S])`` as :func:`deepport.backends.torch.moe_low_latency.dispatch_low_latency`
  derives them (``target``: the pair's row ``l * S + position`` in the ``[L, S]`` layout where valid, else
  -1; ``packed``: the canonical ``packed_src_row``), writing ``count`` also into ``count32`` (int32
  ``[L]``, the op's ``recv_count``) and, where ``count32_copy`` is given, into it too (the handle's copy).
  Without it the dispatch derives them with torch ops.
- ``low_latency_send_rows(x, idx, num_ranks, num_local, t_max, meta, data_rows, scale_rows)`` (optional): the
  whole sender's side of a multi-rank low-latency dispatch from ``topk_idx`` int64 ``[T, K]``: returns
  ``(in_rank bool [T, R], send_slot int64 [T, R], target int64 [T, R])`` (token ``t``'s row in rank
  ``r``'s block of ``t_max`` send rows: the tokens before it that select an expert of ``r``, -1 if ``t``
  selects none; ``target = r * t_max + send_slot``, -1 if none); writes each sent row's int32 ``meta [R *
  t_max, 1 + K]`` (token index, then its ``K`` ids) and token -1 into the unused rows, and each sent
  token's payload into its rows of ``data_rows`` (``[R * t_max, H * size]`` bytes, dense rows at any
  stride): FP8-cast (``cast_fp8``'s bits) with its scales into ``scale_rows`` (float32 ``[R * t_max, H /
  128]``) when that is given, else ``x``'s bits. Without it the dispatch does this with torch ops.
- ``low_latency_send_window(x, idx, num_ranks, num_local, t_max, fmt, window, cast, idx_copy)`` (optional;
  ``T >= 1``):
  ``low_latency_send_rows`` without a send buffer, for a transport that offers a
  :class:`~deepport.backends.torch.moe_comm.FixedWindow` (the hopper backend's peer memory): the same routes,
  and the same rows (``fmt``'s parts ``meta``, ``x`` and, with ``cast``, ``scales``; :class:`RowFormat`)
  stored straight into each destination rank's memory, row ``i`` of rank ``r``'s block at ``window.table[seq
  & 1, r] + i * fmt.row_bytes``; ``idx`` also copied into ``idx_copy`` (int64 ``[T, K]``, the handle's copy)
  where given. The dispatch then calls ``window.finish``. Without it (or without a window) the dispatch fills
  a send buffer and exchanges it.
- ``token_rows_landed(like, table, weights, received, seq, rows_per_rank, out)`` (optional): ``token_rows_into``
  whose rows (of ``out.shape[1]`` elements of ``like``'s dtype) lie where a written fixed exchange left them
  (``FixedWindow.land``): row ``i`` is row ``i % rows_per_rank`` of source ``i // rows_per_rank``'s part at
  ``received[(seq - 1) & 1, source]``. The low-latency combine then sums the partial sums in place, without
  the exchange's copy out of the slots.
- ``token_rows_at(like, addresses, weights, out)`` (optional): ``token_rows_into`` with each term's row given
  by its address (int64 ``[T, K]``, -1 none, 16-byte aligned rows of ``out.shape[1]`` elements of ``like``'s
  dtype) instead of its index: the normal combine sums the rows where they arrived in a peer transport's
  memory (no copy out of it).
- ``rank_rows_at(like, in_rank, bases, me, own, out)`` (optional): ``token_rows_at`` with weights of one and
  the addresses made by the step itself from ``in_rank`` (bool ``[T, R]``): token ``t``'s terms are, for each
  rank ``r`` with ``in_rank[t, r]`` in rank order, row ``k`` of the rows at ``bases[r]`` (int64 ``[R]``; the
  address ``own`` for ``r == me``), ``k`` the number of tokens before ``t`` in rank ``r``. The normal combine
  takes it (when ``R <= K``) instead of building the address table with torch ops.
- ``sum_in_place(rows, handle, grp, out, what)`` (optional, preferred over ``rank_rows_at``): the whole
  return of the normal combine's 16-bit ``rows`` summed per token into ``out`` through the active transport's
  blocks (the same bytes, flags and bits as the window path with ``rank_rows_at``), True when it ran; False,
  nothing started, where it does not apply (then the combine takes its other paths). The triton backend's
  replays its device work as a CUDA graph (:mod:`deepport.backends.triton.moe_sum_graph`).
- ``receive_meta(meta, rank, num_local, K, with_weights)`` (optional): the normal dispatch's received routes
  from its int32 metadata rows ``meta [n, 1 + K (+ K)]`` (source token, global ids (, weight bits)):
  ``(src int64 [n], local int64 [n, K], weights float32 [n, K] or None)``, ids local to ``rank`` (-1
  elsewhere) and the weights' bits where the id is local, 0 elsewhere (as
  :func:`deepport.backends.torch.moe_index.local_ids` and ``torch.where`` give them). Without it the dispatch
  derives them with torch ops.
- ``route_prelude(idx, num_experts, grp, what, peers)`` (optional, with ``rows_to_blocks``): the normal dispatch's
  routing up to its host read in one step through the active transport (layout, the count exchange of the
  same table, the sums, the read): a :class:`RoutePrelude`, or None, nothing started, where it does not
  apply. The triton backend's replays it as a CUDA graph (:mod:`deepport.backends.triton.moe_route_graph`).
  ``peers`` (:class:`PeerRows`, or None): the rows to send, which the step may also store for the other ranks
  before its read (the prelude's ``sent`` then says where; None where it did not).
- ``finish_sent(prelude, outs, own_start, window)`` (optional, with a ``route_prelude`` that stores the others'
  rows): once the exchange of ``prelude.sent`` began through ``window`` (a staged window that offers its
  ``landing``), this rank's own rows into ``outs`` from row ``own_start`` while the others' travel, then
  ``window.receive()`` and every received row out, as ``rows_to_blocks`` (part ``"own"``) and ``blocks_to_rows``
  would; True when it ran, False, nothing started, where it does not apply. The triton backend's replays both as
  CUDA graphs.
- ``blocks_exchange(prelude, fmt, data, scales, weights, sends, recvs, outs, grp, num_local, what)`` (optional,
  with ``route_prelude``): the whole exchange of ``rows_to_blocks`` / ``blocks_to_rows`` below (the acknowledgement
  wait, both kernels, the data flags, the acknowledgements) in one step after ``route_prelude`` left
  ``prelude``, every part fitting a block; True when it ran, False, nothing started, where it does not apply.
  The triton backend's replays it as a CUDA graph.
- ``rows_to_blocks(data, scales, idx, weights, in_rank, fmt, bases, me, num_local, outs, own_start, cumsum,
  part)`` and ``blocks_to_rows(bases, counts, fmt, me, num_local, outs)`` (optional, together): the normal
  dispatch through a :class:`~deepport.backends.torch.moe_comm.RowsWindow` in two kernels and no index work.
  The first stores every token's packed row (``fmt``; the metadata made from ``idx`` and ``weights``) straight
  into each other destination's part (addresses ``bases``, int64 ``[R]``) and this rank's own rows into
  :class:`BlockOutputs` from row ``own_start`` (``cumsum``: the running count of ``in_rank`` by rank, int64
  ``[R, T]``, where the routing made it, else None); ``part`` ``"all"``, or ``"peers"`` (only the other
  ranks' rows) and ``"own"`` (only this rank's): where the window's ``begin`` starts the exchange early, the
  dispatch stores the others' rows, begins, then stores its own while they travel (``outs`` None with
  ``"peers"``: nothing of it is written; over ``all_to_all_single`` the others' rows are stored before the host
  read into a send buffer sized for the most rows a rank can send, ``bases`` then a :class:`CountedParts`).
  ``fmt`` names the parts a row carries: without ``x`` no payload is stored (side rows: part ``"peers"`` only),
  without ``scales`` none into the parts (the outputs still get them), without ``meta`` no metadata (the
  payload rows of a split wire). The second copies every
  other source's rows out of this rank's parts (``bases``; ``counts`` int64 ``[R]`` per source on the device)
  into ``outs``, the routes derived from the metadata (:mod:`deepport.backends.triton.moe_blocks`); with a
  ``fmt`` without ``x`` only the routes and scales (the payload landed in ``outs.x`` already). Without
  them the dispatch gathers each part by index.
- ``token_rows_window(y, table, weights, window, rows_per_rank)`` (optional): ``token_rows_into``'s sums
  as float32 rows of ``C = y.shape[1]`` stored straight into the receivers' memory through ``window`` (a
  :class:`~deepport.backends.torch.moe_comm.FixedWindow` of ``rows_per_rank * C * 4`` bytes per rank): row
  ``t`` of the ``[world * rows_per_rank, C]`` result is row ``t % rows_per_rank`` of rank ``t //
  rows_per_rank``'s part. The low-latency combine's partial sums take it when the transport offers a window.
- ``low_latency_return(idx, weights, send_slot, num_local, t_max, w_send)`` (optional, with
  ``token_rows_into`` and ``low_latency_pairs``): the sender's side of a multi-rank low-latency combine.
  Returns ``(table, weight)``, int64 and float32 ``[T, Q]``: entry ``q`` is rank ``q`` when ``world <= K``,
  else slot ``q`` (only the first slot naming a rank); ``table`` the send row ``r * t_max + send_slot[t, r]``
  whose returned row token ``t`` adds, -1 for none; ``weight`` 1, or, when ``w_send`` is None (bf16 expert
  rows come back), the sum in slot order of ``weights[t, k]`` over ``t``'s slots on that rank. A ``w_send``
  (float32 ``[>= R * t_max, K]``) receives ``weights[t]`` in each row ``table[t, q] >= 0``. Without it the
  combine does this with torch ops.
- ``low_latency_pairs(recv_local, valid, position, w_recv)`` (optional, with ``low_latency_return``): the
  receiver's side: ``(table, pair_w)``, int64 and float32 ``[S, K]`` from the dispatch's fixed routes:
  ``table[s, k] = recv_local * S + position`` where ``valid``, else -1; ``pair_w[s, k]`` the sum in slot
  order of ``w_recv[s, k2]`` over the slots ``k2`` naming the same local expert (0 where not valid;
  unspecified when ``w_recv`` is None). The partial sums are then ``token_rows_into`` over these terms.
- ``low_latency_receive_landed(received, seq, t_max, fmt, rank, num_local, count32, count32_copy)`` and
  ``scatter_row_pair_landed(received, seq, t_max, fmt, placed, targets)`` (optional, both or neither, with
  ``low_latency_send_window``): the low-latency dispatch's receiver reading the rows where a written fixed exchange
  left them (``window.land()``'s ``received, seq``): slot ``s`` is row ``s % t_max`` (``fmt.row_bytes`` bytes,
  16-byte aligned) of source ``s // t_max``'s part at ``received[(seq - 1) & 1, source]``. The first is
  ``low_latency_receive`` over those rows' ``meta`` parts (``T_max >= 1``, ``K >= 1``); the second
  ``scatter_row_pair`` of the parts named in ``placed`` (``[(name, layout)]``, two of them: the payload, read as the
  layout's dtype, and the scales) of those rows. The exchange then copies nothing out of the slots.
- ``low_latency_return_window(idx, weights, send_slot, num_local, t_max, window)`` and
  ``low_latency_pairs_landed(recv_local, valid, position, received, seq, t_max)`` (optional, both or neither):
  the weights' exchange of that combine written and read in place, for a transport whose
  :class:`~deepport.backends.torch.moe_comm.FixedWindow` lands (``window.land``). The first is
  ``low_latency_return`` with ``w_send`` row ``r * t_max + i`` stored straight into row ``i`` of rank ``r``'s part
  at ``window.table[seq & 1, r]`` (``K`` float32 per row); the second ``low_latency_pairs`` whose ``w_recv`` row
  ``s`` is row ``s % t_max`` of source ``s // t_max``'s part at ``received[(seq - 1) & 1, source]`` (what
  ``window.land()`` returned). The weights' exchange then copies nothing in or out of the slots.
- ``layout_counts(idx, num_experts, num_ranks)`` (optional): the routing counts of ``topk_idx [T, K]``:
  ``(in_rank bool [T, R], per_rank [R], per_expert [E])`` (integers of any type): which ranks each token
  reaches, how many tokens reach each rank, and how many tokens select each expert (a token counted once
  per distinct expert). Without it the normal dispatch derives them with torch ops.
- ``layout_table(idx, num_experts, num_ranks)`` (optional): the same counts laid out as the normal
  dispatch's count exchange sends them, ``(in_rank bool [T, R], table int64 [R, 1 + E / R])`` (row ``r``:
  the tokens reaching rank ``r``, then those selecting each of its experts); preferred to ``layout_counts``.
- ``cast_fp8(x)``: bf16 ``[T, H]`` -> (e4m3 ``[T, H]``, float32 scales ``[T, H / 128]``), DeepEP's rule
  bit for bit (the op's docstring): per 128 channels ``amax = max(|x|, float32(1e-4))``, ``scale =
  float32(amax * float32(1/448))``, ``fp8 = e4m3(float32(x * float32(448 / amax)))``.
- ``scatter_rows(src, dst, targets)`` (optional): the same placement seen from the source rows:
  ``dst.view(G * R, C)[targets[j, q]] = src[j]`` for every ``q`` (``targets`` int64 ``[n, Q]``; two
  entries naming one row always carry the same source row). A backend whose ``place_rows`` would touch
  every destination row provides it for the sparse low-latency layout (``G * R`` far above the rows
  placed); without it the layouts call ``place_rows``.
- ``take_rows(x, index)`` (optional): ``x[index]``, a new ``[k, C]`` tensor (``index`` int64 ``[k]``, no
  ``-1``): the payload rows (data, FP8 scales) a rank sends, in send order. Without it the transport
  gathers them straight into its packed send rows.
- ``take_rows_into(x, index, out)`` (optional, preferred over ``take_rows``): the same rows written
  straight into ``out [k, C]`` (rows at any stride, elements dense: a part of the packed send rows, or
  the output's own block), bit for bit; ``x`` and ``out`` come as integer views of one type.
- ``sum_rows(rows, dst, n)`` (optional): float32 ``[n, C]``, row ``d`` the sum of the ``rows[e]`` with
  ``dst[e] == d`` (0 where none): the per-token sum of the rows a normal or expanded combine returns.
  Without it the transport sums with torch (float32 rows by :func:`sum_rows`, bf16 rows by a dense
  per-token gather and one reduction in rank order).
- ``dispatch_expanded_one_process(call)`` (optional): the whole one-process (world size 1) expanded
  dispatch, fused by the backend, returning what :func:`deepport.moe_dispatch_expanded` returns, the same
  bits as :mod:`deepport.backends.torch.moe_one_process_expanded` (the triton backend's:
  :mod:`deepport.backends.triton.moe_expanded_dispatch`). Without it
  :func:`deepport.backends.torch.moe_layouts.dispatch_expanded` runs that module with these steps.

The torch steps never wait for the device: ``place_rows`` is one gather of every destination row (the
layouts hand it indices with no ``-1`` where a row must be zero: they point at a zero row of ``src``;
with ``zero_missing`` it appends that zero row to a copy of ``src`` itself, ``T`` rows copied instead of
every destination row zeroed again), ``scatter_rows`` one ``index_put_``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepport.backends.torch.moe_comm import FixedWindow, RowFormat, RowsWindow, same_bits
from deepport.kernels.fp8_layout import amax_scales
from deepport.kernels.moe_args import FP8, FP8_BLOCK

if TYPE_CHECKING:
    from deepport.kernels.moe_args import MoEGroup
    from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
    from deepport.kernels.moe_handle import MoEHandle


@dataclass(frozen=True)
class BlockOutputs:
    """What a normal dispatch through ``rows_to_blocks`` / ``blocks_to_rows`` fills, ``n`` received rows:
    ``x`` ``[n, H]`` (the payload's dtype), ``scales`` float32 ``[n, H / 128]`` or None, ``src`` int64 ``[n]``
    (each row's token on its source), ``local`` int64 ``[n, K]`` (local expert ids, -1 elsewhere),
    ``weights`` float32 ``[n, K]`` or None (the weight where the id is local, else 0). A ``blocks_exchange``
    step also fills ``local_out`` (the local ids again: the caller's tensor, where given), ``in_rank`` (bool ``[T,
    R]``) and ``idx`` (int64 ``[T, K]``): copies of its routing's for the handle."""

    x: torch.Tensor
    scales: torch.Tensor | None
    src: torch.Tensor
    local: torch.Tensor
    weights: torch.Tensor | None
    local_out: torch.Tensor | None = None
    in_rank: torch.Tensor | None = None
    idx: torch.Tensor | None = None


@dataclass(frozen=True)
class CountedParts:
    """Where ``rows_to_blocks`` stores the other ranks' rows when only the device knows how many go to each: one
    send buffer (``buffer``, uint8, 16-byte aligned, long enough for all of them) whose parts follow one another
    in rank order, rank ``r``'s ``counts[r]`` rows long (int64 ``[R]`` on the device, any stride), this rank's
    left out: the parts ``all_to_all_single`` sends once the host has read the counts."""

    buffer: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class PeerRows:
    """The rows a ``route_prelude`` step may store for the other ranks before its host read (as the early send
    does, :class:`CountedParts`): ``fmt``'s packed rows of ``data`` ``[T, H]`` (dense), ``scales`` float32
    ``[T, H / 128]`` (dense) or None and ``weights`` float32 ``[T, K]`` or None, the metadata made from the
    routing's ``idx``."""

    fmt: RowFormat
    data: torch.Tensor
    scales: torch.Tensor | None
    weights: torch.Tensor | None


@dataclass(frozen=True)
class RoutePrelude:
    """What a ``route_prelude`` step leaves of the normal dispatch's routing: ``in_rank`` bool ``[T, R]``,
    ``table`` int64 ``[R, 1 + L]`` (the count table sent: per rank its tokens, then per local expert), ``got``
    int64 ``[R, 1 + L]`` (the tables received, by source), ``cumsum`` int64 ``[R, T]`` (the running count of
    ``in_rank`` by rank), ``per_expert`` int64 ``[L]`` (rows received per local expert); on the host
    ``sends``, ``recvs`` (tokens to and from each rank) and ``per_expert_host``. The device tensors may be the
    step's own buffers, valid until its next call (a handle keeps copies). ``sent``: where the step stored the
    other ranks' rows of the :class:`PeerRows` it was given (the parts placed by ``table``'s first column; its
    buffer, too, is the step's own), else None; ``copies``: ``(in_rank, idx)`` copies it made for the handle
    (this call's, bool ``[T, R]`` and int64 ``[T, K]``), else None."""

    in_rank: torch.Tensor
    table: torch.Tensor
    got: torch.Tensor
    cumsum: torch.Tensor
    per_expert: torch.Tensor
    sends: list[int]
    recvs: list[int]
    per_expert_host: list[int]
    state: object = None  # the step's own, for its blocks_exchange
    sent: CountedParts | None = None
    copies: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class LocalSteps:
    place_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]
    weighted_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    cast_fp8: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    scatter_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    scatter_row_pair: Callable[[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor], None] | None = None
    take_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    take_rows_into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    sum_rows: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    weighted_rows_into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                 None] | None = None
    dispatch_expanded_one_process: Callable[[MoEExpandedDispatchCall], MoEExpandedDispatchResult] | None = None
    token_rows_into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    token_table: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
                          tuple[torch.Tensor, torch.Tensor]] | None = None
    low_latency_layout: Callable[[torch.Tensor, int, int, torch.Tensor],
                                 tuple[torch.Tensor, torch.Tensor]] | None = None
    low_latency_positions: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    low_latency_receive: Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor | None],
                                  tuple[torch.Tensor, ...]] | None = None
    low_latency_send_rows: Callable[[torch.Tensor, torch.Tensor, int, int, int, torch.Tensor, torch.Tensor,
                                     torch.Tensor | None],
                                    tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    low_latency_send_window: Callable[[torch.Tensor, torch.Tensor, int, int, int, RowFormat, FixedWindow, bool,
                                       torch.Tensor | None],
                                      tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    token_rows_window: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, FixedWindow, int], None] | None = None
    token_rows_at: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    token_rows_landed: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int,
                                 torch.Tensor], None] | None = None
    rank_rows_at: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor], None] | None = None
    sum_in_place: Callable[[torch.Tensor, MoEHandle, MoEGroup, torch.Tensor, str], bool] | None = None
    route_prelude: Callable[[torch.Tensor, int, MoEGroup, str, PeerRows | None], RoutePrelude | None] | None = None
    finish_sent: Callable[[RoutePrelude, BlockOutputs, int, RowsWindow], bool] | None = None
    blocks_exchange: Callable[[RoutePrelude, RowFormat, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                               list[int], list[int], BlockOutputs, MoEGroup, int, str], bool] | None = None
    receive_meta: Callable[[torch.Tensor, int, int, int, bool],
                           tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None
    rows_to_blocks: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor,
                              RowFormat, torch.Tensor | CountedParts, int, int, BlockOutputs | None, int,
                              torch.Tensor | None, str],
                             None] | None = None
    blocks_to_rows: Callable[[torch.Tensor, torch.Tensor, RowFormat, int, int, BlockOutputs], None] | None = None
    low_latency_return: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor | None],
                                 tuple[torch.Tensor, torch.Tensor]] | None = None
    low_latency_pairs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                                tuple[torch.Tensor, torch.Tensor]] | None = None
    low_latency_receive_landed: Callable[[torch.Tensor, torch.Tensor, int, RowFormat, int, int, torch.Tensor,
                                          torch.Tensor | None], tuple[torch.Tensor, ...]] | None = None
    scatter_row_pair_landed: Callable[[torch.Tensor, torch.Tensor, int, RowFormat, list[tuple[str, torch.Tensor]],
                                       torch.Tensor], None] | None = None
    low_latency_return_window: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, FixedWindow],
                                        tuple[torch.Tensor, torch.Tensor]] | None = None
    low_latency_pairs_landed: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
                                       tuple[torch.Tensor, torch.Tensor]] | None = None
    layout_counts: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    layout_table: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]] | None = None


def _flat(dst: torch.Tensor) -> torch.Tensor | None:
    """``dst [G, R, C]`` viewed as ``[G * R, C]`` with dense rows, or None when its strides do not allow it."""
    g, r, c = (int(d) for d in dst.shape)
    if dst.stride(2) != 1 and c > 1:
        return None
    if g > 1 and r > 0 and dst.stride(0) != r * dst.stride(1):
        return None
    return dst.view(g * r, c)


def place_rows(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, zero_missing: bool) -> None:
    g, r, c = (int(d) for d in dst.shape)
    n = int(src.shape[0])
    flat = _flat(dst)
    if n == 0:  # every index is -1
        if zero_missing:
            (flat if flat is not None else dst).view(torch.uint8 if dst.element_size() == 1 else dst.dtype).zero_()
        return
    s = same_bits(src, src)[1]
    if zero_missing:  # -1 reads a zero row after a copy of src: fewer bytes than zeroing gathered rows
        s = torch.cat([s, s.new_zeros((1, int(s.shape[1])))])
        rows = index.reshape(-1).remainder(n + 1)  # -1 -> n
    else:
        rows = index.reshape(-1).clamp(min=0)
    if flat is not None:
        d, s = same_bits(flat, s)
        torch.index_select(s, 0, rows, out=d)
        return
    picked = s.index_select(0, rows)  # odd destination strides: gather, then copy
    dst.copy_(picked.view(torch.uint8).view(src.dtype).view(g, r, c))


def scatter_rows(src: torch.Tensor, dst: torch.Tensor, targets: torch.Tensor) -> None:
    r = int(dst.shape[1])
    n, q = (int(d) for d in targets.shape)
    flat = _flat(dst)
    if flat is not None:
        d, s = same_bits(flat, src)
        d.index_put_((targets,), s[:, None, :].expand(n, q, int(s.shape[1])))
    else:
        dst.index_put_((targets // r, targets % r), src[:, None, :].expand(n, q, int(src.shape[1])))


def weighted_rows(y: torch.Tensor, src_pos: torch.Tensor, dst_row: torch.Tensor, weights: torch.Tensor,
                  num_rows: int) -> torch.Tensor:
    out = torch.zeros((num_rows, int(y.shape[1])), dtype=torch.float32, device=y.device)
    out.index_add_(0, dst_row, y[src_pos].to(torch.float32) * weights[:, None])
    return out


def cast_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, hidden = int(x.shape[0]), int(x.shape[1])
    blocks = x.to(torch.float32).view(t, hidden // FP8_BLOCK, FP8_BLOCK)
    scale, multiplier = amax_scales(blocks.abs().amax(dim=2))
    data = (blocks * multiplier[:, :, None]).to(FP8).view(t, hidden)
    return data, scale


def sum_rows(rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """The default ``sum_rows``: float32 ``index_add_`` of the rows (converted on the way) into zeros."""
    total = torch.zeros((n, *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    total.index_add_(0, dst, rows if rows.dtype == torch.float32 else rows.to(torch.float32))
    return total


TORCH = LocalSteps(place_rows, weighted_rows, cast_fp8, scatter_rows)
