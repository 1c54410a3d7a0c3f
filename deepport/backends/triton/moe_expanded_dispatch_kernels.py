"""Triton kernels of the triton backend's fused one-process expanded MoE dispatch (any GPU triton targets);
the wrapper and the layout they write are :mod:`deepport.backends.triton.moe_expanded_dispatch`.

- :func:`moe_expanded_layout_kernel`, grid ``(E,)``: program ``e`` walks the tokens in order, one
  ``[BLOCK_T, BLOCK_K]`` tile of ``topk_idx`` (int32 or int64) per step, and for each token selecting
  expert ``e`` (any slot naming it) writes the expanded row ``start_e + (earlier tokens selecting e)``
  (``start_e`` the aligned counts of the experts before ``e``, from ``counts``): ``token_of`` (int64,
  the token), ``src_row`` (int64, the token's received row: the tokens routed anywhere before it),
  ``m_indices`` / ``expert_of`` (int32 ``e``), ``recv_weights`` / ``weight_of`` (float32: ``sums[t, k]``
  of a slot ``k`` naming ``e``, the caller's per-slot weight sums, equal for every such slot); then its
  padding rows (``token_of`` / ``src_row`` / ``m_indices`` / ``expert_of`` -1, weights 0). Program 0 also
  writes the handle's per-token arrays: ``idx64`` (``topk_idx`` as int64 ``[T, K]``), and for each token
  routed anywhere its received row's ``recv_src`` (the token) and ``recv_topk`` (its ``topk_idx`` row,
  int64). Every entry is written by exactly one program: no atomics, no order dependence.
- :func:`moe_expanded_rows_kernel`, grid ``(m, ceil(C / BLOCK_C))``: ``out[r, :] = x[token_of[r], :]`` as
  raw bits (integer views), zero where ``token_of[r] == -1`` (padding rows); with ``HAS_SCALES`` the
  column-block-0 programs do the same for the FP8 scales row (``BLOCK_S`` columns, any strides of ``s``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def moe_expanded_layout_kernel(idx_ptr, sums_ptr, counts_ptr, token_of_ptr, src_row_ptr, m_idx_ptr, expert_of_ptr,
                               recv_w_ptr, weight_of_ptr, recv_src_ptr, recv_topk_ptr, idx64_ptr,
                               num_tokens, num_topk, num_experts, alignment,
                               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_P: tl.constexpr):
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    aligned = (counts + alignment - 1) // alignment * alignment
    start = tl.sum(tl.where(experts < e, aligned, 0), 0)
    count = tl.load(counts_ptr + e)
    end = start + (count + alignment - 1) // alignment * alignment
    before_e = start * 0  # tokens selecting e so far
    before_any = start * 0  # tokens routed anywhere so far
    slot = tl.arange(0, BLOCK_K)
    for t0 in range(0, num_tokens, BLOCK_T):  # one [BLOCK_T, K] tile of topk_idx per step
        tok = t0 + tl.arange(0, BLOCK_T)
        ok = tok < num_tokens
        lead = (tok * 0 + e) == 0  # program 0 writes the per-token arrays of the handle
        in_tile = ok[:, None] & (slot[None, :] < num_topk)
        at = tok[:, None].to(tl.int64) * num_topk + slot[None, :]
        ids = tl.load(idx_ptr + at, mask=in_tile, other=-1).to(tl.int32)
        hit = (ids == e).to(tl.int32)
        sel = tl.max(hit, 1)
        routed = tl.max((ids >= 0).to(tl.int32), 1)
        recv_row = before_any + tl.cumsum(routed, 0) - 1
        pick = ok & (sel > 0)
        row = (start + before_e + tl.cumsum(sel, 0) - 1).to(tl.int64)
        # every slot naming e carries the same sum: read the one argmax finds
        wsum = tl.load(sums_ptr + tok.to(tl.int64) * num_topk + tl.argmax(hit, 1), mask=pick, other=0.0)
        tl.store(token_of_ptr + row, tok.to(tl.int64), mask=pick)
        tl.store(src_row_ptr + row, recv_row.to(tl.int64), mask=pick)
        tl.store(m_idx_ptr + row, tl.full([BLOCK_T], 0, tl.int32) + e, mask=pick)
        tl.store(expert_of_ptr + row, tl.full([BLOCK_T], 0, tl.int32) + e, mask=pick)
        tl.store(recv_w_ptr + row, wsum, mask=pick)
        tl.store(weight_of_ptr + row, wsum, mask=pick)
        got = ok & (routed > 0) & lead
        tl.store(idx64_ptr + at, ids.to(tl.int64), mask=in_tile & lead[:, None])
        tl.store(recv_src_ptr + recv_row, tok.to(tl.int64), mask=got)
        tl.store(recv_topk_ptr + recv_row[:, None].to(tl.int64) * num_topk + slot[None, :], ids.to(tl.int64),
                 mask=in_tile & got[:, None])
        before_e += tl.sum(sel, 0)
        before_any += tl.sum(routed, 0)
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
