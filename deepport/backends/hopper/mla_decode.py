"""Host side of the sm90 MLA decode: ``kernels/sm90_mla_decode.cu`` over the split-KV plan, then
``kernels/sm90_mla_combine.cu`` for the requests the plan cut.

One CTA per (part of the plan, 64-row query tile, KV head): the plan is dealt to
``SMs // (h_kv * ceil(s_q * h_q / h_kv / 64))`` parts (FlashMLA's ``num_sm_parts``), so every SM runs one CTA and a
``metadata`` planned by :func:`deepport.get_mla_metadata` is used as it is. Both kernels are
asynchronous; with ``metadata`` nothing is read back, so the call can be captured in a CUDA graph
once its plan is on the device (the first call with that plan object).

Operands: q and the cache are read by TMA, which needs 16-byte aligned bases and row strides. The kernel
reads the query rows of one KV head, ``(s_q, h_q / h_kv)``, as one dimension: with one KV head that is
q itself when its rows ``(s_q, h_q)`` flatten to one stride; otherwise (several KV heads, or other
strides) a packed copy of q, ``[b * h_kv, s_q * h_q / h_kv, 576]``, is made (q is small). A cache TMA
cannot read is copied contiguous (a full pass over it: keep caches contiguous).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch

from deepport.backends.hopper import jit, launch, tma
from deepport.backends.hopper.sources import mla_combine_source, mla_decode_source
from deepport.backends.mla_plan import device_plan, num_parts
from deepport.kernels.mla_decode import MLADecodeCall

D_QK = 576
D_V = 512
BLOCK_ROWS = 64  # query rows per CTA
BLOCK_N = 64  # tokens per block
THREADS = 384
COMBINE_THREADS = 128
TILE_BYTES = 9 * BLOCK_N * 128  # 576 channels of 64 tokens in nine 128-byte-wide boxes
SMEM_BYTES = 3 * TILE_BYTES + BLOCK_ROWS * 128 + 3 * BLOCK_ROWS * 4 + 6 * 8 + 1024  # Q, 2 K stages, P, rows, barriers
_DTYPES = {torch.bfloat16: ("bf16", 0), torch.float16: ("fp16", 1)}

# dp::Params of sm90_mla_decode.cu: 2 tensor maps, 8 pointers, 1 int64, 6 int32, 1 float; 64-byte aligned.
_PARAMS = struct.Struct("<128s128s8Qq6if")
PARAMS_USED = _PARAMS.size
PARAMS_SIZE = -(-PARAMS_USED // 64) * 64
_COMBINE = struct.Struct("<6Q4i")  # dp::CombineParams of sm90_mla_combine.cu

COMPILE_OPTIONS: tuple[str, ...] = ("-lineinfo",)


def decode_options(page: int, dtype: torch.dtype) -> tuple[str, ...]:
    """NVRTC options of the split kernel for ``page``-token pages of ``dtype``."""
    return (f"-DPAGE={page}", f"-DDTYPE={_DTYPES[dtype][1]}", f"-DDP_PARAMS_SIZE={PARAMS_SIZE}",
            f"-DDP_PARAMS_USED={PARAMS_USED}", f"-DDP_SMEM_BYTES={SMEM_BYTES}", *COMPILE_OPTIONS)


def combine_options(dtype: torch.dtype) -> tuple[str, ...]:
    return (f"-DDTYPE={_DTYPES[dtype][1]}", *COMPILE_OPTIONS)


_functions: dict[tuple[str, int, torch.dtype, int], Any] = {}


def _function(kind: str, page: int, dtype: torch.dtype, device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (kind, page, dtype, index)
    function = _functions.get(key)
    if function is None:
        name = _DTYPES[dtype][0]
        if kind == "decode":
            source, options, smem = mla_decode_source(name), decode_options(page, dtype), SMEM_BYTES
        else:
            source, options, smem = mla_combine_source(name), combine_options(dtype), 0
        cache_key, cubin = jit.get_cubin(source, options)
        function = launch.load_function(cache_key, cubin, source.entry, index, smem)
        _functions[key] = function
    return function


def _tma_ready(x: torch.Tensor, outer_dims: tuple[int, ...]) -> bool:
    return (x.stride(-1) == 1 and x.data_ptr() % tma.TMA_ALIGN == 0
            and all(x.stride(d) * 2 % tma.TMA_ALIGN == 0 for d in outer_dims if x.shape[d] > 1))


def packed_query(q: torch.Tensor, h_kv: int) -> tuple[torch.Tensor, int, int]:
    """``(tensor, row stride, batch stride)`` (elements) of q ``[b, s_q, h_q, 576]`` as the kernel reads it:
    ``[b * h_kv, s_q * h_q / h_kv, 576]``, the query rows of one KV head per batch entry. q itself when it
    has one KV head and TMA can read its rows ``(s_q, h_q)`` as one dimension, else a packed copy."""
    b, s_q, h_q, d = (int(x) for x in q.shape)
    if h_kv == 1 and (s_q == 1 or h_q == 1 or q.stride(1) == h_q * q.stride(2)) and _tma_ready(q, (0, 1, 2)):
        row = _row_stride(q, 2, d) if h_q > 1 else _row_stride(q, 1, d)
        return q, row, _row_stride(q, 0, s_q * h_q * row)
    group = h_q // h_kv
    packed = q.view(b, s_q, h_kv, group, d).permute(0, 2, 1, 3, 4).contiguous()
    return packed, d, s_q * group * d


def _row_stride(x: torch.Tensor, dim: int, default: int) -> int:
    return x.stride(dim) if x.shape[dim] > 1 else default


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Write ``out`` and ``lse`` of a validated call (see :func:`deepport.mla_decode`); within
    :data:`~deepport.backends.hopper.support.MLA_REQUIREMENTS` (576/512 channels, one KV head)."""
    sig = call.signature
    device = call.q.device
    b, s_q, h_q, h_kv = int(call.q.shape[0]), sig.s_q, sig.h_q, sig.h_kv
    group = h_q // h_kv
    q_rows = s_q * group  # query rows per KV head
    tiles = -(-q_rows // BLOCK_ROWS)
    plan = device_plan(call, num_parts(call, BLOCK_ROWS, 1))
    q, q_row_stride, q_batch_stride = packed_query(call.q, h_kv)
    k = call.k_cache if _tma_ready(call.k_cache, (0, 1, 2)) else call.k_cache.contiguous()
    table = call.block_table if call.block_table.stride(-1) == 1 else call.block_table.contiguous()
    seqlens = call.cache_seqlens.contiguous()
    num_blocks, page = int(k.shape[0]), int(k.shape[1])

    tmap_q = tma.tile_map_16bit(q.data_ptr(), (D_QK, q_rows, b * h_kv), (q_row_stride * 2, q_batch_stride * 2),
                                (64, BLOCK_ROWS, 1))
    k_head_stride = _row_stride(k, 2, D_QK)
    k_row_stride = _row_stride(k, 1, h_kv * k_head_stride)
    k_block_stride = _row_stride(k, 0, page * k_row_stride)
    tmap_k = tma.tile_map_16bit(k.data_ptr(), (D_QK, h_kv, page, num_blocks),
                                (k_head_stride * 2, k_row_stride * 2, k_block_stride * 2),
                                (64, 1, min(page, BLOCK_N), 1))
    if plan.num_cut:
        o_acc = torch.empty((plan.split_rows, h_kv, q_rows, D_V), dtype=torch.float32, device=device)
        lse_acc = torch.empty((plan.split_rows, h_kv, q_rows), dtype=torch.float32, device=device)
        acc_ptrs = (o_acc.data_ptr(), lse_acc.data_ptr())
    else:
        acc_ptrs = (0, 0)
    params = _PARAMS.pack(tmap_q, tmap_k, table.data_ptr(), seqlens.data_ptr(), plan.pieces.data_ptr(),
                          plan.part_ptr.data_ptr(), out.data_ptr(), lse.data_ptr(), *acc_ptrs,
                          table.stride(0), q_rows, h_q, s_q, int(bool(call.causal and s_q > 1)), h_kv, group,
                          call.softmax_scale * math.log2(math.e))
    params += bytes(PARAMS_SIZE - len(params))
    decode = _function("decode", page, sig.dtype, device)
    launch.launch(decode, (plan.num_parts, tiles, h_kv), THREADS, SMEM_BYTES, params, device)
    if plan.num_cut:
        combine = _function("combine", 0, sig.dtype, device)
        cparams = _COMBINE.pack(*acc_ptrs, plan.cut.data_ptr(), plan.num_splits.data_ptr(), out.data_ptr(),
                                lse.data_ptr(), q_rows, h_q, s_q, group)
        launch.launch(combine, (plan.num_cut, h_kv * q_rows), COMBINE_THREADS, 0, cparams, device)
