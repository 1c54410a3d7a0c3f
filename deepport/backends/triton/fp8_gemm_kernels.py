"""Triton kernels of the block-scaled FP8 GEMMs: dense NT (with split-K or tail split), M-grouped contiguous and masked.

All three compute tiles of ``D = A @ B^T`` in NT form (A ``[rows, K]``, B ``[N, K]``, ``float8_e4m3fn``, any
strides) with DeepGEMM's SM90 promotion: K is walked in blocks of 128 (``gran_k``); each block's e4m3
product goes into a float32 block accumulator on the tensor cores (``tl.dot``: ``wgmma`` on sm_90), which
is then promoted into the tile's float32 accumulator with the block's scale factors::

    acc[m, n] += dot(A[m, kb], B[n, kb]) * SFA[m, kb] * SFB[n // GRAN_N, kb]

Scale factors are float32, or packed UE8M0 (``UE8M0``): int32 words holding four K blocks' biased
exponent bytes, decoded in the kernel as ``2**(e - 127)`` (the byte shifted into a float32's exponent
field). SF tensors are read through their strides (row-major or MN-major, padding never read).

Operand loads (``USE_TMA``): a host ``TensorDescriptor`` (Hopper's bulk tensor copies; out-of-range rows
and the K tail zero-filled) when the operand is K-contiguous with 16-byte aligned rows, else pointer
arithmetic (rows wrapped into range, the K tail masked when ``EVEN_K`` is false). Rows loaded past the
end of an operand's valid rows never reach ``out`` (a workspace may hold them). Offsets that can grow
past 2**31 elements are int64.

Tile order: programs walk tiles in groups of ``GROUP_M`` M tiles (each group sweeps N), so the A and B
tiles in flight stay in L2. The dense kernel can split K over several programs per tile (all tiles:
split-K; only the tiles of the last, partial wave: tail split), each writing a float32 partial to a
workspace that a reduce kernel sums in a fixed order. The masked kernel is persistent: it reads
``masked_m`` on the device (no host sync) and hands out only the tiles of rows in use.
"""

# ruff: noqa: SIM108  (if/else on tl.constexpr flags is how Triton compiles only one side; keep them statements)
from __future__ import annotations

import triton
import triton.language as tl

BLOCK_K = tl.constexpr(128)
"""K elements per scale factor and per main-loop step (``gran_k``)."""


