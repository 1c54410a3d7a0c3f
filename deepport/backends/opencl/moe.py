"""The seven MoE ops on OpenCL: layout, normal / expanded / low-latency dispatch and combine.

Routing and every byte that crosses ranks go through the torch backend's transport
(:mod:`deepport.backends.torch.moe_routes` over ``torch.distributed`` ``all_to_all_single``); the local
steps run as OpenCL kernels (:mod:`.moe_rows`): the layout counts, the gather of the rows each rank
sends, the permutation of received rows into the expanded (grouped-GEMM contiguous) and low-latency
(per-expert, fixed capacity) layouts, the per-token FP8 cast, and the weighted un-permute (per
received token, then per source token). Index bookkeeping (which row goes where) is small and stays
in torch on the inputs' device.
"""

from __future__ import annotations

import torch

from deepport.backends.opencl import moe_rows
from deepport.backends.torch import moe_routes
from deepport.backends.torch.moe_comm import all_to_all_rows
from deepport.backends.torch.moe_routes import return_rows, route, selection_mask, send_tokens
from deepport.kernels.moe_args import FP8_BLOCK, align_up
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle, MoELowLatencyHandle
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult


def layout(call: MoELayoutCall) -> MoELayout:
    per_rank, per_expert, in_rank = moe_rows.layout_counts(call.topk_idx, call.num_experts, call.num_ranks)
    device = call.topk_idx.device
    return MoELayout(per_rank.to(device), per_expert.to(device), in_rank.to(device))


def dispatch(call: MoEDispatchCall) -> MoEDispatchResult:
    return moe_routes.dispatch(call, moe_rows.take_rows)


def combine(call: MoECombineCall) -> MoECombineResult:
    return moe_routes.combine(call, moe_rows.sum_rows)


