"""Host wrappers of ``moe_permute.cl``: each takes and returns torch tensors (copied through the host to the
OpenCL device and back) and runs one kernel.

- :func:`layout_counts`: routing counts and the token-to-rank mask.
- :func:`gather_rows`: ``out[i] = src[index[i]]``, zero rows where ``index < 0`` (any row dtype, moved as bytes);
  :func:`take_rows` allocates ``out`` (the ``take`` step of the torch backend's transport).
- :func:`cast_fp8`: the per-token, per-128-channel e4m3 cast of bf16 rows.
- :func:`segment_sums`: ``out[d] = sum_e w_e * src[rows_e]`` over the entries ``e`` naming ``d``, in entry order;
  :func:`sum_rows` is its unweighted form (the ``sum_rows`` step of the torch backend's transport).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepport.backends.opencl import transfer
from deepport.backends.opencl.runtime import Runtime, get_runtime

SOURCE = "moe_permute.cl"
_CAST_THREADS = 128  # one work-item per channel of a 128-channel FP8 block


def _launch(rt: Runtime, name: str, args: tuple[Any, ...], global_size: tuple[int, ...],
            local_size: tuple[int, ...] | None = None) -> None:
    import pyopencl as cl

    kernel = rt.kernel(SOURCE, name, {"CAST_THREADS": _CAST_THREADS})
    kernel.set_args(*args)
    cl.enqueue_nd_range_kernel(rt.queue, kernel, global_size, local_size)


def layout_counts(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> tuple[torch.Tensor, ...]:
    """``(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])`` on
    the host; each token counts once per distinct rank and expert it selects."""
    rt = get_runtime()
    tokens, topk = (int(x) for x in topk_idx.shape)
    per_rank = transfer.upload(rt, np.zeros(num_ranks, dtype=np.int32), writable=True)
    per_expert = transfer.upload(rt, np.zeros(num_experts, dtype=np.int32), writable=True)
    in_rank = transfer.scratch(rt, tokens * num_ranks)
    if tokens:
        ids = transfer.upload(rt, topk_idx.to(torch.int32))
        _launch(rt, "moe_layout", (ids, np.int32(topk), np.int32(num_ranks), np.int32(num_experts // num_ranks),
                                   in_rank, per_expert, per_rank), (tokens,))
    return (transfer.download(rt, per_rank, (num_ranks,), torch.int32),
            transfer.download(rt, per_expert, (num_experts,), torch.int32),
            transfer.download(rt, in_rank, (tokens, num_ranks), torch.uint8).to(torch.bool))


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``out[i] = src[index[i]]`` (zero bytes where ``index[i] < 0``) for every row of ``out``;
    ``src`` and ``out`` have equal row shapes and dtypes, ``index`` is int64 ``[len(out)]``."""
    rows = int(out.shape[0])
    if rows == 0:
        return
    rt = get_runtime()
    row_bytes = out[0].numel() * out.element_size()
    src_bytes = transfer.host_array(src).reshape(-1).view(np.uint8)
    dst = transfer.scratch(rt, rows * row_bytes)
    idx = transfer.upload(rt, index.to(torch.int64))
    if row_bytes % 16 == 0:
        _launch(rt, "moe_gather_rows16", (transfer.upload(rt, src_bytes), idx, dst, np.int32(row_bytes // 16)),
                (row_bytes // 16, rows))
    else:
        _launch(rt, "moe_gather_rows1", (transfer.upload(rt, src_bytes), idx, dst, np.int32(row_bytes)),
                (row_bytes, rows))
    raw = transfer.download(rt, dst, (rows * row_bytes,), torch.uint8)
    out.copy_(raw.view(out.dtype).view(out.shape))


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` (``index`` int64, no negative entries) as a new tensor on ``x``'s device."""
    out = torch.empty((int(index.shape[0]), *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather_rows(x, index, out)
    return out


def cast_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``[T, H]`` (``H`` a multiple of 128) to ``(e4m3 [T, H], float32 scales [T, H / 128])`` on ``x``'s
    device: per token and 128 channels ``amax = max(|x|, 1e-4)``, ``scale = amax / 448``,
    ``q = e4m3(x * (448 / amax))``."""
    tokens, hidden = (int(s) for s in x.shape)
    blocks = hidden // 128
    if tokens == 0:
        return (torch.empty((0, hidden), dtype=torch.float8_e4m3fn, device=x.device),
                torch.empty((0, blocks), dtype=torch.float32, device=x.device))
    rt = get_runtime()
    q, scales = transfer.scratch(rt, tokens * hidden), transfer.scratch(rt, 4 * tokens * blocks)
    _launch(rt, "moe_cast_fp8", (transfer.upload(rt, x), q, scales, np.int32(hidden)),
            (tokens * blocks * _CAST_THREADS,), (_CAST_THREADS,))
    return (transfer.download(rt, q, (tokens, hidden), torch.float8_e4m3fn).to(x.device),
            transfer.download(rt, scales, (tokens, blocks), torch.float32).to(x.device))


def segment_sums(src: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor, num_dst: int,
                 weights: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``out [num_dst, H]`` (float32 or bf16, on ``src``'s device): ``out[d] = sum w_e * src[rows[e]]`` over
    the entries ``e`` with ``dst[e] == d``, in entry order, accumulated in float32 and rounded once;
    ``src`` bf16 or float32 ``[N, H]``; ``rows``, ``dst`` int64 ``[E]``; ``weights`` float32 ``[E]`` or
    ``None`` (all 1)."""
    if src.dtype not in (torch.bfloat16, torch.float32) or src.dim() != 2:
        raise TypeError(f"segment_sums: expected bfloat16 or float32 rows [N, H], got {src.dtype} {tuple(src.shape)}")
    hidden = int(src.shape[1])
    out_shape = (num_dst, hidden)
    if num_dst == 0 or hidden == 0:
        return torch.zeros(out_shape, dtype=out_dtype, device=src.device)
    rt = get_runtime()
    order = torch.argsort(dst.cpu(), stable=True)
    counts = torch.bincount(dst.cpu(), minlength=num_dst)
    offsets = torch.zeros(num_dst + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    w = np.zeros(1, dtype=np.float32) if weights is None else transfer.host_array(weights.cpu()[order])
    out = transfer.scratch(rt, num_dst * hidden * (2 if out_dtype == torch.bfloat16 else 4))
    i32 = np.int32
    _launch(rt, "moe_reduce_rows", (transfer.upload(rt, src), transfer.upload(rt, offsets),
                                    transfer.upload(rt, rows.cpu()[order]), transfer.upload(rt, w), out,
                                    i32(hidden), i32(src.dtype == torch.bfloat16), i32(weights is not None),
                                    i32(out_dtype == torch.bfloat16)), (hidden, num_dst))
    return transfer.download(rt, out, out_shape, out_dtype).to(src.device)


def sum_rows(rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[n, ...]``: row ``d`` is the sum of the ``rows[e]`` with ``dst[e] == d`` (0 where none)."""
    width = 1
    for size in rows.shape[1:]:
        width *= int(size)
    flat = rows.reshape(int(rows.shape[0]), width)
    entries = torch.arange(int(rows.shape[0]), device=rows.device)
    return segment_sums(flat, entries, dst, n, None, torch.float32).view(n, *rows.shape[1:])
