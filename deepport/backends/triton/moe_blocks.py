"""The normal dispatch's per-device work over a transport with one-sided writes, in two kernels.

When the active transport hands out a :class:`~deepport.backends.torch.moe_comm.RowsWindow` (the hopper
backend's peer memory, or shared memory on CPUs) the dispatch needs no send or receive buffer, and with these
two steps (:class:`~deepport.backends.torch.moe_local.LocalSteps` ``rows_to_blocks`` / ``blocks_to_rows``) no
index work on the host's side either:

- :func:`rows_to_blocks`: every token's packed row (payload, FP8 scales, int32 metadata built in the kernel
  from ``topk_idx`` and the weights) stored straight into each destination's block at the token's place
  among that destination's tokens (a running count of ``in_rank`` by rank), this rank's own payload straight
  into its outputs;
- :func:`blocks_to_rows`: every received row copied out of this rank's blocks into the outputs, and the
  routes (source token, local ids, weights) derived from its metadata in the same kernel.

The bytes in the blocks are those of :func:`deepport.backends.torch.moe_routes`'s packed rows (the same
:class:`~deepport.backends.torch.moe_comm.RowFormat` and order), so a peer that exchanges by other means
(rounds, another backend's steps) reads and writes the same blocks. The staged dispatch's split wire calls both
with formats of fewer parts (:class:`~deepport.backends.torch.moe_routes.SplitWire`): the payload rows alone
(no metadata stored), and the side rows alone (no payload stored or copied).
"""

from __future__ import annotations

import torch

from deepport.backends.torch.moe_comm import RowFormat
from deepport.backends.torch.moe_local import BlockOutputs, CountedParts
from deepport.backends.triton.fast_launch import FastLaunch
from deepport.backends.triton.moe_permute import _guard, block_for_bytes
from deepport.backends.triton.moe_permute_kernels import moe_blocks_to_rows_kernel, moe_rows_to_blocks_kernel

_TO_BLOCKS = FastLaunch(moe_rows_to_blocks_kernel)
_FROM_BLOCKS = FastLaunch(moe_blocks_to_rows_kernel)
# bytes of a row per program (as the row-moving kernels: small programs measured fastest on the H200)
_MOVE_BYTES = 2048
_WARPS = 2


def _pow2(n: int) -> int:
    return max(2, 1 << max(n - 1, 0).bit_length())


