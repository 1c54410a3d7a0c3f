"""The MoE ops on the reference backend: gather the world, apply the NumPy definitions, keep ours.

Slow by design (Python loops over tokens); it is the oracle the torch backend is checked against
in multi-process runs, where the conformance suite's own reference sees only generated inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from deepport.backends.reference.moe_gather import gather_rows
from deepport.kernels.f64.moe import (
    Dispatched,
    align_up,
    cast_fp8_f64,
    combine_f64,
    dispatch_f64,
    expanded_rows_f64,
    layout_f64,
    packed_rows_f64,
)
from deepport.kernels.moe_args import FP8, Alloc, MoEGroup, MoEInput, dense
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle, MoELowLatencyHandle
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult


def _np(t: torch.Tensor, dtype: type = np.float64) -> np.ndarray:
    wide = torch.float64 if dtype is np.float64 else torch.int64
    return t.detach().to("cpu", wide).numpy().astype(dtype)


def _put(alloc: Alloc, device: torch.device, value: torch.Tensor) -> torch.Tensor:
    out = alloc(tuple(value.shape), value.dtype)
    if value.dtype == FP8:
        out.view(torch.uint8).copy_(value.view(torch.uint8))
    else:
        out.copy_(value)
    return out


def _pick_rows(parts: list[torch.Tensor], ranks: np.ndarray, rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Row ``rows[i]`` of rank ``ranks[i]``'s gathered tensor, bit-exact, as one CPU tensor."""
    shape = (len(rows), *like.shape[1:])
    if len(rows) == 0:
        return torch.empty(shape, dtype=like.dtype)
    picked = [dense(parts[int(r)][int(j)].reshape(1, *like.shape[1:])).view(torch.uint8) for r, j in zip(ranks, rows,
                                                                                              strict=True)]
    return torch.cat(picked).view(like.dtype).reshape(shape)


def layout(call: MoELayoutCall) -> MoELayout:
    per_rank, per_expert, in_rank = layout_f64(_np(call.topk_idx, np.int64), call.num_experts, call.num_ranks)
    dev = call.topk_idx.device
    return MoELayout(torch.from_numpy(per_rank.astype(np.int32)).to(dev),
                     torch.from_numpy(per_expert.astype(np.int32)).to(dev), torch.from_numpy(in_rank).to(dev))


def _route(data: torch.Tensor, scales: torch.Tensor | None, topk_idx: torch.Tensor, weights: torch.Tensor | None,
           num_experts: int, grp: MoEGroup, alignment: int) -> tuple[Dispatched, torch.Tensor,
                                                                      torch.Tensor | None, MoEHandle]:
    """Gather the world and return (definition, received payload, received scales, handle) on the host."""
    topks = [_np(t, np.int64) for t in gather_rows(topk_idx.to(torch.int64), grp)]
    ws = None if weights is None else [_np(w) for w in gather_rows(weights, grp)]
    got = dispatch_f64(topks, ws, grp.rank, num_experts)
    recv = _pick_rows(gather_rows(data, grp), got.src_rank, got.src_token, data)
    recv_s = None
    if scales is not None:
        recv_s = _pick_rows(gather_rows(scales.contiguous(), grp), got.src_rank, got.src_token, scales)
    dev = data.device
    _, _, in_rank = layout_f64(topks[grp.rank], num_experts, grp.world_size)
    handle = MoEHandle(grp.group, grp.rank, grp.world_size, num_experts, int(data.shape[1]), alignment,
                       topk_idx.to(torch.int64).clone(), torch.from_numpy(in_rank).to(dev),
                       tuple(int(v) for v in in_rank.sum(axis=0)), tuple(int(v) for v in got.recv_counts),
                       torch.from_numpy(got.src_token).to(dev), torch.from_numpy(got.local_idx).to(dev),
                       tuple(int(v) for v in got.per_expert))
    return got, recv, recv_s, handle


