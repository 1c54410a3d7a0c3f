"""Triton kernels of MLA decode (any GPU triton targets; float32 softmax; bf16 / fp16 inputs).

Two kernels, launched by :mod:`deepport.backends.triton.mla_decode`:

- :func:`mla_decode_split_kernel`, grid ``(num_parts, h_kv, row_tiles)``: program ``(p, hk, t)``
  runs the pieces of part ``p`` of the split-KV plan one after the other (a persistent program per
  SM group, so every program gets the same number of KV blocks) for query rows
  ``t * BLOCK_H ...`` of KV head ``hk``. A query row ``r`` of KV head ``hk`` is token
  ``r // group`` and head ``hk * group + r % group`` (``group = h_q / h_kv``). For each piece
  ``(request, lo, hi, split_row, direct)`` it streams tokens ``[lo, hi)`` of the request through the
  block table, ``BLOCK_N`` at a time: one load of the K rows (``D_QK`` channels, split as the first
  ``D_V`` (also V) and the ``D_QK - D_V`` tail), ``S = Q K^T`` on the tensor cores, an online
  softmax in float32 (``exp2``, logits pre-multiplied by ``scale * log2(e)``), ``O += P V``. Tokens
  ``>= hi`` (``hi <= cache_seqlens``) are masked out of every load, so neither the tail of the last
  page nor unused block-table slots are read. ``direct`` pieces (a request not cut by the plan)
  write ``out`` and ``lse`` themselves; the others write float32 partial ``O`` (normalised) and
  their natural-log LSE (``-inf`` for a row that saw no token) to row ``split_row`` of the split
  accumulators.
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
def _attend_tile(acc, m_i, l_i, q_main, q_tail, k_row, tok, hi, last, dv, dt, scale_log2,
                 D_V: tl.constexpr, D_QK: tl.constexpr, HAS_TAIL: tl.constexpr, EVEN_DV: tl.constexpr,
                 EVEN_DT: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """One step of the online softmax over the K rows at ``k_row`` (tokens ``tok``).

    Unmasked (``MASKED`` false) tiles hold only tokens below ``hi`` that every query row sees."""
    tok_ok = tok < hi
    kv = _load_rows(k_row[:, None] + dv[None, :], tok_ok, dv, D_V, MASKED, EVEN_DV)
    if UPCAST:
        kv = kv.to(tl.float32)
    s = tl.dot(q_main, tl.trans(kv))
    if HAS_TAIL:
        k_tail = _load_rows(k_row[:, None] + dt[None, :], tok_ok, dt, D_QK, MASKED, EVEN_DT)
        if UPCAST:
            k_tail = k_tail.to(tl.float32)
        s += tl.dot(q_tail, tl.trans(k_tail))
    s = s * scale_log2
    if MASKED:
        visible = tok_ok[None, :]
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
    if UPCAST:
        acc += tl.dot(p, kv)
    else:
        acc += tl.dot(p.to(kv.dtype), kv)
    return acc, m_new, l_i


@triton.jit
def mla_decode_split_kernel(
    q_ptr, k_ptr, table_ptr, seqlens_ptr, pieces_ptr, part_ptr,
    out_ptr, lse_ptr, o_acc_ptr, lse_acc_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_tb,
    group, s_q, q_rows, h_q, acc_rows,
    scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
):
    part = tl.program_id(0)
    hk = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < q_rows
    s_idx = rows // group
    head = hk * group + rows % group
    HAS_TAIL: tl.constexpr = D_QK > D_V
    EVEN_DV: tl.constexpr = BLOCK_DV == D_V
    EVEN_DT: tl.constexpr = BLOCK_DT == D_QK - D_V
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < D_V
    dt = D_V + tl.arange(0, BLOCK_DT)
    dt_ok = dt < D_QK
    cols = tl.arange(0, BLOCK_N)
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
        q_main = tl.load(q_row[:, None] + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            q_main = q_main.to(tl.float32)
        q_tail = q_main  # unused without a tail
        if HAS_TAIL:
            q_tail = tl.load(q_row[:, None] + dt[None, :], mask=row_ok[:, None] & dt_ok[None, :], other=0.0)
            if UPCAST:
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
        acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        table_row = table_ptr + req.to(tl.int64) * stride_tb
        k_head = k_ptr + hk * stride_kh
        # block ids one step ahead (a loop-carried value), so the pipeliner can prefetch K tiles
        blk = tl.load(table_row + (lo + cols) // PAGE, mask=lo + cols < hi, other=0)
        for start in range(lo, full_end, BLOCK_N):
            tok = start + cols
            nxt = tok + BLOCK_N
            blk_next = tl.load(table_row + nxt // PAGE, mask=nxt < hi, other=0)
            k_row = k_head + blk.to(tl.int64) * stride_kb + (tok % PAGE) * stride_kp
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_main, q_tail, k_row, tok, hi, last, dv, dt, scale_log2,
                                         D_V, D_QK, HAS_TAIL, EVEN_DV, EVEN_DT, False, CAUSAL, UPCAST)
            blk = blk_next
        for start in range(full_end, hi, BLOCK_N):
            tok = start + cols
            nxt = tok + BLOCK_N
            blk_next = tl.load(table_row + nxt // PAGE, mask=nxt < hi, other=0)
            k_row = k_head + blk.to(tl.int64) * stride_kb + (tok % PAGE) * stride_kp
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q_main, q_tail, k_row, tok, hi, last, dv, dt, scale_log2,
                                         D_V, D_QK, HAS_TAIL, EVEN_DV, EVEN_DT, True, CAUSAL, UPCAST)
            blk = blk_next
        seen = l_i > 0.0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse_nat = (tl.where(seen, m_i, 0.0) + tl.log2(tl.where(seen, l_i, 1.0))) * LN2
        if direct != 0:
            out_row = ((req.to(tl.int64) * s_q + s_idx) * h_q + head) * D_V
            tl.store(out_ptr + out_row[:, None] + dv[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok[None, :])
            tl.store(lse_ptr + (req.to(tl.int64) * h_q + head) * s_q + s_idx,
                     tl.where(seen, lse_nat, float("inf")), mask=row_ok)
        else:
            acc_row = split_row.to(tl.int64) * acc_rows + hk * q_rows + rows
            tl.store(o_acc_ptr + acc_row[:, None] * D_V + dv[None, :], o, mask=row_ok[:, None] & dv_ok[None, :])
            tl.store(lse_acc_ptr + acc_row, tl.where(seen, lse_nat, float("-inf")), mask=row_ok)


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