def _words(t: torch.Tensor, fmt: RowFormat, other: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``t`` ``[rows, H]`` (dense rows) as ``[rows, words]`` of the widest integer type that the packed row allows
    too and whose size divides where ``t`` (and ``other``, the tensor the kernel moves the same words to or from)
    starts: any contiguous tensor, wherever it starts, is moved right."""
    raw = t.view(torch.uint8)
    starts = [t] if other is None else [t, other]
    for wide in (torch.int64, torch.int32, torch.int16):
        size = wide.itemsize
        if int(raw.shape[1]) % size == 0 and fmt.row_bytes % size == 0 and all(
                int(a.data_ptr()) % size == 0 and a.storage_offset() * a.element_size() % size == 0 for a in starts):
            return raw.view(wide), int(raw.shape[1]) // size
    return raw, int(raw.shape[1])


def rows_to_blocks(data: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor, weights: torch.Tensor | None,
                   in_rank: torch.Tensor, fmt: RowFormat, bases: torch.Tensor | CountedParts, me: int, num_local: int,
                   outs: BlockOutputs | None, own_start: int, cumsum: torch.Tensor | None = None,
                   part: str = "all") -> None:
    """Store token ``t``'s packed row (``fmt``'s parts ``x``, ``scales``, ``meta``: ``t``, its top-k ids
    and the bits of its weights) for every other rank ``r`` with ``in_rank[t, r]`` (bool ``[T, R]``) as row
    ``k`` of the rows at ``bases[r]`` (int64 ``[R]`` device addresses, 16-byte aligned), ``k`` the tokens
    before ``t`` in ``r`` (or, with :class:`~deepport.backends.torch.moe_local.CountedParts`, in one send buffer
    whose parts the device's counts place); for ``r == me`` write row ``own_start + k`` of ``outs`` instead
    (payload, scales, source token, local ids, weights). ``data`` ``[T, H]``, ``scales`` float32 ``[T, H / 128]``
    or None, ``idx`` int64 ``[T, K]``, ``weights`` float32 ``[T, K]`` or None; ``cumsum`` int64 ``[R, T]``, the
    running count of ``in_rank`` by rank, where the caller has it (else made here). ``part``: ``"all"``, or ``"peers"``
    (only the other ranks' rows) then ``"own"`` (only this rank's, e.g. while the blocks travel); ``outs`` may
    be None for ``"peers"`` (nothing of it is written then: the outputs may not exist yet)."""
    rows = _PARTS.get(part)
    if rows is None:
        raise ValueError(f"rows_to_blocks: part must be one of {sorted(_PARTS)}, got {part!r}")
    if outs is None and part != "peers":
        raise ValueError(f"rows_to_blocks: part {part!r} writes this rank's own rows into outs, got outs=None")
    tokens, world = int(in_rank.shape[0]), int(in_rank.shape[1])
    if tokens == 0:
        return
    k = int(idx.shape[1])
    rows_in = data.contiguous()
    words, x_words = _words(rows_in, fmt, None if outs is None else outs.x)
    if "x" not in fmt.names:  # side rows only (a split wire): no payload words into the parts
        if part != "peers":
            raise ValueError(f"rows_to_blocks: a format without the payload stores only the other ranks' side "
                             f"rows (part 'peers'), got part {part!r}")
        x_words = 0
    if "scales" not in fmt.names and part != "own":  # the parts carry no scales: none stored there
        if part == "all" and scales is not None:
            raise ValueError("rows_to_blocks: part 'all' with scales needs a format that carries them")
        scales = None
    flags = in_rank.contiguous().view(torch.uint8)
    if cumsum is None:
        cumsum = torch.cumsum(flags.t().contiguous(), 1, dtype=torch.int64)  # by rank: torch's fast inner scan
    idx64 = idx.to(torch.int64).contiguous()
    w = idx64 if weights is None else weights.to(torch.float32).contiguous()
    s = scales if scales is not None else w
    if outs is None:  # ROWS 1 never stores into the outputs: inputs of the same types stand in
        outs = BlockOutputs(rows_in, scales, idx64, idx64, None if weights is None else w)
    out_words, _ = _words(outs.x, fmt, rows_in)  # the same row bytes and starts: the same word type
    if isinstance(bases, CountedParts):  # no table of addresses: the kernel places the parts from the counts
        addresses, send_at, counts, counted = cumsum, int(bases.buffer.data_ptr()), bases.counts, True
        if send_at % 16 or counts.dtype != torch.int64 or tuple(counts.shape) != (world,):
            raise ValueError(f"rows_to_blocks: counted parts need a 16-byte aligned buffer and int64 [{world}] "
                             f"counts, got address {send_at:#x} and {counts.dtype} {tuple(counts.shape)}")
    else:
        addresses, send_at, counts, counted = bases, 0, bases, False
    num_scales = 0 if scales is None else int(scales.shape[1])
    meta_width = fmt.widths[fmt.names.index("meta")] if "meta" in fmt.names else 0
    block = block_for_bytes(max(x_words, 1), words.element_size(), _MOVE_BYTES)
    with _guard(data.device):
        _TO_BLOCKS((tokens, max(1, -(-x_words // block))),
                   words, s, idx64, w, flags, cumsum, addresses, out_words, _or(outs.scales, w), outs.src,
                   outs.local, _or(outs.weights, w), own_start, me, me * num_local, num_local, tokens, x_words,
                   num_scales, s.stride(0), s.stride(1), fmt.row_bytes, _offset(fmt, "scales"), _offset(fmt, "meta"),
                   addresses, send_at, counts, counts.stride(0), world, k, _pow2(k), meta_width, _pow2(meta_width),
                   scales is not None, weights is not None, block, _pow2(max(num_scales, 1)), False, rows, counted,
                   num_warps=_WARPS)


_PARTS = {"all": 0, "peers": 1, "own": 2}  # the kernel's ROWS


def blocks_to_rows(bases: torch.Tensor, counts: torch.Tensor, fmt: RowFormat, me: int, num_local: int,
                   outs: BlockOutputs) -> None:
    """Copy the ``n = sum(counts)`` received rows (``counts`` int64 ``[R]`` on the device, rows by source;
    source ``s``'s packed rows at ``bases[s]``) into ``outs`` (payload, scales) and derive the routes from
    their metadata (source token, local ids, the weights where the id is local, else 0), except this rank's
    own rows, which :func:`rows_to_blocks` wrote."""
    n, k = int(outs.local.shape[0]), int(outs.local.shape[1])
    if n == 0:
        return
    if "meta" not in fmt.names:
        raise ValueError(f"blocks_to_rows: the routes come from the rows' metadata; the format has {fmt.names}")
    words, x_words = _words(outs.x, fmt)
    if "x" not in fmt.names:  # side rows only (a split wire): the payload already landed in outs.x
        x_words = 0
    if "scales" not in fmt.names and outs.scales is not None:
        raise ValueError("blocks_to_rows: scales to fill, but the format carries none")
    num_scales = 0 if outs.scales is None else int(outs.scales.shape[1])
    block = block_for_bytes(max(x_words, 1), words.element_size(), _MOVE_BYTES)
    with _guard(outs.x.device):
        _FROM_BLOCKS((n, max(1, -(-x_words // block))),
                     bases, counts, counts.stride(0), words, _or(outs.scales, outs.src), outs.src, outs.local,
                     _or(outs.weights, outs.src), me, x_words, num_scales, fmt.row_bytes, _offset(fmt, "scales"),
                     _offset(fmt, "meta"), me * num_local, num_local, bases, int(bases.shape[0]), k, _pow2(k),
                     outs.scales is not None, outs.weights is not None, block, _pow2(max(num_scales, 1)), False,
                     num_warps=_WARPS)


def _or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``t``, or a tensor the kernel never touches in its place (its flag is off)."""
    return stand_in if t is None else t


def _offset(fmt: RowFormat, name: str) -> int:
    return fmt.offsets[fmt.names.index(name)] if name in fmt.names else 0
