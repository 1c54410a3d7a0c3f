"""Expanded MoE dispatch: one row per (received token, local expert), in DeepGEMM's contiguous layout.

The output feeds ``m_grouped_fp8_gemm_nt_contiguous`` directly: rows grouped by local expert, each
expert's segment starting at a multiple of ``expert_alignment`` (128 =
``get_mk_alignment_for_contiguous_layout()``), ``m_indices`` naming each row's expert (-1 on padding).
Conventions (ids, duplicates, groups, ``alloc``): :mod:`deepport.kernels.moe_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import moe_args
from deepport.kernels.moe_args import Alloc, MoEGroup, MoEImpl, MoEInput, MoESignature
from deepport.kernels.moe_handle import MoEExpandedHandle

OP = "moe_dispatch_expanded"
OP_VERSION = 1
CONTIGUOUS_LAYOUT_ALIGNMENT = 128  # DeepGEMM's get_mk_alignment_for_contiguous_layout()


@dataclass(frozen=True)
class MoEExpandedDispatchCall:
    data: torch.Tensor
    scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_experts: int
    group: MoEGroup
    expert_alignment: int
    alloc: Alloc
    signature: MoESignature


class MoEExpandedDispatchResult(NamedTuple):
    recv_x: MoEInput
    m_indices: torch.Tensor
    recv_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]
    handle: MoEExpandedHandle


def moe_dispatch_expanded(
    x: MoEInput,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    *,
    group: object = None,
    expert_alignment: int = CONTIGUOUS_LAYOUT_ALIGNMENT,
    backend: str | None = None,
    alloc: Alloc | None = None,
) -> MoEExpandedDispatchResult:
    """Dispatch (collective over ``group``) and lay the received tokens out once per local expert.

    Args:
        x, topk_idx, num_experts, group: as for :func:`deepport.moe_dispatch`.
        topk_weights: float32 ``[num_tokens, num_topk]`` (required: the combine applies them).
        expert_alignment: each expert's segment starts at a multiple of it (>= 1; default 128).
        backend, alloc: as for :func:`deepport.moe_dispatch`.

    Returns:
        :class:`MoEExpandedDispatchResult` ``(recv_x, m_indices, recv_weights,
        num_recv_tokens_per_expert, handle)`` with ``M = sum(num_recv_tokens_per_expert)`` rows:

        - ``recv_x``: ``x``'s type with ``M`` rows (FP8 scales ``[M, hidden / 128]`` contiguous).
          Local expert ``e`` owns rows ``[start_e, start_e + n_e)`` with ``start_e`` = sum of the
          aligned counts of experts ``< e`` and ``n_e`` = distinct received tokens selecting it, in the
          normal dispatch's order (source rank, then token index). Padding rows are zero.
        - ``m_indices``: int32 ``[M]``, ``e`` on expert ``e``'s rows, -1 on padding.
        - ``recv_weights``: float32 ``[M]``, the sum of the token's weights over the slots naming the
          row's expert; 0 on padding.
        - ``num_recv_tokens_per_expert``: ``n_e`` rounded up to ``expert_alignment``, per local expert.
        - ``handle``: for :func:`deepport.moe_combine_expanded`.
    """
    call = bind(x, topk_idx, topk_weights, num_experts, group=group, expert_alignment=expert_alignment,
                alloc=alloc)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoEExpandedDispatchCall, MoEExpandedDispatchResult] = chosen.implementation(OP)
    result = run(call)
    return result


def bind(x: MoEInput, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, *,
         group: object = None, expert_alignment: int = CONTIGUOUS_LAYOUT_ALIGNMENT,
         alloc: Alloc | None = None) -> MoEExpandedDispatchCall:
    """Validate the arguments of :func:`moe_dispatch_expanded` and build the call a backend receives."""
    data, scales = moe_args.check_payload("x", x)
    grp = moe_args.resolve_group(group, data.device)
    experts = moe_args.check_num_experts(num_experts, grp.world_size)
    idx = moe_args.check_topk_idx(topk_idx, experts, data.device, int(data.shape[0]))
    weights = moe_args.check_topk_weights(topk_weights, idx)
    align = moe_args.check_alignment("expert_alignment", expert_alignment)
    sig = moe_args.signature(data.device, data.dtype, int(data.shape[1]), int(idx.shape[1]), experts, grp)
    inputs = {"x[0]" if scales is not None else "x": data, "x[1]": scales, "topk_idx": idx, "topk_weights": weights}
    return MoEExpandedDispatchCall(data, scales, idx, weights, experts, grp, align,
                                   moe_args.checked_alloc(alloc, data.device, inputs), sig)


def example_signature(device: DeviceInfo) -> MoESignature:
    """DeepSeek-V3 prefill: FP8 hidden 7168, top-8 of 256 experts, one process."""
    return MoESignature(device, moe_args.FP8, 7168, 8, 256, 1, "none")
