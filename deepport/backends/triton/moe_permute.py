"""MoE on the triton backend: the layout count and the single-device steps of the expanded and
low-latency layouts as Triton kernels; routing and the multi-rank exchange are the torch backend's
(:mod:`deepport.backends.torch.moe_layouts`, over ``torch.distributed``), called with these steps.

Moved payloads are copied as raw bits (integer views), so they equal the torch and reference backends'
exactly; weighted sums accumulate in float32 per destination row in a fixed order (entries sorted by
destination row, stably), stored as float32 rows or (``weighted_rows_into``) rounded once to bf16 by
the kernel's store; the one-process combines (expanded and low-latency) hand ``token_rows_into`` each
token's terms already in order (a ``[T, K]`` table), which sums them the same way without the sort by
destination (a radix sort of ``T * K`` entries and the segment scan: about 100 us of the 290 us expanded
combine of 4096 tokens on an H200, trace of 2026-12-01). The expanded combine's table comes from one
kernel, ``token_table`` (torch's ten gathers, scatter and sort took about 85 us around the 132 us sum
kernel, trace of 2026-12-02); the one-process low-latency layout and the combine's row of each slot also
come from one kernel each (``low_latency_layout``, ``low_latency_positions``) instead of a dozen torch
scans, scatters and gathers apiece. The multi-rank low-latency dispatch's sender is one kernel (routes,
metadata and the FP8-cast rows: ``low_latency_send_rows``), its receiver's routes one more
(``low_latency_receive``), then one kernel placing payload and scales (``scatter_row_pair``); the
handle's copies of ``topk_idx`` and ``recv_count`` are written by the send and receive kernels; the
combine's terms take one kernel per side
(``low_latency_return``, ``low_latency_pairs``). A dispatch of 128 tokens x 7168 at EP=2 took 103 kernels
and 285 us of one rank's GPU time before these, the combine 60 and 235 (traces of 2026-12-02; the figures
since are in benchmarks/results/2026-12-02-h200-ll-fused-steps). The FP8 cast uses IEEE divisions and e4m3
round-to-nearest-even (under the interpreter, whose e4m3 and bf16 roundings are wrong, the kernels store
float32 and torch rounds). The one-process expanded dispatch is fused
(:mod:`deepport.backends.triton.moe_expanded_dispatch`, the ``dispatch_expanded_one_process`` step).
"""

from __future__ import annotations

import contextlib

import torch

from deepport.backends.torch import moe_layouts
from deepport.backends.torch.moe_comm import FixedWindow, RowFormat
from deepport.backends.torch.moe_local import LocalSteps
from deepport.backends.triton._runtime import interpreting
from deepport.backends.triton.fast_launch import FastLaunch
from deepport.backends.triton.moe_permute_kernels import (
    moe_cast_fp8_kernel,
    moe_layout_count_kernel,
    moe_ll_layout_kernel,
    moe_ll_pairs_kernel,
    moe_ll_positions_kernel,
    moe_ll_receive_kernel,
    moe_ll_return_kernel,
    moe_ll_send_rows_kernel,
    moe_ll_window_rows_kernel,
    moe_place_rows_kernel,
    moe_rank_rows_kernel,
    moe_receive_meta_kernel,
    moe_scatter_row_pair_kernel,
    moe_scatter_rows_kernel,
    moe_token_rows_kernel,
    moe_token_table_kernel,
    moe_weighted_rows_kernel,
)
from deepport.kernels.moe_args import FP8, FP8_BLOCK
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import (
    AMAX_FLOOR,
    FP8_MAX,
    FP8_MAX_INV,
    MoELowLatencyDispatchCall,
    MoELowLatencyDispatchResult,
)

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ROW_BLOCK = 4096  # columns per program when moving or summing rows
# The weighted-rows kernel issues the next row's load before the current row's multiply-add (same sum, same
# order, same bits): off until measured on a GPU (scripts/gpu_moe_trace.py --combine)
_PREFETCH = False


# the normal EP ops' kernels of many arguments, launched without Triton's per-call binding once compiled
_LAYOUT = FastLaunch(moe_layout_count_kernel)
_PLACE = FastLaunch(moe_place_rows_kernel)
_RANK_ROWS = FastLaunch(moe_rank_rows_kernel)


def _guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _block(num_cols: int) -> int:
    return min(_ROW_BLOCK, max(16, 1 << max(num_cols - 1, 0).bit_length()))


# Measured on the H200 (scripts/gpu_moe_trace.py --rows --combine, 2026-12-01; benchmarks/results/
# 2026-12-01-h200-tune/): the row kernels are fastest with small programs. Moving rows: 2 KB per 2-warp
# program (223 us against 282 us at 16 KB and 4 warps for 4096 x 8 bf16 rows of 7168), whatever the element
# width. The weighted sum: 4 KB of y per program at 16 bytes per thread (131.5 us against 150 us at 8 KB,
# 4 warps).
_MOVE_BYTES = 2048
MOVE_WARPS = 2
_SUM_BYTES = 4096


