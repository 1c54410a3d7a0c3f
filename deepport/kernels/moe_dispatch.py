"""Normal (high-throughput) MoE dispatch: send each token once to every rank holding one of its experts.

DeepEP's ``Buffer.dispatch`` semantics over any ``torch.distributed`` group (or one process).
Conventions (ids, duplicates, groups, ``alloc``): :mod:`deepport.kernels.moe_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import moe_args
from deepport.kernels.moe_args import Alloc, MoEGroup, MoEImpl, MoEInput, MoESignature
from deepport.kernels.moe_handle import MoEHandle, MoELowLatencyHandle

OP = "moe_dispatch"
OP_VERSION = 1


@dataclass(frozen=True)
class MoEDispatchCall:
    """A validated dispatch. ``handle`` set means a cached re-dispatch (``topk_*`` are ``None``)."""

    data: torch.Tensor  # bf16 or e4m3 [num_tokens, hidden]
    scales: torch.Tensor | None  # fp32 [num_tokens, hidden / 128] for FP8 payloads
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    num_experts: int
    group: MoEGroup
    expert_alignment: int
    handle: MoEHandle | None
    alloc: Alloc
    signature: MoESignature


class MoEDispatchResult(NamedTuple):
    """What :func:`moe_dispatch` returns (unpacks like DeepEP's tuple, without the event)."""

    recv_x: MoEInput
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert: list[int] | None
    handle: MoEHandle


def moe_dispatch(
    x: MoEInput,
    topk_idx: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    num_experts: int | None = None,
    *,
    group: object = None,
    expert_alignment: int = 1,
    handle: MoEHandle | None = None,
    backend: str | None = None,
    alloc: Alloc | None = None,
) -> MoEDispatchResult:
    """Send each token to every rank that holds at least one of its experts (collective over ``group``).

    Args:
        x: bf16 ``[num_tokens, hidden]`` contiguous, or the FP8 tuple ``(e4m3 [num_tokens, hidden]
            contiguous, fp32 scales [num_tokens, hidden / 128] any strides)`` with ``hidden % 128 == 0``.
            Payloads are moved bit-exactly. ``num_tokens`` may differ per rank and may be 0.
        topk_idx: int64/int32 ``[num_tokens, num_topk]``, global expert ids in ``[-1, num_experts)``.
            ``None`` only for a cached dispatch.
        topk_weights: float32 ``[num_tokens, num_topk]`` or ``None`` (then no weights are received).
        num_experts: total experts over the group, a multiple of its world size.
        group: ``torch.distributed`` process group, or ``None`` (one process, every expert local).
        expert_alignment: per-expert counts are rounded up to a multiple of it (>= 1).
        handle: a previous dispatch's handle for a cached re-dispatch: ``x`` (``[num_tokens, any
            hidden]``) is sent along the same routes; ``topk_idx``, ``topk_weights``, ``num_experts``
            must be ``None`` and ``group`` ``None`` or the handle's group.
        backend: run on this backend (explicit: raises if it cannot, never falls back).
        alloc: optional output allocator (see :mod:`deepport.kernels.moe_args`).

    Returns:
        :class:`MoEDispatchResult` ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert, handle)``:

        - ``recv_x``: ``x``'s type (tensor or FP8 tuple, scales contiguous) with ``num_recv`` rows,
          one per distinct (source rank, token) pair having at least one expert on this rank, ordered
          by source rank, then by token index on that rank.
        - ``recv_topk_idx``: ``topk_idx``'s dtype ``[num_recv, num_topk]``: the token's slots with
          local expert ids ``e - rank * num_local_experts`` where the expert is on this rank, -1
          elsewhere (and where the slot was -1).
        - ``recv_topk_weights``: float32 ``[num_recv, num_topk]``, the weight where the slot's expert
          is local, 0.0 elsewhere; ``None`` when ``topk_weights`` was ``None``.
        - ``num_recv_tokens_per_expert``: list of ``num_local_experts`` ints, distinct received tokens
          per local expert rounded up to ``expert_alignment``.
        - ``handle``: the routes, for :func:`moe_combine` and cached dispatch.

        A cached dispatch returns ``(recv_x, None, None, None, handle)``.
    """
    call = bind(x, topk_idx, topk_weights, num_experts, group=group, expert_alignment=expert_alignment,
                handle=handle, alloc=alloc)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoEDispatchCall, MoEDispatchResult] = chosen.implementation(OP)
    result = run(call)
    return result


