"""Expanded (grouped-GEMM contiguous) MoE layout in torch.

The expanded dispatch is the normal route (:func:`deepport.backends.torch.moe_routes.route`, 2
collectives, 1 host sync) with the received rows left packed and placed straight into the expanded
layout (one gather; padding rows read a zero row kept after the received ones), each distinct
(received token, local expert) pair once.

The expanded combine weights each row and returns one row per received token in one collective:
float32 partial sums over the token's local experts (``recv_weights * y`` summed in float32), or,
when no token can have two experts on one rank (``num_topk == 1`` or one expert per rank), the bf16
row itself with its float32 weight, which the source multiplies: the same float32 product, half the
bytes. bf16 partial sums are not an option: the contract sums in float32 and rounds once, and a
partial rounded to bf16 on each rank breaks that bound (``MOE_NOTES.md``).

In one process (world size 1) both ops run :mod:`deepport.backends.torch.moe_one_process_expanded`
instead (static-shape index ops from ``topk_idx``, one host read in the dispatch and none in the
combine, the same outputs bit for bit; a backend may fuse the whole dispatch instead, through
``LocalSteps.dispatch_expanded_one_process``, as the triton backend does);
:func:`dispatch_expanded_routed` / :func:`combine_expanded_routed` are the general route at any world size.

The per-device steps (gathering the rows to send, placing rows, the weighted and per-token sums, the
FP8 cast) are :class:`~deepport.backends.torch.moe_local.LocalSteps`, replaceable by another backend's
kernels (the triton and opencl backends pass their own and reuse the routing and the exchange). The
low-latency layout lives in :mod:`deepport.backends.torch.moe_low_latency` (re-exported here).
"""

from __future__ import annotations

import torch

from deepport.backends.torch import moe_one_process_expanded as one_process_expanded
from deepport.backends.torch.moe_comm import RowFormat, all_to_all_rows, same_bits
from deepport.backends.torch.moe_index import column_cumsum, compact, selection_mask, slot_weight_sums
from deepport.backends.torch.moe_local import TORCH, LocalSteps
from deepport.backends.torch.moe_low_latency import combine_low_latency, dispatch_low_latency
from deepport.backends.torch.moe_routes import return_rows, route, send_tokens, sum_per_token
from deepport.kernels.moe_args import FP8_BLOCK, align_up
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle

__all__ = ["combine_expanded", "combine_expanded_routed", "combine_low_latency", "dispatch_expanded",
           "dispatch_expanded_routed", "dispatch_low_latency"]


def dispatch_expanded(call: MoEExpandedDispatchCall, local: LocalSteps = TORCH) -> MoEExpandedDispatchResult:
    """:func:`deepport.moe_dispatch_expanded` with ``local``'s steps: in one process (world size 1) the
    one-process path (``local.dispatch_expanded_one_process`` where the backend fuses it, else
    :mod:`.moe_one_process_expanded`; one host read either way), else the general route."""
    if call.group.world_size == 1:
        if local.dispatch_expanded_one_process is not None:
            return local.dispatch_expanded_one_process(call)
        return one_process_expanded.dispatch(call, local)
    return dispatch_expanded_routed(call, local)


def combine_expanded(call: MoEExpandedCombineCall, local: LocalSteps = TORCH) -> torch.Tensor:
    """:func:`deepport.moe_combine_expanded` with ``local``'s steps: a one-rank handle (any backend's)
    takes the one-process path (no host read), else the general route."""
    if call.handle.routes.world_size == 1:
        return one_process_expanded.combine(call, local)
    return combine_expanded_routed(call, local)


def dispatch_expanded_routed(call: MoEExpandedDispatchCall, local: LocalSteps = TORCH) -> MoEExpandedDispatchResult:
    """The expanded dispatch through the general route (any world size; module docstring)."""
    got = route(call.data, call.scales, call.topk_idx, call.topk_weights, call.num_experts, call.group,
                call.expert_alignment, unpack=False, zero_row=True, what="moe_dispatch_expanded", local=local)
    routes = got.handle
    n, num_local, align = routes.num_recv, routes.num_local_experts, call.expert_alignment
    per_expert = routes.num_recv_tokens_per_expert
    aligned = [align_up(c, align) for c in per_expert]
    m, pairs = sum(aligned), sum(per_expert)
    dev = call.data.device
    starts = torch.cumsum(-(-got.per_expert // align) * align, 0) - (-(-got.per_expert // align) * align)
    # distinct (received row, local expert) pairs, expert-major, rows in received order
    mask = selection_mask(got.local_idx, num_local, 1)  # [n, L]
    flat = compact(mask.t(), pairs)
    expert, row = flat // max(n, 1), flat % max(n, 1)
    position = column_cumsum(mask) - 1
    dest = starts[expert] + position[row, expert]
    src_row = torch.full((m,), -1, dtype=torch.int64, device=dev)
    src_row[dest] = row
    gather = torch.where(src_row >= 0, src_row, n)[None]  # padding rows read the zero row after the received ones
    hidden = int(call.data.shape[1])
    recv_x = call.alloc((m, hidden), call.data.dtype)
    local.place_rows(got.data, recv_x[None], gather, False)
    recv_s = None
    if got.scales is not None:
        recv_s = call.alloc((m, hidden // FP8_BLOCK), torch.float32)
        local.place_rows(got.scales, recv_s[None], gather, False)
    m_indices = call.alloc((m,), torch.int32)
    m_indices.fill_(-1)
    m_indices[dest] = expert.to(torch.int32)
    assert got.weights is not None
    recv_w = call.alloc((m,), torch.float32)
    recv_w.zero_()
    recv_w[dest] = slot_weight_sums(got.local_idx[row], got.weights[row], expert[:, None])[:, 0]
    handle = MoEExpandedHandle(routes, src_row, m_indices.clone(), recv_w.clone())
    x_out = recv_x if recv_s is None else (recv_x, recv_s)
    return MoEExpandedDispatchResult(x_out, m_indices, recv_w, aligned, handle)


def combine_expanded_routed(call: MoEExpandedCombineCall, local: LocalSteps = TORCH) -> torch.Tensor:
    """The expanded combine through the general route (any world size; module docstring)."""
    h, y = call.handle, call.y
    routes = h.routes
    n, hidden = routes.num_recv, int(y.shape[1])
    valid = compact(h.m_indices >= 0, sum(routes.num_recv_tokens_per_expert))
    rows, weights = h.expanded_src_row[valid], h.weights[valid]
    out = call.alloc((routes.num_tokens, hidden), torch.bfloat16)
    if routes.num_topk == 1 or routes.num_local_experts == 1:  # one expanded row per received row
        fmt = RowFormat.of([("y", torch.bfloat16, hidden), ("w", torch.float32, 1)])
        send = fmt.empty(n, y.device)
        of_row = torch.empty(n, dtype=torch.int64, device=y.device)
        of_row[rows] = valid
        dst, src = same_bits(fmt.part(send, "y"), y)
        torch.index_select(src, 0, of_row, out=dst)
        fmt.part(send, "w")[:, 0] = h.weights[of_row]
        back = all_to_all_rows(send, list(routes.recv_counts), list(routes.send_counts), call.group,
                               what="moe_combine_expanded")
        weighted = fmt.part(back, "y").to(torch.float32) * fmt.part(back, "w")
        out.copy_(sum_per_token(local, weighted, send_tokens(routes.is_token_in_rank, sum(routes.send_counts)),
                                routes.num_tokens))
        return out
    partial = local.weighted_rows(y, valid, rows, weights, n)
    out.copy_(return_rows(partial, routes, call.group, "moe_combine_expanded", local=local))
    return out
