"""The triton backend's fused one-process expanded MoE dispatch: one host read, two launches after it.

:func:`dispatch` is the triton :class:`~deepport.backends.torch.moe_local.LocalSteps`'
``dispatch_expanded_one_process`` hook, which :func:`deepport.backends.torch.moe_layouts.dispatch_expanded`
calls in one process (world size 1) in place of the torch one-process path
(:mod:`deepport.backends.torch.moe_one_process_expanded`), on a GPU and under the interpreter alike. Its
outputs (``recv_x`` and FP8 scales, ``m_indices``, ``recv_weights``, the per-expert counts and the
:class:`~deepport.kernels.moe_handle.MoEExpandedHandle`, routes included) equal the general route's
(:func:`~deepport.backends.torch.moe_layouts.dispatch_expanded_routed`) bit for bit. In order:

1. one ``torch.zeros`` of a byte buffer holding the int32 counts ``[E + 1]``, the int32 per-block counts
   ``hist`` ``[blocks, E + 1]`` (``blocks = ceil(T / _BLOCK_T)`` token blocks) and the uint8 flags ``[T]``;
2. ``moe_expanded_count_kernel``, grid ``(blocks,)``: per token block and expert the distinct tokens of the
   block selecting it, per block the tokens routed anywhere (``hist``), their sums over the blocks in
   ``counts`` (per expert in ``counts[:E]``, routed anywhere in ``counts[E]``), the flags (the handle's
   ``is_token_in_rank``, bool ``[T, 1]``);
   three torch ops: the per-slot weight sums, float32 ``[T, K]``, ``sums[t, k]`` the sum over the slots
   ``j`` of ``where(topk_idx[t, j] == topk_idx[t, k], topk_weights[t, j], 0.0)``, the torch one-process
   path's and the general route's ``sum``, so the bits match on every device (the order of a float32 sum
   shows only when a token names one expert in three or more slots; torch's reduction order is its
   own, on a GPU not necessarily the slot order); launched before the read, they overlap the count kernel;
3. the one host read: ``counts.tolist()``, which sizes ``m = sum(align_up(counts[e], alignment))``;
4. ``moe_expanded_layout_kernel``, grid ``(blocks + E,)``: one program per token block places its tokens
   (an expert's rows of block ``b`` follow those of the blocks before ``b``, counted in ``hist``), one
   per expert writes its padding rows: per expanded row its token (int64, -1 for padding), ``m_indices``,
   ``recv_weights`` and the handle's ``expanded_src_row`` / ``m_indices`` / ``weights`` copies, plus the
   handle's ``topk_idx`` (int64), ``recv_src_idx`` and ``recv_topk_idx``
   (:mod:`deepport.backends.triton.moe_expanded_dispatch_kernels` says who writes what);
5. ``moe_expanded_rows_kernel``, grid ``(m, column blocks)``: each expanded row copied from ``x`` as raw
   bits, in the widest integer units that divide a row's bytes and both base addresses (padding rows
   zero), the FP8 scales row (any strides: column-major scales are read in place) in the same launch.
   With ``_ROWS = "scatter"`` instead: the layout kernel also writes ``dest`` (int64 ``[T, K]``, set to -1
   by one ``torch.full`` before it: per token and first slot naming an expert, that expert's row), then
   ``moe_expanded_scatter_kernel``, grid ``(T, column blocks)``, reads each token's row once and stores it
   into its rows, and ``moe_expanded_pad_rows_kernel`` zeroes the padding rows (when there are any).

``T = 0``: no kernel at all, the zeros only. No routed token (``m = 0``): the layout kernel alone after
the read (it writes the handle's ``topk_idx``).
"""

from __future__ import annotations

import torch

from deepport.backends.triton.moe_expanded_dispatch_kernels import (
    moe_expanded_count_kernel,
    moe_expanded_layout_kernel,
    moe_expanded_pad_rows_kernel,
    moe_expanded_rows_kernel,
    moe_expanded_scatter_kernel,
)
from deepport.backends.triton.moe_permute import _BITS, MOVE_WARPS, _guard, move_block
from deepport.kernels.moe_args import FP8_BLOCK, MoEInput, align_up
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle

__all__ = ["dispatch"]

_BLOCK_T = 16  # tokens per block of the count and layout kernels (one program per block); the tunable
_TILE = 4096  # elements of a [BLOCK_T, BLOCK_E] tile of tokens x experts (and of a [BLOCK_B, BLOCK_E] one)
# How the payload rows move: "gather" (one program per expanded row reads its token's row: x read once per
# (token, expert), measured on the H200) or "scatter" (one program per token reads its row once and writes
# it to each of its expanded rows, then the padding rows are zeroed; same bits; not yet measured)
_ROWS = "gather"


