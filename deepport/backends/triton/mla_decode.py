"""MLA decode on the Triton backend: the split-KV kernel over the plan's parts, then the LSE merge.

``run(call, out, lse)`` (the backend contract) launches
:func:`~deepport.backends.triton.mla_decode_kernels.mla_decode_split_kernel` on a grid of
``(num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / block_h))`` programs and, when the plan cuts any
request into several pieces, :func:`~deepport.backends.triton.mla_decode_kernels.mla_decode_combine_kernel`
over those requests. Both are asynchronous and allocate only through torch's caching allocator, so a
call with ``metadata`` is CUDA-graph capturable once its plan has been put on the device (the first
call with that plan object). Without ``metadata`` the plan is computed on the host from
``cache_seqlens`` (one device-to-host copy per call).
"""

from __future__ import annotations

import contextlib
import math

import torch

from deepport.backends.mla_plan import device_plan, num_parts
from deepport.backends.triton import configs
from deepport.backends.triton._runtime import interpreting
from deepport.backends.triton.mla_decode_kernels import mla_decode_combine_kernel, mla_decode_split_kernel
from deepport.kernels.mla_decode import MLADecodeCall


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor,
        config: configs.MLAConfig | None = None) -> None:
    """Write ``out`` and ``lse`` of a validated call (see :func:`deepport.mla_decode`).

    ``config`` overrides the tuned tile configuration (benchmarks and tests)."""
    sig = call.signature
    device = call.q.device
    q_rows = sig.num_q_tokens_per_head_k
    acc_rows = sig.h_kv * q_rows
    cfg = config or configs.mla_config(sig.device.name, q_rows)
    plan = device_plan(call, num_parts(call, cfg.block_h, cfg.programs_per_sm))
    interp = interpreting()
    # The interpreter rounds float32 -> bf16/fp16 stores by truncation: store float32, round with torch.
    out_buf = torch.empty(out.shape, dtype=torch.float32, device=device) if interp else out
    acc_shape = (plan.split_rows, acc_rows) if plan.num_cut else (1, 1)
    o_acc = torch.empty((*acc_shape, sig.d_v), dtype=torch.float32, device=device)
    lse_acc = torch.empty(acc_shape, dtype=torch.float32, device=device)
    q, k = call.q, call.k_cache
    block_dv = max(16, _next_pow2(sig.d_v))
    block_dt = max(16, _next_pow2(sig.d_qk - sig.d_v))
    group = sig.h_q // sig.h_kv
    with _device_guard(device):
        grid = (plan.num_parts, sig.h_kv, -(-q_rows // cfg.block_h))
        mla_decode_split_kernel[grid](
            q, k, call.block_table, call.cache_seqlens, plan.pieces, plan.part_ptr,
            out_buf, lse, o_acc, lse_acc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            call.block_table.stride(0),
            group, sig.s_q, q_rows, sig.h_q, acc_rows,
            call.softmax_scale * math.log2(math.e),
            D_V=sig.d_v, D_QK=sig.d_qk, BLOCK_DV=block_dv, BLOCK_DT=block_dt,
            PAGE=sig.page_block_size, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n,
            CAUSAL=bool(call.causal and sig.s_q > 1), UPCAST=interp,
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