def _expert_rows(local_idx: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (received row, local expert) pairs, by expert then row: ``(expert, row, rank of the row
    among the expert's rows)``."""
    mask = selection_mask(local_idx, num_local, 1)  # [num_recv, L]
    expert, row = mask.t().nonzero().unbind(1)
    counts = mask.sum(0)
    first = torch.cumsum(counts, 0) - counts  # index of each expert's first pair
    return expert, row, torch.arange(int(expert.shape[0]), device=local_idx.device) - first[expert]


def _weight_per_expert(local_idx: torch.Tensor, weights: torch.Tensor, num_local: int) -> torch.Tensor:
    """float32 ``[num_recv, L]``: per row, the summed weights of its slots naming each local expert."""
    target = torch.where(local_idx >= 0, local_idx, num_local)
    sums = torch.zeros((int(local_idx.shape[0]), num_local + 1), dtype=torch.float32, device=local_idx.device)
    sums.scatter_add_(1, target, weights.to(torch.float32))
    return sums[:, :num_local]


def dispatch_expanded(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    got = route(call.data, call.scales, call.topk_idx, call.topk_weights, call.num_experts, call.group,
                call.expert_alignment, take=moe_rows.take_rows)
    routes = got.handle
    num_local, device = routes.num_local_experts, call.data.device
    aligned = [align_up(c, call.expert_alignment) for c in routes.num_recv_tokens_per_expert]
    starts = torch.tensor([sum(aligned[:e]) for e in range(num_local)], dtype=torch.int64, device=device)
    m = sum(aligned)
    expert, row, position = _expert_rows(got.local_idx, num_local)
    dest = starts[expert] + position
    src_row = torch.full((m,), -1, dtype=torch.int64, device=device)
    src_row[dest] = row
    hidden = int(call.data.shape[1])
    recv_x = call.alloc((m, hidden), call.data.dtype)
    moe_rows.gather_rows(got.data, src_row, recv_x)  # padding rows (-1) are written as zeros
    recv_s = None
    if got.scales is not None:
        recv_s = call.alloc((m, hidden // FP8_BLOCK), torch.float32)
        moe_rows.gather_rows(got.scales, src_row, recv_s)
    m_indices = call.alloc((m,), torch.int32)
    m_indices.fill_(-1)
    m_indices[dest] = expert.to(torch.int32)
    assert got.weights is not None  # the op requires topk_weights
    recv_w = call.alloc((m,), torch.float32)
    recv_w.zero_()
    recv_w[dest] = _weight_per_expert(got.local_idx, got.weights, num_local)[row, expert]
    handle = MoEExpandedHandle(routes, src_row, m_indices.clone(), recv_w.clone())
    return MoEExpandedDispatchResult(recv_x if recv_s is None else (recv_x, recv_s), m_indices, recv_w, aligned,
                                     handle)


def combine_expanded(call: MoEExpandedCombineCall) -> torch.Tensor:
    h, routes = call.handle, call.handle.routes
    valid = (h.m_indices >= 0).nonzero()[:, 0]
    partial = moe_rows.segment_sums(call.y, valid, h.expanded_src_row[valid], routes.num_recv, h.weights[valid],
                                    torch.float32)
    out = call.alloc((routes.num_tokens, int(call.y.shape[1])), torch.bfloat16)
    out.copy_(return_rows(partial, routes, call.group, moe_rows.sum_rows))
    return out


def dispatch_low_latency(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    data, scales = moe_rows.cast_fp8(call.x) if call.use_fp8 else (call.x, None)
    got = route(data, scales, call.topk_idx, None, call.num_experts, call.group, 1, take=moe_rows.take_rows)
    routes = got.handle
    num_local, capacity = routes.num_local_experts, routes.world_size * call.max_tokens_per_rank
    expert, row, position = _expert_rows(got.local_idx, num_local)
    packed = torch.full((num_local * capacity,), -1, dtype=torch.int64, device=call.x.device)
    packed[expert * capacity + position] = row
    hidden = int(call.x.shape[1])
    recv_x = call.alloc((num_local, capacity, hidden), data.dtype)
    moe_rows.gather_rows(got.data, packed, recv_x.view(num_local * capacity, hidden))  # rows past the count: 0
    recv_s = None
    if got.scales is not None:
        storage = call.alloc((num_local, hidden // FP8_BLOCK, capacity), torch.float32)
        recv_s = storage.transpose(1, 2)  # column-major in the last two dimensions
        rows = torch.empty((num_local * capacity, hidden // FP8_BLOCK), dtype=torch.float32, device=call.x.device)
        moe_rows.gather_rows(got.scales, packed, rows)
        recv_s.copy_(rows.view(num_local, capacity, hidden // FP8_BLOCK))
    count = call.alloc((num_local,), torch.int32)
    count.copy_(torch.tensor(routes.num_recv_tokens_per_expert, dtype=torch.int32))
    handle = MoELowLatencyHandle(routes, call.max_tokens_per_rank, count.clone(), packed.view(num_local, capacity))
    return MoELowLatencyDispatchResult(recv_x if recv_s is None else (recv_x, recv_s), count, handle)


def combine_low_latency(call: MoELowLatencyCombineCall) -> torch.Tensor:
    h, routes = call.handle, call.handle.routes
    tokens = send_tokens(routes.is_token_in_rank)
    sent = all_to_all_rows(call.topk_weights[tokens].contiguous(), list(routes.send_counts),
                           list(routes.recv_counts), call.group)
    weights = torch.where(routes.recv_topk_idx >= 0, sent, torch.zeros_like(sent))  # this rank's slots only
    per_expert = _weight_per_expert(routes.recv_topk_idx, weights, routes.num_local_experts)
    capacity = int(h.packed_src_row.shape[1])
    expert, position = (h.packed_src_row >= 0).nonzero().unbind(1)
    row = h.packed_src_row[expert, position]
    hidden = int(call.y.shape[2])
    partial = moe_rows.segment_sums(call.y.view(-1, hidden), expert * capacity + position, row, routes.num_recv,
                                    per_expert[row, expert], torch.float32)
    out = call.alloc((routes.num_tokens, hidden), torch.bfloat16)
    out.copy_(return_rows(partial, routes, call.group, moe_rows.sum_rows))
    return out
