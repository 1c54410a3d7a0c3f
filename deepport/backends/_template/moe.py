"""The MoE ops on this backend, one function per op. Spec: the ``deepport.moe_*`` docstrings and the
conventions of :mod:`deepport.kernels.moe_args`; calling convention: :class:`MoEImpl` (``fn(call) -> result``)."""

from __future__ import annotations

import torch

from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult

_COMMON = (" Every output tensor comes from call.alloc(shape, dtype) and must be fully written (the suite "
           "poisons it); ranks call collectively over call.group (None: one process); -1 routes select "
           "nothing and a duplicate expert counts once (deepport.kernels.moe_args). The reference backend "
           "(deepport/backends/reference/moe.py) and the oracles (deepport.kernels.f64.moe) show every rule.")


def layout(call: MoELayoutCall) -> MoELayout:
    raise NotImplementedError("moe_layout: return MoELayout(tokens per rank [R], tokens per expert [E], "
                              "is_token_in_rank [T, R] bool) from call.topk_idx." + _COMMON)


def dispatch(call: MoEDispatchCall) -> MoEDispatchResult:
    raise NotImplementedError("moe_dispatch: send each token's row (and FP8 scales) once to every rank "
                              "holding one of its experts; return MoEDispatchResult with the received rows "
                              "in canonical order (source rank, then token), local top-k ids, weights, "
                              "aligned per-expert counts and the MoEHandle combine needs." + _COMMON)


def combine(call: MoECombineCall) -> MoECombineResult:
    raise NotImplementedError("moe_combine: return each received row to its source token through call.handle "
                              "and sum per token in float32, rounded once to bfloat16 (and the weights, if "
                              "given)." + _COMMON)


def dispatch_expanded(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    raise NotImplementedError("moe_dispatch_expanded: like moe_dispatch, then one row per (token, local "
                              "expert), each expert's segment aligned to call.expert_alignment, padding rows "
                              "with m_indices -1 and weight 0 (the grouped GEMM's contiguous layout)." + _COMMON)


def combine_expanded(call: MoEExpandedCombineCall) -> torch.Tensor:
    raise NotImplementedError("moe_combine_expanded: weight each expanded row of call.y by its routing weight, "
                              "sum per received token, return it to its source and sum there (float32, one "
                              "bfloat16 rounding); return combined_x." + _COMMON)


def dispatch_low_latency(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    raise NotImplementedError("moe_low_latency_dispatch: pack received rows per local expert into "
                              "[L, world * max_tokens_per_rank, hidden] (FP8-cast per 128 channels when "
                              "call.use_fp8), with per-expert counts and the MoELowLatencyHandle." + _COMMON)


def combine_low_latency(call: MoELowLatencyCombineCall) -> torch.Tensor:
    raise NotImplementedError("moe_low_latency_combine: weight each packed row of call.y by its top-k weight, "
                              "return it to its source token and sum (float32, one bfloat16 rounding); "
                              "return combined_x." + _COMMON)
