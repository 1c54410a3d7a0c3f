"""Triton kernels of the triton backend's fused one-process expanded MoE dispatch (any GPU triton targets);
the wrapper and the layout they write are :mod:`deepport.backends.triton.moe_expanded_dispatch`.

Token block ``b`` is the tokens ``b * BLOCK_T`` to ``(b + 1) * BLOCK_T - 1`` (the last one ragged), one of
``blocks = ceil(T / BLOCK_T)``. Both layout kernels take the experts ``BLOCK_E`` at a time: per step a
``[BLOCK_T, BLOCK_E]`` 0/1 tile of which token selects which expert, built slot by slot from ``topk_idx``
(int32 or int64; a token naming an expert in several slots selects it once; ``-1`` slots name none).

- :func:`moe_expanded_count_kernel`, grid ``(blocks,)``, before the host read: program ``b`` writes row
  ``b`` of ``hist`` (int32 ``[blocks, E + 1]``): ``hist[b, e]`` the tokens of block ``b`` selecting expert
  ``e``, ``hist[b, E]`` those routed anywhere; ``flags[t]`` (uint8 0/1, the handle's ``is_token_in_rank``)
  of its tokens: whether routed anywhere; and adds its row to ``counts`` (int32 ``[E + 1]``, zeroed by the
  caller: per expert its tokens, then the tokens routed anywhere) by integer atomic adds, the only atomics
  of the dispatch (an integer sum: exact in any order).
- :func:`moe_expanded_layout_kernel`, grid ``(blocks + E,)``, after the read. Program ``b < blocks``
  places the tokens of block ``b``: the ``i``-th token of the block (in token order, from 0) selecting
  expert ``e`` gets the expanded row ``start_e + sum(hist[b', e] for b' < b) + i``, ``start_e`` the
  aligned counts ``align_up(counts[e'], alignment)`` of the experts ``e' < e`` (summed step by step over
  the expert steps), the earlier blocks' rows of ``hist`` read ``BLOCK_B`` at a time, ``i`` the inclusive
  running sum down the token axis of the 0/1 tile, minus one. Per such row it writes ``token_of`` (int64,
  the token), ``src_row`` (int64, the token's received row), ``m_indices`` / ``expert_of`` (int32 ``e``)
  and ``recv_weights`` / ``weight_of`` (float32: ``sums[t, k]`` of the first slot ``k`` naming ``e``, the
  caller's per-slot weight sums, equal for every such slot). It also writes its tokens' entries of the
  handle's per-token arrays: ``idx64`` (``topk_idx`` as int64 ``[T, K]``) and, for each token routed
  anywhere, at its received row ``sum(hist[b', E] for b' < b)`` + (tokens of block ``b`` before it routed
  anywhere), ``recv_src`` (the token) and ``recv_topk`` (its ``topk_idx`` row, int64). Program
  ``blocks + e`` writes expert ``e``'s padding rows, ``start_e + counts[e]`` up to ``start_e +
  align_up(counts[e], alignment)`` (``start_e`` from one ``BLOCK_A``-wide load of ``counts``), ``BLOCK_P``
  a step: ``token_of`` / ``src_row`` / ``m_indices`` / ``expert_of`` -1, weights 0. Every entry is written
  by exactly one program, no atomics: the rows of each expert's segment are in token order, the same
  bits at any ``BLOCK_T``, ``BLOCK_E`` or ``BLOCK_B``.
- :func:`moe_expanded_rows_kernel`, grid ``(m, ceil(C / BLOCK_C))``: ``out[r, :] = x[token_of[r], :]`` as
  raw bits (integer views), zero where ``token_of[r] == -1`` (padding rows); with ``HAS_SCALES`` the
  column-block-0 programs do the same for the FP8 scales row (``BLOCK_S`` columns, any strides of ``s``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(idx_ptr, tok, ok, num_topk, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_T, BLOCK_K]`` tile of ``topk_idx`` (int32; -1 outside) of tokens ``tok``, its offsets
    and mask."""
    slot = tl.arange(0, BLOCK_K)
    in_tile = ok[:, None] & (slot[None, :] < num_topk)
    at = tok[:, None].to(tl.int64) * num_topk + slot[None, :]
    return tl.load(idx_ptr + at, mask=in_tile, other=-1).to(tl.int32), at, in_tile


@triton.jit
def _hits(idx_ptr, sums_ptr, tok, ok, e, num_topk, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
          WEIGHTS: tl.constexpr):
    """``[BLOCK_T, BLOCK_E]``: whether token ``tok[i]`` selects expert ``e[j]`` in any slot (int32 0/1,
    a token naming ``e`` in several slots counts once), and with ``WEIGHTS`` the weight sum of its first
    slot naming ``e`` (0 where none) and that slot's index (0 where none)."""
    hit = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    w = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    first = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    for k in range(0, num_topk):
        col = tl.load(idx_ptr + tok.to(tl.int64) * num_topk + k, mask=ok, other=-1).to(tl.int32)
        match = col[:, None] == e[None, :]
        if WEIGHTS:
            s = tl.load(sums_ptr + tok.to(tl.int64) * num_topk + k, mask=ok, other=0.0)
            w = tl.where(match & (hit == 0), s[:, None], w)
            first = tl.where(match & (hit == 0), k, first)
        hit = tl.maximum(hit, match.to(tl.int32))
    return hit, w, first


