"""Triton kernels of the MoE layouts' single-device steps (any GPU triton targets).

- :func:`moe_layout_count_kernel`, grid ``(ceil(T / BLOCK_T),)``: per token, its distinct experts and
  ranks (a slot repeating an earlier slot's expert, or rank, is skipped; ``-1`` slots too), counted with
  integer atomics into ``per_expert`` / ``per_rank`` (zeroed by the caller) and flagged in ``in_rank``
  (uint8 ``[T, R]``, zeroed by the caller). Integer sums: exact in any order.
- :func:`moe_place_rows_kernel`, grid ``(G * R, ceil(C / BLOCK_C))``: ``dst[g, i, :] = src[index[g, i], :]``
  as raw bits (integer views of the payload), zero (``ZERO_MISSING``) or untouched where the index is -1.
- :func:`moe_scatter_rows_kernel`, grid ``(n, ceil(C / BLOCK_C))``: the same placement from the source
  side, ``dst.view(G * R, C)[targets[j, q]] = src[j]`` as raw bits, each source row read once (not at all
  when every target is ``-1``) and written once to each distinct target (a ``q`` repeating an earlier ``q``'s
  target of row ``j`` is skipped, and so is a target ``-1``).
- :func:`moe_ll_receive_kernel`, grid ``L``: the routes of a multi-rank low-latency dispatch's received
  slots for local expert ``l`` (what :func:`deepport.backends.torch.moe_low_latency.dispatch_low_latency`
  derives with torch ops).
- :func:`moe_weighted_rows_kernel`, grid ``(num_rows, ceil(C / BLOCK_C))``: row ``r`` of the float32
  output is ``sum_j weights[j] * y[src_pos[j]]`` over ``j`` in ``seg[r] : seg[r + 1]`` (entries sorted
  by destination row, stable), accumulated in float32 in that order and stored in ``out``'s dtype
  (float32, or bf16 rounded once, to nearest even).
- :func:`moe_cast_fp8_kernel`, grid ``(T, H / 128)``: one 128-channel block of one token, DeepEP's
  float32 rule (the op's docstring): ``amax = max(|x|, 1e-4)``, ``scale = amax * float32(1/448)`` (one
  float32 product) and ``x * (448 / amax)`` (the quotient an IEEE division), stored as e4m3
  (``STORE_FP32``: as float32, for the interpreter, whose e4m3 rounding is wrong; the caller rounds
  with torch).
- :func:`moe_ll_send_rows_kernel`, grid ``(T, chunks of H)``: the whole sender's side of a multi-rank
  low-latency dispatch in one kernel: which ranks each token goes to, its row in each rank's block (each
  token counts the tokens before it itself), the rows' metadata, and the payload written straight into the
  send rows, FP8-cast on the way (no FP8 copy of ``x`` in between).
- :func:`moe_ll_return_kernel`, grid ``T``: the sender's side of a multi-rank low-latency combine: the
  per-token table of returned rows and their weights, and the weight rows sent to the receivers.
- :func:`moe_ll_pairs_kernel`, grid ``ceil(S / BLOCK_S)``: the receiver's side: each received slot's
  terms (rows of the expert outputs and their summed weights).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def moe_layout_count_kernel(idx_ptr, per_rank_ptr, per_expert_ptr, in_rank_ptr,
                            num_tokens, num_topk, experts_per_rank, num_ranks,
                            BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, TABLE: tl.constexpr = False,
                            RANKS_P: tl.constexpr = 0):
    """Grid ``ceil(T / BLOCK_T)``: ``in_rank`` (uint8 ``[T, R]``) and the counts, by integer atomics: per rank
    the tokens selecting one of its experts, per expert the tokens selecting it (once per token). ``TABLE``:
    both into the int64 table ``[R, 1 + experts_per_rank]`` at ``per_rank_ptr`` (row ``r``: rank ``r``'s
    count, then its experts'), as the normal dispatch's count exchange sends it; else int32 ``per_rank [R]``
    and ``per_expert [E]``. ``RANKS_P`` (a power of two ``>= R``, or 0): each program sums its tokens per rank
    first and adds one count per rank (few ranks: thousands of atomics on one counter wait on each other), else
    one atomic per (token, rank)."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.arange(0, BLOCK_K)
    ok = (tok[:, None] < num_tokens) & (slot[None, :] < num_topk)
    ids = tl.load(idx_ptr + tok[:, None].to(tl.int64) * num_topk + slot[None, :], mask=ok, other=-1).to(tl.int32)
    valid = ids >= 0
    ranks = tl.where(valid, ids // experts_per_rank, -1)
    # slot j repeats an earlier slot i < j: compare every pair of slots of a token
    earlier = slot[:, None] < slot[None, :]  # [i, j]
    same_expert = (ids[:, :, None] == ids[:, None, :]) & earlier[None, :, :]
    same_rank = (ranks[:, :, None] == ranks[:, None, :]) & earlier[None, :, :]
    first_expert = valid & (tl.sum(same_expert.to(tl.int32), 1) == 0)
    first_rank = valid & (tl.sum(same_rank.to(tl.int32), 1) == 0)
    width = experts_per_rank + 1
    if TABLE:
        ones = tl.full([BLOCK_T, BLOCK_K], 1, tl.int64)
        at_expert = tl.where(first_expert, ranks * width + 1 + (ids - ranks * experts_per_rank), 0)
        tl.atomic_add(per_rank_ptr + at_expert, ones, mask=first_expert)
    else:
        ones = tl.full([BLOCK_T, BLOCK_K], 1, tl.int32)
        tl.atomic_add(per_expert_ptr + tl.where(first_expert, ids, 0), ones, mask=first_expert)
    if RANKS_P > 0:
        r = tl.arange(0, RANKS_P)
        hits = (ranks[:, :, None] == r[None, None, :]) & first_rank[:, :, None]
        per = tl.sum(tl.sum(hits.to(tl.int32), 1), 0)  # [RANKS_P]: this program's tokens per rank
        live = (r < num_ranks) & (per > 0)
        if TABLE:
            tl.atomic_add(per_rank_ptr + r * width, per.to(tl.int64), mask=live)
        else:
            tl.atomic_add(per_rank_ptr + r, per, mask=live)
    elif TABLE:
        tl.atomic_add(per_rank_ptr + tl.where(first_rank, ranks * width, 0), ones, mask=first_rank)
    else:
        tl.atomic_add(per_rank_ptr + tl.where(first_rank, ranks, 0), ones, mask=first_rank)
    flag = tl.full([BLOCK_T, BLOCK_K], 1, tl.uint8)
    tl.store(in_rank_ptr + tok[:, None].to(tl.int64) * num_ranks + tl.where(first_rank, ranks, 0), flag,
             mask=first_rank)


@triton.jit
def moe_place_rows_kernel(src_ptr, index_ptr, dst_ptr, rows_per_group, num_cols,
                          stride_src, stride_dg, stride_dr, stride_dc,
                          ZERO_MISSING: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    g = p // rows_per_group
    dst = dst_ptr + g.to(tl.int64) * stride_dg + (p - g * rows_per_group).to(tl.int64) * stride_dr + cols * stride_dc
    src_row = tl.load(index_ptr + p)
    if src_row >= 0:
        tl.store(dst, tl.load(src_ptr + src_row * stride_src + cols, mask=ok), mask=ok)
    elif ZERO_MISSING:
        tl.store(dst, tl.zeros([BLOCK_C], dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scatter_row_block(src_ptr, targets_ptr, dst_ptr, j, c, rows_per_group, num_cols, stride_src, stride_dg,
                       stride_dr, stride_dc, Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns block ``c`` of source row ``j`` stored at each of its distinct targets (-1: none)."""
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    live = tl.zeros([], tl.int32)
    for q in tl.static_range(Q):
        live += (tl.load(targets_ptr + j * Q + q) >= 0).to(tl.int32)
    if live > 0:  # the row is read once, then stored at each of its distinct targets
        row = tl.load(src_ptr + j * stride_src + cols, mask=ok)
        for q in tl.static_range(Q):
            target = tl.load(targets_ptr + j * Q + q)
            repeat = tl.zeros([], tl.int32)
            for e in tl.static_range(q):  # an earlier slot of this row naming the same target: already written
                repeat += (tl.load(targets_ptr + j * Q + e) == target).to(tl.int32)
            if (repeat == 0) & (target >= 0):
                g = target // rows_per_group
                dst = dst_ptr + g * stride_dg + (target - g * rows_per_group) * stride_dr + cols * stride_dc
                tl.store(dst, row, mask=ok)


@triton.jit
def moe_scatter_rows_kernel(src_ptr, targets_ptr, dst_ptr, rows_per_group, num_cols,
                            stride_src, stride_dg, stride_dr, stride_dc, Q: tl.constexpr, BLOCK_C: tl.constexpr):
    _scatter_row_block(src_ptr, targets_ptr, dst_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1),
                       rows_per_group, num_cols, stride_src, stride_dg, stride_dr, stride_dc, Q, BLOCK_C)


@triton.jit
def _landed_row(received_ptr, seq_ptr, num_sources, t_max, row_bytes, i):
    """The address (int64) of received row ``i`` where a fixed exchange left it: row ``i % t_max`` of source
    ``i // t_max``'s part at ``received[(seq - 1) & 1, source]`` (``received`` int64 ``[2, num_sources]``, ``seq``
    int64 ``[1]``, the exchange's counter, which it advanced; rows of ``row_bytes``). ``i`` may be a block."""
    source = i // t_max
    base = tl.load(received_ptr + ((tl.load(seq_ptr) - 1) & 1) * num_sources + source)
    return base + (i - source * t_max) * row_bytes


@triton.jit
def moe_scatter_row_pair_kernel(a_src_ptr, a_dst_ptr, a_cols, a_stride_src, a_dg, a_dr, a_dc, a_blocks,
                                b_src_ptr, b_dst_ptr, b_cols, b_stride_src, b_dg, b_dr, b_dc,
                                targets_ptr, rows_per_group, received_ptr, seq_ptr, num_sources, t_max, row_bytes,
                                a_off, b_off, Q: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                LANDED: tl.constexpr):
    """Grid ``(n, a_blocks + cdiv(b_cols, BLOCK_B))``: :func:`moe_scatter_rows_kernel` of two parts of the same
    rows under the same targets in one launch (the low-latency dispatch's payload and its scales): programs
    ``c < a_blocks`` move part ``a``'s column blocks, the others part ``b``'s. ``LANDED``: source row ``j`` is
    where a fixed exchange left it (:func:`_landed_row`), its parts at byte ``a_off`` and ``b_off`` of the row
    (``a_src_ptr`` and ``b_src_ptr`` then only give the parts' types; rows and parts 16-byte aligned)."""
    j = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if LANDED:
        row = _landed_row(received_ptr, seq_ptr, num_sources, t_max, row_bytes, j)
        a_src = tl.multiple_of((row + a_off).to(tl.pointer_type(a_src_ptr.dtype.element_ty)), 16)
        b_src = tl.multiple_of((row + b_off).to(tl.pointer_type(b_src_ptr.dtype.element_ty)), 16)
        a_row, b_row = tl.zeros([], tl.int64), tl.zeros([], tl.int64)  # strides: the rows' own addresses
    else:
        a_src, b_src, a_row, b_row = a_src_ptr, b_src_ptr, a_stride_src, b_stride_src
    if c < a_blocks:
        _scatter_row_block(a_src, targets_ptr, a_dst_ptr, j, c, rows_per_group, a_cols, a_row, a_dg, a_dr, a_dc, Q,
                           BLOCK_A)
    else:
        _scatter_row_block(b_src, targets_ptr, b_dst_ptr, j, c - a_blocks, rows_per_group, b_cols, b_row, b_dg,
                           b_dr, b_dc, Q, BLOCK_B)


@triton.jit
def moe_ll_receive_kernel(meta_ptr, stride_meta, first_local, num_local, slots, recv_token_ptr, recv_local_ptr,
                          valid_ptr, position_ptr, target_ptr, count_ptr, count32_ptr, packed_ptr, count_copy_ptr,
                          received_ptr, seq_ptr, num_sources, t_max, row_bytes, meta_off, K: tl.constexpr,
                          KP: tl.constexpr, BLOCK_S: tl.constexpr, COPY_COUNT: tl.constexpr, LANDED: tl.constexpr):
    """Grid ``L``. ``meta`` int32 ``[S, 1 + K]`` (row stride ``stride_meta``): each received slot's source
    token (-1: unused) and global top-k ids. Program ``l`` walks the slots in order and writes, for the
    entries ``(s, k)`` naming local expert ``l`` (program 0 also those naming none): ``position`` (the rank
    of slot ``s`` among the slots selecting ``l``), ``valid`` (the first slot ``k`` naming ``l`` in row
    ``s``) and ``target`` (``l * S + position`` where valid, else -1); ``count[l]`` (int64 and int32);
    the row ``l`` of ``packed`` (each selecting slot's compact received row: the routed slots before it,
    as routed slots fill each source's block from its start; -1 from ``count[l]`` on); program 0 also
    ``recv_token`` and ``recv_local`` (local ids, -1 for another rank's expert or an unused slot).
    ``COPY_COUNT``: the int32 count also into ``count_copy`` (the handle's copy of ``recv_count``). ``LANDED``:
    slot ``s``'s meta is at byte ``meta_off`` of received row ``s`` where a fixed exchange left it
    (:func:`_landed_row`), not in ``meta``."""
    e = tl.program_id(0)
    j = tl.arange(0, KP)
    jok = j < K
    taken = tl.zeros([], tl.int32)  # slots selecting e so far
    received = tl.zeros([], tl.int32)  # routed slots so far
    for start in range(0, slots, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        sok = s < slots
        s64 = s.to(tl.int64)
        if LANDED:
            landed_at = _landed_row(received_ptr, seq_ptr, num_sources, t_max, row_bytes, tl.where(sok, s64, 0))
            rows = (landed_at + meta_off).to(tl.pointer_type(tl.int32))
        else:
            rows = meta_ptr + s64 * stride_meta
        tok = tl.load(rows, mask=sok, other=-1)
        g = tl.load(rows[:, None] + 1 + j[None, :], mask=sok[:, None] & jok[None, :], other=-1)
        loc = tl.where(tok[:, None] >= 0, _local_ids(g, first_local, num_local), -1)
        names = (loc == e).to(tl.int32)
        # the first slot k naming e in its row: none before it names e (a [S, K] scan, not a [S, K, K] compare)
        first = (loc == e) & (tl.cumsum(names, axis=1) == 1)
        mine = tl.max(names, axis=1)  # [BLOCK_S]: slot s selects e
        routed = (tok >= 0).to(tl.int32)
        pos = tl.broadcast_to((taken + tl.cumsum(mine, axis=0) - 1)[:, None], [BLOCK_S, KP]).to(tl.int64)
        compact = (received + tl.cumsum(routed, axis=0) - 1).to(tl.int64)
        first_program = (tl.zeros([BLOCK_S, KP], tl.int32) + e) == 0
        entries = ((loc == e) | ((loc < 0) & first_program)) & sok[:, None] & jok[None, :]
        at = s64[:, None] * K + j[None, :]
        valid = first
        tl.store(position_ptr + at, pos, mask=entries)
        tl.store(valid_ptr + at, valid.to(tl.int8), mask=entries)
        tl.store(target_ptr + at, tl.where(valid, e.to(tl.int64) * slots + pos, -1), mask=entries)
        if e == 0:
            tl.store(recv_token_ptr + s64, tok.to(tl.int64), mask=sok)
            tl.store(recv_local_ptr + at, loc.to(tl.int64), mask=sok[:, None] & jok[None, :])
        row = e.to(tl.int64) * slots + (taken + tl.cumsum(mine, axis=0) - 1).to(tl.int64)
        tl.store(packed_ptr + row, compact, mask=(mine > 0) & sok)
        taken += tl.sum(mine, axis=0)
        received += tl.sum(routed, axis=0)
    tl.store(count_ptr + e, taken.to(tl.int64))
    tl.store(count32_ptr + e, taken)
    if COPY_COUNT:
        tl.store(count_copy_ptr + e, taken)
    for start in range(0, slots, BLOCK_S):
        p = start + tl.arange(0, BLOCK_S)
        tl.store(packed_ptr + e.to(tl.int64) * slots + p, tl.full([BLOCK_S], -1, tl.int64),
                 mask=(p >= taken) & (p < slots))


@triton.jit
def moe_weighted_rows_kernel(y_ptr, src_pos_ptr, weight_ptr, seg_ptr, out_ptr, num_cols, stride_y,
                             BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr = False):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    acc = tl.zeros([BLOCK_C], tl.float32)
    start, end = tl.load(seg_ptr + r), tl.load(seg_ptr + r + 1)
    if PREFETCH:  # the next row's load is issued before this row's multiply-add (same sum, same order)
        # (a row's flag as a block, cols * 0 + ..., keeps the masks block-shaped for the interpreter)
        first = tl.load(src_pos_ptr + tl.minimum(start, end - 1), mask=start < end, other=0)
        nxt = tl.load(y_ptr + first * stride_y + cols, mask=ok & (cols * 0 + start < end), other=0.0)
        for j in range(start, end):
            cur = nxt
            w = tl.load(weight_ptr + j)
            row = tl.load(src_pos_ptr + tl.minimum(j + 1, end - 1))
            nxt = tl.load(y_ptr + row * stride_y + cols, mask=ok & (cols * 0 + j + 1 < end), other=0.0)
            acc += cur.to(tl.float32) * w
    else:
        for j in range(start, end):
            row = tl.load(src_pos_ptr + j)
            w = tl.load(weight_ptr + j)
            acc += tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + r.to(tl.int64) * num_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def moe_token_rows_kernel(y_ptr, table_ptr, weight_ptr, out_ptr, num_cols, stride_y, win_ptr, seq_ptr, num_ranks,
                          rows_per_rank, K: tl.constexpr, BLOCK_C: tl.constexpr, DIRECT: tl.constexpr = False,
                          ADDRESSED: tl.constexpr = False, LANDED: tl.constexpr = False):
    """Grid ``(T, ceil(C / BLOCK_C))``: ``out[t] = sum_j weight[t, j] * y[table[t, j]]`` in float32 over the
    ``K`` entries of row ``t`` of ``table`` in column order, skipping ``-1``; the same multiply-add as
    :func:`moe_weighted_rows_kernel` (so the same bits for the same terms in the same order), without the
    sort by destination that kernel's segments need. ``DIRECT``: row ``t`` is row ``t % rows_per_rank`` of rank
    ``t // rows_per_rank``'s part, stored straight into its memory at ``win[seq & 1, rank]`` (``win`` int64
    ``[2, num_ranks]``, rows of ``C`` elements of ``out``'s type, 16-byte aligned). ``ADDRESSED``: the table
    holds each row's address (16-byte aligned, any memory mapped here, e.g. a peer's block), not its index
    in ``y`` (``y_ptr`` then only gives the rows' type). ``LANDED``: row ``i`` of ``y`` is row ``i %
    rows_per_rank`` of source ``i // rows_per_rank``'s part where a fixed exchange left it, at ``win[(seq - 1) &
    1, source]`` (this rank's slots, 16-byte aligned rows of ``num_cols`` elements; ``y_ptr`` gives the type)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    acc = tl.zeros([BLOCK_C], tl.float32)
    for j in tl.static_range(K):
        row = tl.load(table_ptr + t * K + j)
        w = tl.load(weight_ptr + t * K + j)
        if row >= 0:
            if ADDRESSED:
                src = tl.multiple_of(row.to(tl.pointer_type(y_ptr.dtype.element_ty)), 16) + cols
            elif LANDED:
                source = row // rows_per_rank
                base = tl.load(win_ptr + ((tl.load(seq_ptr) - 1) & 1) * num_ranks + source)
                row_bytes = num_cols * (y_ptr.dtype.element_ty.primitive_bitwidth // 8)
                row_at = base + (row - source * rows_per_rank) * row_bytes
                src = tl.multiple_of(row_at.to(tl.pointer_type(y_ptr.dtype.element_ty)), 16) + cols
            else:
                src = y_ptr + row * stride_y + cols
            acc += tl.load(src, mask=ok, other=0.0).to(tl.float32) * w
    if DIRECT:
        rank = t // rows_per_rank
        base = tl.load(win_ptr + (tl.load(seq_ptr) & 1) * num_ranks + rank)
        row_at = base + (t - rank * rows_per_rank) * num_cols * out_ptr.dtype.element_ty.primitive_bitwidth // 8
        dst = tl.multiple_of(row_at.to(tl.pointer_type(out_ptr.dtype.element_ty)), 16) + cols
    else:
        dst = out_ptr + t * num_cols + cols
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def moe_rank_rows_kernel(like_ptr, in_rank_ptr, cumsum_ptr, base_ptr, own, me, out_ptr, num_cols, num_tokens,
                         table_ptr, WORLD: tl.constexpr, BLOCK_C: tl.constexpr, FROM_TABLE: tl.constexpr):
    """Grid ``(T, ceil(C / BLOCK_C))``: ``out[t]``, the float32 sum over ranks ``r`` in order with
    ``in_rank[t, r]`` (uint8 ``[T, WORLD]``) of the row of ``C`` elements of ``like``'s type at ``base[r] +
    (cumsum[r, t] - 1) * row_bytes`` (``own`` instead of ``base[r]`` for ``r == me``; ``cumsum`` int64 ``[WORLD,
    T]``, rank ``r``'s running count of ``in_rank[:, r]`` up to token ``t``: its rows are its tokens in order; laid
    out by rank so that it is torch's fast inner-dimension scan), rounded
    once to ``out``'s type. The terms and their order of :func:`moe_token_rows_kernel` with ``ADDRESSED``
    over the table of those addresses and weights of one (the same bits), with the addresses made here.
    ``FROM_TABLE``: ``own`` and ``out``'s address are read from ``table`` (int64: ``table[1]`` the output,
    ``table[2]`` ``own``; :mod:`deepport.backends.triton.moe_sum_graph`), ``out_ptr`` giving only its type."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    if FROM_TABLE:
        own = tl.load(table_ptr + 2)
        out_ptr = tl.load(table_ptr + 1).to(tl.pointer_type(out_ptr.dtype.element_ty))
    acc = tl.zeros([BLOCK_C], tl.float32)
    row_bytes = num_cols * (like_ptr.dtype.element_ty.primitive_bitwidth // 8)
    for r in tl.static_range(WORLD):
        if tl.load(in_rank_ptr + t * WORLD + r) != 0:
            start = tl.where(me == r, own, tl.load(base_ptr + r))
            row_at = start + (tl.load(cumsum_ptr + r * num_tokens + t) - 1) * row_bytes
            src = tl.multiple_of(row_at.to(tl.pointer_type(like_ptr.dtype.element_ty)), 16) + cols
            acc += tl.load(src, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * num_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def moe_receive_meta_kernel(meta_ptr, stride_meta, num_rows, src_ptr, local_ptr, weight_ptr, first_local, num_local,
                            K: tl.constexpr, KP: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid ``ceil(n / BLOCK_R)``: from received int32 rows ``meta [n, 1 + K (+ K)]`` (row stride
    ``stride_meta``: source token, the ``K`` global expert ids (, the ``K`` weights' bits)), ``src [n]`` int64
    the source token, ``local [n, K]`` int64 each id minus ``first_local`` where that lies in ``[0,
    num_local)`` (and the id is ``>= 0``), else -1, and with ``HAS_WEIGHTS`` ``weight [n, K]`` float32 the
    weight's bits where the id is local, else 0."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    live = r < num_rows
    tl.store(src_ptr + r, tl.load(meta_ptr + r * stride_meta, mask=live, other=0).to(tl.int64), mask=live)
    j = tl.arange(0, KP)
    cell = live[:, None] & (j[None, :] < K)
    ids = tl.load(meta_ptr + r[:, None] * stride_meta + 1 + j[None, :], mask=cell, other=-1).to(tl.int64)
    local = _local_ids(ids, first_local, num_local)
    tl.store(local_ptr + r[:, None] * K + j[None, :], local, mask=cell)
    if HAS_WEIGHTS:
        bits = tl.load(meta_ptr + r[:, None] * stride_meta + 1 + K + j[None, :], mask=cell, other=0)
        tl.store(weight_ptr + r[:, None] * K + j[None, :], tl.where(local >= 0, bits, 0).to(tl.float32, bitcast=True),
                 mask=cell)


@triton.jit
def moe_rows_to_blocks_kernel(x_ptr, scale_ptr, idx_ptr, weight_ptr, in_rank_ptr, cumsum_ptr, base_ptr, x_out_ptr,
                              scale_out_ptr, src_out_ptr, local_out_ptr, weight_out_ptr, own_start, me, first_local,
                              num_local, num_tokens, x_words, num_scales, stride_st, stride_sc, row_bytes, scale_at,
                              meta_at, table_ptr, send_at, count_ptr, stride_count, WORLD: tl.constexpr,
                              K: tl.constexpr, KP: tl.constexpr, META: tl.constexpr, MP: tl.constexpr,
                              HAS_SCALES: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_S: tl.constexpr, FROM_TABLE: tl.constexpr, ROWS: tl.constexpr,
                              COUNTED: tl.constexpr):
    """Grid ``(T, ceil(x_words / BLOCK_C))``: token ``t``'s packed row for every other rank ``r`` with
    ``in_rank[t, r]`` (uint8 ``[T, WORLD]``), row ``cumsum[r, t] - 1`` (int64 ``[WORLD, T]``: the tokens of
    ``r`` in order) of the rows at ``base[r]`` (int64 ``[WORLD]``; ``row_bytes`` apart, 16-byte aligned):
    ``x``'s row as words at byte 0 (``x_words`` words of ``x``'s type, dense rows); from column block 0 its
    float32 scales at byte ``scale_at`` (``[T, num_scales]``, strides ``stride_st, stride_sc``) and its int32
    metadata at byte ``meta_at`` (``META`` words: ``t``, the ``K`` ids of ``idx`` (int64 ``[T, K]``), with
    ``HAS_WEIGHTS`` the bits of the ``K`` float32 weights). For ``r == me`` the row goes straight into the
    outputs at row ``own_start + cumsum - 1``: the words into ``x_out``, the scales into ``scale_out``,
    ``t`` into ``src_out`` (int64), the ids minus ``first_local`` where in ``[0, num_local)`` (else -1) into
    ``local_out`` (int64 ``[n, K]``) and the weights where the id is local (else 0) into ``weight_out``.
    ``ROWS``: 0 every row, 1 only the other ranks' (into the blocks), 2 only this rank's own (into the outputs:
    a second launch that runs while the blocks travel). ``FROM_TABLE``: the addresses of ``x``, ``scale``,
    ``weight``, ``x_out``, ``scale_out``, ``src_out``, ``local_out``, ``weight_out`` and ``own_start`` are read
    from ``table`` (int64, in that order; the arguments give only the types:
    :mod:`deepport.backends.triton.moe_route_graph`), and the kernel also
    copies ``in_rank`` and ``idx`` to ``table[9]`` and ``table[10]`` and writes its own rows' local ids to
    ``table[11]`` too (the handle's copies and the caller's). ``COUNTED``: no ``base``; the parts lie one after
    another from address ``send_at`` in rank order, rank ``q``'s ``count[q * stride_count]`` rows long (int64),
    this rank's left out (one send buffer whose counts only the device knows yet)."""
    if FROM_TABLE:
        x_ptr = _table_ptr(table_ptr, 0, x_ptr)
        scale_ptr = _table_ptr(table_ptr, 1, scale_ptr)
        weight_ptr = _table_ptr(table_ptr, 2, weight_ptr)
        x_out_ptr = _table_ptr(table_ptr, 3, x_out_ptr)
        scale_out_ptr = _table_ptr(table_ptr, 4, scale_out_ptr)
        src_out_ptr = _table_ptr(table_ptr, 5, src_out_ptr)
        local_out_ptr = _table_ptr(table_ptr, 6, local_out_ptr)
        weight_out_ptr = _table_ptr(table_ptr, 7, weight_out_ptr)
        own_start = tl.load(table_ptr + 8)
        in_rank_copy = tl.load(table_ptr + 9).to(tl.pointer_type(in_rank_ptr.dtype.element_ty))
        idx_copy = _table_ptr(table_ptr, 10, idx_ptr)
        local_copy = _table_ptr(table_ptr, 11, local_out_ptr)
    t = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    if FROM_TABLE:  # noqa: SIM102 (a constexpr branch: the names it reads exist only in table mode)
        if cb == 0:
            jk = tl.arange(0, KP)
            tl.store(idx_copy + t * K + jk, tl.load(idx_ptr + t * K + jk, mask=jk < K), mask=jk < K)
            for q in tl.static_range(WORLD):
                tl.store(in_rank_copy + t * WORLD + q, tl.load(in_rank_ptr + t * WORLD + q))
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < x_words
    words = tl.load(x_ptr + t * x_words + cols, mask=ok)
    m = tl.arange(0, MP)  # the metadata and the scales: small, loaded by every program
    ids = tl.load(idx_ptr + t * K + (m - 1), mask=(m >= 1) & (m <= K), other=0).to(tl.int32)
    meta = tl.where(m == 0, t.to(tl.int32), ids)
    if HAS_WEIGHTS:
        wbits = tl.load(weight_ptr + t * K + (m - 1 - K), mask=(m > K) & (m <= 2 * K), other=0.0)
        meta = tl.where(m > K, wbits.to(tl.int32, bitcast=True), meta)
    s = tl.arange(0, BLOCK_S)
    if HAS_SCALES:
        scales = tl.load(scale_ptr + t * stride_st + s * stride_sc, mask=s < num_scales)
    for r in tl.static_range(WORLD):
        if tl.load(in_rank_ptr + t * WORLD + r) != 0:
            pos = tl.load(cumsum_ptr + r * num_tokens + t) - 1
            if me == r:
                if ROWS != 1:
                    row = own_start + pos
                    tl.store(x_out_ptr + row * x_words + cols, words, mask=ok)
                    if cb == 0:
                        if HAS_SCALES:
                            tl.store(scale_out_ptr + row * num_scales + s, scales, mask=s < num_scales)
                        tl.store(src_out_ptr + row, t)
                        j = tl.arange(0, KP)
                        own_ids = tl.load(idx_ptr + t * K + j, mask=j < K, other=-1)
                        local = _local_ids(own_ids, first_local, num_local)
                        tl.store(local_out_ptr + row * K + j, local, mask=j < K)
                        if FROM_TABLE:
                            tl.store(local_copy + row * K + j, local, mask=j < K)
                        if HAS_WEIGHTS:
                            w = tl.load(weight_ptr + t * K + j, mask=j < K, other=0.0)
                            tl.store(weight_out_ptr + row * K + j, tl.where(local >= 0, w, 0.0), mask=j < K)
            elif ROWS != 2:
                if COUNTED:
                    ahead = pos
                    for q in tl.static_range(r):  # the rows of the ranks before r, this rank's left out
                        ahead += tl.where(me == q, 0, tl.load(count_ptr + q * stride_count))
                    row_at = send_at + ahead * row_bytes
                else:
                    row_at = tl.load(base_ptr + r) + pos * row_bytes
                dst = tl.multiple_of(row_at.to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
                tl.store(dst + cols, words, mask=ok)
                if cb == 0:
                    tl.store((row_at + meta_at).to(tl.pointer_type(tl.int32)) + m, meta, mask=m < META)
                    if HAS_SCALES:
                        scale_dst = (row_at + scale_at).to(tl.pointer_type(tl.float32))
                        tl.store(scale_dst + s, scales, mask=s < num_scales)


@triton.jit
def _local_ids(ids, first_local, num_local):
    """Each global expert id of ``ids`` minus ``first_local`` where that lies in ``[0, num_local)`` (and the id
    is ``>= 0``), else -1: the ids local to the rank whose experts start at ``first_local``."""
    local = ids - first_local
    return tl.where((ids >= 0) & (local >= 0) & (local < num_local), local, -1)


@triton.jit
def _table_ptr(table_ptr, at: tl.constexpr, like):
    """Entry ``at`` of the int64 ``table`` as a pointer of ``like``'s type, 16-byte aligned (the table's writer
    checks every address it stores)."""
    return tl.multiple_of(tl.load(table_ptr + at).to(tl.pointer_type(like.dtype.element_ty)), 16)


@triton.jit
def moe_blocks_to_rows_kernel(base_ptr, count_ptr, stride_count, x_out_ptr, scale_out_ptr, src_ptr, local_ptr,
                              weight_out_ptr, me, x_words, num_scales, row_bytes, scale_at, meta_at,
                              first_local, num_local, table_ptr, WORLD: tl.constexpr, K: tl.constexpr,
                              KP: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, FROM_TABLE: tl.constexpr):
    """Grid ``(n, ceil(x_words / BLOCK_C))``: received row ``i`` (rows by source rank, ``count[s]`` int64 from
    source ``s``, at stride ``stride_count``) is row ``i - (rows of lower sources)`` of the packed rows at
    ``base[s]`` (the layout :func:`moe_rows_to_blocks_kernel` writes): its words into ``x_out[i]``, its
    scales into ``scale_out[i]``, and from its metadata ``src[i]`` (int64), ``local[i]`` (int64 ``[n, K]``)
    the ids minus ``first_local`` where in ``[0, num_local)``, else -1, and with ``HAS_WEIGHTS``
    ``weight_out[i]`` the weights where the id is local, else 0. Rows from this rank (``s == me``) are left
    alone: :func:`moe_rows_to_blocks_kernel` wrote them. ``FROM_TABLE``: grid ``(G, ceil(x_words / BLOCK_C))``,
    the ``G`` programs of a column block stride over the ``n = sum(count)`` rows (read here), the outputs'
    addresses are entries 3 to 7 of ``table`` (as :func:`moe_rows_to_blocks_kernel` reads them), and the local
    ids go to ``table[11]`` too."""
    cb = tl.program_id(1)
    if FROM_TABLE:
        x_out_ptr = _table_ptr(table_ptr, 3, x_out_ptr)
        scale_out_ptr = _table_ptr(table_ptr, 4, scale_out_ptr)
        src_ptr = _table_ptr(table_ptr, 5, src_ptr)
        local_ptr = _table_ptr(table_ptr, 6, local_ptr)
        weight_out_ptr = _table_ptr(table_ptr, 7, weight_out_ptr)
        local_copy = _table_ptr(table_ptr, 11, local_ptr)
        n = tl.zeros([], tl.int64)
        for r in tl.static_range(WORLD):
            n += tl.load(count_ptr + r * stride_count)
        for i in range(tl.program_id(0).to(tl.int64), n, tl.num_programs(0)):
            _block_row(i, cb, base_ptr, count_ptr, stride_count, x_out_ptr, scale_out_ptr, src_ptr, local_ptr,
                       local_copy, weight_out_ptr, me, x_words, num_scales, row_bytes, scale_at, meta_at, first_local,
                       num_local, WORLD, K, KP, HAS_SCALES, HAS_WEIGHTS, BLOCK_C, BLOCK_S, True)
    else:
        _block_row(tl.program_id(0).to(tl.int64), cb, base_ptr, count_ptr, stride_count, x_out_ptr, scale_out_ptr,
                   src_ptr, local_ptr, local_ptr, weight_out_ptr, me, x_words, num_scales, row_bytes, scale_at,
                   meta_at, first_local, num_local, WORLD, K, KP, HAS_SCALES, HAS_WEIGHTS, BLOCK_C, BLOCK_S, False)


@triton.jit
def _block_row(i, cb, base_ptr, count_ptr, stride_count, x_out_ptr, scale_out_ptr, src_ptr, local_ptr, local_copy,
               weight_out_ptr, me, x_words, num_scales, row_bytes, scale_at, meta_at, first_local, num_local,
               WORLD: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, HAS_SCALES: tl.constexpr,
               HAS_WEIGHTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, COPY_LOCAL: tl.constexpr):
    """Column block ``cb`` of received row ``i`` for :func:`moe_blocks_to_rows_kernel` (``COPY_LOCAL``: the
    local ids to ``local_copy`` too)."""
    s = tl.zeros([], tl.int64)
    start = tl.zeros([], tl.int64)
    below = tl.zeros([], tl.int64)
    for r in tl.static_range(WORLD - 1):  # the source: how many sources' rows all lie below row i
        below += tl.load(count_ptr + r * stride_count)
        s = tl.where(i >= below, r + 1, s)
        start = tl.where(i >= below, below, start)
    row_at = tl.load(base_ptr + s) + (i - start) * row_bytes
    if s != me:
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = cols < x_words
        words = tl.load(tl.multiple_of(row_at.to(tl.pointer_type(x_out_ptr.dtype.element_ty)), 16) + cols, mask=ok)
        tl.store(x_out_ptr + i * x_words + cols, words, mask=ok)
        if HAS_SCALES and cb == 0:
            c = tl.arange(0, BLOCK_S)
            scales = tl.load((row_at + scale_at).to(tl.pointer_type(tl.float32)) + c, mask=c < num_scales)
            tl.store(scale_out_ptr + i * num_scales + c, scales, mask=c < num_scales)
    if cb == 0 and s != me:
        meta = (row_at + meta_at).to(tl.pointer_type(tl.int32))
        tl.store(src_ptr + i, tl.load(meta).to(tl.int64))
        j = tl.arange(0, KP)
        ids = tl.load(meta + 1 + j, mask=j < K, other=-1).to(tl.int64)
        local = _local_ids(ids, first_local, num_local)
        tl.store(local_ptr + i * K + j, local, mask=j < K)
        if COPY_LOCAL:
            tl.store(local_copy + i * K + j, local, mask=j < K)
        if HAS_WEIGHTS:
            bits = tl.load(meta + 1 + K + j, mask=j < K, other=0)
            tl.store(weight_out_ptr + i * K + j, tl.where(local >= 0, bits, 0).to(tl.float32, bitcast=True),
                     mask=j < K)


@triton.jit
def moe_token_table_kernel(src_row_ptr, expert_ptr, token_of_ptr, topk_ptr, row_weight_ptr, table_ptr,
                           table_weight_ptr, num_rows, stride_topk, K: tl.constexpr, KP: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """Grid ``ceil(R / BLOCK_R)``: the one-process expanded combine's per-token table. Expanded row ``r``
    with ``src_row[r] >= 0`` (received token ``s``, token ``token_of[s]``, expert ``expert[r]``) goes to
    column ``K - n + rank`` of its token's row of ``table`` (``-1`` before; ``table_weight`` gets
    ``row_weight[r]``), where ``n`` is the number of distinct experts ``>= 0`` among the token's ``K``
    top-k slots (``topk[s]``, row stride ``stride_topk``) and ``rank`` how many of them are below
    ``expert[r]``: the token's rows in ascending order, as rows are laid out by ascending expert, ``-1``
    entries first. ``KP``: ``K`` rounded up to a power of two."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    src = tl.load(src_row_ptr + r, mask=r < num_rows, other=-1).to(tl.int64)
    live = src >= 0
    s = tl.where(live, src, 0)
    token = tl.load(token_of_ptr + s, mask=live, other=0).to(tl.int64)
    expert = tl.load(expert_ptr + r, mask=live, other=0).to(tl.int64)
    j = tl.arange(0, KP)
    ids = tl.load(topk_ptr + s[:, None] * stride_topk + j[None, :], mask=live[:, None] & (j[None, :] < K),
                  other=-1).to(tl.int64)  # [BLOCK_R, KP]
    # a slot counts once per distinct expert: no earlier slot of the token names the same one
    earlier = (ids[:, :, None] == ids[:, None, :]) & (j[None, None, :] < j[None, :, None])
    first = (ids >= 0) & (tl.max(earlier.to(tl.int32), axis=2) == 0)
    n = tl.sum(first.to(tl.int32), axis=1)
    rank = tl.sum((first & (ids < expert[:, None])).to(tl.int32), axis=1)
    at = token * K + (K - n + rank).to(tl.int64)
    tl.store(table_ptr + at, r.to(tl.int64), mask=live)
    tl.store(table_weight_ptr + at, tl.load(row_weight_ptr + r, mask=live, other=0.0), mask=live)


@triton.jit
def moe_ll_layout_kernel(idx_ptr, stride_idx, src_ptr, packed_ptr, count_ptr, num_tokens, capacity,
                         K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid ``E``: the one-process low-latency layout of expert ``e`` from ``idx [T, K]`` (row stride
    ``stride_idx``, ids in ``[-1, E)``, ``T <= capacity``): ``src[e, p]`` the ``p``-th token selecting ``e``
    in any slot (tokens ascending), ``packed[e, p]`` that token's received row (its rank among the tokens
    selecting any expert), both ``-1`` from ``count[e]`` (int32) to ``capacity``."""
    e = tl.program_id(0)
    j = tl.arange(0, KP)
    taken = tl.zeros([], tl.int32)  # rows of e so far
    received = tl.zeros([], tl.int32)  # tokens selecting any expert so far
    for start in range(0, num_tokens, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        ids = tl.load(idx_ptr + t.to(tl.int64)[:, None] * stride_idx + j[None, :],
                      mask=(t < num_tokens)[:, None] & (j[None, :] < K), other=-1)
        mine = tl.max((ids == e).to(tl.int32), axis=1)  # [BLOCK_T]: 1 where the token selects e
        routed = tl.max((ids >= 0).to(tl.int32), axis=1)
        at = e.to(tl.int64) * capacity + (taken + tl.cumsum(mine, axis=0) - 1)
        tl.store(src_ptr + at, t.to(tl.int64), mask=mine > 0)
        tl.store(packed_ptr + at, (received + tl.cumsum(routed, axis=0) - 1).to(tl.int64), mask=mine > 0)
        taken += tl.sum(mine, axis=0)
        received += tl.sum(routed, axis=0)
    tl.store(count_ptr + e, taken)
    for start in range(0, capacity, BLOCK_T):
        p = start + tl.arange(0, BLOCK_T)
        rest = (p >= taken) & (p < capacity)
        at = e.to(tl.int64) * capacity + p
        tl.store(src_ptr + at, tl.full([BLOCK_T], -1, tl.int64), mask=rest)
        tl.store(packed_ptr + at, tl.full([BLOCK_T], -1, tl.int64), mask=rest)


@triton.jit
def moe_ll_positions_kernel(idx_ptr, stride_idx, src_pos_ptr, capacity, K: tl.constexpr, KP: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    """Grid ``T``: for token ``t`` and slot ``k`` with ``e = idx[t, k] >= 0``, ``src_pos[t, k] = e * capacity +``
    the number of tokens before ``t`` selecting ``e`` in any slot (``t``'s row in ``e``'s packed block,
    the one-process low-latency layout); ``-1`` where ``idx[t, k] < 0``."""
    t = tl.program_id(0)
    j = tl.arange(0, KP)
    mine = tl.load(idx_ptr + t.to(tl.int64) * stride_idx + j, mask=j < K, other=-1).to(tl.int64)  # [KP]
    before = tl.zeros([KP], tl.int32)
    for start in range(0, t, BLOCK_T):
        u = start + tl.arange(0, BLOCK_T)
        ids = tl.load(idx_ptr + u.to(tl.int64)[:, None] * stride_idx + j[None, :],
                      mask=(u < t)[:, None] & (j[None, :] < K), other=-1).to(tl.int64)  # [BLOCK_T, KP]
        hit = tl.max((ids[None, :, :] == mine[:, None, None]).to(tl.int32), axis=2)  # [KP, BLOCK_T]
        before += tl.sum(hit, axis=1)
    pos = tl.where(mine >= 0, mine * capacity + before.to(tl.int64), -1)
    tl.store(src_pos_ptr + t.to(tl.int64) * K + j, pos, mask=j < K)


@triton.jit
def _cast_block(x, fp8_max, amax_floor):
    """One 128-channel block ``x`` (float32) cast by DeepEP's rule: ``(scaled, amax)``, ``scaled`` still float32
    (the caller stores it as e4m3, rounding to nearest even, or as float32 under the interpreter)."""
    amax = tl.maximum(tl.max(tl.abs(x), 0), amax_floor)
    scaled = x * tl.div_rn(fp8_max + tl.zeros([], tl.float32), amax)  # float32(448 / amax), correctly rounded
    return scaled, amax


@triton.jit
def _cast_blocks(x, fp8_max, amax_floor):
    """:func:`_cast_block` of each row of ``x`` (float32 ``[B, 128]``, one 128-channel block per row), the same
    operations per element: ``(scaled [B, 128], amax [B])``."""
    amax = tl.maximum(tl.max(tl.abs(x), 1), amax_floor)
    scaled = x * tl.div_rn(fp8_max + tl.zeros_like(amax), amax)[:, None]
    return scaled, amax


@triton.jit
def moe_cast_fp8_kernel(x_ptr, q_ptr, scale_ptr, hidden, fp8_max, fp8_max_inv, amax_floor,
                        STORE_FP32: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * 128 + tl.arange(0, 128)
    scaled, amax = _cast_block(tl.load(x_ptr + t * hidden + cols).to(tl.float32), fp8_max, amax_floor)
    if STORE_FP32:
        tl.store(q_ptr + t * hidden + cols, scaled)
    else:
        tl.store(q_ptr + t * hidden + cols, scaled.to(tl.float8e4nv))
    tl.store(scale_ptr + t * (hidden // 128) + blk, amax * fp8_max_inv)  # float32(amax * float32(1/448))


@triton.jit
def moe_ll_send_rows_kernel(x_ptr, stride_x, idx_ptr, stride_idx, num_tokens, num_local, num_ranks, t_max,
                            in_rank_ptr, send_slot_ptr, target_ptr, meta_ptr, stride_meta, q_ptr, stride_q,
                            scale_ptr, stride_s, hidden, blocks_per_program, fp8_max, fp8_max_inv, amax_floor,
                            win_ptr, seq_ptr, row_bytes, meta_off, q_off, scale_off, idx_copy_ptr,
                            K: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, BLOCK_T: tl.constexpr,
                            CAST: tl.constexpr, STORE_FP32: tl.constexpr, DIRECT: tl.constexpr,
                            DIRECT_Q: tl.constexpr, META_ALIGN: tl.constexpr, Q_ALIGN: tl.constexpr,
                            S_ALIGN: tl.constexpr, COPY_IDX: tl.constexpr, BPP: tl.constexpr):
    """Grid ``(T, ceil(H / 128 / blocks_per_program))``: the whole sender's side of a multi-rank low-latency
    dispatch for token ``t``. Program ``(t, c)`` moves the payload's 128-channel blocks from
    ``c * blocks_per_program`` on, all of them as one ``[BPP, 128]`` tile (``BPP``: ``blocks_per_program``
    rounded up to a power of two); program ``(t, 0)`` also writes the routes and metadata. Every program
    finds the token's ranks (``idx [T, K]`` global ids, -1 none; ``num_local`` experts per rank) and its row
    in each one's block of ``t_max`` send rows (the tokens before it that select an expert of that rank,
    counted by walking ``idx`` in steps of ``BLOCK_T``). Routes: ``in_rank[t, r]`` (uint8), ``send_slot[t,
    r]`` (-1 if none) and ``target[t, r] = r * t_max + send_slot`` (-1 if none); each sent row's int32
    ``meta`` (token, ``K`` ids); token -1 into the token's share of each block's unused rows. Payload of each
    sent row: with ``CAST``, :func:`moe_cast_fp8_kernel`'s blocks of bf16 ``x`` (e4m3 into ``q``, scales
    into ``scale``), computed once per block whatever the number of rows; without, ``x``'s row bits copied
    into ``q`` (both integer views of one width).

    ``DIRECT``: no send buffer. Rank ``r``'s rows go straight into its memory: row ``i`` of its block at the
    address ``win[seq & 1, r] + i * row_bytes`` (``win`` int64 ``[2, R]``, ``seq`` int64 ``[1]``, read here so a
    captured graph follows the exchanges), its meta, payload and scales at byte ``meta_off``, ``q_off`` and
    ``scale_off`` of the row (aligned to ``META_ALIGN``, ``Q_ALIGN`` and ``S_ALIGN`` bytes). ``DIRECT_Q`` False
    (with ``STORE_FP32``): the payload still goes to the local ``q`` rows, to be rounded and moved by
    :func:`moe_ll_window_rows_kernel`.

    ``COPY_IDX``: program ``(t, 0)`` also writes token ``t``'s ids as int64 into row ``t`` of ``idx_copy``
    (``[T, K]`` contiguous: the handle's copy of ``topk_idx``)."""
    t = tl.program_id(0)
    t64 = t.to(tl.int64)
    j = tl.arange(0, KP)
    r = tl.arange(0, RP)
    rok = r < num_ranks
    # rank r holds the ids [r * num_local, (r + 1) * num_local): compared, never divided (a 64-bit division per
    # id and rank in every program made the kernel 3x slower)
    lo, hi = r * num_local, (r + 1) * num_local
    ids = tl.load(idx_ptr + t64 * stride_idx + j, mask=j < K, other=-1).to(tl.int32)
    mine = tl.max(((ids[:, None] >= lo[None, :]) & (ids[:, None] < hi[None, :])).to(tl.int32), axis=0) > 0
    before = tl.zeros([RP], tl.int32)
    total = tl.zeros([RP], tl.int32)
    for start in range(0, num_tokens, BLOCK_T):
        u = start + tl.arange(0, BLOCK_T)
        g = tl.load(idx_ptr + u.to(tl.int64)[:, None] * stride_idx + j[None, :],
                    mask=(u < num_tokens)[:, None] & (j[None, :] < K), other=-1).to(tl.int32)
        hit = tl.max(((g[:, :, None] >= lo[None, None, :]) & (g[:, :, None] < hi[None, None, :])).to(tl.int32),
                     axis=1)
        total += tl.sum(hit, axis=0)
        before += tl.sum(tl.where((u < t)[:, None], hit, 0), axis=0)
    row = r.to(tl.int64) * t_max + before.to(tl.int64)  # [RP]: this token's send row in each rank's block
    sent = mine & rok
    if DIRECT:  # the address of this token's row in each rank's slot for this rank
        base = tl.load(win_ptr + (tl.load(seq_ptr) & 1) * num_ranks + r, mask=rok, other=0)
        row_at = base + before.to(tl.int64) * row_bytes
        meta_row = tl.multiple_of((row_at + meta_off).to(tl.pointer_type(tl.int32)), META_ALIGN)
    else:
        base = tl.zeros([RP], tl.int64)
        row_at = base
        meta_row = meta_ptr + row * stride_meta
    chunk = tl.program_id(1)
    if chunk == 0:
        tl.store(in_rank_ptr + t64 * num_ranks + r, mine.to(tl.uint8), mask=rok)
        tl.store(send_slot_ptr + t64 * num_ranks + r, tl.where(mine, before.to(tl.int64), -1), mask=rok)
        tl.store(target_ptr + t64 * num_ranks + r, tl.where(mine, row, -1), mask=rok)
        if COPY_IDX:
            tl.store(idx_copy_ptr + t64 * K + j, tl.load(idx_ptr + t64 * stride_idx + j, mask=j < K), mask=j < K)
        tl.store(meta_row, tl.zeros([RP], tl.int32) + t, mask=sent)
        tl.store(meta_row[:, None] + 1 + j[None, :],
                 tl.broadcast_to(ids[None, :], [RP, KP]).to(tl.int32), mask=sent[:, None] & (j[None, :] < K))
        for p0 in range(0, t_max, num_tokens):  # unused rows p = total + t, total + t + T, ... of each block
            p = total + p0 + t
            if DIRECT:
                unused = tl.multiple_of((base + p.to(tl.int64) * row_bytes + meta_off).to(tl.pointer_type(tl.int32)),
                                        META_ALIGN)
            else:
                unused = meta_ptr + (r.to(tl.int64) * t_max + p) * stride_meta
            tl.store(unused, tl.full([RP], -1, tl.int32), mask=rok & (p < t_max))
    if DIRECT:
        scale_row = tl.multiple_of((row_at + scale_off).to(tl.pointer_type(tl.float32)), S_ALIGN)
    else:
        scale_row = scale_ptr + row * stride_s
    if DIRECT_Q:
        if CAST:
            q_row = tl.multiple_of((row_at + q_off).to(tl.pointer_type(tl.float8e4nv)), Q_ALIGN)
        else:
            q_row = tl.multiple_of((row_at + q_off).to(tl.pointer_type(x_ptr.dtype.element_ty)), Q_ALIGN)
    else:
        q_row = q_ptr + row * stride_q
    # this program's blocks as one tile: every load in flight at once (one block at a time, each a load, a
    # reduction and stores in turn, made the kernel a chain of 8 round trips)
    first = chunk * blocks_per_program
    blk = first + tl.arange(0, BPP)
    bok = (blk < first + blocks_per_program) & (blk < tl.cdiv(hidden, 128))  # CAST: H % 128 == 0
    cols = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [BPP, 128]
    cok = bok[:, None] & (cols < hidden)
    x = tl.load(x_ptr + t64 * stride_x + cols, mask=cok, other=0)
    dst = q_row[:, None, None] + cols[None, :, :]  # [RP, BPP, 128]
    keep = sent[:, None, None] & cok[None, :, :]
    if CAST:
        scaled, amax = _cast_blocks(x.to(tl.float32), fp8_max, amax_floor)
        if STORE_FP32:
            tl.store(dst, tl.broadcast_to(scaled[None, :, :], [RP, BPP, 128]), mask=keep)
        else:
            tl.store(dst, tl.broadcast_to(scaled.to(tl.float8e4nv)[None, :, :], [RP, BPP, 128]), mask=keep)
        tl.store(scale_row[:, None] + blk[None, :], tl.broadcast_to((amax * fp8_max_inv)[None, :], [RP, BPP]),
                 mask=sent[:, None] & bok[None, :])
    else:
        tl.store(dst, tl.broadcast_to(x[None, :, :], [RP, BPP, 128]), mask=keep)


@triton.jit
def moe_ll_window_rows_kernel(src_ptr, stride_src, target_ptr, win_ptr, seq_ptr, num_ranks, t_max, row_bytes,
                              part_off, width, BLOCK: tl.constexpr):
    """Grid ``(T * R, cdiv(width, BLOCK))``: the bytes ``src[target[t, r], :width]`` (uint8 rows) of every sent
    pair ``(t, r)`` (``target [T, R]`` = ``r * t_max + slot``, -1 none) to byte ``part_off`` of row ``slot`` at
    ``win[seq & 1, r]`` (the layout of :func:`moe_ll_send_rows_kernel`'s ``DIRECT`` rows). The interpreter's
    FP8 payload takes this way: staged in float32, rounded by torch, then moved here."""
    pair = tl.program_id(0)
    r = pair % num_ranks
    row = tl.load(target_ptr + pair)
    if row >= 0:
        slot = row - r.to(tl.int64) * t_max
        base = tl.load(win_ptr + (tl.load(seq_ptr) & 1) * num_ranks + r)
        dst = (base + slot * row_bytes + part_off).to(tl.pointer_type(tl.uint8))
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + c, tl.load(src_ptr + row * stride_src + c, mask=c < width), mask=c < width)


@triton.jit
def moe_ll_return_kernel(idx_ptr, stride_idx, weight_ptr, stride_w, send_slot_ptr, num_ranks, num_local, t_max,
                         table_ptr, table_w_ptr, w_send_ptr, win_ptr, seq_ptr, K: tl.constexpr, KP: tl.constexpr,
                         Q: tl.constexpr, QP: tl.constexpr, PER_RANK: tl.constexpr, SINGLE: tl.constexpr,
                         SEND_WEIGHTS: tl.constexpr, DIRECT_W: tl.constexpr):
    """Grid ``T``: the sender's side of a multi-rank low-latency combine for token ``t`` (``idx`` global ids,
    ``weight`` float32 top-k weights, ``send_slot [T, R]`` the dispatch's rows, -1 none). Entry ``q`` of the
    returned rows: rank ``q`` (``PER_RANK``, ``Q = R <= K``) or slot ``q`` (``Q = K < R``, the first slot naming
    a rank only). ``table[t, q]`` is that entry's send row ``r * t_max + slot``, -1 where nothing was sent
    (or a later slot of a rank already counted); ``table_w[t, q]``: 1, or with ``SINGLE`` (bf16 expert rows
    come back) the sum in slot order of the weights of ``t``'s slots on that rank. ``SEND_WEIGHTS``: ``t``'s
    ``K`` weights into each row ``w_send[table[t, q]]`` (float32 ``[*, K]``, contiguous); with ``DIRECT_W``
    straight into the destination's memory instead: row ``slot`` of rank ``r``'s part at ``win[seq & 1, r]``
    (``win`` int64 ``[2, R]``, ``seq`` int64 ``[1]`` read here, so a captured graph follows the exchanges), rows
    of ``K`` float32."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    jok = j < K
    ids = tl.load(idx_ptr + t * stride_idx + j, mask=jok, other=-1).to(tl.int64)
    rank_of = tl.where(ids >= 0, ids // num_local, -1)
    if PER_RANK:
        q = tl.arange(0, QP)
        slot = tl.load(send_slot_ptr + t * num_ranks + q, mask=q < Q, other=-1)
        table = tl.where(slot >= 0, q.to(tl.int64) * t_max + slot, -1)
        of = tl.where(q < Q, q.to(tl.int64), -1)
    else:
        q = j
        slot = tl.load(send_slot_ptr + t * num_ranks + tl.maximum(rank_of, 0), mask=rank_of >= 0, other=-1)
        earlier = j[None, :] < j[:, None]  # [k, k2]: k2 before k
        dup = tl.sum(((rank_of[:, None] == rank_of[None, :]) & earlier).to(tl.int32), axis=1) > 0
        table = tl.where((rank_of >= 0) & ~dup, rank_of * t_max + slot, -1)
        of = rank_of
    ok = q < Q
    tl.store(table_ptr + t * Q + q, table, mask=ok)
    if SINGLE:
        acc = tl.zeros([QP], tl.float32)
        for k in tl.static_range(K):  # the weights of this rank's slots, in slot order
            gk = tl.load(idx_ptr + t * stride_idx + k).to(tl.int64)
            rk = tl.where(gk >= 0, gk // num_local, -1)
            wk = tl.load(weight_ptr + t * stride_w + k).to(tl.float32)
            acc += tl.where((of == rk) & (of >= 0), wk, 0.0)
        tl.store(table_w_ptr + t * Q + q, acc, mask=ok)
    else:
        tl.store(table_w_ptr + t * Q + q, tl.full([QP], 1.0, tl.float32), mask=ok)
    if SEND_WEIGHTS:
        w = tl.load(weight_ptr + t * stride_w + j, mask=jok, other=0.0).to(tl.float32)
        sent = ok & (table >= 0)
        if DIRECT_W:  # row `slot` of this rank's part in rank r's slots for this exchange's parity
            row = tl.where(sent, table, 0)
            r = row // t_max
            base = tl.load(win_ptr + (tl.load(seq_ptr) & 1) * num_ranks + r, mask=sent, other=0)
            dst = (base + (row - r * t_max) * (K * 4)).to(tl.pointer_type(tl.float32))
            tl.store(dst[:, None] + j[None, :], tl.broadcast_to(w[None, :], [QP, KP]),
                     mask=sent[:, None] & jok[None, :])
        else:
            tl.store(w_send_ptr + table[:, None] * K + j[None, :], tl.broadcast_to(w[None, :], [QP, KP]),
                     mask=sent[:, None] & jok[None, :])


@triton.jit
def moe_ll_pairs_kernel(recv_local_ptr, valid_ptr, position_ptr, w_ptr, table_ptr, pair_w_ptr, slots,
                        received_ptr, seq_ptr, t_max, num_sources, K: tl.constexpr, KP: tl.constexpr,
                        BLOCK_S: tl.constexpr, HAS_W: tl.constexpr, LANDED: tl.constexpr):
    """Grid ``ceil(S / BLOCK_S)``: the receiver's terms of a multi-rank low-latency combine per received slot
    (``recv_local``, ``valid`` int8, ``position``: the dispatch's ``[S, K]`` routes): ``table[s, k]`` the valid
    pair's row ``l * S + position`` in the expert outputs, -1 elsewhere; with ``HAS_W``, ``pair_w[s, k]`` the
    sum in slot order of the received weights ``w [S, K]`` of the slots naming that pair's expert (0 where
    not valid). ``LANDED``: ``w`` where a fixed exchange left it instead, row ``s`` as row ``s % t_max`` (of
    ``K`` float32) of source ``s // t_max``'s part at ``received[(seq - 1) & 1, source]`` (int64 ``[2,
    num_sources]``; ``seq`` int64 ``[1]``, the exchange's counter, which it advanced)."""
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    j = tl.arange(0, KP)
    ok = (s < slots)[:, None] & (j < K)[None, :]
    at = s[:, None] * K + j[None, :]
    loc = tl.load(recv_local_ptr + at, mask=ok, other=-1)
    valid = (tl.load(valid_ptr + at, mask=ok, other=0) != 0) & (loc >= 0)
    pos = tl.load(position_ptr + at, mask=ok, other=0)
    tl.store(table_ptr + at, tl.where(valid, loc * slots + pos, -1), mask=ok)
    if HAS_W:
        if LANDED:  # each slot's weights row in its source's part of this rank's slots, at the exchange's parity
            source = tl.where(s < slots, s // t_max, 0)
            base = tl.load(received_ptr + ((tl.load(seq_ptr) - 1) & 1) * num_sources + source, mask=s < slots,
                           other=0)
            w_row = (base + (s - source * t_max) * (K * 4)).to(tl.pointer_type(tl.float32))
        else:
            w_row = w_ptr + s * K
        acc = tl.zeros([BLOCK_S, KP], tl.float32)
        for k in tl.static_range(K):  # the weights of the slots naming the pair's expert, in slot order
            lk = tl.load(recv_local_ptr + s * K + k, mask=s < slots, other=-1)
            wk = tl.load(w_row + k, mask=s < slots, other=0.0)
            acc += tl.where(valid & (loc == lk[:, None]), wk[:, None], 0.0)
        tl.store(pair_w_ptr + at, acc, mask=ok)
