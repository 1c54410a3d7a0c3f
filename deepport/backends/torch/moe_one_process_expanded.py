"""Expanded (grouped-GEMM contiguous) MoE dispatch and combine in one process: one host read, no transport.

With one rank (``group=None``, or a group of world size 1) every expert is local and the expanded layout
is a function of ``topk_idx``: token ``t``'s row in expert ``e``'s segment is ``start_e`` (the aligned
counts of the experts before ``e``, summed) plus the number of earlier tokens selecting ``e``. Static-shape
tensor ops compute that row per top-k slot ``[T, K]``; slots naming one expert twice compute the same row
and write the same values there, ``-1`` slots write into a sink entry past the end. The outputs equal the
general route's (:func:`deepport.backends.torch.moe_layouts.dispatch_expanded_routed`) bit for bit, handle
included:

- **dispatch**: exactly one host read, the per-expert counts and the number of tokens routed anywhere
  (the contract returns the counts as host ints; they size ``recv_x`` and the handle's received rows),
  then one ``place_rows`` step straight from the caller's ``x`` (and one for the FP8 scales), padding
  rows zero. The handle's :class:`~deepport.kernels.moe_handle.MoEHandle` is built from the same read:
  received rows are the tokens selecting any expert, in token order; ``recv_topk_idx`` is their
  ``topk_idx`` (local ids are global ids on one rank).
- **combine**: no host read. One ``weighted_rows`` step (``weighted_rows_into`` where the backend has
  it: the triton kernel rounds to bf16 as it stores; ``token_rows_into`` where it has that, over each
  token's rows listed in order by :func:`rows_per_token`, so nothing sorts by token) sums, per token,
  ``recv_weights[row] * y[row]``
  over the token's expanded rows in ascending row order (expert order) in float32, rounded once to
  bf16: the general route sums the same terms in the same order per received row and then adds that one
  partial to zero per token (which changes no bits), so the result is the same. Works for any one-rank
  handle (its host fields are read, never device values).

The per-device steps are the caller's :class:`~deepport.backends.torch.moe_local.LocalSteps` (torch,
triton, opencl kernels).
"""

from __future__ import annotations

import torch

from deepport.backends.torch.moe_index import compact
from deepport.backends.torch.moe_local import LocalSteps
from deepport.kernels.moe_args import FP8_BLOCK, MoEInput, align_up, dense
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle

__all__ = ["combine", "dispatch", "rows_per_token"]


