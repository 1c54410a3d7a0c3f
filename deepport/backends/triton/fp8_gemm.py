"""Dense block-scaled FP8 GEMM on Triton (``fp8_gemm_{nt,nn,tn,tt}``): host side of ``fp8_gemm_nt_kernel``.

The op layer hands every layout over in NT form (A ``[M, K]``, B ``[N, K]`` views, SFs ``[rows, K blocks]``
views, any strides), so one kernel serves all four: K-contiguous operands with 16-byte aligned rows are
read through tensor descriptors, others through pointers. ``c`` (float32, possibly ``out`` itself) is
added in the epilogue. Three schedules, by the configuration (:mod:`fp8_configs`):

- whole tiles (``split_k`` = ``tail_split`` = 1): grid ``(tiles, 1)``, one program per output tile writes it.
- split-K (``split_k > 1``), when the output tiles alone leave most multiprocessors idle (decode batches:
  M <= 128 with few N tiles): grid ``(tiles, split_k)``, each program writes a float32 partial tile of its
  K blocks to a workspace ``[split_k, M, N]``; ``splitk_reduce_kernel`` (grid over 32 x 128 blocks of
  the output) sums the partials in split order, adds ``c`` and rounds once.
- tail split (``tail_split`` > 1 or 0 = auto, with split-K off), against wave quantization: of the
  ``tiles``, the first ``full`` (whole waves of ``slots`` = multiprocessors x
  :func:`fp8_configs.resident_programs`) are computed whole as above and the last ``tail`` each over ``s``
  K ranges (:func:`fp8_configs.tail_plan`), in ONE launch of ``full + tail * s`` programs; the pieces write
  float32 partial tiles to a workspace ``[s, tail, BLOCK_M, BLOCK_N]``, and ``tail_reduce_kernel`` (grid
  ``(tail, blocks of a tile)``) sums each tail tile's partials in piece order, adds ``c``, rounds once and
  writes only the tail tiles. No workspace and no second launch when nothing is left for a tail.

Every output element is written exactly once per call. All three are deterministic (same inputs, same
bits): the reductions add in a fixed order. A tile computed whole has the same bits with the tail split
on or off (the same loop over its K blocks; checked under the interpreter); split tiles may differ from
it in the last bits (their K blocks are summed in another grouping).
"""

from __future__ import annotations

import torch

from deepport.backends.triton import fp8_configs
from deepport.backends.triton.fp8_gemm_kernels import fp8_gemm_nt_kernel, splitk_reduce_kernel, tail_reduce_kernel
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


def launch(call: FP8GemmCall, out: torch.Tensor, config: fp8_configs.GemmConfig, slots: int | None = None) -> None:
    """Compute the call into ``out`` with ``config`` (``split_k`` / ``tail_split`` 0: chosen from the shape).
    ``slots``: programs that run at once, for the tail split (default: the device's multiprocessors times
    :func:`fp8_configs.resident_programs`)."""
    m, n, k = call.m, call.n, call.k
    if m == 0:
        return
    bm, bn = config.block_m, config.block_n
    multiprocessors = call.signature.device.multiprocessors
    split = config.split_k or fp8_configs.auto_split_k(m, n, k, config, multiprocessors)
    tiles = ceil_div(m, bm) * ceil_div(n, bn)
    full, tail, pieces = tiles, 0, 1
    if split == 1:
        slots = slots or multiprocessors * fp8_configs.resident_programs(config)
        full, tail, pieces = fp8_configs.tail_plan(m, n, k, config, slots)
    a_desc, b_desc = operand(call.a, bm, config.tma), operand(call.b, bn // config.split_n, config.tma)
    use_tma = a_desc is not None and b_desc is not None
    a, b = (a_desc, b_desc) if use_tma else (call.a, call.b)
    sfa, sfb = call.sfa, call.sfb
    # float32 results take bfloat16 MMAs (exact float32 accumulation); the interpreter's e4m3 dot is exact
    precise = out.dtype == torch.float32 and not interpreting()
    flags = dict(GRAN_N=call.gran_n, UE8M0=call.sf_format == SF_UE8M0, USE_TMA=use_tma, EVEN_K=k % 128 == 0,
                 SFB_SCALAR=call.gran_n % bn == 0, PRECISE=precise, SPLIT_K=split, SPLIT_N=config.split_n,
                 BLOCK_M=bm, BLOCK_N=bn, GROUP_M=config.group_m, TAIL_SPLIT=pieces, **config.launch_options())
    strides = (call.a.stride(0), call.a.stride(1), call.b.stride(0), call.b.stride(1), sfa.stride(0), sfa.stride(1),
               sfb.stride(0), sfb.stride(1))
    target = staged(out)
    c = call.c if call.c is not None else target
    if split > 1:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=out.device)
        fp8_gemm_nt_kernel[(tiles, split)](a, b, sfa, sfb, ws, ws, ws, m, n, k, 0, *strides, 0, 0, m * n, n, 1,
                                          HAS_C=False, **flags)
        rm, rn = _REDUCE_BLOCK
        splitk_reduce_kernel[(ceil_div(m, rm), ceil_div(n, rn))](
            ws, c, target, m, n, c.stride(0), c.stride(1), target.stride(0), target.stride(1), SPLIT_K=split,
            HAS_C=call.c is not None, BLOCK_M=rm, BLOCK_N=rn, num_warps=4)
    else:
        ws = torch.empty((pieces, tail, bm, bn), dtype=torch.float32, device=out.device) if tail else target
        fp8_gemm_nt_kernel[(full + tail * pieces, 1)](
            a, b, sfa, sfb, c, target, ws, m, n, k, full, *strides, c.stride(0), c.stride(1), 0, target.stride(0),
            target.stride(1), HAS_C=call.c is not None, **flags)
        if tail:
            rm, rn = min(_REDUCE_BLOCK[0], bm), min(_REDUCE_BLOCK[1], bn)
            tail_reduce_kernel[(tail, (bm // rm) * (bn // rn))](
                ws, c, target, m, n, full, tail, c.stride(0), c.stride(1), target.stride(0), target.stride(1),
                TAIL_SPLIT=pieces, HAS_C=call.c is not None, TILE_M=bm, TILE_N=bn, GROUP_M=config.group_m,
                BLOCK_M=rm, BLOCK_N=rn, num_warps=4)
    unstage(out, target)