@triton.jit
def moe_expanded_count_kernel(idx_ptr, counts_ptr, hist_ptr, flags_ptr, num_tokens, num_topk, num_experts,
                              BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    tok = b * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < num_tokens
    ids = _tile(idx_ptr, tok, ok, num_topk, BLOCK_K)[0]
    routed = tl.max((ids >= 0).to(tl.int32), 1)
    tl.store(flags_ptr + tok, routed.to(tl.uint8), mask=ok)
    row = hist_ptr + b.to(tl.int64) * (num_experts + 1)
    routed_here = tl.sum(routed, 0)
    tl.store(row + num_experts, routed_here)
    tl.atomic_add(counts_ptr + num_experts, routed_here)
    for e0 in range(0, num_experts, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        hit = _hits(idx_ptr, idx_ptr, tok, ok, e, num_topk, BLOCK_T, BLOCK_E, WEIGHTS=False)[0]
        here = tl.sum(hit, 0)
        tl.store(row + e, here, mask=e < num_experts)
        tl.atomic_add(counts_ptr + e, here, mask=(e < num_experts) & (here > 0))


@triton.jit
def _aligned(counts_ptr, e, e_ok, alignment):
    count = tl.load(counts_ptr + e, mask=e_ok, other=0)
    return (count + alignment - 1) // alignment * alignment


@triton.jit
def moe_expanded_layout_kernel(idx_ptr, sums_ptr, counts_ptr, hist_ptr, token_of_ptr, src_row_ptr, m_idx_ptr,
                               expert_of_ptr, recv_w_ptr, weight_of_ptr, recv_src_ptr, recv_topk_ptr, idx64_ptr,
                               dest_ptr, num_tokens, num_topk, num_experts, alignment,
                               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_P: tl.constexpr,
                               WRITE_DEST: tl.constexpr = False):
    p = tl.program_id(0)
    blocks = tl.cdiv(num_tokens, BLOCK_T)
    width = num_experts + 1  # a row of hist
    if p < blocks:  # token block p: its tokens' rows
        tok = p * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = tok < num_tokens
        ids, at, in_tile = _tile(idx_ptr, tok, ok, num_topk, BLOCK_K)
        slot = tl.arange(0, BLOCK_K)
        routed = tl.max((ids >= 0).to(tl.int32), 1)
        before_any = p * 0  # tokens routed anywhere in the blocks before p
        for b0 in range(0, p, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            before_any += tl.sum(tl.load(hist_ptr + b.to(tl.int64) * width + num_experts, mask=b < p, other=0), 0)
        recv_row = before_any + tl.cumsum(routed, 0) - 1
        got = ok & (routed > 0)
        tl.store(idx64_ptr + at, ids.to(tl.int64), mask=in_tile)
        tl.store(recv_src_ptr + recv_row, tok.to(tl.int64), mask=got)
        tl.store(recv_topk_ptr + recv_row[:, None].to(tl.int64) * num_topk + slot[None, :], ids.to(tl.int64),
                 mask=in_tile & got[:, None])
        start = p * 0  # aligned rows of the experts before this chunk
        for e0 in range(0, num_experts, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            e_ok = e < num_experts
            aligned = _aligned(counts_ptr, e, e_ok, alignment)
            first = start + tl.cumsum(aligned, 0) - aligned  # each expert's first row ...
            for b0 in range(0, p, BLOCK_B):  # ... plus its tokens in the blocks before p
                b = b0 + tl.arange(0, BLOCK_B)
                first += tl.sum(tl.load(hist_ptr + b[:, None].to(tl.int64) * width + e[None, :],
                                        mask=(b[:, None] < p) & e_ok[None, :], other=0), 0)
            start += tl.sum(aligned, 0)
            hit, w, first_slot = _hits(idx_ptr, sums_ptr, tok, ok, e, num_topk, BLOCK_T, BLOCK_E, WEIGHTS=True)
            row = (first[None, :] + tl.cumsum(hit, 0) - 1).to(tl.int64)  # + earlier tokens of p selecting e
            pick = hit > 0
            tl.store(token_of_ptr + row, tok[:, None].to(tl.int64), mask=pick)
            tl.store(src_row_ptr + row, recv_row[:, None].to(tl.int64), mask=pick)
            tl.store(m_idx_ptr + row, e[None, :], mask=pick)
            tl.store(expert_of_ptr + row, e[None, :], mask=pick)
            tl.store(recv_w_ptr + row, w, mask=pick)
            tl.store(weight_of_ptr + row, w, mask=pick)
            if WRITE_DEST:  # the scatter kernel's map: (token, first slot naming e) -> its row
                tl.store(dest_ptr + tok[:, None].to(tl.int64) * num_topk + first_slot, row, mask=pick)
    else:  # expert p - blocks: its padding rows
        e = p - blocks
        experts = tl.arange(0, BLOCK_A)
        start = tl.sum(_aligned(counts_ptr, experts, experts < e, alignment), 0)
        count = tl.load(counts_ptr + e)
        end = start + (count + alignment - 1) // alignment * alignment
        for p0 in range(start + count, end, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            pad = rows < end
            minus = tl.full([BLOCK_P], -1, tl.int32)
            tl.store(token_of_ptr + rows, minus.to(tl.int64), mask=pad)
            tl.store(src_row_ptr + rows, minus.to(tl.int64), mask=pad)
            tl.store(m_idx_ptr + rows, minus, mask=pad)
            tl.store(expert_of_ptr + rows, minus, mask=pad)
            tl.store(recv_w_ptr + rows, tl.zeros([BLOCK_P], tl.float32), mask=pad)
            tl.store(weight_of_ptr + rows, tl.zeros([BLOCK_P], tl.float32), mask=pad)


@triton.jit
def moe_expanded_rows_kernel(x_ptr, token_of_ptr, out_ptr, num_cols, stride_x,
                             s_ptr, s_out_ptr, num_scale_cols, stride_s_row, stride_s_col,
                             HAS_SCALES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    t = tl.load(token_of_ptr + r)
    if t >= 0:
        tl.store(out_ptr + r * num_cols + cols, tl.load(x_ptr + t * stride_x + cols, mask=ok), mask=ok)
    else:
        tl.store(out_ptr + r * num_cols + cols, tl.zeros([BLOCK_C], out_ptr.dtype.element_ty), mask=ok)
    if HAS_SCALES and cb == 0:
        sc = tl.arange(0, BLOCK_S)
        sok = sc < num_scale_cols
        if t >= 0:
            row = tl.load(s_ptr + t * stride_s_row + sc * stride_s_col, mask=sok)
        else:
            row = tl.zeros([BLOCK_S], s_out_ptr.dtype.element_ty)
        tl.store(s_out_ptr + r * num_scale_cols + sc, row, mask=sok)


@triton.jit
def moe_expanded_pad_rows_kernel(token_of_ptr, out_ptr, num_cols, s_out_ptr, num_scale_cols,
                                 HAS_SCALES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid ``(m, ceil(C / BLOCK_C))``: zero the padding rows (``token_of[r] == -1``) of ``out`` (and, with
    ``HAS_SCALES``, of the scales); token rows are left alone (the scatter kernel writes them)."""
    r = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.load(token_of_ptr + r)
    tl.store(out_ptr + r * num_cols + cols, tl.zeros([BLOCK_C], out_ptr.dtype.element_ty),
             mask=(cols < num_cols) & (cols * 0 + t < 0))  # the row's flag as a block (interpreter-safe masks)
    if HAS_SCALES and cb == 0:
        sc = tl.arange(0, BLOCK_S)
        tl.store(s_out_ptr + r * num_scale_cols + sc, tl.zeros([BLOCK_S], s_out_ptr.dtype.element_ty),
                 mask=(sc < num_scale_cols) & (sc * 0 + t < 0))


@triton.jit
def moe_expanded_scatter_kernel(x_ptr, dest_ptr, out_ptr, num_cols, stride_x, num_topk,
                                s_ptr, s_out_ptr, num_scale_cols, stride_s_row, stride_s_col,
                                HAS_SCALES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid ``(T, ceil(C / BLOCK_C))``: token ``t``'s row of ``x`` read once and stored, as raw bits, into
    each expanded row ``dest[t, k] >= 0`` (the layout kernel's map with ``WRITE_DEST``: one entry per distinct
    expert of the token, -1 elsewhere); with ``HAS_SCALES`` the column-block-0 programs do the same for its
    FP8 scales row. The reverse of :func:`moe_expanded_rows_kernel`, which reads ``x`` once per expanded row
    (8 times per token at top-8, mostly from HBM: rows are in expert order); padding rows are left to that
    kernel's twin :func:`moe_expanded_pad_rows_kernel`."""
    t = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_cols
    row = tl.load(x_ptr + t * stride_x + cols, mask=ok)
    sc = tl.arange(0, BLOCK_S)
    sok = (sc < num_scale_cols) & (sc * 0 + cb == 0)  # column block 0 moves the scales
    if HAS_SCALES:
        srow = tl.load(s_ptr + t * stride_s_row + sc * stride_s_col, mask=sok)
    for k in range(0, num_topk):
        r = tl.load(dest_ptr + t * num_topk + k)
        if r >= 0:
            tl.store(out_ptr + r * num_cols + cols, row, mask=ok)
            if HAS_SCALES:
                tl.store(s_out_ptr + r * num_scale_cols + sc, srow, mask=sok)
