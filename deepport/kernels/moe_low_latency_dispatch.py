"""Low-latency MoE dispatch: tokens packed per local expert into a fixed-capacity buffer.

DeepEP's ``low_latency_dispatch`` layout ``[num_local_experts, world_size * max_tokens_per_rank,
hidden]`` with per-expert counts, optionally cast to FP8 during the dispatch: exactly the input of
``m_grouped_fp8_gemm_nt_masked``. Conventions: :mod:`deepport.kernels.moe_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import fp8_layout, moe_args
from deepport.kernels.moe_args import Alloc, MoEGroup, MoEImpl, MoEInput, MoESignature
from deepport.kernels.moe_handle import MoELowLatencyHandle

OP = "moe_low_latency_dispatch"
OP_VERSION = 1
# the FP8 cast's constants (the docstring of moe_low_latency_dispatch has the rule)
FP8_MAX = fp8_layout.FP8_E4M3_MAX
FP8_MAX_INV = fp8_layout.FP8_E4M3_MAX_INV
AMAX_FLOOR = fp8_layout.AMAX_FLOOR


@dataclass(frozen=True)
class MoELowLatencyDispatchCall:
    x: torch.Tensor  # bf16 [num_tokens, hidden]
    topk_idx: torch.Tensor
    max_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    group: MoEGroup
    alloc: Alloc
    signature: MoESignature


class MoELowLatencyDispatchResult(NamedTuple):
    recv_x: MoEInput
    recv_count: torch.Tensor
    handle: MoELowLatencyHandle


def moe_low_latency_dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    max_tokens_per_rank: int,
    num_experts: int,
    *,
    group: object = None,
    use_fp8: bool = True,
    backend: str | None = None,
    alloc: Alloc | None = None,
) -> MoELowLatencyDispatchResult:
    """Dispatch into per-expert buffers of fixed capacity (collective over ``group``).

    Args:
        x: bf16 ``[num_tokens, hidden]`` contiguous, ``num_tokens <= max_tokens_per_rank``; ``hidden``
            a multiple of 128 when ``use_fp8``.
        topk_idx: int64/int32 ``[num_tokens, num_topk]``, ids in ``[-1, num_experts)``.
        max_tokens_per_rank: ``T_max``, the same on every rank (>= 1).
        num_experts: total experts, a multiple of the group's world size ``R``.
        group, backend, alloc: as for :func:`deepport.moe_dispatch`.
        use_fp8: cast to e4m3 per token and 128 channels exactly as DeepEP's kernel does, all in
            float32 (:func:`deepport.kernels.fp8_layout.amax_scales`):

            - ``amax = max(max |x| over the 128 channels, float32(1e-4))`` (exact: bf16 values);
            - ``scale = float32(amax * float32(1/448))``: one float32 multiplication by the float32
              reciprocal ``0.0022321429569274187`` (DeepEP's ``scale_inv = amax * kFP8AmaxInv``),
              NOT a division by 448 (which differs in the last bit for about half of all amaxes;
              e.g. amax 12 gives ``0.0267857164144516``, where ``12 / 448`` rounds to
              ``0.02678571455180645``). ``recv_x`` scales are these float32 bits exactly;
            - ``fp8 = e4m3(float32(x * float32(448 / amax)))``, the division correctly rounded and
              the e4m3 rounding to nearest even (``|x * 448 / amax| <= 448``, so no saturation).
              Conformance accepts any e4m3 within half a step of ``x * float32(448 / amax)``.

    Returns:
        :class:`MoELowLatencyDispatchResult` ``(recv_x, recv_count, handle)`` with ``L`` local experts:

        - ``recv_x``: bf16 ``[L, R * T_max, hidden]``, or with ``use_fp8`` the tuple
          ``(e4m3 [L, R * T_max, hidden], fp32 scales [L, R * T_max, hidden / 128])`` whose scales
          are column-major in the last two dimensions (strides ``(hidden / 128 * R * T_max, 1,
          R * T_max)``). Expert ``e``'s first ``recv_count[e]`` rows hold one row per distinct
          (source rank, token) selecting it, ordered by source rank then token index; later rows
          are unspecified.
        - ``recv_count``: int32 ``[L]``.
        - ``handle``: for :func:`deepport.moe_low_latency_combine`.
    """
    call = bind(x, topk_idx, max_tokens_per_rank, num_experts, group=group, use_fp8=use_fp8, alloc=alloc)
    chosen, _ = selection.choose(OP, call.signature, backend)
    run: MoEImpl[MoELowLatencyDispatchCall, MoELowLatencyDispatchResult] = chosen.implementation(OP)
    result = run(call)
    return result


def bind(x: torch.Tensor, topk_idx: torch.Tensor, max_tokens_per_rank: int, num_experts: int, *,
         group: object = None, use_fp8: bool = True, alloc: Alloc | None = None) -> MoELowLatencyDispatchCall:
    data, scales = moe_args.check_payload("x", x)
    if scales is not None:
        raise InvalidArgumentError("x", "expected a bf16 tensor (the low-latency dispatch casts to FP8 "
                                   "itself with use_fp8=True), got an FP8 tuple")
    fp8 = chk.expect_bool("use_fp8", use_fp8)
    hidden = int(data.shape[1])
    if fp8 and hidden % moe_args.FP8_BLOCK != 0:
        raise InvalidArgumentError("x", f"expected hidden to be a multiple of {moe_args.FP8_BLOCK} with "
                                   f"use_fp8=True, got {hidden}")
    t_max = chk.expect_int("max_tokens_per_rank", max_tokens_per_rank, minimum=1)
    if int(data.shape[0]) > t_max:
        raise InvalidArgumentError("x", f"expected at most max_tokens_per_rank={t_max} rows, got "
                                   f"{int(data.shape[0])}")
    grp = moe_args.resolve_group(group, data.device)
    if grp.world_size * t_max > chk.INT32_MAX:
        raise InvalidArgumentError("max_tokens_per_rank", f"expected world_size * max_tokens_per_rank <= "
                                   f"{chk.INT32_MAX} (rows per expert, counted by the int32 recv_count), got "
                                   f"{grp.world_size} * {t_max} = {grp.world_size * t_max}")
    experts = moe_args.check_num_experts(num_experts, grp.world_size)
    idx = moe_args.check_topk_idx(topk_idx, experts, data.device, int(data.shape[0]))
    sig = moe_args.signature(data.device, moe_args.FP8 if fp8 else data.dtype, hidden, int(idx.shape[1]),
                             experts, grp)
    return MoELowLatencyDispatchCall(data, idx, t_max, experts, fp8, grp,
                                     moe_args.checked_alloc(alloc, data.device, {"x": data, "topk_idx": idx}), sig)


def example_signature(device: DeviceInfo) -> MoESignature:
    """DeepSeek-V3 decode: hidden 7168 cast to FP8, top-8 of 256 experts, one process."""
    return MoESignature(device, moe_args.FP8, 7168, 8, 256, 1, "none")
