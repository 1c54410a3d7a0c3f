"""Dense block-scaled FP8 GEMM on Triton (``fp8_gemm_{nt,nn,tn,tt}``): host side of ``fp8_gemm_nt_kernel``.

The op layer hands every layout over in NT form (A ``[M, K]``, B ``[N, K]`` views, SFs ``[rows, K blocks]``
views, any strides), so one kernel serves all four: K-contiguous operands with 16-byte aligned rows are
read through tensor descriptors, others through pointers. ``c`` (float32, possibly ``out`` itself) is
added in the epilogue. When the output tiles alone leave most multiprocessors idle (decode batches:
M <= 128 with few N tiles), the K blocks are split over ``split_k`` programs per tile, each writing a
float32 partial tile to a workspace, and a second kernel sums the partials in a fixed order, adds ``c``
and rounds once.
"""

from __future__ import annotations

import torch

from deepport.backends.triton import fp8_configs
from deepport.backends.triton.fp8_gemm_kernels import fp8_gemm_nt_kernel, splitk_reduce_kernel
from deepport.backends.triton.fp8_launch import operand, staged, unstage
from deepport.backends.triton.fp8_support import interpreting
from deepport.kernels._fp8_checks import SF_UE8M0
from deepport.kernels.fp8_gemm import FP8GemmCall
from deepport.kernels.fp8_layout import ceil_div

_REDUCE_BLOCK = (32, 128)


def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Compute the call into ``out`` with the configuration :func:`fp8_configs.choose` picks."""
    device = call.signature.device
    config = fp8_configs.choose(fp8_configs.DENSE, device.name, device.multiprocessors, call.m, call.n, call.k)
    launch(call, out, config)


def launch(call: FP8GemmCall, out: torch.Tensor, config: fp8_configs.GemmConfig) -> None:
    """Compute the call into ``out`` with ``config`` (``split_k == 0``: chosen from the shape)."""
    m, n, k = call.m, call.n, call.k
    if m == 0:
        return
    bm, bn = config.block_m, config.block_n
    split = config.split_k or fp8_configs.auto_split_k(m, n, k, config, call.signature.device.multiprocessors)
    a_desc, b_desc = operand(call.a, bm, config.tma), operand(call.b, bn // config.split_n, config.tma)
    use_tma = a_desc is not None and b_desc is not None
    a, b = (a_desc, b_desc) if use_tma else (call.a, call.b)
    sfa, sfb = call.sfa, call.sfb
    # float32 results take bfloat16 MMAs (exact float32 accumulation); the interpreter's e4m3 dot is exact
    precise = out.dtype == torch.float32 and not interpreting()
    flags = dict(GRAN_N=call.gran_n, UE8M0=call.sf_format == SF_UE8M0, USE_TMA=use_tma, EVEN_K=k % 128 == 0,
                 SFB_SCALAR=call.gran_n % bn == 0, PRECISE=precise, SPLIT_K=split, SPLIT_N=config.split_n,
                 BLOCK_M=bm, BLOCK_N=bn, GROUP_M=config.group_m, **config.launch_options())
    grid = (ceil_div(m, bm) * ceil_div(n, bn), split)
    target = staged(out)
    if split == 1:
        c = call.c if call.c is not None else target
        fp8_gemm_nt_kernel[grid](a, b, sfa, sfb, c, target, m, n, k, call.a.stride(0), call.a.stride(1),
                                 call.b.stride(0), call.b.stride(1), sfa.stride(0), sfa.stride(1), sfb.stride(0),
                                 sfb.stride(1), c.stride(0), c.stride(1), 0, target.stride(0), target.stride(1),
                                 HAS_C=call.c is not None, **flags)
    else:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=out.device)
        fp8_gemm_nt_kernel[grid](a, b, sfa, sfb, ws, ws, m, n, k, call.a.stride(0), call.a.stride(1),
                                 call.b.stride(0), call.b.stride(1), sfa.stride(0), sfa.stride(1), sfb.stride(0),
                                 sfb.stride(1), 0, 0, m * n, n, 1, HAS_C=False, **flags)
        c = call.c if call.c is not None else target
        rm, rn = _REDUCE_BLOCK
        splitk_reduce_kernel[(ceil_div(m, rm), ceil_div(n, rn))](
            ws, c, target, m, n, c.stride(0), c.stride(1), target.stride(0), target.stride(1), SPLIT_K=split,
            HAS_C=call.c is not None, BLOCK_M=rm, BLOCK_N=rn, num_warps=4)
    unstage(out, target)
