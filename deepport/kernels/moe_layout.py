"""MoE routing layout (DeepEP's ``get_dispatch_layout``): what each rank and expert receives.

Purely local: no process group. See :mod:`deepport.kernels.moe_args` for the conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo, device_info
from deepport.kernels import _checks as chk
from deepport.kernels import moe_args
from deepport.kernels.moe_args import MoEImpl

OP = "moe_layout"
OP_VERSION = 1


@dataclass(frozen=True)
class MoELayoutSignature:
    device: DeviceInfo
    dtype: torch.dtype  # of topk_idx
    num_topk: int
    num_experts: int
    num_ranks: int

    def __str__(self) -> str:
        return (f"{str(self.dtype).removeprefix('torch.')} top{self.num_topk} of {self.num_experts} experts "
                f"over {self.num_ranks} rank(s)")


@dataclass(frozen=True)
class MoELayoutCall:
    topk_idx: torch.Tensor
    num_experts: int
    num_ranks: int
    signature: MoELayoutSignature


class MoELayout(NamedTuple):
    num_tokens_per_rank: torch.Tensor  # int32 [num_ranks]
    num_tokens_per_expert: torch.Tensor  # int32 [num_experts]
    is_token_in_rank: torch.Tensor  # bool [num_tokens, num_ranks]


def moe_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, *,
               backend: str | None = None) -> MoELayout:
    """Where each token goes: tokens per rank, tokens per expert and the token-to-rank mask.

    Args:
        topk_idx: int64 or int32 ``[num_tokens, num_topk]``, contiguous; expert ids in
            ``[-1, num_experts)``, ``-1`` = no selection. ``num_tokens`` may be 0.
        num_experts: total experts, a multiple of ``num_ranks``; expert ``e`` lives on rank
            ``e // (num_experts // num_ranks)``.
        num_ranks: ranks the experts are split over (>= 1).
        backend: run on this backend (explicit: raises if it cannot, never falls back).

    Returns:
        :class:`MoELayout` on ``topk_idx``'s device:
        ``num_tokens_per_rank`` int32 ``[num_ranks]``: tokens with at least one expert on rank ``r``
        (a token counts once per rank); ``num_tokens_per_expert`` int32 ``[num_experts]``: tokens
        selecting expert ``e`` (a token counts once per expert, even if named in several slots);
        ``is_token_in_rank`` bool ``[num_tokens, num_ranks]``. Tokens whose slots are all ``-1``
        appear nowhere.
    """
    call = bind(topk_idx, num_experts, num_ranks)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoELayoutCall, MoELayout] = chosen.implementation(OP)
    result = run(call)
    return result


def bind(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> MoELayoutCall:
    ranks = chk.expect_int("num_ranks", num_ranks, minimum=1)
    experts = moe_args.check_num_experts(num_experts, ranks)
    idx = moe_args.check_topk_idx(topk_idx, experts)
    sig = MoELayoutSignature(device_info(idx.device), idx.dtype, int(idx.shape[1]), experts, ranks)
    return MoELayoutCall(idx, experts, ranks, sig)


def example_signature(device: DeviceInfo) -> MoELayoutSignature:
    """DeepSeek-V3 routing: top-8 of 256 experts over 8 ranks."""
    return MoELayoutSignature(device, torch.int64, 8, 256, 8)