def dispatch(call: MoEDispatchCall) -> MoEDispatchResult:
    dev = call.data.device
    if call.handle is not None:
        h = call.handle
        src_rank = np.repeat(np.arange(h.world_size), h.recv_counts)
        src_tok = _np(h.recv_src_idx, np.int64)
        recv = _pick_rows(gather_rows(call.data, call.group), src_rank, src_tok, call.data)
        out = _put(call.alloc, dev, recv.to(dev))
        if call.scales is None:
            return MoEDispatchResult(out, None, None, None, h)
        cached_s = _pick_rows(gather_rows(call.scales.contiguous(), call.group), src_rank, src_tok, call.scales)
        return MoEDispatchResult((out, _put(call.alloc, dev, cached_s.to(dev))), None, None, None, h)
    assert call.topk_idx is not None
    got, recv, recv_s, handle = _route(call.data, call.scales, call.topk_idx, call.topk_weights,
                                       call.num_experts, call.group, call.expert_alignment)
    data_out = _put(call.alloc, dev, recv.to(dev))
    recv_x: MoEInput = data_out if recv_s is None else (data_out, _put(call.alloc, dev, recv_s.to(dev)))
    idx = _put(call.alloc, dev, torch.from_numpy(got.local_idx).to(dev, call.topk_idx.dtype))
    weights = None
    if got.weights is not None:
        weights = _put(call.alloc, dev, torch.from_numpy(got.weights).to(dev, torch.float32))
    counts = [align_up(int(c), call.expert_alignment) for c in got.per_expert]
    return MoEDispatchResult(recv_x, idx, weights, counts, handle)


def _return(rows: np.ndarray, src_token: np.ndarray, h: MoEHandle, grp: MoEGroup) -> np.ndarray:
    """Sum, for this rank's tokens, the rows every rank holds for them (rows: float64 ``[n, ...]``)."""
    src_rank = np.repeat(np.arange(h.world_size), h.recv_counts)
    all_rows = [_np(t) for t in gather_rows(torch.from_numpy(rows).to(h.device), grp)]
    all_ranks = [_np(t, np.int64) for t in gather_rows(torch.from_numpy(src_rank).to(h.device), grp)]
    all_toks = [_np(t, np.int64) for t in gather_rows(torch.from_numpy(src_token).to(h.device), grp)]
    return combine_f64(all_rows, all_ranks, all_toks, h.rank, h.num_tokens)


def combine(call: MoECombineCall) -> MoECombineResult:
    h, dev = call.handle, call.x.device
    src_tok = _np(h.recv_src_idx, np.int64)
    out = _return(_np(call.x), src_tok, h, call.group)
    combined = _put(call.alloc, dev, torch.from_numpy(out).to(dev, torch.bfloat16))
    weights = None
    if call.topk_weights is not None:
        w = _return(_np(call.topk_weights), src_tok, h, call.group)
        weights = _put(call.alloc, dev, torch.from_numpy(w).to(dev, torch.float32))
    return MoECombineResult(combined, weights)


