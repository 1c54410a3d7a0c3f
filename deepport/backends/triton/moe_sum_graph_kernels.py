"""Triton kernels of the normal combine replayed as a CUDA graph (:mod:`deepport.backends.triton.moe_sum_graph`).

A captured graph keeps the addresses its kernels were launched with, so the kernels inside it take every
per-call address and count from a small int64 *table* that one eager kernel writes before each replay:

- :func:`moe_sum_table_kernel`, grid ``(WORLD,)`` (eager): program 0 writes the table (the rows' address,
  the output's, this rank's own rows', and per rank where its part of the rows starts and how many rows it
  has); program ``r`` copies column ``r`` of ``in_rank`` (uint8 ``[T, WORLD]``) into the graph's own copy
  and writes its running count (int64 ``[WORLD, T]``: the row of each token among rank ``r``'s rows).
- :func:`moe_parts_to_blocks_kernel`, grid ``(G, ceil(words / BLOCK_C))`` (in the graph): rank ``r``'s part of
  the rows (``table``'s start and count) copied into ``r``'s block at ``base[r]``, for every rank but this one;
  the ``G`` programs of a column block stride over the part's rows (the count is read on the device).

Table layout (int64 ``[TABLE_SIZE]``, up to :data:`MAX_WORLD` ranks): ``[0]`` the rows' address, ``[1]`` the
output's, ``[2]`` this rank's own rows', ``[3 + r]`` the first row of rank ``r``'s part, ``[11 + r]`` its number
of rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_WORLD = 8
TABLE_SIZE = 3 + 2 * MAX_WORLD


@triton.jit
def moe_sum_table_kernel(table_ptr, rows_ptr, out_ptr, own_address, in_rank_ptr, flags_ptr, cumsum_ptr, num_tokens,
                         s0, s1, s2, s3, s4, s5, s6, s7, c0, c1, c2, c3, c4, c5, c6, c7,
                         WORLD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Grid ``(WORLD,)``: the table (module docstring) from the rows (``rows_ptr``), the output (``out_ptr``),
    this rank's own rows' address ``own_address``, and the parts' starts ``s0..`` and counts ``c0..`` (ranks past
    ``WORLD`` ignored); ``flags[:, r] = in_rank[:, r]`` and ``cumsum[r, t]``, the inclusive running count of
    ``in_rank[:t + 1, r]`` (``T = num_tokens``)."""
    r = tl.program_id(0)
    if r == 0:
        # scalars stored as they come (an argument equal to 1 arrives as a constant): the pointer converts them
        tl.store(table_ptr + 0, rows_ptr.to(tl.int64))
        tl.store(table_ptr + 1, out_ptr.to(tl.int64))
        tl.store(table_ptr + 2, own_address)
        tl.store(table_ptr + 3, s0)
        tl.store(table_ptr + 4, s1)
        tl.store(table_ptr + 5, s2)
        tl.store(table_ptr + 6, s3)
        tl.store(table_ptr + 7, s4)
        tl.store(table_ptr + 8, s5)
        tl.store(table_ptr + 9, s6)
        tl.store(table_ptr + 10, s7)
        tl.store(table_ptr + 11, c0)
        tl.store(table_ptr + 12, c1)
        tl.store(table_ptr + 13, c2)
        tl.store(table_ptr + 14, c3)
        tl.store(table_ptr + 15, c4)
        tl.store(table_ptr + 16, c5)
        tl.store(table_ptr + 17, c6)
        tl.store(table_ptr + 18, c7)
    carry = tl.zeros([1], tl.int64).sum(0)
    for first in range(0, num_tokens, BLOCK_T):
        t = first + tl.arange(0, BLOCK_T)
        live = t < num_tokens
        f = tl.load(in_rank_ptr + t.to(tl.int64) * WORLD + r, mask=live, other=0)
        tl.store(flags_ptr + t.to(tl.int64) * WORLD + r, f, mask=live)
        ones = (f != 0).to(tl.int64)
        tl.store(cumsum_ptr + r * num_tokens + t, tl.cumsum(ones, 0) + carry, mask=live)
        carry += tl.sum(ones, 0)


@triton.jit
def moe_parts_to_blocks_kernel(table_ptr, base_ptr, like_ptr, me, num_words, WORLD: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    """Grid ``(G, ceil(num_words / BLOCK_C))``: for each rank ``r != me``, rows ``table[3 + r] ..`` (``table[3 +
    11 + r]`` of them) of the rows at ``table[0]`` (``num_words`` words of ``like``'s type each, 16-byte
    aligned) copied to rows ``0 ..`` at ``base[r]`` (int64 ``[WORLD]`` addresses)."""
    g = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < num_words
    word = like_ptr.dtype.element_ty
    row_bytes = num_words.to(tl.int64) * (word.primitive_bitwidth // 8)
    rows = tl.load(table_ptr + 0)
    for r in tl.static_range(WORLD):
        if r != me:
            start = tl.load(table_ptr + 3 + r)
            count = tl.load(table_ptr + 11 + r)
            dst_base = tl.load(base_ptr + r)
            for i in range(g, count, step):
                src = tl.multiple_of((rows + (start + i) * row_bytes).to(tl.pointer_type(word)), 16) + cols
                dst = tl.multiple_of((dst_base + i * row_bytes).to(tl.pointer_type(word)), 16) + cols
                tl.store(dst, tl.load(src, mask=ok), mask=ok)
