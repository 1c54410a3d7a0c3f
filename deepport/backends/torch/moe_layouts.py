"""Expanded (grouped-GEMM contiguous) and low-latency (per-expert packed) MoE layouts in torch.

Both start from the normal routes (:func:`deepport.backends.torch.moe_routes.route`) and place each
distinct (received token, local expert) pair; their weighted combines reduce each token's pairs on
the receiving rank in float32, send the partial sums back, and sum them at the source. The per-device
steps (placing rows, weighted sums, the FP8 cast) are :class:`~deepport.backends.torch.moe_local.LocalSteps`,
replaceable by another backend's kernels. In one process the low-latency pair runs
:mod:`deepport.backends.torch.moe_one_process` instead, with the same steps: no host read of the
routing, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from deepport.backends.torch import moe_one_process as one_process
from deepport.backends.torch.moe_comm import all_to_all_rows
from deepport.backends.torch.moe_local import TORCH, LocalSteps
from deepport.backends.torch.moe_routes import return_rows, route, selection_mask, send_tokens
from deepport.kernels.moe_args import FP8_BLOCK, align_up
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle, MoELowLatencyHandle
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult


def _pairs(local_idx: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (row, expert) pairs ordered by expert then row: ``(expert, row, position in expert)``."""
    mask = selection_mask(local_idx, num_local, 1)  # [num_recv, L]
    position = mask.to(torch.int64).cumsum(0) - 1
    expert, row = mask.t().nonzero().unbind(1)
    return expert, row, position[row, expert]


def _slot_weight_sums(local_idx: torch.Tensor, weights: torch.Tensor, num_local: int) -> torch.Tensor:
    """float32 ``[num_recv, L]``: per row, the summed weights of the slots naming each local expert."""
    target = torch.where(local_idx >= 0, local_idx, num_local)
    sums = torch.zeros((local_idx.shape[0], num_local + 1), dtype=torch.float32, device=local_idx.device)
    sums.scatter_add_(1, target, weights.to(torch.float32))
    return sums[:, :num_local]


def dispatch_expanded(call: MoEExpandedDispatchCall, local: LocalSteps = TORCH) -> MoEExpandedDispatchResult:
    got = route(call.data, call.scales, call.topk_idx, call.topk_weights, call.num_experts, call.group,
                call.expert_alignment, local=local)
    routes = got.handle
    num_local, align = routes.num_local_experts, call.expert_alignment
    aligned = [align_up(c, align) for c in routes.num_recv_tokens_per_expert]
    starts = torch.tensor([sum(aligned[:e]) for e in range(num_local)], dtype=torch.int64,
                          device=call.data.device)
    m = sum(aligned)
    expert, row, position = _pairs(got.local_idx, num_local)
    dest = starts[expert] + position
    src_row = torch.full((m,), -1, dtype=torch.int64, device=call.data.device)
    src_row[dest] = row
    hidden = int(call.data.shape[1])
    recv_x = call.alloc((m, hidden), call.data.dtype)
    local.place_rows(got.data, recv_x[None], src_row[None], True)  # padding rows are zero
    recv_s = None
    if got.scales is not None:
        recv_s = call.alloc((m, hidden // FP8_BLOCK), torch.float32)
        local.place_rows(got.scales, recv_s[None], src_row[None], True)
    m_indices = call.alloc((m,), torch.int32)
    m_indices.fill_(-1)
    m_indices[dest] = expert.to(torch.int32)
    assert got.weights is not None
    recv_w = call.alloc((m,), torch.float32)
    recv_w.zero_()
    recv_w[dest] = _slot_weight_sums(got.local_idx, got.weights, num_local)[row, expert]
    handle = MoEExpandedHandle(routes, src_row, m_indices.clone(), recv_w.clone())
    x_out = recv_x if recv_s is None else (recv_x, recv_s)
    return MoEExpandedDispatchResult(x_out, m_indices, recv_w, aligned, handle)


def combine_expanded(call: MoEExpandedCombineCall, local: LocalSteps = TORCH) -> torch.Tensor:
    h = call.handle
    valid = (h.m_indices >= 0).nonzero()[:, 0]
    partial = local.weighted_rows(call.y, valid, h.expanded_src_row[valid], h.weights[valid], h.routes.num_recv)
    out = call.alloc((h.routes.num_tokens, int(call.y.shape[1])), torch.bfloat16)
    out.copy_(return_rows(partial, h.routes, call.group, local))
    return out


def dispatch_low_latency(call: MoELowLatencyDispatchCall, local: LocalSteps = TORCH) -> MoELowLatencyDispatchResult:
    data, scales = local.cast_fp8(call.x) if call.use_fp8 else (call.x, None)
    if call.group.world_size == 1:  # one process: no host read of the routing (CUDA-graph capturable)
        return one_process.dispatch(call, data, scales, local)
    got = route(data, scales, call.topk_idx, None, call.num_experts, call.group, 1, local=local)
    routes = got.handle
    num_local, capacity = routes.num_local_experts, routes.world_size * call.max_tokens_per_rank
    expert, row, position = _pairs(got.local_idx, num_local)
    packed = torch.full((num_local, capacity), -1, dtype=torch.int64, device=call.x.device)
    packed[expert, position] = row
    hidden = int(call.x.shape[1])
    recv_x = call.alloc((num_local, capacity, hidden), data.dtype)
    local.place_rows(got.data, recv_x, packed, False)  # rows past each expert's count stay as allocated
    recv_s = None
    if got.scales is not None:
        storage = call.alloc((num_local, hidden // FP8_BLOCK, capacity), torch.float32)
        recv_s = storage.transpose(1, 2)  # column-major in the last two dimensions
        local.place_rows(got.scales, recv_s, packed, False)
    count = call.alloc((num_local,), torch.int32)
    count.copy_(torch.tensor(routes.num_recv_tokens_per_expert, dtype=torch.int32))
    handle = MoELowLatencyHandle(routes, call.max_tokens_per_rank, count.clone(), packed)
    return MoELowLatencyDispatchResult(recv_x if recv_s is None else (recv_x, recv_s), count, handle)


def _forward_weights(weights: torch.Tensor, routes: MoEHandle, call: MoELowLatencyCombineCall) -> torch.Tensor:
    """The source's top-k weights of every received token, zeroed on non-local slots."""
    tokens = send_tokens(routes.is_token_in_rank)
    got = all_to_all_rows(weights[tokens].contiguous(), list(routes.send_counts), list(routes.recv_counts),
                          call.group)
    return torch.where(routes.recv_topk_idx >= 0, got, torch.zeros_like(got))


def combine_low_latency(call: MoELowLatencyCombineCall, local: LocalSteps = TORCH) -> torch.Tensor:
    if call.handle.world_size == 1:  # one process: no host read of the routing (CUDA-graph capturable)
        return one_process.combine(call, local)
    h, routes = call.handle, call.handle.routes
    weights = _forward_weights(call.topk_weights, routes, call)
    sums = _slot_weight_sums(routes.recv_topk_idx, weights, routes.num_local_experts)
    expert, position = (h.packed_src_row >= 0).nonzero().unbind(1)
    row = h.packed_src_row[expert, position]
    num_local, capacity, hidden = (int(d) for d in call.y.shape)
    slot = expert * capacity + position  # row of y viewed as [L * capacity, hidden]
    partial = local.weighted_rows(call.y.reshape(num_local * capacity, hidden), slot, row, sums[row, expert],
                                  routes.num_recv)
    out = call.alloc((routes.num_tokens, hidden), torch.bfloat16)
    out.copy_(return_rows(partial, routes, call.group, local))
    return out
