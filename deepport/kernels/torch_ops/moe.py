"""The MoE custom ops whose outputs have data-independent shapes: layout, and low-latency dispatch and
combine in one process (``group=None``, every expert local). Conventions: :mod:`deepport.kernels.moe_args`.

Schemas::

    moe_layout(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor)
    moe_low_latency_dispatch(Tensor x, Tensor topk_idx, int max_tokens_per_rank, int num_experts,
                             bool use_fp8=True) -> (Tensor, Tensor, Tensor, Tensor)
    moe_low_latency_combine(Tensor y, Tensor topk_idx, Tensor topk_weights, Tensor recv_count,
                            Tensor packed_src_row) -> Tensor

``moe_layout`` returns :func:`deepport.moe_layout`'s ``(num_tokens_per_rank int32 [R],
num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])``.

``moe_low_latency_dispatch`` returns ``(recv_x, recv_scales, recv_count, packed_src_row)`` with
``E = num_experts`` local experts and ``T_max = max_tokens_per_rank``: ``recv_x`` ``[E, T_max, hidden]``
(e4m3 with ``use_fp8``, else bf16); ``recv_scales`` float32 ``[E, T_max, hidden / 128]`` column-major in
the last two dimensions (the masked GEMM's SFA), or ``[E, T_max, 0]`` without FP8; ``recv_count`` int32
``[E]``; ``packed_src_row`` int64 ``[E, T_max]`` (see :class:`deepport.MoELowLatencyHandle`). Rows past
``recv_count[e]`` are zero (the op leaves them unspecified; a functional op's result is a function of
its inputs). ``recv_count`` and ``packed_src_row`` are the handle: pass them to the combine with the
same ``topk_idx``.
"""

from __future__ import annotations

import torch

from deepport.dispatch import settings
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import moe_layout as layout_op
from deepport.kernels import moe_low_latency_combine as combine_op
from deepport.kernels import moe_low_latency_dispatch as dispatch_op
from deepport.kernels.moe_args import FP8, FP8_BLOCK, Alloc
from deepport.kernels.moe_handle import MoELowLatencyHandle, OneProcessRoutes


@torch.library.custom_op("deepport::moe_layout", mutates_args=(),
                         schema="(Tensor topk_idx, int num_experts, int num_ranks) -> (Tensor, Tensor, Tensor)")
