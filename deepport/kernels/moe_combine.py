"""Normal MoE combine: bring every received row back to its source token and sum (unweighted).

DeepEP's ``Buffer.combine`` semantics; the inverse route of :func:`deepport.kernels.moe_dispatch.moe_dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import _checks as chk
from deepport.kernels import moe_args
from deepport.kernels.moe_args import Alloc, MoEGroup, MoEImpl, MoESignature
from deepport.kernels.moe_dispatch import check_handle
from deepport.kernels.moe_handle import MoEHandle

OP = "moe_combine"
OP_VERSION = 1


@dataclass(frozen=True)
class MoECombineCall:
    x: torch.Tensor  # bf16 [num_recv, hidden]
    handle: MoEHandle
    topk_weights: torch.Tensor | None  # fp32 [num_recv, num_topk]
    group: MoEGroup
    alloc: Alloc
    signature: MoESignature


class MoECombineResult(NamedTuple):
    combined_x: torch.Tensor
    combined_topk_weights: torch.Tensor | None


def moe_combine(x: torch.Tensor, handle: MoEHandle, topk_weights: torch.Tensor | None = None, *,
                backend: str | None = None, alloc: Alloc | None = None) -> MoECombineResult:
    """Return every received row to its source rank and sum per token (collective over the handle's group).

    Args:
        x: bf16 ``[num_recv, hidden]`` contiguous, rows in the order of the dispatch's ``recv_x``.
        handle: the :class:`MoEHandle` of that dispatch.
        topk_weights: float32 ``[num_recv, num_topk]`` or ``None``; summed per slot like ``x``.
        backend: run on this backend (explicit: raises if it cannot, never falls back).
        alloc: optional output allocator (see :mod:`deepport.kernels.moe_args`).

    Returns:
        :class:`MoECombineResult` ``(combined_x, combined_topk_weights)`` on the dispatching rank:
        ``combined_x`` bf16 ``[num_tokens, hidden]``, ``combined_x[t]`` = sum over the ranks that
        received token ``t`` of their row for it, accumulated in float32 and rounded once (no
        weighting); a token routed nowhere gives 0. ``combined_topk_weights`` float32
        ``[num_tokens, num_topk]``, the per-slot sum likewise (with the dispatch's
        ``recv_topk_weights`` it recovers the original weights on routed slots, 0 on -1 slots), or
        ``None`` when ``topk_weights`` is ``None``.
    """
    call = bind(x, handle, topk_weights, alloc=alloc)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoECombineCall, MoECombineResult] = chosen.implementation(OP)
    result = run(call)
    return result


def bind(x: torch.Tensor, handle: MoEHandle, topk_weights: torch.Tensor | None = None, *,
         alloc: Alloc | None = None) -> MoECombineCall:
    """Validate the arguments of :func:`moe_combine` and build the call a backend receives."""
    x = chk.expect_tensor("x", x)
    chk.expect_dtype("x", x, (torch.bfloat16,))
    chk.expect_ndim("x", x, 2, "[num_recv, hidden]")
    chk.expect_positive("x", x, 1, "hidden")
    chk.expect_contiguous("x", x)
    check_handle("handle", handle, MoEHandle, x.device)
    chk.expect_dim("x", x, 0, handle.num_recv, "num_recv, the rows the handle's dispatch received")
    weights = None
    if topk_weights is not None:
        weights = chk.expect_tensor("topk_weights", topk_weights)
        chk.expect_dtype("topk_weights", weights, (torch.float32,))
        chk.expect_shape("topk_weights", weights, (handle.num_recv, handle.num_topk), "[num_recv, num_topk]")
        chk.expect_same_device("topk_weights", weights, x.device, "x")
        chk.expect_contiguous("topk_weights", weights)
    grp = moe_args.resolve_group(handle.group, x.device)
    sig = moe_args.signature(x.device, x.dtype, int(x.shape[1]), handle.num_topk, handle.num_experts, grp)
    alloc_checked = moe_args.checked_alloc(alloc, x.device, {"x": x, "handle": handle, "topk_weights": weights})
    return MoECombineCall(x, handle, weights, grp, alloc_checked, sig)


def example_signature(device: DeviceInfo) -> MoESignature:
    """DeepSeek-V3 inference: bf16 hidden 7168, top-8 of 256 experts, one process."""
    return MoESignature(device, torch.bfloat16, 7168, 8, 256, 1, "none")
