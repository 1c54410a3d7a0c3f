"""Low-latency MoE dispatch and combine in one process, without reading a device value on the host.

With one rank (``group=None``) the packed layout is a function of ``topk_idx`` that static-shape tensor
ops compute: a token's row in expert ``e`` is the number of earlier tokens selecting ``e``. Nothing
here synchronises with the device or depends on the routing for a shape, so a decode step's
dispatch, grouped GEMM and combine can be captured in a CUDA graph once and replayed with new
routing. The handle's routes are a :class:`~deepport.kernels.moe_handle.OneProcessRoutes`, built only
if someone reads ``handle.routes``.

Index tensors that may point nowhere use a sink (one extra row or column past the end) instead of
boolean selection, whose result shape would depend on the data.
"""

from __future__ import annotations

import torch

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


def _gather_rows(values: torch.Tensor, src: torch.Tensor, out: torch.Tensor) -> None:
    """``out[e, p] = values[src[e, p]]`` bit-exactly, zero where ``src < 0`` (byte views: e4m3 has no
    ``where`` kernel on every device)."""
    raw = values.view(torch.uint8) if values.element_size() == 1 else values
    picked = raw[src.clamp(min=0)]
    zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
    target = out.view(torch.uint8) if out.element_size() == 1 else out
    target.copy_(torch.where((src >= 0)[..., None], picked, zero))


def dispatch(call: MoELowLatencyDispatchCall, data: torch.Tensor,
             scales: torch.Tensor | None) -> MoELowLatencyDispatchResult:
    """The one-process low-latency dispatch of ``data`` (bf16, or e4m3 with ``scales`` when the call casts)."""
    experts, capacity = call.num_experts, call.max_tokens_per_rank
    hidden = int(call.x.shape[1])
    mask = expert_mask(call.topk_idx, experts)
    src = packed_sources(mask, capacity)
    recv_x = call.alloc((experts, capacity, hidden), data.dtype)
    recv_s = None
    if int(data.shape[0]) == 0:  # nothing to gather from: every row is past its (zero) count
        (recv_x.view(torch.uint8) if recv_x.element_size() == 1 else recv_x).zero_()
    else:
        _gather_rows(data, src, recv_x)
    if scales is not None:
        storage = call.alloc((experts, hidden // FP8_BLOCK, capacity), torch.float32)
        recv_s = storage.transpose(1, 2)  # column-major in the last two dimensions
        if int(data.shape[0]) == 0:
            storage.zero_()
        else:
            _gather_rows(scales, src, recv_s)
    count = call.alloc((experts,), torch.int32)
    count.copy_(mask.sum(dim=0))
    packed = src  # no token, no row: every entry is -1
    if int(data.shape[0]) > 0:
        row_of_token, _ = received_rows(mask)
        packed = torch.where(src >= 0, row_of_token[src.clamp(min=0)], -1)
    routes = OneProcessRoutes(call.topk_idx.to(torch.int64).clone(), experts, hidden)
    handle = MoELowLatencyHandle(routes, capacity, count.clone(), packed)
    x_out: MoEInput = recv_x if recv_s is None else (recv_x, recv_s)
    return MoELowLatencyDispatchResult(x_out, count, handle)


def combine(call: MoELowLatencyCombineCall) -> torch.Tensor:
    """``out[t] = sum_k w[t, k] * y[e_k, row of t in e_k]`` over the slots with ``e_k != -1``, in float32.

    The row of each (token, expert) comes from the handle's ``packed_src_row`` (a received row, mapped
    to its token); slots naming one expert twice read its one row twice, each with its own weight,
    which is the contract's sum of weights."""
    h, y = call.handle, call.y
    t, hidden, experts = h.num_tokens, int(y.shape[2]), h.num_experts
    out = call.alloc((t, hidden), torch.bfloat16)
    if t == 0:
        return out
    _, token_of_row = received_rows(expert_mask(call.topk_idx, experts))
    packed = h.packed_src_row
    capacity = int(packed.shape[1])
    valid = packed >= 0
    token = torch.where(valid, token_of_row[packed.clamp(min=0)], t)  # [E, capacity], sink row t
    position = torch.zeros((t + 1, experts), dtype=torch.int64, device=y.device)
    expert_of = torch.arange(experts, device=y.device)[:, None].expand(experts, capacity)
    rows = torch.arange(capacity, device=y.device).expand(experts, capacity)
    position.index_put_((token.reshape(-1), expert_of.reshape(-1)), rows.reshape(-1))
    idx = call.topk_idx.to(torch.int64)
    routed = idx >= 0
    expert = idx.clamp(min=0)
    row = position[torch.arange(t, device=y.device)[:, None], expert]  # [T, k]
    picked = y[expert, row].to(torch.float32)  # [T, k, hidden]
    weights = torch.where(routed, call.topk_weights, 0.0)
    # where, not multiply: an unrouted slot reads row 0, which may hold NaN
    total = torch.where(routed[..., None], picked * weights[..., None], 0.0).sum(dim=1)
    out.copy_(total)
    return out