@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: program ``pid`` -> (M tile, N tile); ``GROUP_M`` M tiles sweep N together."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _scale(sf, rows, s_row, s_col, kb, UE8M0: tl.constexpr):
    """float32 SFs of ``rows`` (a vector or one index) for K block ``kb`` (offsets in int64: an MN-major SF's
    K-block stride is M)."""
    if UE8M0:
        word = tl.load(sf + tl.cast(rows, tl.int64) * s_row + tl.cast(kb // 4, tl.int64) * s_col)
        exponent = (word >> ((kb % 4) * 8)) & 0xFF
        value = (exponent << 23).to(tl.float32, bitcast=True)
    else:
        value = tl.load(sf + tl.cast(rows, tl.int64) * s_row + tl.cast(kb, tl.int64) * s_col)
    return value


@triton.jit
def _load_tile(src, row0, ptrs, k0, s_k, offs_k, K, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """One ``[rows, 128]`` e4m3 tile at K offset ``k0``: from the descriptor ``src`` at row ``row0``
    (``USE_TMA``) or through ``ptrs`` (the tile's pointers at K offset 0; the K tail masked unless ``EVEN_K``)."""
    if USE_TMA:
        tile = src.load([row0, k0])
    else:
        at_k = ptrs + tl.cast(k0, tl.int64) * s_k
        if EVEN_K:
            tile = tl.load(at_k)
        else:
            tile = tl.load(at_k, mask=(offs_k + k0 < K)[None, :], other=0.0)
    return tile


@triton.jit
def _scaled_block(a_tile, b_tile, sa, sb, SFB_SCALAR: tl.constexpr, PRECISE: tl.constexpr):
    """``dot(a_tile, b_tile^T) * SFA * SFB`` in float32. ``PRECISE``: the e4m3 values (exact in bfloat16)
    multiplied by bfloat16 tensor-core MMAs, whose float32 accumulation is exact to float32 rounding; the
    e4m3 MMAs of sm_90 keep fewer bits over a 128-long K block (fine for a bfloat16 output, not for float32)."""
    if PRECISE:
        block = tl.dot(a_tile.to(tl.bfloat16), tl.trans(b_tile.to(tl.bfloat16)))
    else:
        block = tl.dot(a_tile, tl.trans(b_tile))
    if SFB_SCALAR:
        scaled = block * (sa * sb)[:, None]
    else:
        scaled = block * sb[None, :] * sa[:, None]
    return scaled


@triton.jit
def _mainloop(a, a_row0, a_rows, s_am, s_ak, b, b_row0, n_off, N, s_bn, s_bk,
              sfa, s_sfam, s_sfak, sfb, s_sfbn, s_sfbk, K, kb_lo, kb_hi,
              GRAN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
              USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UE8M0: tl.constexpr, SFB_SCALAR: tl.constexpr,
              PRECISE: tl.constexpr):
    """The float32 ``[BLOCK_M, BLOCK_N]`` tile ``sum_{kb in [kb_lo, kb_hi)} dot(A_kb, B_kb^T) * SFA * SFB``.

    A rows: ``a_rows`` (in range); with ``USE_TMA`` the descriptor ``a`` is read from row ``a_row0``. B
    columns ``n_off ..`` of the group (wrapped mod ``N`` for pointers); the descriptor ``b`` from row
    ``b_row0``. ``SPLIT_N`` = 2 computes the tile as two ``BLOCK_N / 2`` halves with one accumulator each
    (half the registers for the block product, so two programs fit on a multiprocessor);
    ``SFB_SCALAR``: the tile lies in one 128-row block of B (one SFB per K block).
    """
    PART: tl.constexpr = BLOCK_N // SPLIT_N
    offs_k = tl.arange(0, BLOCK_K)
    cols0 = (n_off + tl.arange(0, PART)) % N
    cols1 = (n_off + PART + tl.arange(0, PART)) % N
    if SFB_SCALAR:
        sfb0 = n_off // GRAN_N
        sfb1 = sfb0
    else:
        sfb0 = cols0 // GRAN_N
        sfb1 = cols1 // GRAN_N
    a_ptrs = a
    b0_ptrs = b
    b1_ptrs = b
    if not USE_TMA:
        # int64 throughout: a transposed operand's K stride is its M (or N), so 127 * M passes 2**31 for
        # M > 16.9M rows (fp8_gemm_tn / _tt A, fp8_gemm_nn / _tt B)
        k_off = offs_k.to(tl.int64)[None, :]
        a_ptrs = a + a_rows.to(tl.int64)[:, None] * s_am + k_off * s_ak
        b0_ptrs = b + cols0.to(tl.int64)[:, None] * s_bn + k_off * s_bk
        b1_ptrs = b + cols1.to(tl.int64)[:, None] * s_bn + k_off * s_bk
    acc0 = tl.zeros((BLOCK_M, PART), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, PART), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        a_tile = _load_tile(a, a_row0, a_ptrs, k0, s_ak, offs_k, K, USE_TMA, EVEN_K)
        sa = _scale(sfa, a_rows, s_sfam, s_sfak, kb, UE8M0)
        b_tile = _load_tile(b, b_row0, b0_ptrs, k0, s_bk, offs_k, K, USE_TMA, EVEN_K)
        acc0 += _scaled_block(a_tile, b_tile, sa, _scale(sfb, sfb0, s_sfbn, s_sfbk, kb, UE8M0), SFB_SCALAR, PRECISE)
        if SPLIT_N == 2:
            b_tile = _load_tile(b, b_row0 + PART, b1_ptrs, k0, s_bk, offs_k, K, USE_TMA, EVEN_K)
            acc1 += _scaled_block(a_tile, b_tile, sa, _scale(sfb, sfb1, s_sfbn, s_sfbk, kb, UE8M0), SFB_SCALAR,
                                  PRECISE)
    if SPLIT_N == 2:
        acc = tl.reshape(tl.permute(tl.join(acc0, acc1), (0, 2, 1)), (BLOCK_M, BLOCK_N))
    else:
        acc = acc0
    return acc


@triton.jit
def _store(acc, out, offs_m, offs_n, row_ok, N, s_om, s_on, c, s_cm, s_cn, HAS_C: tl.constexpr):
    """``out[rows, cols] = acc (+ c)`` where ``row_ok`` and the column is ``< N``, cast to out's dtype."""
    mask = row_ok[:, None] & (offs_n < N)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if HAS_C:
        acc += tl.load(c + rows * s_cm + offs_n[None, :] * s_cn, mask=mask, other=0.0)
    tl.store(out + rows * s_om + offs_n[None, :] * s_on, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["full"])
def fp8_gemm_nt_kernel(a, b, sfa, sfb, c, out, ws, M, N, K, full,
                       s_am, s_ak, s_bn, s_bk, s_sfam, s_sfak, s_sfbn, s_sfbk, s_cm, s_cn, s_os, s_om, s_on,
                       GRAN_N: tl.constexpr, UE8M0: tl.constexpr, HAS_C: tl.constexpr, USE_TMA: tl.constexpr,
                       EVEN_K: tl.constexpr, SFB_SCALAR: tl.constexpr, PRECISE: tl.constexpr,
                       SPLIT_K: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUP_M: tl.constexpr, TAIL_SPLIT: tl.constexpr):
    """Dense ``out = A @ B^T (+ c)``, one output tile per program in :func:`_tile_of`'s order.

    - ``SPLIT_K`` = ``TAIL_SPLIT`` = 1: grid ``(tiles, 1)``; every tile whole (all K blocks, ``c`` added,
      rounded once into ``out``); ``ws`` and ``full`` unused.
    - ``SPLIT_K > 1``: grid ``(tiles, SPLIT_K)``; split ``s`` writes its float32 partial sum over its share
      of the K blocks into ``out + s * s_os`` (a workspace ``[SPLIT_K, M, N]``, ``HAS_C`` false) and
      :func:`splitk_reduce_kernel` finishes.
    - ``TAIL_SPLIT > 1`` (tail split): grid ``(full + tail * TAIL_SPLIT, 1)`` with ``tail = tiles - full``.
      Programs below ``full`` compute tiles ``0 .. full - 1`` whole, as above (the same loop, so the same
      bits). Program ``full + p`` computes piece ``s = p // tail`` of tile ``full + t``, ``t = p % tail``:
      the sum over K blocks ``[s * kb / TAIL_SPLIT, (s + 1) * kb / TAIL_SPLIT)`` (``kb`` = K blocks;
      rounded down, so no range is empty while ``TAIL_SPLIT <= kb``), stored unmasked and unrounded into
      ``ws[s, t]`` (float32, contiguous ``[TAIL_SPLIT, tail, BLOCK_M, BLOCK_N]``); it writes no ``out``.
      :func:`tail_reduce_kernel` then finishes the tail tiles.
    """
    k_blocks = tl.cdiv(K, BLOCK_K)
    if TAIL_SPLIT == 1:
        pid = tl.program_id(0)
        per_split = tl.cdiv(k_blocks, SPLIT_K)
        kb_lo = tl.program_id(1) * per_split
        kb_hi = tl.minimum(kb_lo + per_split, k_blocks)
    else:
        tail = tl.maximum(tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) - full, 1)  # the host launches only tail > 0
        piece = tl.maximum(tl.program_id(0) - full, 0)
        whole = tl.program_id(0) < full
        pid = tl.where(whole, tl.program_id(0), full + piece % tail)
        kb_lo = tl.where(whole, 0, (piece // tail) * k_blocks // TAIL_SPLIT)
        kb_hi = tl.where(whole, k_blocks, (piece // tail + 1) * k_blocks // TAIL_SPLIT)
    pid_m, pid_n = _tile_of(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _mainloop(a, pid_m * BLOCK_M, offs_m % M, s_am, s_ak, b, pid_n * BLOCK_N, pid_n * BLOCK_N, N, s_bn, s_bk,
                    sfa, s_sfam, s_sfak, sfb, s_sfbn, s_sfbk, K, kb_lo, kb_hi,
                    GRAN_N, BLOCK_M, BLOCK_N, SPLIT_N, USE_TMA, EVEN_K, UE8M0, SFB_SCALAR, PRECISE)
    if TAIL_SPLIT == 1:
        target = out + tl.program_id(1).to(tl.int64) * s_os
        _store(acc, target, offs_m, offs_n, offs_m < M, N, s_om, s_on, c, s_cm, s_cn, HAS_C)
    elif tl.program_id(0) < full:
        _store(acc, out, offs_m, offs_n, offs_m < M, N, s_om, s_on, c, s_cm, s_cn, HAS_C)
    else:
        piece64 = piece.to(tl.int64)  # = s * tail + t: ws[s, t] starts piece * BLOCK_M * BLOCK_N
        rows = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N
        tl.store(ws + piece64 * (BLOCK_M * BLOCK_N) + rows + tl.arange(0, BLOCK_N)[None, :], acc)


@triton.jit
def splitk_reduce_kernel(ws, c, out, M, N, s_cm, s_cn, s_om, s_on, SPLIT_K: tl.constexpr, HAS_C: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out = sum_s ws[s] (+ c)``: the split-K partials ``ws`` ``[SPLIT_K, M, N]`` (float32, contiguous)
    summed in a fixed order, then cast once."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    plane = tl.cast(M, tl.int64) * N
    ptrs = ws + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ptrs + s * plane, mask=mask, other=0.0)
    _store(acc, out, offs_m, offs_n, offs_m < M, N, s_om, s_on, c, s_cm, s_cn, HAS_C)


@triton.jit(do_not_specialize=["full", "tail"])
def tail_reduce_kernel(ws, c, out, M, N, full, tail, s_cm, s_cn, s_om, s_on, TAIL_SPLIT: tl.constexpr,
                       HAS_C: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, GROUP_M: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Finish :func:`fp8_gemm_nt_kernel`'s tail split: ``out = sum_s ws[s, t] (+ c)`` over tail tile ``t``
    (tile ``full + t`` of the GEMM's ``TILE_M x TILE_N`` tiles in :func:`_tile_of`'s order), the partials
    added in the order ``s = 0, 1, ..`` (the same bits every run), then cast once. Grid ``(tail, sub-blocks)``:
    each program one ``BLOCK_M x BLOCK_N`` block of one tail tile; only the tail tiles' elements are written."""
    t = tl.program_id(0)
    pid_m, pid_n = _tile_of(full + t, tl.cdiv(M, TILE_M), tl.cdiv(N, TILE_N), GROUP_M)
    per_row: tl.constexpr = TILE_N // BLOCK_N
    sub_m = tl.program_id(1) // per_row * BLOCK_M + tl.arange(0, BLOCK_M)
    sub_n = tl.program_id(1) % per_row * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = ws + t.to(tl.int64) * (TILE_M * TILE_N) + sub_m[:, None] * TILE_N + sub_n[None, :]
    plane = tl.cast(tail, tl.int64) * (TILE_M * TILE_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(TAIL_SPLIT):
        acc += tl.load(ptrs + s * plane)
    offs_m = pid_m * TILE_M + sub_m
    _store(acc, out, offs_m, pid_n * TILE_N + sub_n, offs_m < M, N, s_om, s_on, c, s_cm, s_cn, HAS_C)


@triton.jit
def m_grouped_fp8_gemm_nt_contiguous_kernel(
        a, b, sfa, sfb, m_indices, out, M, N, K,
        s_am, s_ak, s_bg, s_bn, s_bk, s_sfam, s_sfak, s_sfbg, s_sfbn, s_sfbk, s_om, s_on,
        GRAN_N: tl.constexpr, UE8M0: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
        SFB_SCALAR: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr):
    """Row ``m`` times ``B[m_indices[m]]^T``; ``-1`` rows written +0.0. ``BLOCK_M`` divides 128 (the segment
    alignment), so a tile holds rows of one group then padding: the group is its first row's, and a tile
    whose first row is padding is all padding (no K loop, zeros stored). With ``USE_TMA``, ``b`` describes
    B as ``[G * N, K]``."""
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    group = tl.load(m_indices + pid_m * BLOCK_M)
    row_group = tl.load(m_indices + offs_m, mask=offs_m < M, other=-1)
    g = tl.maximum(group, 0)
    kb_hi = tl.where(group >= 0, tl.cdiv(K, BLOCK_K), 0)
    if USE_TMA:
        b_g = b
    else:
        b_g = b + g.to(tl.int64) * s_bg
    acc = _mainloop(a, pid_m * BLOCK_M, offs_m % M, s_am, s_ak, b_g, g * N + pid_n * BLOCK_N, pid_n * BLOCK_N, N,
                    s_bn, s_bk, sfa, s_sfam, s_sfak, sfb + g.to(tl.int64) * s_sfbg, s_sfbn, s_sfbk, K, 0, kb_hi,
                    GRAN_N, BLOCK_M, BLOCK_N, SPLIT_N, USE_TMA, EVEN_K, UE8M0, SFB_SCALAR, False)
    acc = tl.where((row_group >= 0)[:, None], acc, 0.0)
    _store(acc, out, offs_m, offs_n, offs_m < M, N, s_om, s_on, out, 0, 0, False)


@triton.jit
def m_grouped_fp8_gemm_nt_masked_kernel(
        a, b, sfa, sfb, masked_m, out, G, M_MAX, N, K,
        s_ag, s_am, s_ak, s_bg, s_bn, s_bk, s_sfag, s_sfam, s_sfak, s_sfbg, s_sfbn, s_sfbk, s_og, s_om, s_on,
        GRAN_N: tl.constexpr, UE8M0: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
        SFB_SCALAR: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[g, m] = A[g, m] @ B[g]^T`` for ``m < masked_m[g]``; other rows never written. Persistent: the
    tiles in use (``ceil(masked_m[g] / BLOCK_M) * ceil(N / BLOCK_N)`` per group, read on the device) are
    dealt round-robin to the programs; within a group M tiles vary fastest (they share a B tile). With
    ``USE_TMA``, ``a`` describes A as ``[G * M_MAX, K]`` and ``b`` B as ``[G * N, K]``."""
    num_n = tl.cdiv(N, BLOCK_N)
    total = 0
    for gi in range(G):
        total += tl.cdiv(tl.load(masked_m + gi), BLOCK_M) * num_n
    k_blocks = tl.cdiv(K, BLOCK_K)
    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        g = 0
        first = 0
        start = 0
        for gi in range(G):
            count = tl.cdiv(tl.load(masked_m + gi), BLOCK_M) * num_n
            hit = (tile >= start) & (tile < start + count)
            g = tl.where(hit, gi, g)
            first = tl.where(hit, start, first)
            start += count
        rows_g = tl.load(masked_m + g)
        num_m = tl.cdiv(rows_g, BLOCK_M)
        pid_m = (tile - first) % num_m
        pid_n = (tile - first) // num_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        g64 = g.to(tl.int64)
        if USE_TMA:
            a_g = a
            b_g = b
        else:
            a_g = a + g64 * s_ag
            b_g = b + g64 * s_bg
        acc = _mainloop(a_g, g * M_MAX + pid_m * BLOCK_M, offs_m % M_MAX, s_am, s_ak,
                        b_g, g * N + pid_n * BLOCK_N, pid_n * BLOCK_N, N, s_bn, s_bk,
                        sfa + g64 * s_sfag, s_sfam, s_sfak, sfb + g64 * s_sfbg, s_sfbn, s_sfbk, K, 0, k_blocks,
                        GRAN_N, BLOCK_M, BLOCK_N, SPLIT_N, USE_TMA, EVEN_K, UE8M0, SFB_SCALAR, False)
        _store(acc, out + g64 * s_og, offs_m, offs_n, offs_m < rows_g, N, s_om, s_on, out, 0, 0, False)