def dispatch_expanded(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    dev = call.data.device
    got, recv, recv_s, routes = _route(call.data, call.scales, call.topk_idx, call.topk_weights,
                                       call.num_experts, call.group, call.expert_alignment)
    assert got.weights is not None
    src_row, m_idx, row_w = expanded_rows_f64(got.local_idx, got.weights, routes.num_local_experts,
                                              call.expert_alignment)
    valid = src_row >= 0

    def expand(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((len(src_row), *t.shape[1:]), dtype=torch.uint8 if t.dtype == FP8 else t.dtype)
        rows = torch.from_numpy(src_row[valid])
        out[torch.from_numpy(valid)] = t.view(torch.uint8)[rows] if t.dtype == FP8 else t[rows]
        return out.view(t.dtype)

    data_out = _put(call.alloc, dev, expand(recv).to(dev))
    recv_x: MoEInput = data_out if recv_s is None else (data_out, _put(call.alloc, dev, expand(recv_s).to(dev)))
    m_indices = _put(call.alloc, dev, torch.from_numpy(m_idx).to(dev, torch.int32))
    weights = _put(call.alloc, dev, torch.from_numpy(row_w).to(dev, torch.float32))
    handle = MoEExpandedHandle(routes, torch.from_numpy(src_row).to(dev), m_indices.clone(), weights.clone())
    counts = [align_up(int(c), call.expert_alignment) for c in got.per_expert]
    return MoEExpandedDispatchResult(recv_x, m_indices, weights, counts, handle)


def combine_expanded(call: MoEExpandedCombineCall) -> torch.Tensor:
    h, dev = call.handle, call.y.device
    routes = h.routes
    src_row = _np(h.expanded_src_row, np.int64)
    valid = np.nonzero(src_row >= 0)[0]
    y = _np(call.y[torch.from_numpy(valid).to(dev)])
    w = _np(h.weights)[valid]
    partial = np.zeros((routes.num_recv, y.shape[1]), dtype=np.float64)
    np.add.at(partial, src_row[valid], y * w[:, None])
    out = _return(partial, _np(routes.recv_src_idx, np.int64), routes, call.group)
    return _put(call.alloc, dev, torch.from_numpy(out).to(dev, torch.bfloat16))


def dispatch_low_latency(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    dev = call.x.device
    got, recv, _, routes = _route(call.x, None, call.topk_idx, None, call.num_experts, call.group, 1)
    num_local, capacity = routes.num_local_experts, routes.world_size * call.max_tokens_per_rank
    packed = packed_rows_f64(got.local_idx, num_local, capacity)
    expert, position = np.nonzero(packed >= 0)
    rows = torch.from_numpy(packed[expert, position])
    hidden = int(call.x.shape[1])
    recv_x = call.alloc((num_local, capacity, hidden), FP8 if call.use_fp8 else torch.bfloat16)
    e_t, p_t = torch.from_numpy(expert).to(dev), torch.from_numpy(position).to(dev)
    x_out: MoEInput = recv_x
    if call.use_fp8:
        values, scales = cast_fp8_f64(_np(recv[rows]).reshape(len(rows), hidden))
        recv_x.view(torch.uint8)[e_t, p_t] = torch.from_numpy(values).to(FP8).view(torch.uint8).to(dev)
        storage = call.alloc((num_local, hidden // 128, capacity), torch.float32)
        scales_out = storage.transpose(1, 2)
        scales_out[e_t, p_t] = torch.from_numpy(scales).to(dev, torch.float32)
        x_out = (recv_x, scales_out)
    else:
        recv_x[e_t, p_t] = recv[rows].to(dev)
    count = _put(call.alloc, dev, torch.from_numpy(got.per_expert).to(dev, torch.int32))
    handle = MoELowLatencyHandle(routes, call.max_tokens_per_rank, count.clone(), torch.from_numpy(packed).to(dev))
    return MoELowLatencyDispatchResult(x_out, count, handle)


def combine_low_latency(call: MoELowLatencyCombineCall) -> torch.Tensor:
    h, dev = call.handle, call.y.device
    routes = h.routes
    topks = [_np(t, np.int64) for t in gather_rows(routes.topk_idx, call.group)]
    weights = [_np(w) for w in gather_rows(call.topk_weights, call.group)]
    packed = _np(h.packed_src_row, np.int64)
    src_rank = np.repeat(np.arange(routes.world_size), routes.recv_counts)
    src_tok = _np(routes.recv_src_idx, np.int64)
    partial = np.zeros((routes.num_recv, int(call.y.shape[2])), dtype=np.float64)
    for e, pos in zip(*np.nonzero(packed >= 0), strict=True):
        j = packed[e, pos]
        r, t = int(src_rank[j]), int(src_tok[j])
        expert = routes.rank * routes.num_local_experts + int(e)
        w = float(weights[r][t][topks[r][t] == expert].sum())
        partial[j] += w * _np(call.y[int(e), int(pos)])
    out = _return(partial, src_tok, routes, call.group)
    return _put(call.alloc, dev, torch.from_numpy(out).to(dev, torch.bfloat16))