def moe_layout(topk_idx: torch.Tensor, num_experts: int,
               num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_rank, per_expert, in_rank = layout_op.moe_layout(topk_idx, num_experts, num_ranks)
    return per_rank.contiguous(), per_expert.contiguous(), in_rank.contiguous()  # the fake kernel's strides


@moe_layout.register_fake
def _moe_layout_fake(topk_idx: torch.Tensor, num_experts: int,
                     num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (topk_idx.new_empty((num_ranks,), dtype=torch.int32), topk_idx.new_empty((num_experts,), dtype=torch.int32),
            topk_idx.new_empty((topk_idx.shape[0], num_ranks), dtype=torch.bool))


def _zeros(device: torch.device) -> Alloc:
    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        (t.view(torch.uint8) if t.element_size() == 1 else t).zero_()  # e4m3 has no fill kernel everywhere
        return t

    return alloc


@torch.library.custom_op("deepport::moe_low_latency_dispatch", mutates_args=(),
                         schema="(Tensor x, Tensor topk_idx, int max_tokens_per_rank, int num_experts, "
                                "bool use_fp8=True) -> (Tensor, Tensor, Tensor, Tensor)")
def moe_low_latency_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, max_tokens_per_rank: int, num_experts: int,
                             use_fp8: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    got = dispatch_op.moe_low_latency_dispatch(x, topk_idx, max_tokens_per_rank, num_experts, use_fp8=use_fp8,
                                               alloc=_zeros(x.device))
    if isinstance(got.recv_x, tuple):
        recv_x, scales = got.recv_x
        if scales.stride(1) != 1:  # the contract's column-major scales, as the fake kernel gives them
            scales = torch.empty_like(scales.transpose(1, 2), memory_format=torch.contiguous_format).transpose(
                1, 2).copy_(scales)
    else:
        recv_x = got.recv_x
        scales = x.new_empty((num_experts, max_tokens_per_rank, 0), dtype=torch.float32)
    count, packed = got.recv_count.contiguous(), got.handle.packed_src_row.contiguous()
    if packed is got.handle.packed_src_row and count is not got.handle.recv_count:
        setattr(count, _HANDLE, got.handle)  # the combine takes the handle itself back (no rebuild, no sync)
    return recv_x.contiguous(), scales, count, packed


@moe_low_latency_dispatch.register_fake
def _moe_low_latency_dispatch_fake(x: torch.Tensor, topk_idx: torch.Tensor, max_tokens_per_rank: int,
                                   num_experts: int, use_fp8: bool = True
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[1]
    rows = (num_experts, max_tokens_per_rank)
    if use_fp8:
        recv_x = x.new_empty((*rows, hidden), dtype=FP8)
        scales = x.new_empty((num_experts, hidden // FP8_BLOCK, max_tokens_per_rank), dtype=torch.float32)
        scales = scales.transpose(1, 2)
    else:
        recv_x = x.new_empty((*rows, hidden), dtype=torch.bfloat16)
        scales = x.new_empty((*rows, 0), dtype=torch.float32)
    return (recv_x, scales, x.new_empty((num_experts,), dtype=torch.int32),
            x.new_empty(rows, dtype=torch.int64))


_HANDLE = "_deepport_low_latency_handle"


def handle_of(topk_idx: torch.Tensor, recv_count: torch.Tensor, packed_src_row: torch.Tensor,
              hidden: int) -> MoELowLatencyHandle:
    """The :class:`MoELowLatencyHandle` of a one-process dispatch given as the dispatch op's tensors.

    The dispatch op's own ``recv_count`` tensor carries its handle (an attribute: the same tensor object
    reaches the combine in eager mode, during a CUDA-graph capture and through ``torch.compile``'s
    graphs), which is used as is: whatever its backend keeps there (device-only routes) stays valid and
    nothing is read on the host. Otherwise (a copy of the tensors) the handle is rebuilt from them:
    shapes are checked, and with value checks on (``DEEPPORT_CHECK_VALUES``, one device-to-host copy)
    the counts must be those of ``topk_idx`` and ``packed_src_row`` must hold that many rows per expert.
    """
    own: MoELowLatencyHandle | None = getattr(recv_count, _HANDLE, None)
    if own is not None and isinstance(packed_src_row, torch.Tensor) and \
            packed_src_row.data_ptr() == own.packed_src_row.data_ptr():
        return own
    packed = chk.expect_tensor("packed_src_row", packed_src_row)
    chk.expect_dtype("packed_src_row", packed, (torch.int64,))
    chk.expect_ndim("packed_src_row", packed, 2, "[num_experts, max_tokens_per_rank]")
    chk.expect_contiguous("packed_src_row", packed)
    count = chk.expect_tensor("recv_count", recv_count)
    chk.expect_dtype("recv_count", count, (torch.int32,))
    chk.expect_shape("recv_count", count, (int(packed.shape[0]),), "[num_experts], from `packed_src_row`")
    idx = chk.expect_tensor("topk_idx", topk_idx)
    for name, t in (("recv_count", count), ("packed_src_row", packed)):
        chk.expect_same_device(name, t, idx.device, "topk_idx")
    experts = int(packed.shape[0])
    if settings.check_values() and idx.dim() == 2 and idx.numel() > 0:
        target = torch.where(idx >= 0, idx.to(torch.int64), experts).clamp(max=experts)
        selects = torch.zeros((idx.shape[0], experts + 1), dtype=torch.bool, device=idx.device)
        selects.scatter_(1, target, True)
        expected = selects[:, :experts].sum(dim=0)
        held = (packed >= 0).sum(dim=1)
        if not (torch.equal(expected, count.to(torch.int64)) and torch.equal(held, expected)):
            raise InvalidArgumentError("recv_count", "expected the recv_count and packed_src_row that "
                                       "moe_low_latency_dispatch returned for this topk_idx, got counts that differ")
    routes = OneProcessRoutes(idx.to(torch.int64, copy=True), experts, hidden)
    return MoELowLatencyHandle(routes, int(packed.shape[1]), count, packed)


@torch.library.custom_op("deepport::moe_low_latency_combine", mutates_args=(),
                         schema="(Tensor y, Tensor topk_idx, Tensor topk_weights, Tensor recv_count, "
                                "Tensor packed_src_row) -> Tensor")
def moe_low_latency_combine(y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            recv_count: torch.Tensor, packed_src_row: torch.Tensor) -> torch.Tensor:
    hidden = int(y.shape[-1]) if isinstance(y, torch.Tensor) and y.dim() > 0 else 0
    handle = handle_of(topk_idx, recv_count, packed_src_row, hidden)
    return combine_op.moe_low_latency_combine(y, topk_idx, topk_weights, handle)


@moe_low_latency_combine.register_fake
def _moe_low_latency_combine_fake(y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                                  recv_count: torch.Tensor, packed_src_row: torch.Tensor) -> torch.Tensor:
    return y.new_empty((topk_idx.shape[0], y.shape[2]), dtype=torch.bfloat16)
