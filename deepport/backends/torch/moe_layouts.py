"""Expanded (grouped-GEMM contiguous) and low-latency (per-expert packed) MoE layouts in torch.

Both start from the normal routes (:func:`deepport.backends.torch.moe_routes.route`) and place each
distinct (received token, local expert) pair; their weighted combines reduce each token's pairs on
the receiving rank in float32, send the partial sums back, and sum them at the source. In one process
the low-latency pair runs :mod:`deepport.backends.torch.moe_one_process` instead (no host read of the
routing, so it can be captured in a CUDA graph).
"""

from __future__ import annotations

import torch

from deepport.backends.torch import moe_one_process as one_process
from deepport.backends.torch.moe_comm import all_to_all_rows
from deepport.backends.torch.moe_routes import return_rows, route, selection_mask, send_tokens
from deepport.kernels.moe_args import FP8, FP8_BLOCK, align_up
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle, MoELowLatencyHandle
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import (
    AMAX_FLOOR,
    FP8_MAX,
    MoELowLatencyDispatchCall,
    MoELowLatencyDispatchResult,
)


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


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A byte view (index_put is not implemented for e4m3 on every device)."""
    return t.view(torch.uint8)


def dispatch_expanded(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    got = route(call.data, call.scales, call.topk_idx, call.topk_weights, call.num_experts, call.group,
                call.expert_alignment)
    routes = got.handle
    num_local, align = routes.num_local_experts, call.expert_alignment
    aligned = [align_up(c, align) for c in routes.num_recv_tokens_per_expert]
    starts = torch.tensor([sum(aligned[:e]) for e in range(num_local)], dtype=torch.int64,
                          device=call.data.device)
    m = sum(aligned)
    expert, row, position = _pairs(got.local_idx, num_local)
    dest = starts[expert] + position
    hidden = int(call.data.shape[1])
    recv_x = call.alloc((m, hidden), call.data.dtype)
    recv_x.view(torch.uint8).zero_()  # padding rows are zero (e4m3 has no zero() kernel everywhere)
    _bytes(recv_x)[dest] = _bytes(got.data)[row]
    recv_s = None
    if got.scales is not None:
        recv_s = call.alloc((m, hidden // FP8_BLOCK), torch.float32)
        recv_s.zero_()
        recv_s[dest] = got.scales[row]
    m_indices = call.alloc((m,), torch.int32)
    m_indices.fill_(-1)
    m_indices[dest] = expert.to(torch.int32)
    assert got.weights is not None
    recv_w = call.alloc((m,), torch.float32)
    recv_w.zero_()
    recv_w[dest] = _slot_weight_sums(got.local_idx, got.weights, num_local)[row, expert]
    src_row = torch.full((m,), -1, dtype=torch.int64, device=call.data.device)
    src_row[dest] = row
    handle = MoEExpandedHandle(routes, src_row, m_indices.clone(), recv_w.clone())
    x_out = recv_x if recv_s is None else (recv_x, recv_s)
    return MoEExpandedDispatchResult(x_out, m_indices, recv_w, aligned, handle)


def combine_expanded(call: MoEExpandedCombineCall) -> torch.Tensor:
    h = call.handle
    valid = (h.m_indices >= 0).nonzero()[:, 0]
    partial = torch.zeros((h.routes.num_recv, int(call.y.shape[1])), dtype=torch.float32, device=call.y.device)
    partial.index_add_(0, h.expanded_src_row[valid], call.y[valid].to(torch.float32) * h.weights[valid, None])
    out = call.alloc((h.routes.num_tokens, int(call.y.shape[1])), torch.bfloat16)
    out.copy_(return_rows(partial, h.routes, call.group))
    return out


def cast_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``[T, H]`` -> (e4m3 ``[T, H]``, fp32 scales ``[T, H/128]``): per 128 channels
    ``amax = max(|x|, 1e-4)``, ``scale = amax / 448``, ``fp8 = x * (448 / amax)``."""
    t, hidden = int(x.shape[0]), int(x.shape[1])
    blocks = x.to(torch.float32).view(t, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    data = (blocks * (FP8_MAX / amax)[:, :, None]).to(FP8).view(t, hidden)
    return data, amax / FP8_MAX


def dispatch_low_latency(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    data, scales = cast_per_token_fp8(call.x) if call.use_fp8 else (call.x, None)
    if call.group.world_size == 1:  # one process: no host read of the routing (CUDA-graph capturable)
        return one_process.dispatch(call, data, scales)
    got = route(data, scales, call.topk_idx, None, call.num_experts, call.group, 1)
    routes = got.handle
    num_local, capacity = routes.num_local_experts, routes.world_size * call.max_tokens_per_rank
    expert, row, position = _pairs(got.local_idx, num_local)
    hidden = int(call.x.shape[1])
    recv_x = call.alloc((num_local, capacity, hidden), data.dtype)
    _bytes(recv_x)[expert, position] = _bytes(got.data)[row]
    recv_s = None
    if got.scales is not None:
        storage = call.alloc((num_local, hidden // FP8_BLOCK, capacity), torch.float32)
        recv_s = storage.transpose(1, 2)  # column-major in the last two dimensions
        recv_s[expert, position] = got.scales[row]
    count = call.alloc((num_local,), torch.int32)
    count.copy_(torch.tensor(routes.num_recv_tokens_per_expert, dtype=torch.int32))
    packed = torch.full((num_local, capacity), -1, dtype=torch.int64, device=call.x.device)
    packed[expert, position] = row
    handle = MoELowLatencyHandle(routes, call.max_tokens_per_rank, count.clone(), packed)
    return MoELowLatencyDispatchResult(recv_x if recv_s is None else (recv_x, recv_s), count, handle)


def _forward_weights(weights: torch.Tensor, routes: MoEHandle, call: MoELowLatencyCombineCall) -> torch.Tensor:
    """The source's top-k weights of every received token, zeroed on non-local slots."""
    tokens = send_tokens(routes.is_token_in_rank)
    got = all_to_all_rows(weights[tokens].contiguous(), list(routes.send_counts), list(routes.recv_counts),
                          call.group)
    return torch.where(routes.recv_topk_idx >= 0, got, torch.zeros_like(got))


def combine_low_latency(call: MoELowLatencyCombineCall) -> torch.Tensor:
    if call.handle.world_size == 1:  # one process: no host read of the routing (CUDA-graph capturable)
        return one_process.combine(call)
    h, routes = call.handle, call.handle.routes
    weights = _forward_weights(call.topk_weights, routes, call)
    sums = _slot_weight_sums(routes.recv_topk_idx, weights, routes.num_local_experts)
    expert, position = (h.packed_src_row >= 0).nonzero().unbind(1)
    row = h.packed_src_row[expert, position]
    hidden = int(call.y.shape[2])
    partial = torch.zeros((routes.num_recv, hidden), dtype=torch.float32, device=call.y.device)
    partial.index_add_(0, row, call.y[expert, position].to(torch.float32) * sums[row, expert][:, None])
    out = call.alloc((routes.num_tokens, hidden), torch.bfloat16)
    out.copy_(return_rows(partial, routes, call.group))
    return out
