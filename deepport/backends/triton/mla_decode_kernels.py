"""Triton kernels of MLA decode (any GPU triton targets; float32 softmax; bf16 / fp16 inputs).

Two kernels, launched by :mod:`deepport.backends.triton.mla_decode`:

- :func:`mla_decode_split_kernel`, grid ``(num_parts * row_tiles * V_SPLIT, h_kv)``: program
  ``(part * row_tiles * V_SPLIT + t * V_SPLIT + v, hk)`` runs the pieces of part ``part`` of the
  split-KV plan one after the other (a persistent program per SM group, so every program gets the same
  number of KV blocks) for query rows ``t * BLOCK_H ...`` of KV head ``hk`` and output channels
  ``v * D_V / V_SPLIT ...`` (``V_SPLIT`` = 2: two programs share a row tile, each computes the whole
  ``S`` and half of ``O``: half the accumulator registers, ``S`` computed twice). The programs that
  read the same K tiles are adjacent in the grid, so they run at the same time and share the L2. A
  query row ``r`` of KV head ``hk`` is token ``r // group`` and head ``hk * group + r % group``
  (``group = h_q / h_kv``). For each piece ``(request, lo, hi, split_row, direct)`` it streams tokens
  ``[lo, hi)`` of the request through the block table, ``BLOCK_N`` at a time: the K rows in three parts
  (this program's share of the first ``D_V`` channels, which are also V; the other share; the
  ``D_QK - D_V`` tail), ``S = Q K^T`` as one tensor-core product per part accumulated in float32, an
  online softmax in float32 (``exp2``, logits pre-multiplied by ``scale * log2(e)``), ``O += P V``.
  Tiles every query row sees in full run without masks; the last tiles of a piece (and under causality
  the diagonal ones) mask the logits of tokens ``>= hi`` (``hi <= cache_seqlens``) or past a row's
  causal end. K tiles are read through pointers (tokens ``>= hi`` masked out of the loads, so neither
  the tail of the last page nor unused block-table slots are read) or, with ``K_TMA``, by bulk tensor
  copies (host tensor descriptors over the cache as ``[blocks * PAGE, D_QK]`` rows; a tile lies in one
  page, and in the last tile the rows past ``hi``, read but not used, have their V zeroed). ``direct``
  pieces (a request not cut by the plan) write ``out`` and ``lse`` themselves; the others write float32
  partial ``O`` (normalised) and their natural-log LSE (``-inf`` for a row that saw no token) to row
  ``split_row`` of the split accumulators (share 0 writes the LSE).
- :func:`mla_decode_combine_kernel`, grid ``(num_cut_requests, h_q * s_q)``: merges the partial
  results of one cut request and one query row: ``lse = log(sum_j exp(lse_j))``,
  ``out = sum_j exp(lse_j - lse) O_j``; a row with no visible token gets ``out = 0, lse = +inf``.

``UPCAST`` (set under the interpreter) multiplies in float32: the interpreter's bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl

from deepport.backends.mla_plan import PIECE_FIELDS

_PIECE = tl.constexpr(PIECE_FIELDS)


@triton.jit
def _load_rows(ptrs, tok_ok, d, D_END: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """K rows ``ptrs[token, channel]``; ``MASKED`` tiles skip tokens past the piece, odd widths their padding."""
    if MASKED:
        return tl.load(ptrs, mask=tok_ok[:, None] & (d[None, :] < D_END), other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d[None, :] < D_END, other=0.0)


@triton.jit
def _k_tile_ptr(k_row, tok_ok, c_own, c_oth, dt, D_V: tl.constexpr, D_QK: tl.constexpr, HAS_OTHER: tl.constexpr,
                HAS_TAIL: tl.constexpr, EVEN_DV: tl.constexpr, EVEN_DT: tl.constexpr, MASKED: tl.constexpr):
    """The K tile's three parts through pointers (``k_row``: each token's row): channels ``c_own`` (this
    program's share of V), ``c_oth`` (the rest of V, with ``HAS_OTHER``) and the ``dt`` tail."""
    k_own = _load_rows(k_row[:, None] + c_own[None, :], tok_ok, c_own, D_V, MASKED, EVEN_DV)
    k_oth = k_own  # unused without another share
    if HAS_OTHER:
        k_oth = _load_rows(k_row[:, None] + c_oth[None, :], tok_ok, c_oth, D_V, MASKED, EVEN_DV)
    k_tail = k_own  # unused without a tail
    if HAS_TAIL:
        k_tail = _load_rows(k_row[:, None] + dt[None, :], tok_ok, dt, D_QK, MASKED, EVEN_DT)
    return k_own, k_oth, k_tail


@triton.jit
def _k_tile_tma(desc_v, desc_t, row, col_own, col_oth, D_V: tl.constexpr, HAS_OTHER: tl.constexpr,
                HAS_TAIL: tl.constexpr):
    """The same three parts of ``BLOCK_N`` consecutive cache rows from ``row`` on, by bulk tensor copies."""
    k_own = desc_v.load([row, col_own])
    k_oth = k_own
    if HAS_OTHER:
        k_oth = desc_v.load([row, col_oth])
    k_tail = k_own
    if HAS_TAIL:
        k_tail = desc_t.load([row, D_V])
    return k_own, k_oth, k_tail


@triton.jit
def _attend_tile(acc, m_i, l_i, q_own, q_oth, q_tail, k_own, k_oth, k_tail, tok, hi, last, scale_log2,
                 HAS_OTHER: tl.constexpr, HAS_TAIL: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One step of the online softmax over one K tile (tokens ``tok``): ``S`` as one tensor-core product
    per channel part accumulated in float32, ``O += P V_own``.

    Unmasked (``MASKED`` false) tiles hold only tokens below ``hi`` that every query row sees."""
    if UPCAST:
        k_own = k_own.to(tl.float32)
        k_oth = k_oth.to(tl.float32)
        k_tail = k_tail.to(tl.float32)
    s = tl.dot(q_own, tl.trans(k_own))
    if HAS_OTHER:
        s = tl.dot(q_oth, tl.trans(k_oth), s)
    if HAS_TAIL:
        s = tl.dot(q_tail, tl.trans(k_tail), s)
    s = s * scale_log2
    if MASKED:
        visible = (tok < hi)[None, :]
        if CAUSAL:
            visible = visible & (tok[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # noqa: SIM108 (a row may have seen nothing yet: keep exp2 away from (-inf) - (-inf))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        acc = tl.dot(p, k_own, acc)
    else:
        acc = tl.dot(p.to(k_own.dtype), k_own, acc)
    return acc, m_new, l_i


@triton.jit
def _tiles_ptr(acc, m_i, l_i, blk, first, end, hi, last, q_own, q_oth, q_tail, k_head, stride_kb, stride_kp,
               table_row, c_own, c_oth, dt, cols, scale_log2, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               D_V: tl.constexpr, D_QK: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_TAIL: tl.constexpr,
               EVEN_DV: tl.constexpr, EVEN_DT: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr):
    """Tokens ``[first, end)``, ``BLOCK_N`` at a time, K through pointers; ``blk``: the block ids of the first
    tile's tokens (carried one tile ahead). Returns the softmax state and the block ids after ``end``."""
    for start in range(first, end, BLOCK_N):
        tok = start + cols
        nxt = tok + BLOCK_N
        blk_next = tl.load(table_row + nxt // PAGE, mask=nxt < hi, other=0)
        k_row = k_head + blk.to(tl.int64) * stride_kb + (tok % PAGE) * stride_kp
        k_own, k_oth, k_tail = _k_tile_ptr(k_row, tok < hi, c_own, c_oth, dt, D_V, D_QK, HAS_OTHER, HAS_TAIL,
                                           EVEN_DV, EVEN_DT, MASKED)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_own, q_oth, q_tail, k_own, k_oth, k_tail, tok, hi, last,
                                     scale_log2, HAS_OTHER, HAS_TAIL, MASKED, CAUSAL, UPCAST)
        blk = blk_next
    return acc, m_i, l_i, blk


@triton.jit
def _tiles_tma(acc, m_i, l_i, blk, first, end, hi, last, q_own, q_oth, q_tail, desc_v, desc_t, table_row, half,
               cols, scale_log2, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D_V: tl.constexpr,
               DV_PART: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_TAIL: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """The same with K by bulk tensor copies (``blk``: the first tile's block id). A tile is ``BLOCK_N``
    consecutive rows of one page; in ``MASKED`` tiles the rows past ``hi`` are read too (they are inside
    the page), their V zeroed (they may hold anything, NaN included) and their logits masked."""
    for start in range(first, end, BLOCK_N):
        tok = start + cols
        nxt = start + BLOCK_N
        blk_next = tl.load(table_row + nxt // PAGE, mask=nxt < hi, other=0)
        k_own, k_oth, k_tail = _k_tile_tma(desc_v, desc_t, blk * PAGE + start % PAGE, half * DV_PART,
                                           (1 - half) * DV_PART, D_V, HAS_OTHER, HAS_TAIL)
        if MASKED:
            k_own = tl.where((tok < hi)[:, None], k_own, 0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_own, q_oth, q_tail, k_own, k_oth, k_tail, tok, hi, last,
                                     scale_log2, HAS_OTHER, HAS_TAIL, MASKED, CAUSAL, UPCAST)
        blk = blk_next
    return acc, m_i, l_i, blk


@triton.jit
def mla_decode_split_kernel(
    q_ptr, k_ptr, k_desc_v, k_desc_t, table_ptr, seqlens_ptr, pieces_ptr, part_ptr,
    out_ptr, lse_ptr, o_acc_ptr, lse_acc_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_tb,
    group, s_q, q_rows, h_q, acc_rows,
    scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, V_SPLIT: tl.constexpr,
    K_TMA: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    tiles = tl.cdiv(q_rows, BLOCK_H) * V_SPLIT
    part = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    half = tile % V_SPLIT
    hk = tl.program_id(1)
    rows = (tile // V_SPLIT) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < q_rows
    s_idx = rows // group
    head = hk * group + rows % group
    HAS_TAIL: tl.constexpr = D_QK > D_V
    HAS_OTHER: tl.constexpr = V_SPLIT > 1
    EVEN_DV: tl.constexpr = BLOCK_DV == D_V
    EVEN_DT: tl.constexpr = BLOCK_DT == D_QK - D_V
    DV_PART: tl.constexpr = BLOCK_DV // V_SPLIT
    c_own = half * DV_PART + tl.arange(0, DV_PART)
    c_oth = (1 - half) * DV_PART + tl.arange(0, DV_PART)  # the other share (V_SPLIT == 2)
    own_ok = c_own < D_V
    oth_ok = c_oth < D_V
    dt = D_V + tl.arange(0, BLOCK_DT)
    dt_ok = dt < D_QK
    cols = tl.arange(0, BLOCK_N)
    lse_ok = row_ok & (rows * 0 + half == 0)  # the shares compute the same softmax: share 0 writes the LSE
    LN2: tl.constexpr = 0.6931471805599453

    first_piece = tl.load(part_ptr + part)
    end_piece = tl.load(part_ptr + part + 1)
    for pc in range(first_piece, end_piece):
        rec = pieces_ptr + pc * _PIECE
        req = tl.load(rec)
        lo = tl.load(rec + 1)
        hi = tl.load(rec + 2)
        split_row = tl.load(rec + 3)
        direct = tl.load(rec + 4)

        q_row = q_ptr + req.to(tl.int64) * stride_qb + s_idx * stride_qs + head * stride_qh
        q_own = tl.load(q_row[:, None] + c_own[None, :], mask=row_ok[:, None] & own_ok[None, :], other=0.0)
        q_oth = q_own  # unused without another share
        if HAS_OTHER:
            q_oth = tl.load(q_row[:, None] + c_oth[None, :], mask=row_ok[:, None] & oth_ok[None, :], other=0.0)
        q_tail = q_own  # unused without a tail
        if HAS_TAIL:
            q_tail = tl.load(q_row[:, None] + dt[None, :], mask=row_ok[:, None] & dt_ok[None, :], other=0.0)
        if UPCAST:
            q_own = q_own.to(tl.float32)
            q_oth = q_oth.to(tl.float32)
            q_tail = q_tail.to(tl.float32)
        # Last visible token of each row under the bottom-right causal mask (hi <= L bounds the rest).
        # Tiles below min(hi, L - s_q + 1) are seen by every row: they run without masks.
        seqlen = tl.load(seqlens_ptr + req)
        last = seqlen - s_q + s_idx
        open_end = hi
        if CAUSAL:
            open_end = tl.minimum(hi, seqlen - s_q + 1)
        full_end = lo + tl.maximum(open_end - lo, 0) // BLOCK_N * BLOCK_N
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, DV_PART], tl.float32)
        table_row = table_ptr + req.to(tl.int64) * stride_tb
        k_head = k_ptr + hk * stride_kh
        # block ids one step ahead (a loop-carried value), so the pipeliner can prefetch K tiles
        if K_TMA:  # h_kv == 1, PAGE a multiple of BLOCK_N: a tile is BLOCK_N consecutive rows of one page
            blk_s = tl.load(table_row + lo // PAGE, mask=lo < hi, other=0)
            acc, m_i, l_i, blk_s = _tiles_tma(acc, m_i, l_i, blk_s, lo, full_end, hi, last, q_own, q_oth, q_tail,
                                              k_desc_v, k_desc_t, table_row, half, cols, scale_log2, PAGE, BLOCK_N,
                                              D_V, DV_PART, HAS_OTHER, HAS_TAIL, False, CAUSAL, UPCAST)
            acc, m_i, l_i, blk_s = _tiles_tma(acc, m_i, l_i, blk_s, full_end, hi, hi, last, q_own, q_oth, q_tail,
                                              k_desc_v, k_desc_t, table_row, half, cols, scale_log2, PAGE, BLOCK_N,
                                              D_V, DV_PART, HAS_OTHER, HAS_TAIL, True, CAUSAL, UPCAST)
        else:
            blk = tl.load(table_row + (lo + cols) // PAGE, mask=lo + cols < hi, other=0)
            acc, m_i, l_i, blk = _tiles_ptr(acc, m_i, l_i, blk, lo, full_end, hi, last, q_own, q_oth, q_tail,
                                            k_head, stride_kb, stride_kp, table_row, c_own, c_oth, dt, cols,
                                            scale_log2, PAGE, BLOCK_N, D_V, D_QK, HAS_OTHER, HAS_TAIL, EVEN_DV,
                                            EVEN_DT, False, CAUSAL, UPCAST)
            acc, m_i, l_i, blk = _tiles_ptr(acc, m_i, l_i, blk, full_end, hi, hi, last, q_own, q_oth, q_tail,
                                            k_head, stride_kb, stride_kp, table_row, c_own, c_oth, dt, cols,
                                            scale_log2, PAGE, BLOCK_N, D_V, D_QK, HAS_OTHER, HAS_TAIL, EVEN_DV,
                                            EVEN_DT, True, CAUSAL, UPCAST)
        seen = l_i > 0.0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse_nat = (tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))) * LN2
        if direct != 0:
            out_row = ((req.to(tl.int64) * s_q + s_idx) * h_q + head) * D_V
            tl.store(out_ptr + out_row[:, None] + c_own[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & own_ok[None, :])
            tl.store(lse_ptr + (req.to(tl.int64) * h_q + head) * s_q + s_idx,
                     tl.where(seen, lse_nat, float("inf")), mask=lse_ok)
        else:
            acc_row = split_row.to(tl.int64) * acc_rows + hk * q_rows + rows
            tl.store(o_acc_ptr + acc_row[:, None] * D_V + c_own[None, :], o, mask=row_ok[:, None] & own_ok[None, :])
            tl.store(lse_acc_ptr + acc_row, tl.where(seen, lse_nat, float("-inf")), mask=lse_ok)


@triton.jit
def mla_decode_combine_kernel(
    o_acc_ptr, lse_acc_ptr, out_ptr, lse_ptr, cut_ptr, splits_ptr,
    group, s_q, q_rows, h_q, acc_rows,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    req = tl.load(cut_ptr + tl.program_id(0))
    row = tl.program_id(1)  # hk * q_rows + r
    r = row % q_rows
    s_idx = r // group
    head = (row // q_rows) * group + r % group
    first = tl.load(splits_ptr + req)
    n = tl.load(splits_ptr + req + 1) - first
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < D_V

    m = tl.full([], float("-inf"), tl.float32)
    for j in range(0, n):
        m = tl.maximum(m, tl.load(lse_acc_ptr + (first + j).to(tl.int64) * acc_rows + row))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for j in range(0, n):
        at = (first + j).to(tl.int64) * acc_rows + row
        w = tl.exp(tl.load(lse_acc_ptr + at) - m_use)
        total += w
        acc += w * tl.load(o_acc_ptr + at * D_V + dv, mask=dv_ok, other=0.0)
    seen = total > 0.0
    o = acc / tl.where(seen, total, 1.0)
    out_at = ((req.to(tl.int64) * s_q + s_idx) * h_q + head) * D_V
    tl.store(out_ptr + out_at + dv, o.to(out_ptr.dtype.element_ty), mask=dv_ok)
    tl.store(lse_ptr + (req.to(tl.int64) * h_q + head) * s_q + s_idx,
             tl.where(seen, m_use + tl.log(tl.where(seen, total, 1.0)), float("inf")))