def bind(x: MoEInput, topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
         num_experts: int | None = None, *, group: object = None, expert_alignment: int = 1,
         handle: MoEHandle | None = None, alloc: Alloc | None = None) -> MoEDispatchCall:
    """Validate the arguments of :func:`moe_dispatch` and build the call a backend receives."""
    data, scales = moe_args.check_payload("x", x)
    device = data.device
    if handle is not None:
        return _bind_cached(data, scales, topk_idx, topk_weights, num_experts, group, handle, alloc)
    grp = moe_args.resolve_group(group, device)
    if topk_idx is None or num_experts is None:
        raise InvalidArgumentError("topk_idx" if topk_idx is None else "num_experts",
                                   "expected a value for a dispatch without `handle`, got None")
    experts = moe_args.check_num_experts(num_experts, grp.world_size)
    idx = moe_args.check_topk_idx(topk_idx, experts, device, int(data.shape[0]))
    weights = None if topk_weights is None else moe_args.check_topk_weights(topk_weights, idx)
    align = moe_args.check_alignment("expert_alignment", expert_alignment)
    sig = moe_args.signature(device, data.dtype, int(data.shape[1]), int(idx.shape[1]), experts, grp)
    inputs = {"x[0]" if scales is not None else "x": data, "x[1]": scales, "topk_idx": idx, "topk_weights": weights}
    return MoEDispatchCall(data, scales, idx, weights, experts, grp, align, None,
                           moe_args.checked_alloc(alloc, device, inputs), sig)


def check_handle(name: str, handle: object, cls: type, device: torch.device) -> None:
    if not isinstance(handle, cls):
        raise ArgumentTypeError(name, f"expected a {cls.__name__} from the matching dispatch, got "
                                f"{type(handle).__name__}")
    # A low-latency handle knows its device without building its routes (no device-to-host copy).
    where: torch.device = handle.device if isinstance(handle, (MoEHandle, MoELowLatencyHandle)) else \
        handle.routes.device  # type: ignore[attr-defined]
    if where != device:
        raise InvalidArgumentError(name, f"expected a handle on {device} (the device of `x`), got {where}")


def _bind_cached(data: torch.Tensor, scales: torch.Tensor | None, topk_idx: object, topk_weights: object,
                 num_experts: object, group: object, handle: MoEHandle, alloc: Alloc | None) -> MoEDispatchCall:
    check_handle("handle", handle, MoEHandle, data.device)
    for name, value in (("topk_idx", topk_idx), ("topk_weights", topk_weights), ("num_experts", num_experts)):
        if value is not None:
            raise InvalidArgumentError(name, "expected None for a cached dispatch (the routes come from "
                                       f"`handle`), got {type(value).__name__}")
    if group is not None and group is not handle.group:
        raise InvalidArgumentError("group", "expected None or the group of `handle`, got another group")
    if int(data.shape[0]) != handle.num_tokens:
        raise InvalidArgumentError("x", f"expected {handle.num_tokens} rows (the tokens of `handle`'s dispatch), "
                                   f"got shape {tuple(data.shape)}")
    grp = moe_args.resolve_group(handle.group, data.device)
    sig = moe_args.signature(data.device, data.dtype, int(data.shape[1]), handle.num_topk, handle.num_experts, grp)
    inputs = {"x[0]" if scales is not None else "x": data, "x[1]": scales, "handle": handle}
    return MoEDispatchCall(data, scales, None, None, handle.num_experts, grp, handle.expert_alignment, handle,
                           moe_args.checked_alloc(alloc, data.device, inputs), sig)


def example_signature(device: DeviceInfo) -> MoESignature:
    """DeepSeek-V3 inference: bf16 hidden 7168, top-8 of 256 experts, one process."""
    return MoESignature(device, torch.bfloat16, 7168, 8, 256, 1, "none")