def block_for_bytes(num_cols: int, element_size: int, nbytes: int) -> int:
    """Columns per program so that one program handles about ``nbytes`` of a row (a power of two, 16 or more,
    at most ``nbytes``'s elements rounded down and the row rounded up to a power of two)."""
    per = max(16, nbytes // element_size)
    return min(_block(num_cols), 1 << (per.bit_length() - 1))


def _sum_tiling(num_cols: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` of the kernels that sum rows of ``y``: :data:`_SUM_BYTES` of a row per
    program, 16 bytes of it per thread."""
    block = block_for_bytes(num_cols, element_size, _SUM_BYTES)
    return block, max(1, min(16, block * element_size // 512))


def move_block(num_cols: int, element_size: int) -> int:
    """Columns per program of the kernels that copy rows (:data:`_MOVE_BYTES` per program, launched with
    :data:`MOVE_WARPS` warps)."""
    return block_for_bytes(num_cols, element_size, _MOVE_BYTES)


# How place_rows moves rows (the low-latency layouts), swept by scripts/gpu_moe_trace.py --place. The defaults
# are the measured ones: rows at the payload's element width (the dispatch's fp8 rows as bytes), up to 4096
# elements per 4-warp program; 2 KB programs of bytes measured slower on the H200 (212 against 191 us per
# low-latency dispatch, 2026-12-01). _PLACE_WIDE views whole rows as the widest integer type their layout
# allows (int64 for 7168-byte rows, as the fused expanded dispatch does); _PLACE_BYTES > 0 sizes the programs
# by bytes instead.
_PLACE_WIDE = False
_PLACE_BYTES = 0
_PLACE_WARPS = 4


def _place_views(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``src`` (made contiguous unless its rows are dense, as views into packed received rows are) and ``dst``
    as integer views of the same bits: the element's width, or
    with :data:`_PLACE_WIDE` the widest whose size divides a row's bytes, both base addresses and every
    stride in bytes (``dst`` rows dense)."""
    bits = _BITS[src.element_size()]
    dense = src.dim() == 2 and (src.stride(1) == 1 or int(src.shape[1]) <= 1)  # rows at any stride: no copy
    src_bits, dst_bits = (src if dense else src.contiguous()).view(bits), dst.view(bits)
    if not _PLACE_WIDE or dst_bits.stride(2) != 1:
        return src_bits, dst_bits
    size = src_bits.element_size()
    row_bytes = int(dst_bits.shape[2]) * size
    spans = [src_bits.data_ptr(), dst_bits.data_ptr(), row_bytes, src_bits.stride(0) * size,
             dst_bits.stride(0) * size, dst_bits.stride(1) * size]
    for wide in (8, 4, 2):
        if wide > size and all(v % wide == 0 for v in spans):
            return src_bits.view(_BITS[wide]), dst_bits.view(_BITS[wide])
    return src_bits, dst_bits


def place_rows(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, zero_missing: bool) -> None:
    """``dst[g, i] = src[index[g, i]]`` bit for bit (see :mod:`deepport.backends.torch.moe_local`)."""
    groups, rows, cols = (int(d) for d in dst.shape)
    if groups * rows == 0 or cols == 0:
        return
    src_bits, dst_bits = _place_views(src, dst)
    cols = int(dst_bits.shape[2])
    idx = index.to(torch.int64).contiguous()
    size = src_bits.element_size()
    block = block_for_bytes(cols, size, _PLACE_BYTES) if _PLACE_BYTES else _block(cols)
    with _guard(dst.device):
        _PLACE((groups * rows, -(-cols // block)), src_bits, idx, dst_bits, rows, cols, src_bits.stride(0),
               dst_bits.stride(0), dst_bits.stride(1), dst_bits.stride(2), zero_missing, block,
               num_warps=_PLACE_WARPS)


def scatter_rows(src: torch.Tensor, dst: torch.Tensor, targets: torch.Tensor) -> None:
    """``dst.view(G * R, C)[targets[j, q]] = src[j]`` bit for bit (see :mod:`deepport.backends.torch.moe_local`;
    a target -1 is skipped, as :func:`low_latency_receive`'s targets need): programs over the ``n`` source
    rows (each read once, stored at its distinct targets), so a sparse layout (the low-latency one: ``G * R``
    rows for a few hundred placed) costs what it places, where :func:`place_rows` visits every destination
    row (61 us per call for the FP8 rows of 128 tokens, hidden 7168, 128 local experts at EP=2 on an H200,
    2026-12-02)."""
    rows, cols = int(dst.shape[1]), int(dst.shape[2])
    n, q = (int(d) for d in targets.shape)
    if n * q == 0 or cols == 0:
        return
    src_bits, dst_bits = _place_views(src, dst)
    cols = int(dst_bits.shape[2])
    block = block_for_bytes(cols, src_bits.element_size(), _MOVE_BYTES)
    with _guard(dst.device):
        moe_scatter_rows_kernel[(n, -(-cols // block))](
            src_bits, targets.to(torch.int64).contiguous(), dst_bits, rows, cols, src_bits.stride(0),
            dst_bits.stride(0), dst_bits.stride(1), dst_bits.stride(2), Q=q, BLOCK_C=block, num_warps=MOVE_WARPS)


def scatter_row_pair(parts: list[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor) -> None:
    """:func:`scatter_rows` of each ``(src, dst)`` part (the same rows and targets), two parts in one launch
    (the low-latency dispatch's payload and scales; one part: :func:`scatter_rows`)."""
    if len(parts) != 2:
        for src, dst in parts:
            scatter_rows(src, dst, targets)
        return
    n, q = (int(d) for d in targets.shape)
    (a_src, a_dst), (b_src, b_dst) = parts
    if n * q == 0:
        return
    rows = int(a_dst.shape[1])
    if int(b_dst.shape[1]) != rows or int(a_src.shape[0]) != n or int(b_src.shape[0]) != n:
        raise ValueError(f"expected both parts over {n} source rows into [G, {rows}, C] layouts, got sources "
                         f"{tuple(a_src.shape)} and {tuple(b_src.shape)}, destinations {tuple(a_dst.shape)} and "
                         f"{tuple(b_dst.shape)}")
    views = [_place_views(a_src, a_dst), _place_views(b_src, b_dst)]
    if int(views[0][1].shape[2]) == 0 or int(views[1][1].shape[2]) == 0:
        for src, dst in parts:
            scatter_rows(src, dst, targets)
        return
    _scatter_pair(views, targets, rows, None)


def _scatter_pair(views: list[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor, rows: int,
                  landed: tuple[torch.Tensor, torch.Tensor, int, int, int, int] | None) -> None:
    """One launch of the pair kernel over ``views`` (:func:`_place_views` of both parts); ``landed``: ``(received,
    seq, t_max, row_bytes, a_off, b_off)``, the source rows where a fixed exchange left them."""
    n, q = (int(d) for d in targets.shape)
    (a_bits, a_dbits), (b_bits, b_dbits) = views
    a_cols, b_cols = int(a_dbits.shape[2]), int(b_dbits.shape[2])
    a_block = block_for_bytes(a_cols, a_bits.element_size(), _MOVE_BYTES)
    b_block = block_for_bytes(b_cols, b_bits.element_size(), _MOVE_BYTES)
    a_blocks = -(-a_cols // a_block)
    table = targets.to(torch.int64).contiguous()
    received, seq, t_max, row_bytes, a_off, b_off = (table, table, 1, 0, 0, 0) if landed is None else landed
    with _guard(a_dbits.device):
        moe_scatter_row_pair_kernel[(n, a_blocks + -(-b_cols // b_block))](
            a_bits, a_dbits, a_cols, a_bits.stride(0), a_dbits.stride(0), a_dbits.stride(1), a_dbits.stride(2),
            a_blocks, b_bits, b_dbits, b_cols, b_bits.stride(0), b_dbits.stride(0), b_dbits.stride(1),
            b_dbits.stride(2), table, rows, received, seq, int(received.shape[-1]), t_max, row_bytes, a_off, b_off,
            Q=q, BLOCK_A=a_block, BLOCK_B=b_block, LANDED=landed is not None, num_warps=MOVE_WARPS)


def _check_landed(what: str, received: torch.Tensor, seq: torch.Tensor, t_max: int, slots: int) -> None:
    world = int(received.shape[1]) if received.dim() == 2 else -1
    if received.dtype != torch.int64 or tuple(received.shape) != (2, world) or seq.dtype != torch.int64 \
            or seq.numel() != 1 or world * t_max != slots:
        raise ValueError(f"{what}: expected received int64 [2, R] with R * t_max = {slots} slots (t_max {t_max}) "
                         f"and seq int64 [1], got {received.dtype} {tuple(received.shape)}, {seq.dtype} "
                         f"{tuple(seq.shape)}")


def scatter_row_pair_landed(received: torch.Tensor, seq: torch.Tensor, t_max: int, fmt: RowFormat,
                            placed: list[tuple[str, torch.Tensor]], targets: torch.Tensor) -> None:
    """:func:`scatter_row_pair` whose source rows lie where a fixed exchange left them (``FixedWindow.land``):
    row ``i`` is row ``i % t_max`` (``fmt.row_bytes`` bytes, 16-byte aligned) of source ``i // t_max``'s part at
    ``received[(seq - 1) & 1, source]``; ``placed`` names each part of ``fmt`` and its ``[G, rows, C]`` layout,
    whose dtype the part's bits are read as (see :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    n = int(targets.shape[0])
    _check_landed("scatter_row_pair_landed", received, seq, t_max, n)
    offsets = [fmt.offsets[fmt.names.index(name)] for name, _ in placed]
    if len(placed) != 2 or fmt.row_bytes % 16 or any(o % 16 for o in offsets):
        raise ValueError(f"scatter_row_pair_landed: expected two parts at 16-byte offsets of 16-byte rows, got "
                         f"{len(placed)} parts at {offsets} of {fmt.row_bytes}-byte rows")
    if n * int(targets.shape[1]) == 0:
        return
    like = fmt.empty(1, placed[0][1].device)  # one row shaped as the landed ones: their types and alignment
    views = []
    for name, dst in placed:
        part = fmt.part(like, name)
        views.append(_place_views(part if part.dtype == dst.dtype else part.view(dst.dtype), dst))
    rows = int(placed[0][1].shape[1])
    if any(int(d.shape[1]) != rows for _, d in placed) or any(int(v[1].shape[2]) == 0 for v in views):
        raise ValueError(f"scatter_row_pair_landed: expected two non-empty [G, {rows}, C] layouts, got "
                         f"{[tuple(d.shape) for _, d in placed]}")
    _scatter_pair(views, targets, rows, (received, seq, t_max, fmt.row_bytes, offsets[0], offsets[1]))


# received slots per step of the receive kernel's walk (H200, EP=2, 256 slots: 5.7 us per launch at 256, 8.2 at
# 64, 2026-12-02, scripts/gpu_moe_trace.py --ll-routes)
_RECEIVE_SLOTS = 256
_RECEIVE_WARPS = 4  # warps per program of the receive kernel (one program per local expert)


def low_latency_receive(meta: torch.Tensor, rank: int, num_local: int, count32: torch.Tensor,
                        count32_copy: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The receiver's routes of a multi-rank low-latency dispatch in one kernel of one program per local
    expert (see :class:`deepport.backends.torch.moe_local.LocalSteps`), instead of about 25 torch ops; the
    counts also into ``count32_copy`` where given (in the same kernel)."""
    return _receive(meta, int(meta.shape[0]), int(meta.shape[1]) - 1, None, rank, num_local, count32, count32_copy)


def low_latency_receive_landed(received: torch.Tensor, seq: torch.Tensor, t_max: int, fmt: RowFormat, rank: int,
                               num_local: int, count32: torch.Tensor,
                               count32_copy: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`low_latency_receive` reading each slot's meta (``fmt``'s int32 part ``meta``: token, ``K`` ids)
    where a fixed exchange left it: slot ``s`` is row ``s % t_max`` of source ``s // t_max``'s part at
    ``received[(seq - 1) & 1, source]`` (see :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    i = fmt.names.index("meta")
    if fmt.dtypes[i] != torch.int32 or fmt.widths[i] < 2 or t_max < 1:
        raise ValueError(f"low_latency_receive_landed: expected an int32 meta part of a token and at least one id "
                         f"and t_max >= 1, got {fmt.dtypes[i]} x {fmt.widths[i]}, t_max {t_max}")
    slots = int(received.shape[1]) * t_max if received.dim() == 2 else -1
    _check_landed("low_latency_receive_landed", received, seq, t_max, slots)
    return _receive(count32, slots, fmt.widths[i] - 1, (received, seq, t_max, fmt.row_bytes, fmt.offsets[i]), rank,
                    num_local, count32, count32_copy)


def _receive(meta: torch.Tensor, slots: int, k: int, landed: tuple[torch.Tensor, torch.Tensor, int, int, int] | None,
             rank: int, num_local: int, count32: torch.Tensor,
             count32_copy: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The receive kernel over ``meta`` (int32 ``[S, 1 + K]``) or, with ``landed`` ``(received, seq, t_max,
    row_bytes, meta_off)``, over the meta of the landed rows (``meta`` then only gives the device)."""
    dev = meta.device
    recv_token = torch.empty(slots, dtype=torch.int64, device=dev)
    recv_local, position, target = (torch.empty((slots, k), dtype=torch.int64, device=dev) for _ in range(3))
    valid = torch.empty((slots, k), dtype=torch.bool, device=dev)
    count = torch.empty(num_local, dtype=torch.int64, device=dev)
    packed = torch.empty((num_local, slots), dtype=torch.int64, device=dev)
    received, seq, t_max, row_bytes, meta_off = (count, count, 1, 0, 0) if landed is None else landed
    if slots and k:
        with _guard(dev):
            moe_ll_receive_kernel[(num_local,)](
                meta, meta.stride(0) if landed is None else 0, rank * num_local, num_local, slots, recv_token,
                recv_local, valid.view(torch.int8), position, target, count, count32, packed,
                count32 if count32_copy is None else count32_copy, received, seq, int(received.shape[-1]), t_max,
                row_bytes, meta_off, K=k, KP=_pow2(k), BLOCK_S=_RECEIVE_SLOTS, COPY_COUNT=count32_copy is not None,
                LANDED=landed is not None, num_warps=_RECEIVE_WARPS)
    else:  # nothing received, or no slot to name an expert (never with landed rows: checked by the caller)
        recv_token.copy_(meta[:, 0])
        count.zero_()
        count32.zero_()
        if count32_copy is not None:
            count32_copy.zero_()
        packed.fill_(-1)
    return recv_token, recv_local, valid, position, count, target, packed


_SEND_ROWS_TOKENS = 128  # most tokens per step of the send-rows kernel's count
# 128-channel blocks per program of the send-rows kernel (one program per token and chunk; each counts its
# token's rows itself). H200, EP=2, 128 tokens x 7168, FP8 (2026-12-02, scripts/gpu_moe_trace.py --ll-routes):
# 22.1 / 13.5 / 9.8 / 7.5 / 8.3 us at 1 / 2 / 4 / 8 / 14 blocks, one program per token 38.6 us; the routes
# kernel and the cast into the rows it replaces took 3.6 + 6.3 us in two launches
_SEND_ROWS_BLOCKS = 8


def _send_rows_block(k: int, ranks: int) -> int:
    """Tokens per step of the send-rows kernel's count: a ``[BLOCK_T, K, R]`` tile of at most 8192 entries."""
    return max(16, min(_SEND_ROWS_TOKENS, 8192 // (_pow2(k) * _pow2(ranks))))


def low_latency_send_rows(x: torch.Tensor, idx: torch.Tensor, num_ranks: int, num_local: int, t_max: int,
                          meta: torch.Tensor, data_rows: torch.Tensor, scale_rows: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sender's side of a multi-rank low-latency dispatch in one kernel of one program per token and
    :data:`_SEND_ROWS_BLOCKS` blocks of 128 channels (see :class:`deepport.backends.torch.moe_local.LocalSteps`):
    the routes and meta rows, and the payload in the send rows, FP8-cast (:func:`cast_fp8`'s bits) when
    ``scale_rows`` is given. Under the interpreter (wrong e4m3 rounding) the kernel stores float32 rows that
    torch rounds."""
    t = int(idx.shape[0])
    in_rank, send_slot, target = _route_tensors(t, num_ranks, idx.device)
    if t == 0:
        meta[:, 0].fill_(-1)
        return in_rank, send_slot, target
    cast = scale_rows is not None
    staged = cast and interpreting()
    if cast:
        rows = data_rows.view(FP8)
        out = torch.zeros(rows.shape, dtype=torch.float32, device=idx.device) if staged else rows
        src = x if x.stride(1) == 1 else x.contiguous()
    else:
        src, out = _place_views(x, data_rows[None])
        out = out[0]
    scales = scale_rows if scale_rows is not None else meta  # not written without the cast
    _launch_send_rows(src, idx, num_ranks, num_local, t_max, (in_rank, send_slot, target), meta, out, scales,
                      cast, staged, None)
    if staged:
        _round_staged(out, target, rows.view(torch.uint8))
    return in_rank, send_slot, target


def low_latency_send_window(x: torch.Tensor, idx: torch.Tensor, num_ranks: int, num_local: int, t_max: int,
                            fmt: RowFormat, window: FixedWindow, cast: bool, idx_copy: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`low_latency_send_rows` with no send buffer: each sent row (``fmt``'s parts ``meta``, ``x`` and,
    with ``cast``, ``scales``) stored straight into its rank's memory through ``window`` (the written fixed
    exchange; see :class:`deepport.backends.torch.moe_local.LocalSteps`); ``idx`` also copied into ``idx_copy``
    (int64 ``[T, K]``, contiguous) where given, by the same kernel. Under the interpreter the FP8 payload is
    staged in float32, rounded by torch and moved by a second kernel."""
    t, dev = int(idx.shape[0]), idx.device
    if t == 0:
        raise ValueError("low_latency_send_window needs at least one token (its programs mark the unused rows)")
    routes = _route_tensors(t, num_ranks, dev)
    staged = cast and interpreting()
    src = x if x.stride(1) == 1 else x.contiguous()
    if not cast:  # raw bits, as every moved payload
        src = src.view(_BITS[src.element_size()])
    hidden = int(x.shape[1])
    out = torch.zeros((num_ranks * t_max, hidden), dtype=torch.float32, device=dev) if staged else src
    if idx_copy is not None and (idx_copy.dtype != torch.int64 or tuple(idx_copy.shape) != tuple(idx.shape)
                                 or not idx_copy.is_contiguous()):
        raise ValueError(f"expected idx_copy int64 {tuple(idx.shape)} contiguous, got {idx_copy.dtype} "
                         f"{tuple(idx_copy.shape)} strides {idx_copy.stride()}")
    _launch_send_rows(src, idx, num_ranks, num_local, t_max, routes, src, out, src, cast, staged, (fmt, window),
                      idx_copy)
    if staged:
        rows = torch.zeros((num_ranks * t_max, hidden), dtype=torch.uint8, device=dev)
        _round_staged(out, routes[2], rows)
        at = fmt.offsets[fmt.names.index("x")]
        block = min(4096, _pow2(hidden))
        with _guard(dev):
            moe_ll_window_rows_kernel[(t * num_ranks, -(-hidden // block))](
                rows, rows.stride(0), routes[2], window.table, window.seq, num_ranks, t_max, fmt.row_bytes, at,
                hidden, BLOCK=block)
    return routes


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _route_tensors(t: int, num_ranks: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty ``(in_rank bool, send_slot int64, target int64)``, each ``[t, num_ranks]``."""
    return (torch.empty((t, num_ranks), dtype=torch.bool, device=dev),
            torch.empty((t, num_ranks), dtype=torch.int64, device=dev),
            torch.empty((t, num_ranks), dtype=torch.int64, device=dev))


def _round_staged(staged: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> None:
    """The interpreter's float32 payload rows into e4m3 bytes ``rows``, the sent rows only."""
    placed = torch.zeros(int(staged.shape[0]) + 1, dtype=torch.bool, device=staged.device)
    placed[target.reshape(-1)] = True  # -1 lands on the extra entry
    rows[placed[:-1]] = staged[placed[:-1]].to(FP8).view(torch.uint8)


def _align(offset: int) -> int:
    """The largest power of two up to 16 dividing ``offset`` (window rows start 16-byte aligned)."""
    return 16 if offset % 16 == 0 else offset & -offset


def _launch_send_rows(src: torch.Tensor, idx: torch.Tensor, num_ranks: int, num_local: int, t_max: int,
                      routes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], meta: torch.Tensor, out: torch.Tensor,
                      scales: torch.Tensor, cast: bool, staged: bool,
                      direct: tuple[RowFormat, FixedWindow] | None, idx_copy: torch.Tensor | None = None) -> None:
    t, k = (int(d) for d in idx.shape)
    hidden = int(src.shape[1])
    in_rank, send_slot, target = routes
    ids = idx if idx.stride(1) == 1 or k == 1 else idx.contiguous()
    blocks = max(1, -(-hidden // FP8_BLOCK))
    per_program = min(blocks, _SEND_ROWS_BLOCKS)
    if direct is None:
        win, seq, row_bytes, offs = send_slot, send_slot, 0, (0, 0, 0)  # unused
    else:
        fmt, window = direct
        if window.table.dtype != torch.int64 or tuple(window.table.shape) != (2, num_ranks) or \
                window.seq.dtype != torch.int64 or window.seq.numel() != 1:
            raise ValueError(f"expected a window table int64 [2, {num_ranks}] and seq int64 [1], got "
                             f"{window.table.dtype} {tuple(window.table.shape)} and {window.seq.dtype} "
                             f"{tuple(window.seq.shape)}")
        win, seq, row_bytes = window.table, window.seq, fmt.row_bytes
        at = {name: fmt.offsets[i] for i, name in enumerate(fmt.names)}
        offs = (at["meta"], at["x"], at.get("scales", 0))
    with _guard(idx.device):
        moe_ll_send_rows_kernel[(t, -(-blocks // per_program))](
            src, src.stride(0), ids, ids.stride(0) if t > 1 else k, t, num_local, num_ranks, t_max,
            in_rank.view(torch.uint8), send_slot, target, meta, meta.stride(0), out, out.stride(0), scales,
            scales.stride(0), hidden, per_program, FP8_MAX, FP8_MAX_INV, AMAX_FLOOR, win, seq, row_bytes, *offs,
            ids if idx_copy is None else idx_copy,
            K=k, KP=_pow2(k), RP=_pow2(num_ranks), BLOCK_T=_send_rows_block(k, num_ranks), CAST=cast,
            STORE_FP32=staged, DIRECT=direct is not None, DIRECT_Q=direct is not None and not staged,
            META_ALIGN=_align(offs[0]), Q_ALIGN=_align(offs[1]), S_ALIGN=_align(offs[2]),
            COPY_IDX=idx_copy is not None, BPP=_pow2(per_program))


def low_latency_return(idx: torch.Tensor, weights: torch.Tensor, send_slot: torch.Tensor, num_local: int,
                       t_max: int, w_send: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sender's side of a multi-rank low-latency combine in one kernel of one program per token (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`), instead of about 20 torch ops."""
    return _return(idx, weights, send_slot, num_local, t_max, w_send, None)


def low_latency_return_window(idx: torch.Tensor, weights: torch.Tensor, send_slot: torch.Tensor, num_local: int,
                              t_max: int, window: FixedWindow) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`low_latency_return` whose weights rows go straight into the receivers' memory through ``window``
    (``t_max`` rows of ``K`` float32 per rank; see :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    k, world = int(idx.shape[1]), int(send_slot.shape[1])
    if window.pair_bytes != t_max * k * 4 or tuple(window.table.shape) != (2, world):
        raise ValueError(f"low_latency_return_window: expected a window of {t_max} rows of {k} float32 per rank "
                         f"({t_max * k * 4} bytes) over {world} ranks, got {window.pair_bytes} bytes over "
                         f"{tuple(window.table.shape)}")
    return _return(idx, weights, send_slot, num_local, t_max, None, window)


def _return(idx: torch.Tensor, weights: torch.Tensor, send_slot: torch.Tensor, num_local: int, t_max: int,
            w_send: torch.Tensor | None, window: FixedWindow | None) -> tuple[torch.Tensor, torch.Tensor]:
    t, k = (int(d) for d in idx.shape)
    world = int(send_slot.shape[1])
    per_rank = world <= k
    q = world if per_rank else k
    table = torch.empty((t, q), dtype=torch.int64, device=idx.device)
    table_w = torch.empty((t, q), dtype=torch.float32, device=idx.device)
    sending = w_send is not None or window is not None
    if t and k:
        ids = idx if idx.stride(1) == 1 or k == 1 else idx.contiguous()
        w = weights if weights.stride(1) == 1 or k == 1 else weights.contiguous()
        win, seq = (table, table) if window is None else (window.table, window.seq)
        with _guard(idx.device):
            moe_ll_return_kernel[(t,)](
                ids, ids.stride(0) if t > 1 else k, w, w.stride(0) if t > 1 else k, send_slot.contiguous(), world,
                num_local, t_max, table, table_w, table_w if w_send is None else w_send, win, seq, K=k,
                KP=_pow2(k), Q=q, QP=_pow2(q), PER_RANK=per_rank, SINGLE=not sending, SEND_WEIGHTS=sending,
                DIRECT_W=window is not None)
    return table, table_w


_PAIR_SLOTS = 64  # received slots per program of the pairs kernel


def low_latency_pairs(recv_local: torch.Tensor, valid: torch.Tensor, position: torch.Tensor,
                      w_recv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The receiver's side of a multi-rank low-latency combine in one kernel (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`), instead of about 15 torch ops."""
    return _pairs(recv_local, valid, position, w_recv, None)


def low_latency_pairs_landed(recv_local: torch.Tensor, valid: torch.Tensor, position: torch.Tensor,
                             received: torch.Tensor, seq: torch.Tensor, t_max: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`low_latency_pairs` reading the received weights where a fixed exchange left them
    (``FixedWindow.land``: slot ``s``'s row is row ``s % t_max`` of source ``s // t_max``'s part at
    ``received[(seq - 1) & 1, source]``; see :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    _check_landed("low_latency_pairs_landed", received, seq, t_max, int(recv_local.shape[0]))
    return _pairs(recv_local, valid, position, None, (received, seq, t_max, int(received.shape[1])))


def _pairs(recv_local: torch.Tensor, valid: torch.Tensor, position: torch.Tensor, w_recv: torch.Tensor | None,
           landed: tuple[torch.Tensor, torch.Tensor, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    slots, k = (int(d) for d in recv_local.shape)
    table = torch.empty((slots, k), dtype=torch.int64, device=recv_local.device)
    pair_w = torch.empty((slots, k), dtype=torch.float32, device=recv_local.device)
    received, seq, t_max, sources = (table, table, 1, 1) if landed is None else landed
    if slots and k:
        with _guard(recv_local.device):
            moe_ll_pairs_kernel[(-(-slots // _PAIR_SLOTS),)](
                recv_local.contiguous(), valid.contiguous().view(torch.int8), position.contiguous(),
                pair_w if w_recv is None else w_recv.to(torch.float32).contiguous(), table, pair_w, slots, received,
                seq, t_max, sources, K=k, KP=_pow2(k), BLOCK_S=_PAIR_SLOTS,
                HAS_W=w_recv is not None or landed is not None, LANDED=landed is not None)
    return table, pair_w


def weighted_rows(y: torch.Tensor, src_pos: torch.Tensor, dst_row: torch.Tensor, weights: torch.Tensor,
                  num_rows: int) -> torch.Tensor:
    """float32 ``[num_rows, C]``: ``out[dst_row[j]] += weights[j] * y[src_pos[j]]``, summed per row in
    the order of ``j``."""
    out = torch.empty((num_rows, int(y.shape[1])), dtype=torch.float32, device=y.device)
    _weighted_rows(y, src_pos, dst_row, weights, out)
    return out


def weighted_rows_into(y: torch.Tensor, src_pos: torch.Tensor, dst_row: torch.Tensor, weights: torch.Tensor,
                       out: torch.Tensor) -> None:
    """:func:`weighted_rows` rounded once into bf16 ``out [num_rows, C]`` by the kernel's store (under the
    interpreter, whose float32 -> bf16 store truncates, into float32 rows that torch rounds)."""
    if interpreting():
        out.copy_(weighted_rows(y, src_pos, dst_row, weights, int(out.shape[0])))
    else:
        _weighted_rows(y, src_pos, dst_row, weights, out)


def _weighted_rows(y: torch.Tensor, src_pos: torch.Tensor, dst_row: torch.Tensor, weights: torch.Tensor,
                   out: torch.Tensor) -> None:
    num_rows, cols = int(out.shape[0]), int(out.shape[1])
    if num_rows == 0 or cols == 0:
        return
    order = torch.sort(dst_row, stable=True).indices
    seg = torch.zeros(num_rows + 1, dtype=torch.int64, device=y.device)
    per_row = torch.zeros(num_rows, dtype=torch.int64, device=y.device)  # bincount would read max() on the host
    seg[1:] = per_row.scatter_add_(0, dst_row.to(torch.int64), torch.ones_like(dst_row, dtype=torch.int64)).cumsum(0)
    y = y.contiguous()
    block, warps = _sum_tiling(cols, y.element_size())
    with _guard(y.device):
        moe_weighted_rows_kernel[(num_rows, -(-cols // block))](
            y, src_pos[order].to(torch.int64).contiguous(), weights[order].to(torch.float32).contiguous(), seg, out,
            cols, y.stride(0), BLOCK_C=block, PREFETCH=_PREFETCH, num_warps=warps)


def token_rows_into(y: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """bf16 ``out [T, C]``: row ``t`` the float32 sum, in column order, of ``weights[t, j] * y[table[t, j]]``
    over the entries ``table[t, j] >= 0`` (``table`` int64 ``[T, K]``, ``weights`` float32 ``[T, K]``),
    rounded once to bf16 by the kernel's store (under the interpreter, whose float32 -> bf16 store
    truncates, into float32 rows that torch rounds)."""
    if int(out.shape[0]) and int(out.shape[1]):
        y = y.contiguous()
        _sums_per_token(y, y.stride(0), table, weights, out)


def _sums_per_token(like: torch.Tensor, stride_y: int, table: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                    rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None, **mode: bool) -> None:
    """One launch of :func:`moe_token_rows_kernel` over ``out``'s rows (``T, C >= 1``): ``like`` the rows (or
    only their type), ``rows`` its ``(win, seq, num_ranks, rows_per_rank)`` where ``mode`` needs them; under the
    interpreter into float32 rows that torch rounds."""
    tokens, cols = int(out.shape[0]), int(out.shape[1])
    table, weights = table.to(torch.int64).contiguous(), weights.to(torch.float32).contiguous()
    win, seq, ranks, per_rank = rows if rows is not None else (table, table, 1, 1)
    target = torch.empty((tokens, cols), dtype=torch.float32, device=out.device) if interpreting() else out
    block, warps = _sum_tiling(cols, like.element_size())
    with _guard(out.device):
        moe_token_rows_kernel[(tokens, -(-cols // block))](
            like, table, weights, target, cols, stride_y, win, seq, ranks, per_rank, K=int(table.shape[1]),
            BLOCK_C=block, num_warps=warps, **mode)
    if target is not out:
        out.copy_(target)


def token_rows_at(like: torch.Tensor, addresses: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`token_rows_into` whose table holds each row's address (int64, 16-byte aligned; rows of
    ``C = out.shape[1]`` elements of ``like``'s dtype, e.g. in a peer transport's blocks) instead of its index
    (see :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    if int(out.shape[0]) and int(out.shape[1]):
        _sums_per_token(like, int(out.shape[1]), addresses, weights, out, ADDRESSED=True)


def rank_rows_at(like: torch.Tensor, in_rank: torch.Tensor, bases: torch.Tensor, me: int, own: int,
                 out: torch.Tensor) -> None:
    """:func:`token_rows_at` with the addresses made in the kernel (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`): token ``t``'s rows are, for each rank ``r`` with
    ``in_rank[t, r]`` in order, row ``k`` of rank ``r``'s rows at ``bases[r]`` (``own`` for ``r == me``), ``k``
    the tokens before ``t`` in that rank; weights of one."""
    tokens, cols = int(out.shape[0]), int(out.shape[1])
    world = int(in_rank.shape[1])
    if tokens == 0 or cols == 0:
        return
    flags = in_rank.contiguous().view(torch.uint8)
    # by rank: CUDA's scan along the outer dimension of [T, R] runs one thread per column (371 us for 4096 x 2
    # on an H200, 2026-12-02), the inner one of [R, T] a few
    cumsum = torch.cumsum(flags.t().contiguous(), 1, dtype=torch.int64)
    target = torch.empty((tokens, cols), dtype=torch.float32, device=out.device) if interpreting() else out
    block, warps = _sum_tiling(cols, like.element_size())
    with _guard(out.device):
        _RANK_ROWS((tokens, -(-cols // block)), like, flags, cumsum, bases, own, me, target, cols, tokens, bases, world,
                   block, False, num_warps=warps)
    if target is not out:
        out.copy_(target)


def receive_meta(meta: torch.Tensor, rank: int, num_local: int, topk: int,
                 with_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The normal dispatch's received routes from its int32 metadata rows in one kernel (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    rows = int(meta.shape[0])
    src = torch.empty(rows, dtype=torch.int64, device=meta.device)
    local = torch.empty((rows, topk), dtype=torch.int64, device=meta.device)
    weights = torch.empty((rows, topk), dtype=torch.float32, device=meta.device) if with_weights else None
    if rows:
        if meta.stride(1) != 1:
            meta = meta.contiguous()
        block_r = 128
        with _guard(meta.device):
            moe_receive_meta_kernel[(-(-rows // block_r),)](
                meta, meta.stride(0), rows, src, local, local if weights is None else weights, rank * num_local,
                num_local, K=topk, KP=max(2, 1 << max(topk - 1, 0).bit_length()), HAS_WEIGHTS=with_weights,
                BLOCK_R=block_r)
    return src, local, weights


def token_rows_landed(like: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, received: torch.Tensor,
                      seq: torch.Tensor, rows_per_rank: int, out: torch.Tensor) -> None:
    """:func:`token_rows_into` whose rows lie where a fixed exchange left them (``FixedWindow.land``): row ``i``
    is row ``i % rows_per_rank`` of source ``i // rows_per_rank``'s part at ``received[(seq - 1) & 1, source]``,
    rows of ``C = out.shape[1]`` elements of ``like``'s dtype (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    tokens, cols = int(out.shape[0]), int(out.shape[1])
    world = int(received.shape[1])
    if received.dtype != torch.int64 or tuple(received.shape) != (2, world) or seq.dtype != torch.int64 \
            or seq.numel() != 1 or (cols * like.element_size()) % 16:
        raise ValueError(f"token_rows_landed: expected received int64 [2, R], seq int64 [1] and 16-byte rows, got "
                         f"{received.dtype} {tuple(received.shape)}, {seq.dtype} {tuple(seq.shape)}, rows of "
                         f"{cols * like.element_size()} bytes")
    if tokens and cols:
        _sums_per_token(like, cols, table, weights, out, (received, seq, world, rows_per_rank), LANDED=True)


def token_rows_window(y: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, window: FixedWindow,
                      rows_per_rank: int) -> None:
    """:func:`token_rows_into` into float32 rows of ``C = y.shape[1]`` stored straight into the receivers'
    memory: row ``t`` is row ``t % rows_per_rank`` of rank ``t // rows_per_rank``'s part of ``window`` (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    tokens, cols = int(table.shape[0]), int(y.shape[1])
    world = int(window.table.shape[1])
    if tokens != world * rows_per_rank or window.pair_bytes != rows_per_rank * cols * 4 or cols % 4:
        raise ValueError(f"token_rows_window: {tokens} rows of {cols} float32 do not fill {world} parts of "
                         f"{window.pair_bytes} bytes ({rows_per_rank} rows each, 16-byte aligned rows)")
    if tokens == 0 or cols == 0:
        return
    y, table, weights = y.contiguous(), table.to(torch.int64).contiguous(), weights.to(torch.float32).contiguous()
    block, warps = _sum_tiling(cols, y.element_size())
    with _guard(y.device):
        moe_token_rows_kernel[(tokens, -(-cols // block))](
            y, table, weights, weights, cols, y.stride(0), window.table, window.seq, world, rows_per_rank,
            K=int(table.shape[1]), BLOCK_C=block, num_warps=warps, DIRECT=True)


_TABLE_ROWS = 128  # expanded rows per program of the token-table kernel


def token_table(src_row: torch.Tensor, expert: torch.Tensor, token_of: torch.Tensor, topk_idx: torch.Tensor,
                row_weights: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-process expanded combine's terms per token (see :class:`deepport.backends.torch.moe_local.
    LocalSteps`), in one kernel instead of torch's gathers, scatter and sort."""
    k = int(topk_idx.shape[1])
    table = torch.full((tokens, k), -1, dtype=torch.int64, device=src_row.device)
    weights = torch.empty((tokens, k), dtype=torch.float32, device=src_row.device)  # read only where table >= 0
    rows = int(src_row.shape[0])
    if rows and tokens and k:
        topk = topk_idx if topk_idx.stride(1) == 1 else topk_idx.contiguous()
        with _guard(src_row.device):
            moe_token_table_kernel[(-(-rows // _TABLE_ROWS),)](
                src_row.contiguous(), expert.contiguous(), token_of.contiguous(), topk,
                row_weights.to(torch.float32).contiguous(), table, weights, rows, topk.stride(0), K=k,
                KP=_pow2(k), BLOCK_R=_TABLE_ROWS)
    return table, weights


_LL_TOKENS = 64  # tokens per loop step of the one-process low-latency layout kernels


def _pow2(k: int) -> int:
    return 1 << max(k - 1, 0).bit_length()


def low_latency_layout(topk_idx: torch.Tensor, num_experts: int, capacity: int,
                       count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-process low-latency layout (see :class:`deepport.backends.torch.moe_local.LocalSteps`) in one
    kernel of one program per expert, instead of torch's dozen scans, scatters and gathers."""
    t, k = (int(d) for d in topk_idx.shape)
    src = torch.empty((num_experts, capacity), dtype=torch.int64, device=topk_idx.device)
    packed = torch.empty_like(src)
    if num_experts and k:
        idx = topk_idx if topk_idx.stride(1) == 1 or k == 1 else topk_idx.contiguous()
        with _guard(topk_idx.device):
            moe_ll_layout_kernel[(num_experts,)](
                idx, idx.stride(0) if t > 1 else k, src, packed, count, t, capacity, K=k, KP=_pow2(k),
                BLOCK_T=_LL_TOKENS)
    else:  # no slot: no expert receives anything
        src.fill_(-1)
        packed.fill_(-1)
        count.zero_()
    return src, packed


def low_latency_positions(topk_idx: torch.Tensor, capacity: int) -> torch.Tensor:
    """int64 ``[T, K]``: each routed slot's row in the one-process low-latency layout (``e * capacity +``
    the token's place among ``e``'s tokens), ``-1`` for ``-1`` slots: one program per token."""
    t, k = (int(d) for d in topk_idx.shape)
    src_pos = torch.empty((t, k), dtype=torch.int64, device=topk_idx.device)
    if t and k:
        idx = topk_idx if topk_idx.stride(1) == 1 or k == 1 else topk_idx.contiguous()
        with _guard(topk_idx.device):
            moe_ll_positions_kernel[(t,)](idx, idx.stride(0) if t > 1 else k, src_pos, capacity, K=k,
                                          KP=_pow2(k), BLOCK_T=_LL_TOKENS)
    return src_pos


def cast_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel e4m3 cast of bf16 ``x [T, H]`` (see :mod:`deepport.backends.torch.moe_local`)."""
    tokens, hidden = int(x.shape[0]), int(x.shape[1])
    scales = torch.empty((tokens, hidden // FP8_BLOCK), dtype=torch.float32, device=x.device)
    interp = interpreting()
    data = torch.empty((tokens, hidden), dtype=torch.float32 if interp else FP8, device=x.device)
    if tokens and hidden:
        with _guard(x.device):
            moe_cast_fp8_kernel[(tokens, hidden // FP8_BLOCK)](
                x.contiguous(), data, scales, hidden, FP8_MAX, FP8_MAX_INV, AMAX_FLOOR, STORE_FP32=interp)
    return (data.to(FP8) if interp else data), scales


def _dispatch_expanded_one_process(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    from deepport.backends.triton import moe_expanded_dispatch  # imports this module's helpers

    return moe_expanded_dispatch.dispatch(call)


RANKS_SUMMED = 16
"""Up to this many ranks the layout kernel sums each program's tokens per rank before its atomics."""


def _ranks_p(num_ranks: int) -> int:
    """The layout kernel's ``RANKS_P``: the ranks padded to a power of two (at least 2), or 0 above
    :data:`RANKS_SUMMED`."""
    return max(2, 1 << max(num_ranks - 1, 0).bit_length()) if num_ranks <= RANKS_SUMMED else 0


def layout_counts(topk_idx: torch.Tensor, num_experts: int, num_ranks: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(in_rank bool [T, R], per_rank int32 [R], per_expert int32 [E])`` of ``topk_idx`` in one kernel (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`): integer atomics, exact in any order."""
    idx = topk_idx.contiguous()
    tokens, topk = int(idx.shape[0]), int(idx.shape[1])
    device = idx.device
    per_rank = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    per_expert = torch.zeros(num_experts, dtype=torch.int32, device=device)
    in_rank = torch.zeros((tokens, num_ranks), dtype=torch.bool, device=device)
    if tokens and topk:
        block_t = 64
        with _guard(device):
            moe_layout_count_kernel[(-(-tokens // block_t),)](
                idx, per_rank, per_expert, in_rank.view(torch.uint8), tokens, topk, num_experts // num_ranks,
                num_ranks, BLOCK_T=block_t, BLOCK_K=max(2, 1 << max(topk - 1, 0).bit_length()),
                RANKS_P=_ranks_p(num_ranks))
    return in_rank, per_rank, per_expert


def layout_table(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_rank bool [T, R], table int64 [R, 1 + E / R])`` of ``topk_idx`` in one kernel (see
    :class:`deepport.backends.torch.moe_local.LocalSteps`)."""
    tokens = int(topk_idx.shape[0])
    table = torch.zeros((num_ranks, 1 + num_experts // num_ranks), dtype=torch.int64, device=topk_idx.device)
    in_rank = torch.zeros((tokens, num_ranks), dtype=torch.bool, device=topk_idx.device)
    layout_table_into(topk_idx, num_experts, num_ranks, in_rank, table)
    return in_rank, table


def layout_table_into(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, in_rank: torch.Tensor,
                      table: torch.Tensor) -> None:
    """:func:`layout_table` into the caller's zeroed ``in_rank`` (bool ``[T, R]``) and ``table`` (int64 ``[R,
    1 + E / R]``)."""
    idx = topk_idx.contiguous()
    tokens, topk = int(idx.shape[0]), int(idx.shape[1])
    if tokens and topk:
        block_t = 64
        with _guard(idx.device):
            _LAYOUT((-(-tokens // block_t),), idx, table, table, in_rank.view(torch.uint8), tokens, topk,
                    num_experts // num_ranks, num_ranks, block_t, max(2, 1 << max(topk - 1, 0).bit_length()), True,
                    _ranks_p(num_ranks))


TRITON = LocalSteps(place_rows, weighted_rows, cast_fp8, scatter_rows=scatter_rows,
                    scatter_row_pair=scatter_row_pair, weighted_rows_into=weighted_rows_into,
                    dispatch_expanded_one_process=_dispatch_expanded_one_process,
                    token_rows_into=token_rows_into, token_table=token_table, low_latency_layout=low_latency_layout,
                    low_latency_positions=low_latency_positions,
                    low_latency_receive=low_latency_receive, low_latency_send_rows=low_latency_send_rows,
                    low_latency_send_window=low_latency_send_window, token_rows_window=token_rows_window,
                    token_rows_at=token_rows_at, rank_rows_at=rank_rows_at, receive_meta=receive_meta,
                    token_rows_landed=token_rows_landed,
                    low_latency_return=low_latency_return, low_latency_pairs=low_latency_pairs,
                    low_latency_receive_landed=low_latency_receive_landed,
                    scatter_row_pair_landed=scatter_row_pair_landed,
                    low_latency_return_window=low_latency_return_window,
                    low_latency_pairs_landed=low_latency_pairs_landed,
                    layout_counts=layout_counts, layout_table=layout_table)


def layout(call: MoELayoutCall) -> MoELayout:
    in_rank, per_rank, per_expert = layout_counts(call.topk_idx, call.num_experts, call.num_ranks)
    return MoELayout(per_rank, per_expert, in_rank)


def dispatch_expanded(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    return moe_layouts.dispatch_expanded(call, TRITON)


def combine_expanded(call: MoEExpandedCombineCall) -> torch.Tensor:
    return moe_layouts.combine_expanded(call, TRITON)


def dispatch_low_latency(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    return moe_layouts.dispatch_low_latency(call, TRITON)


def combine_low_latency(call: MoELowLatencyCombineCall) -> torch.Tensor:
    return moe_layouts.combine_low_latency(call, TRITON)
