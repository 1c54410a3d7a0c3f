"""Weighted combine of the expanded layout: one bf16 row per (token, local expert) back to its token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import _checks as chk
from deepport.kernels import moe_args
from deepport.kernels.moe_args import Alloc, MoEGroup, MoEImpl, MoESignature
from deepport.kernels.moe_dispatch import check_handle
from deepport.kernels.moe_handle import MoEExpandedHandle

OP = "moe_combine_expanded"
OP_VERSION = 1


@dataclass(frozen=True)
class MoEExpandedCombineCall:
    y: torch.Tensor  # bf16 [num_expanded, hidden]
    handle: MoEExpandedHandle
    group: MoEGroup
    alloc: Alloc
    signature: MoESignature


def moe_combine_expanded(y: torch.Tensor, handle: MoEExpandedHandle, *, backend: str | None = None,
                         alloc: Alloc | None = None) -> torch.Tensor:
    """Weight every expert row and sum it into its source token (collective over the handle's group).

    Args:
        y: bf16 ``[M, hidden]`` contiguous, the expert outputs in the row order of the expanded
            dispatch's ``recv_x`` (``M`` = its row count). Padding rows (``m_indices == -1``) are
            never read and may hold anything, NaN included.
        handle: the :class:`MoEExpandedHandle` of that dispatch.
        backend, alloc: as for :func:`deepport.moe_combine`.

    Returns:
        bf16 ``[num_tokens, hidden]`` on the dispatching rank: ``out[t]`` = sum over every rank and
        local expert that received token ``t`` of ``recv_weights[row] * y[row]`` (that is
        ``sum_k topk_weights[t, k] * expert_k(x[t])``), accumulated in float32 and rounded once;
        0 for a token routed nowhere.
    """
    call = bind(y, handle, alloc=alloc)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoEExpandedCombineCall, torch.Tensor] = chosen.implementation(OP)
    out = run(call)
    return out


def bind(y: torch.Tensor, handle: MoEExpandedHandle, *, alloc: Alloc | None = None) -> MoEExpandedCombineCall:
    y = chk.expect_tensor("y", y)
    chk.expect_dtype("y", y, (torch.bfloat16,))
    chk.expect_ndim("y", y, 2, "[num_expanded, hidden]")
    chk.expect_positive("y", y, 1, "hidden")
    chk.expect_contiguous("y", y)
    check_handle("handle", handle, MoEExpandedHandle, y.device)
    chk.expect_dim("y", y, 0, handle.num_expanded, "the rows of the handle's expanded dispatch")
    routes = handle.routes
    grp = moe_args.resolve_group(routes.group, y.device)
    sig = moe_args.signature(y.device, y.dtype, int(y.shape[1]), routes.num_topk, routes.num_experts, grp)
    alloc_checked = moe_args.checked_alloc(alloc, y.device, {"y": y, "handle": handle})
    return MoEExpandedCombineCall(y, handle, grp, alloc_checked, sig)


def example_signature(device: DeviceInfo) -> MoESignature:
    return MoESignature(device, torch.bfloat16, 7168, 8, 256, 1, "none")
