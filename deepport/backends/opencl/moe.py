"""The seven MoE ops on OpenCL: layout, normal / expanded / low-latency dispatch and combine.

Routing and every byte that crosses ranks are the torch backend's (:mod:`deepport.backends.torch.moe_routes`,
:mod:`deepport.backends.torch.moe_layouts`, over ``torch.distributed`` ``all_to_all_single``), called with
:data:`OPENCL`, this backend's :class:`~deepport.backends.torch.moe_local.LocalSteps`: the gather of the
rows each rank sends, the placement of received rows into the expanded (grouped-GEMM contiguous) and
low-latency (per-expert, fixed capacity) layouts, the per-token FP8 cast, and the weighted un-permute
and per-token sums of the combines run as OpenCL kernels (:mod:`.moe_rows`). Index bookkeeping (which
row goes where) is small and stays in torch on the inputs' device.
"""

from __future__ import annotations

import torch

from deepport.backends.opencl import moe_rows
from deepport.backends.torch import moe_layouts, moe_routes
from deepport.backends.torch.moe_local import LocalSteps
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_combine_expanded import MoEExpandedCombineCall
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_dispatch_expanded import MoEExpandedDispatchCall, MoEExpandedDispatchResult
from deepport.kernels.moe_layout import MoELayout, MoELayoutCall
from deepport.kernels.moe_low_latency_combine import MoELowLatencyCombineCall
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult

OPENCL = LocalSteps(place_rows=moe_rows.place_rows, weighted_rows=moe_rows.weighted_rows,
                    cast_fp8=moe_rows.cast_fp8, take_rows=moe_rows.take_rows, sum_rows=moe_rows.sum_rows)


def layout(call: MoELayoutCall) -> MoELayout:
    per_rank, per_expert, in_rank = moe_rows.layout_counts(call.topk_idx, call.num_experts, call.num_ranks)
    device = call.topk_idx.device
    return MoELayout(per_rank.to(device), per_expert.to(device), in_rank.to(device))


def dispatch(call: MoEDispatchCall) -> MoEDispatchResult:
    return moe_routes.dispatch(call, OPENCL)


def combine(call: MoECombineCall) -> MoECombineResult:
    return moe_routes.combine(call, OPENCL)


def dispatch_expanded(call: MoEExpandedDispatchCall) -> MoEExpandedDispatchResult:
    return moe_layouts.dispatch_expanded(call, OPENCL)


def combine_expanded(call: MoEExpandedCombineCall) -> torch.Tensor:
    return moe_layouts.combine_expanded(call, OPENCL)


def dispatch_low_latency(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    return moe_layouts.dispatch_low_latency(call, OPENCL)


def combine_low_latency(call: MoELowLatencyCombineCall) -> torch.Tensor:
    return moe_layouts.combine_low_latency(call, OPENCL)
