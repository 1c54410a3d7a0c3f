"""Weighted low-latency combine: expert outputs in the low-latency layout back to their tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepport.dispatch import selection, settings
from deepport.dispatch.device import DeviceInfo
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import moe_args
from deepport.kernels.moe_args import Alloc, MoEGroup, MoEImpl, MoESignature
from deepport.kernels.moe_dispatch import check_handle
from deepport.kernels.moe_handle import MoELowLatencyHandle

OP = "moe_low_latency_combine"
OP_VERSION = 1


@dataclass(frozen=True)
class MoELowLatencyCombineCall:
    y: torch.Tensor  # bf16 [L, R * T_max, hidden]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    handle: MoELowLatencyHandle
    group: MoEGroup
    alloc: Alloc
    signature: MoESignature


def moe_low_latency_combine(y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: MoELowLatencyHandle, *, backend: str | None = None,
                            alloc: Alloc | None = None) -> torch.Tensor:
    """Return expert outputs to their tokens and sum them with the top-k weights (collective).

    Args:
        y: bf16 ``[L, R * T_max, hidden]`` contiguous, expert outputs in the dispatch's row layout;
            rows past ``recv_count[e]`` are never read (may hold anything, NaN included).
        topk_idx: the dispatched ``topk_idx`` of this rank (must equal the handle's routing; compared on
            the host unless ``DEEPPORT_CHECK_VALUES=0``).
        topk_weights: float32 ``[num_tokens, num_topk]``.
        handle: the :class:`MoELowLatencyHandle` of that dispatch.
        backend, alloc: as for :func:`deepport.moe_combine`.

    Returns:
        bf16 ``[num_tokens, hidden]``: ``out[t] = sum_{k: topk_idx[t, k] != -1} topk_weights[t, k] *
        y[expert(t, k)][row of t]``, accumulated in float32 and rounded once (an expert named in two
        slots contributes its one row with both weights); 0 for a token routed nowhere.
    """
    call = bind(y, topk_idx, topk_weights, handle, alloc=alloc)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoELowLatencyCombineCall, torch.Tensor] = chosen.implementation(OP)
    out = run(call)
    return out


def bind(y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: MoELowLatencyHandle, *,
         alloc: Alloc | None = None) -> MoELowLatencyCombineCall:
    y = chk.expect_tensor("y", y)
    chk.expect_dtype("y", y, (torch.bfloat16,))
    check_handle("handle", handle, MoELowLatencyHandle, y.device)
    # Only the handle's static facts are read here: its routes may be built lazily (OneProcessRoutes).
    rows = handle.world_size * handle.max_tokens_per_rank
    chk.expect_ndim("y", y, 3, "[num_local_experts, world_size * max_tokens_per_rank, hidden]")
    chk.expect_dim("y", y, 0, handle.num_local_experts, "num_local_experts")
    chk.expect_dim("y", y, 1, rows, "world_size * max_tokens_per_rank")
    chk.expect_positive("y", y, 2, "hidden")
    chk.expect_contiguous("y", y)
    idx = moe_args.check_topk_idx(topk_idx, handle.num_experts, y.device, handle.num_tokens)
    chk.expect_dim("topk_idx", idx, 1, handle.num_topk, "num_topk of the handle's dispatch")
    if settings.check_values() and not torch.equal(idx.to(torch.int64), handle.topk_idx):
        raise InvalidArgumentError("topk_idx", "expected the routing the handle was dispatched with, got "
                                   "different expert ids")
    weights = moe_args.check_topk_weights(topk_weights, idx)
    grp = moe_args.resolve_group(handle.group, y.device)
    sig = moe_args.signature(y.device, y.dtype, int(y.shape[2]), handle.num_topk, handle.num_experts, grp)
    inputs = {"y": y, "topk_idx": idx, "topk_weights": weights, "handle": handle}
    return MoELowLatencyCombineCall(y, idx, weights, handle, grp, moe_args.checked_alloc(alloc, y.device, inputs),
                                    sig)


def example_signature(device: DeviceInfo) -> MoESignature:
    return MoESignature(device, torch.bfloat16, 7168, 8, 256, 1, "none")
