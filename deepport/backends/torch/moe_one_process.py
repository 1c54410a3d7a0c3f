"""Low-latency MoE dispatch and combine in one process, without reading a device value on the host.

With one rank (``group=None``) the packed layout is a function of ``topk_idx`` that static-shape tensor
ops compute: a token's row in expert ``e`` is the number of earlier tokens selecting ``e``. Nothing
here synchronises with the device or depends on the routing for a shape, so a decode step's
dispatch, grouped GEMM and combine can be captured in a CUDA graph once and replayed with new
routing (as far as the backend's :class:`~deepport.backends.torch.moe_local.LocalSteps` read nothing on
the host either: the torch steps do not). The handle's routes are a
:class:`~deepport.kernels.moe_handle.OneProcessRoutes`, built only if someone reads ``handle.routes``.

Index tensors that may point nowhere use a sink (one extra row or column past the end) instead of
boolean selection, whose result shape would depend on the data.
"""

from __future__ import annotations

import torch

from deepport.backends.torch.moe_local import LocalSteps
from deepport.kernels.moe_args import FP8_BLOCK, MoEInput
from deepport.kernels.moe_handle import MoELowLatencyHandle, OneProcessRoutes
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult


def expert_mask(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bool ``[T, E]``: token ``t`` selects expert ``e`` (in any slot; -1 selects nothing)."""
    idx = topk_idx.to(torch.int64)
    target = torch.where(idx >= 0, idx, num_experts)
    mask = torch.zeros((idx.shape[0], num_experts + 1), dtype=torch.bool, device=idx.device)
    mask.scatter_(1, target, True)
    return mask[:, :num_experts]


def packed_sources(mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """int64 ``[E, capacity]``: the token held by each packed row (tokens of an expert in token order),
    -1 past the expert's count."""
    t, experts = int(mask.shape[0]), int(mask.shape[1])
    position = mask.to(torch.int64).cumsum(0) - 1  # [T, E], the row of t in e where mask
    column = torch.where(mask, position, capacity).t()  # unselected pairs go to the sink column
    token = torch.arange(t, device=mask.device).expand(experts, t)
    src = torch.full((experts, capacity + 1), -1, dtype=torch.int64, device=mask.device)
    src.scatter_(1, column, token)
    return src[:, :capacity]


def received_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_of_token [T], token_of_row [T + 1])``: one process receives the tokens that select any expert,
    in token order. ``row_of_token`` is -1 for a token routed nowhere; ``token_of_row`` is defined for the
    first ``num_recv`` rows (the rest and the sink entry ``T`` hold any token)."""
    t = int(mask.shape[0])
    selected = mask.any(dim=1)
    row = selected.to(torch.int64).cumsum(0) - 1
    row_of_token = torch.where(selected, row, -1)
    token_of_row = torch.zeros((t + 1,), dtype=torch.int64, device=mask.device)
    token_of_row.scatter_(0, torch.where(selected, row, t), torch.arange(t, device=mask.device))
    return row_of_token, token_of_row


def dispatch(call: MoELowLatencyDispatchCall, data: torch.Tensor, scales: torch.Tensor | None,
             local: LocalSteps) -> MoELowLatencyDispatchResult:
    """The one-process low-latency dispatch of ``data`` (bf16, or e4m3 with ``scales`` when the call casts).
    Rows past each expert's count are not written (the contract leaves them unspecified; zeroing them was
    the triton backend's largest cost, 85 of 180 us per call at 256 experts x 128 rows x 7168 FP8 on an
    H200, trace of 2026-12-02): the torch steps fill them with copies of a token's row."""
    experts, capacity = call.num_experts, call.max_tokens_per_rank
    hidden = int(call.x.shape[1])
    count = call.alloc((experts,), torch.int32)
    if local.low_latency_layout is not None:
        src, packed = local.low_latency_layout(call.topk_idx, experts, capacity, count)
    else:
        mask = expert_mask(call.topk_idx, experts)
        src = packed_sources(mask, capacity)
        count.copy_(mask.sum(dim=0))
        packed = src  # no token, no row: every entry is -1
        if int(data.shape[0]) > 0:
            row_of_token, _ = received_rows(mask)
            packed = torch.where(src >= 0, row_of_token[src.clamp(min=0)], -1)
    recv_x = call.alloc((experts, capacity, hidden), data.dtype)
    local.place_rows(data, recv_x, src, False)
    recv_s = None
    if scales is not None:
        storage = call.alloc((experts, hidden // FP8_BLOCK, capacity), torch.float32)
        recv_s = storage.transpose(1, 2)  # column-major in the last two dimensions
        local.place_rows(scales, recv_s, src, False)
    routes = OneProcessRoutes(call.topk_idx.to(torch.int64).clone(), experts, hidden)
    handle = MoELowLatencyHandle(routes, capacity, count.clone(), packed)
    x_out: MoEInput = recv_x if recv_s is None else (recv_x, recv_s)
    return MoELowLatencyDispatchResult(x_out, count, handle)


def combine(call: MoELowLatencyCombineCall, local: LocalSteps) -> torch.Tensor:
    """``out[t] = sum_k w[t, k] * y[e_k, row of t in e_k]`` over the slots with ``e_k != -1``, in float32.

    The row of each (token, expert) comes from the handle's ``packed_src_row`` (a received row, mapped
    to its token); slots naming one expert twice read its one row twice, each with its own weight,
    which is the contract's sum of weights. Unrouted slots add into a sink row (``y``'s row there may
    hold NaN), dropped."""
    h, y = call.handle, call.y
    t, hidden, experts = h.num_tokens, int(y.shape[2]), h.num_experts
    out = call.alloc((t, hidden), torch.bfloat16)
    if t == 0:
        return out
    packed = h.packed_src_row
    capacity = int(packed.shape[1])
    if local.low_latency_positions is not None and local.token_rows_into is not None:
        # the contract's layout (tokens of an expert in token order) from the routing alone, in one kernel
        local.token_rows_into(y.reshape(experts * capacity, hidden),
                              local.low_latency_positions(call.topk_idx, capacity), call.topk_weights, out)
        return out
    _, token_of_row = received_rows(expert_mask(call.topk_idx, experts))
    token = torch.where(packed >= 0, token_of_row[packed.clamp(min=0)], t)  # [E, capacity], sink row t
    position = torch.zeros((t + 1, experts), dtype=torch.int64, device=y.device)
    expert_of = torch.arange(experts, device=y.device)[:, None].expand(experts, capacity)
    rows = torch.arange(capacity, device=y.device).expand(experts, capacity)
    position.index_put_((token.reshape(-1), expert_of.reshape(-1)), rows.reshape(-1))
    idx = call.topk_idx.to(torch.int64)
    routed = idx >= 0
    expert = idx.clamp(min=0)
    src_pos = expert * capacity + position[torch.arange(t, device=y.device)[:, None], expert]  # [T, k]
    if local.token_rows_into is not None:  # the terms per token in slot order already: no sort by token
        local.token_rows_into(y.reshape(experts * capacity, hidden), torch.where(routed, src_pos, -1),
                              call.topk_weights, out)
        return out
    dst_row = torch.where(routed, torch.arange(t, device=y.device)[:, None], t)
    total = local.weighted_rows(y.reshape(experts * capacity, hidden), src_pos.reshape(-1), dst_row.reshape(-1),
                                call.topk_weights.reshape(-1), t + 1)
    out.copy_(total[:t])
    return out