def _pow2(n: int, least: int = 2) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def _widest_bits(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``out`` (both ``[rows, hidden]``, ``x`` contiguous) viewed as the widest integer type whose
    size divides a row's bytes and both base addresses (int64 for bf16 hidden 7168: 8-byte moves, 1792
    per row), so the rows kernel moves raw bits in as few, wide elements as it can."""
    row_bytes = int(x.shape[1]) * x.element_size()
    for size in (8, 4, 2, 1):
        if size >= x.element_size() and row_bytes % size == 0 and x.data_ptr() % size == 0 \
                and out.data_ptr() % size == 0:
            return x.view(_BITS[size]), out.view(_BITS[size])
    return x.view(_BITS[x.element_size()]), out.view(_BITS[x.element_size()])


def dispatch(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    """The fused one-process expanded dispatch (module docstring); outputs as
    :func:`deepport.moe_dispatch_expanded` documents them."""
    data, experts, align, grp = call.data, call.num_experts, call.expert_alignment, call.group
    idx, w = call.topk_idx.contiguous(), call.topk_weights
    tokens, topk, hidden = int(idx.shape[0]), int(idx.shape[1]), int(data.shape[1])
    dev = idx.device
    block_t = _BLOCK_T
    blocks = -(-tokens // block_t)
    block_e = min(_pow2(experts), max(16, _TILE // block_t))  # experts per step of a block's loop
    head, hist_bytes = 4 * (experts + 1), 4 * blocks * (experts + 1)
    buf = torch.zeros(head + hist_bytes + tokens, dtype=torch.uint8, device=dev)
    counts, flags = buf[:head].view(torch.int32), buf[head + hist_bytes:]
    hist = buf[head:head + hist_bytes].view(torch.int32)  # [blocks, E + 1]
    with _guard(dev):
        if tokens and topk:
            moe_expanded_count_kernel[(blocks,)](
                idx, counts, hist, flags, tokens, topk, experts, BLOCK_T=block_t, BLOCK_K=_pow2(topk),
                BLOCK_E=block_e)
        sums = torch.where(idx[:, None, :] == idx[:, :, None], w[:, None, :], 0.0).sum(2)  # float32 [T, K]
        host = counts.tolist()  # the one host read
        per_expert, num_recv = tuple(int(c) for c in host[:experts]), int(host[experts])
        aligned = [align_up(c, align) for c in per_expert]
        m = sum(aligned)

        token_of = torch.empty(m, dtype=torch.int64, device=dev)
        src_row = torch.empty(m, dtype=torch.int64, device=dev)
        expert_of = torch.empty(m, dtype=torch.int32, device=dev)
        weight_of = torch.empty(m, dtype=torch.float32, device=dev)
        recv_x = call.alloc((m, hidden), data.dtype)  # the caller's buffers, in the torch path's order
        recv_s = None if call.scales is None else call.alloc((m, hidden // FP8_BLOCK), torch.float32)
        m_indices = call.alloc((m,), torch.int32)
        recv_w = call.alloc((m,), torch.float32)
        idx64 = torch.empty((tokens, topk), dtype=torch.int64, device=dev)
        scatter = _ROWS == "scatter" and m > 0 and hidden > 0
        dest = torch.full((tokens, topk), -1, dtype=torch.int64, device=dev) if scatter else token_of
        recv_src = torch.empty(num_recv, dtype=torch.int64, device=dev)
        recv_topk = torch.empty((num_recv, topk), dtype=torch.int64, device=dev)
        if tokens and topk:
            moe_expanded_layout_kernel[(blocks + experts,)](
                idx, sums, counts, hist, token_of, src_row, m_indices, expert_of, recv_w, weight_of, recv_src,
                recv_topk, idx64, dest, tokens, topk, experts, align, BLOCK_T=block_t, BLOCK_K=_pow2(topk),
                BLOCK_E=block_e, BLOCK_B=min(_pow2(blocks), max(2, _TILE // block_e)), BLOCK_A=_pow2(experts),
                BLOCK_P=_pow2(align, 16), WRITE_DEST=scatter)

        if m and hidden:
            x_bits, out_bits = _widest_bits(data.contiguous(), recv_x)
            s_bits = out_s = out_bits  # unused without scales
            scale_cols = hidden // FP8_BLOCK
            if recv_s is not None and call.scales is not None:
                s_bits, out_s = call.scales.view(torch.int32), recv_s.view(torch.int32)
            cols = int(x_bits.shape[1])
            block = move_block(cols, x_bits.element_size())
            has_s, block_s = recv_s is not None, _pow2(scale_cols, 16)
            if not scatter:
                moe_expanded_rows_kernel[(m, -(-cols // block))](
                    x_bits, token_of, out_bits, cols, x_bits.stride(0), s_bits, out_s, scale_cols,
                    s_bits.stride(0), s_bits.stride(1), HAS_SCALES=has_s, BLOCK_C=block, BLOCK_S=block_s,
                    num_warps=MOVE_WARPS)
            else:
                moe_expanded_scatter_kernel[(tokens, -(-cols // block))](
                    x_bits, dest, out_bits, cols, x_bits.stride(0), topk, s_bits, out_s, scale_cols,
                    s_bits.stride(0), s_bits.stride(1), HAS_SCALES=has_s, BLOCK_C=block, BLOCK_S=block_s)
                if m > sum(per_expert):  # padding rows
                    moe_expanded_pad_rows_kernel[(m, -(-cols // block))](
                        token_of, out_bits, cols, out_s, scale_cols, HAS_SCALES=has_s, BLOCK_C=block,
                        BLOCK_S=block_s)

    routes = MoEHandle(grp.group, grp.rank, grp.world_size, experts, hidden, align, idx64,
                       flags.view(torch.bool)[:, None], (num_recv,), (num_recv,), recv_src, recv_topk, per_expert)
    handle = MoEExpandedHandle(routes, src_row, expert_of, weight_of)
    x_out: MoEInput = recv_x if recv_s is None else (recv_x, recv_s)
    return MoEExpandedDispatchResult(x_out, m_indices, recv_w, aligned, handle)
