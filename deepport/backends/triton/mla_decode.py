"""MLA decode on the Triton backend: the split-KV kernel over the plan's parts, then the LSE merge.

``run(call, out, lse)`` (the backend contract) launches
:func:`~deepport.backends.triton.mla_decode_kernels.mla_decode_split_kernel` on a grid of
``(num_sm_parts * ceil(s_q * h_q / h_kv / block_h) * v_split, h_kv)`` programs and, when the plan cuts any
request into several pieces, :func:`~deepport.backends.triton.mla_decode_kernels.mla_decode_combine_kernel`
over those requests. Both are asynchronous and allocate only through torch's caching allocator, so a
call with ``metadata`` is CUDA-graph capturable once its plan has been put on the device (the first
call with that plan object). Without ``metadata`` the plan is computed on the host from
``cache_seqlens`` (one device-to-host copy per call).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any

import torch

from deepport.backends.mla_plan import device_plan, num_parts
from deepport.backends.triton import configs
from deepport.backends.triton._runtime import interpreting
from deepport.backends.triton.mla_decode_kernels import mla_decode_combine_kernel, mla_decode_split_kernel
from deepport.kernels import mla_schedule
from deepport.kernels.mla_decode import MLADecodeCall

_TMA_ALIGN_BYTES = 16


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def k_descriptors(call: MLADecodeCall, cfg: configs.MLAConfig) -> tuple[Any, Any] | None:
    """Host tensor descriptors of the cache as ``[num_blocks * page, d_qk]`` rows (blocks ``[block_n,
    d_v / v_split]`` and ``[block_n, d_qk - d_v]``) when ``cfg.k_tma`` and the layout allows bulk
    tensor copies (one KV head; a tile inside one page and one 64-token plan block; power-of-two
    channel parts; unit channel stride, pages back to back, 16-byte aligned rows), else ``None`` (the
    kernel then loads every K tile through pointers)."""
    sig, k = call.signature, call.k_cache
    tail = sig.d_qk - sig.d_v
    size = k.element_size()
    fits = (cfg.k_tma and sig.h_kv == 1 and sig.page_block_size % cfg.block_n == 0
            and mla_schedule.BLOCK_N % cfg.block_n == 0
            and _pow2(sig.d_v // cfg.v_split) and sig.d_v % cfg.v_split == 0 and _pow2(tail)
            and k.stride(3) == 1 and k.stride(0) == sig.page_block_size * k.stride(1)
            and (k.stride(1) * size) % _TMA_ALIGN_BYTES == 0 and k.data_ptr() % _TMA_ALIGN_BYTES == 0
            and k.shape[0] * sig.page_block_size < 2**31)
    if not fits:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = k.as_strided((k.shape[0] * sig.page_block_size, sig.d_qk), (k.stride(1), 1))
    return (TensorDescriptor.from_tensor(rows, [cfg.block_n, sig.d_v // cfg.v_split]),
            TensorDescriptor.from_tensor(rows, [cfg.block_n, tail]))


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor,
        config: configs.MLAConfig | None = None) -> None:
    """Write ``out`` and ``lse`` of a validated call (see :func:`deepport.mla_decode`).

    ``config`` overrides the tuned tile configuration (benchmarks and tests)."""
    sig = call.signature
    device = call.q.device
    q_rows = sig.num_q_tokens_per_head_k
    acc_rows = sig.h_kv * q_rows
    cfg = config or configs.mla_config(sig.device.name, q_rows)
    block_dv = max(16, _next_pow2(sig.d_v))
    if block_dv // cfg.v_split < 16:  # a tensor-core product needs 16 channels per share
        cfg = replace(cfg, v_split=1)
    plan = device_plan(call, num_parts(call, cfg.block_h, cfg.programs_per_sm, cfg.v_split))
    interp = interpreting()
    # The interpreter rounds float32 -> bf16/fp16 stores by truncation: store float32, round with torch.
    out_buf = torch.empty(out.shape, dtype=torch.float32, device=device) if interp else out
    acc_shape = (plan.split_rows, acc_rows) if plan.num_cut else (1, 1)
    o_acc = torch.empty((*acc_shape, sig.d_v), dtype=torch.float32, device=device)
    lse_acc = torch.empty(acc_shape, dtype=torch.float32, device=device)
    q, k = call.q, call.k_cache
    block_dt = max(16, _next_pow2(sig.d_qk - sig.d_v))
    group = sig.h_q // sig.h_kv
    descriptors = k_descriptors(call, cfg)
    desc_v, desc_t = descriptors if descriptors is not None else (k, k)
    with _device_guard(device):
        grid = (plan.num_parts * -(-q_rows // cfg.block_h) * cfg.v_split, sig.h_kv)
        mla_decode_split_kernel[grid](
            q, k, desc_v, desc_t, call.block_table, call.cache_seqlens, plan.pieces, plan.part_ptr,
            out_buf, lse, o_acc, lse_acc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            call.block_table.stride(0),
            group, sig.s_q, q_rows, sig.h_q, acc_rows,
            call.softmax_scale * math.log2(math.e),
            D_V=sig.d_v, D_QK=sig.d_qk, BLOCK_DV=block_dv, BLOCK_DT=block_dt,
            PAGE=sig.page_block_size, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, V_SPLIT=cfg.v_split,
            K_TMA=descriptors is not None, CAUSAL=bool(call.causal and sig.s_q > 1), UPCAST=interp,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if plan.num_cut:
            mla_decode_combine_kernel[(plan.num_cut, acc_rows)](
                o_acc, lse_acc, out_buf, lse, plan.cut, plan.num_splits,
                group, sig.s_q, q_rows, sig.h_q, acc_rows,
                D_V=sig.d_v, BLOCK_DV=block_dv, num_warps=4,
            )
    if out_buf is not out:
        out.copy_(out_buf)
