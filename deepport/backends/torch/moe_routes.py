"""Normal MoE layout, dispatch and combine in vectorised torch, over ``all_to_all_single``.

Send side: a token goes once to each rank holding one of its experts, rows ordered by destination
rank then token index; receivers therefore get rows grouped by source rank, each block in token
order, which is the contract's canonical order with no sorting. Combine sends rows back along the
reverse routes and sums per token in float32. The two local steps around the exchanges (gathering the
rows to send, summing returned rows per token) are ``take_rows`` / ``sum_rows`` of a
:class:`~deepport.backends.torch.moe_local.LocalSteps`, replaceable by another backend's kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepport.backends.torch.moe_comm import all_to_all_rows, exchange_counts
from deepport.backends.torch.moe_local import TORCH, LocalSteps
from deepport.kernels.moe_args import Alloc, MoEGroup, align_up
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_handle import MoEHandle
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall


def selection_mask(idx: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """bool ``[T, num_groups]``: token selects at least one expert of group ``g`` (``e // group_size``)."""
    idx = idx.to(torch.int64)
    target = torch.where(idx >= 0, idx // group_size, num_groups)  # -1 goes to a dropped sentinel column
    mask = torch.zeros((idx.shape[0], num_groups + 1), dtype=torch.bool, device=idx.device)
    mask.scatter_(1, target, True)
    return mask[:, :num_groups]


def layout(call: MoELayoutCall) -> MoELayout:
    idx, experts, ranks = call.topk_idx, call.num_experts, call.num_ranks
    in_rank = selection_mask(idx, ranks, experts // ranks)
    per_expert = selection_mask(idx, experts, 1).sum(0, dtype=torch.int32)
    return MoELayout(in_rank.sum(0, dtype=torch.int32), per_expert, in_rank)


def local_ids(global_idx: torch.Tensor, rank: int, num_local: int) -> torch.Tensor:
    """Global expert ids -> ids local to ``rank``, -1 for experts elsewhere and for -1 slots."""
    local = global_idx - rank * num_local
    return torch.where((global_idx >= 0) & (local >= 0) & (local < num_local), local, -1)


@dataclass
class Received:
    """What a dispatch brought to this rank, before packing into a layout."""

    data: torch.Tensor  # [num_recv, hidden], payload dtype
    scales: torch.Tensor | None
    local_idx: torch.Tensor  # int64 [num_recv, num_topk]
    weights: torch.Tensor | None  # float32 [num_recv, num_topk], zero on non-local slots
    handle: MoEHandle


def send_tokens(handle_or_mask: torch.Tensor) -> torch.Tensor:
    """Token index of each sent row, in send order (destination rank, then token)."""
    return handle_or_mask.t().nonzero()[:, 1]


def route(data: torch.Tensor, scales: torch.Tensor | None, topk_idx: torch.Tensor, weights: torch.Tensor | None,
          num_experts: int, grp: MoEGroup, alignment: int, alloc: Alloc | None = None,
          local: LocalSteps = TORCH) -> Received:
    """Send every token once to each rank holding one of its experts; ``alloc`` (when given) provides
    the received payload tensors, ``local.take_rows`` gathers the rows to send."""
    idx = topk_idx.to(torch.int64)
    world, num_local = grp.world_size, num_experts // grp.world_size
    in_rank = selection_mask(idx, world, num_local)
    send_counts = in_rank.sum(0)
    tokens = send_tokens(in_rank)
    sends = [int(v) for v in send_counts.tolist()]
    recvs = exchange_counts(send_counts, grp)
    k = idx.shape[1]
    meta_cols = [idx[tokens], tokens[:, None]]
    if weights is not None:
        meta_cols.append(weights[tokens].view(torch.int32).to(torch.int64))
    meta = all_to_all_rows(torch.cat(meta_cols, dim=1), sends, recvs, grp)
    recv_global, recv_src = meta[:, :k], meta[:, k].contiguous()
    recv_local = local_ids(recv_global, grp.rank, num_local)
    recv_w = None
    if weights is not None:
        raw = meta[:, k + 1:].to(torch.int32).view(torch.float32)
        recv_w = torch.where(recv_local >= 0, raw, torch.zeros_like(raw))
    n = sum(recvs)
    out = None if alloc is None else alloc((n, int(data.shape[1])), data.dtype)
    recv_data = all_to_all_rows(local.take_rows(data, tokens), sends, recvs, grp, out)
    recv_scales = None
    if scales is not None:
        out_s = None if alloc is None else alloc((n, int(scales.shape[1])), scales.dtype)
        recv_scales = all_to_all_rows(local.take_rows(scales, tokens).contiguous(), sends, recvs, grp, out_s)
    per_expert = selection_mask(recv_local, num_local, 1).sum(0)
    handle = MoEHandle(grp.group, grp.rank, world, num_experts, int(data.shape[1]), alignment, idx.clone(),
                       in_rank, tuple(sends), tuple(recvs), recv_src, recv_local,
                       tuple(int(v) for v in per_expert.tolist()))
    return Received(recv_data, recv_scales, recv_local, recv_w, handle)


def resend(data: torch.Tensor, scales: torch.Tensor | None, handle: MoEHandle, grp: MoEGroup,
           alloc: Alloc, local: LocalSteps = TORCH) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached dispatch: the same routes, new payload."""
    tokens = send_tokens(handle.is_token_in_rank)
    sends, recvs = list(handle.send_counts), list(handle.recv_counts)
    n = handle.num_recv
    out = all_to_all_rows(local.take_rows(data, tokens), sends, recvs, grp, alloc((n, int(data.shape[1])), data.dtype))
    out_s = None
    if scales is not None:
        out_s = all_to_all_rows(local.take_rows(scales, tokens).contiguous(), sends, recvs, grp,
                                alloc((n, int(scales.shape[1])), scales.dtype))
    return out, out_s


def dispatch(call: MoEDispatchCall, local: LocalSteps = TORCH) -> MoEDispatchResult:
    if call.handle is not None:
        data, scales = resend(call.data, call.scales, call.handle, call.group, call.alloc, local)
        return MoEDispatchResult(data if scales is None else (data, scales), None, None, None, call.handle)
    assert call.topk_idx is not None
    got = route(call.data, call.scales, call.topk_idx, call.topk_weights, call.num_experts, call.group,
                call.expert_alignment, call.alloc, local)
    n, k = got.local_idx.shape
    recv_idx = call.alloc((int(n), int(k)), call.topk_idx.dtype)
    recv_idx.copy_(got.local_idx)
    recv_w = None
    if got.weights is not None:
        recv_w = call.alloc((int(n), int(k)), torch.float32)
        recv_w.copy_(got.weights)
    counts = [align_up(c, call.expert_alignment) for c in got.handle.num_recv_tokens_per_expert]
    recv_x = got.data if got.scales is None else (got.data, got.scales)
    return MoEDispatchResult(recv_x, recv_idx, recv_w, counts, got.handle)


def return_rows(rows: torch.Tensor, handle: MoEHandle, grp: MoEGroup, local: LocalSteps = TORCH) -> torch.Tensor:
    """Send per-received-token rows back to their sources and sum per token in float32:
    ``[num_recv, ...]`` -> float32 ``[num_tokens, ...]``."""
    back = all_to_all_rows(rows.contiguous(), list(handle.recv_counts), list(handle.send_counts), grp)
    return local.sum_rows(back, send_tokens(handle.is_token_in_rank), handle.num_tokens)


def combine(call: MoECombineCall, local: LocalSteps = TORCH) -> MoECombineResult:
    h = call.handle
    out = call.alloc((h.num_tokens, int(call.x.shape[1])), torch.bfloat16)
    out.copy_(return_rows(call.x, h, call.group, local))
    weights = None
    if call.topk_weights is not None:
        weights = call.alloc((h.num_tokens, h.num_topk), torch.float32)
        weights.copy_(return_rows(call.topk_weights, h, call.group, local))
    return MoECombineResult(out, weights)