def _scattered(rows: torch.Tensor, values: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """``[size]`` of ``values``' dtype: ``fill`` everywhere, then ``out[rows[t, k]] = values[t, k]``
    (``values`` broadcast to ``rows``' shape ``[T, K]``; ``rows`` may name ``size``, a sink entry,
    dropped). Entries naming one row carry one value, so the order of the writes does not matter."""
    out = torch.full((size + 1,), fill, dtype=values.dtype, device=rows.device)
    out.index_put_((rows,), values)
    return out[:size]


def dispatch(call: MoEExpandedDispatchCall, local: LocalSteps) -> MoEExpandedDispatchResult:
    """The one-process expanded dispatch (module docstring); outputs as
    :func:`deepport.moe_dispatch_expanded` documents them."""
    data, experts, align, grp = call.data, call.num_experts, call.expert_alignment, call.group
    idx = call.topk_idx.to(torch.int64)
    tokens, hidden = int(idx.shape[0]), int(data.shape[1])
    routed = idx >= 0
    mask = torch.zeros((tokens, experts + 1), dtype=torch.bool, device=idx.device)
    mask = mask.scatter_(1, torch.where(routed, idx, experts), True)[:, :experts]  # [T, E], expert_mask
    counts = mask.sum(0)  # int64 [E]: distinct tokens per expert
    in_rank = mask.any(1, keepdim=True)  # [T, 1]
    host = torch.cat([counts, in_rank.sum(0)]).tolist()  # the one host read
    per_expert, num_recv = tuple(int(c) for c in host[:experts]), int(host[experts])
    aligned = [align_up(c, align) for c in per_expert]
    m = sum(aligned)
    padded = (counts + (align - 1)) // align * align
    first_row = padded.cumsum(0) - padded - 1  # start_e - 1, per expert
    expert = idx.clamp(min=0)
    # row of each slot: start of its expert + earlier tokens selecting it; -1 slots go to the sink m
    row = torch.where(routed, mask.cumsum(0).gather(1, expert) + first_row[expert], m)  # [T, K]
    recv_row = in_rank[:, 0].cumsum(0) - 1  # [T], the received row of each routed token
    token_of = _scattered(row, torch.arange(tokens, device=idx.device)[:, None], m, -1)
    src_row = _scattered(row, recv_row[:, None], m, -1)
    expert_of = _scattered(row, idx.to(torch.int32), m, -1)
    # per slot, the sum of the weights of the slots naming its expert, in slot order (slot_weight_sums
    # of the general route, same shapes; -1 slots' sums go to the sink)
    same = idx[:, None, :] == idx[:, :, None]  # [T, K, K]
    weight_of = _scattered(row, torch.where(same, call.topk_weights[:, None, :], 0.0).sum(2), m, 0.0)

    recv_x = call.alloc((m, hidden), data.dtype)
    local.place_rows(data, recv_x[None], token_of[None], True)
    recv_s = None
    if call.scales is not None:
        recv_s = call.alloc((m, hidden // FP8_BLOCK), torch.float32)
        local.place_rows(dense(call.scales), recv_s[None], token_of[None], True)
    m_indices = call.alloc((m,), torch.int32)
    m_indices.copy_(expert_of)
    recv_w = call.alloc((m,), torch.float32)
    recv_w.copy_(weight_of)

    recv_src = torch.empty(num_recv + 1, dtype=torch.int64, device=idx.device)
    recv_src.scatter_(0, torch.where(in_rank[:, 0], recv_row, num_recv), torch.arange(tokens, device=idx.device))
    recv_src = recv_src[:num_recv]
    routes = MoEHandle(grp.group, grp.rank, grp.world_size, experts, hidden, align, idx.clone(), in_rank,
                       (num_recv,), (num_recv,), recv_src, idx[recv_src], per_expert)
    handle = MoEExpandedHandle(routes, src_row, expert_of, weight_of)
    x_out: MoEInput = recv_x if recv_s is None else (recv_x, recv_s)
    return MoEExpandedDispatchResult(x_out, m_indices, recv_w, aligned, handle)


def rows_per_token(h: MoEExpandedHandle, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's expanded rows in ascending order (int64 ``[T, K]``, ``-1`` first where a token has fewer
    than ``K``) and their weights (float32 ``[T, K]``, anything where the row is ``-1``): the terms of the
    combine per token, in the order it sums them. A one-rank handle with at least one expanded row.

    A row's place in its token's ``K`` entries is the first top-k slot naming the row's expert (unique:
    an expert has one row per token, a slot naming it twice shares that row); sorting the entries then
    puts them in row order, which is expert order."""
    routes = h.routes
    k = int(routes.recv_topk_idx.shape[1])
    src = h.expanded_src_row
    dev = src.device
    received = src.clamp(min=0)
    token = routes.recv_src_idx[received].to(torch.int64)
    expert = h.m_indices.to(torch.int64)[:, None]
    slot = (routes.recv_topk_idx[received].to(torch.int64) == expert).to(torch.int8).argmax(1)
    flat = torch.full((tokens * k + 1,), -1, dtype=torch.int64, device=dev)  # + a sink for the padding rows
    flat.index_put_((torch.where(src >= 0, token * k + slot, tokens * k),),
                    torch.arange(int(src.shape[0]), device=dev))
    rows = flat[: tokens * k].view(tokens, k).sort(dim=1).values
    return rows, h.weights[rows.clamp(min=0)]


def combine(call: MoEExpandedCombineCall, local: LocalSteps) -> torch.Tensor:
    """The one-process expanded combine (module docstring): bf16 ``[num_tokens, hidden]``, ``out[t]`` the
    float32 sum over the token's expanded rows, in row order, of ``weights[row] * y[row]``, rounded once."""
    h, y = call.handle, call.y
    routes = h.routes
    tokens, hidden = routes.num_tokens, int(y.shape[1])
    out = call.alloc((tokens, hidden), torch.bfloat16)
    if local.token_rows_into is not None and tokens:  # the terms per token, in order: no sort by token
        if int(h.expanded_src_row.shape[0]) == 0:
            out.zero_()
        else:
            if local.token_table is not None:
                table, weights = local.token_table(h.expanded_src_row, h.m_indices, routes.recv_src_idx,
                                                   routes.recv_topk_idx, h.weights, tokens)
            else:
                table, weights = rows_per_token(h, tokens)
            local.token_rows_into(y, table, weights, out)
        return out
    rows = compact(h.m_indices >= 0, sum(routes.num_recv_tokens_per_expert))  # expanded rows, padding left out
    token = routes.recv_src_idx[h.expanded_src_row[rows]]
    if local.weighted_rows_into is not None:  # rounded by the step itself: no float32 rows in memory
        local.weighted_rows_into(y, rows, token, h.weights[rows], out)
    else:
        out.copy_(local.weighted_rows(y, rows, token, h.weights[rows], tokens))
    return out
