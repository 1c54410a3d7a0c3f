"""The MoE ops' local steps as ``moe_permute.cl`` kernels, on torch tensors (copied through the host to the
OpenCL device and back), in the shape of :class:`deepport.backends.torch.moe_local.LocalSteps`:

- :func:`place_rows` / :func:`take_rows`: rows moved bit for bit (as bytes) by a gather kernel;
- :func:`weighted_rows` / :func:`sum_rows`: segmented row sums in float32, entries in a fixed order;
- :func:`cast_fp8`: the per-token, per-128-channel e4m3 cast;

and :func:`layout_counts`, the routing counts of ``moe_layout``.
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


def _gather(src: torch.Tensor, index: torch.Tensor, rows: int, row_bytes: int, zero_missing: bool,
            initial: torch.Tensor | None) -> torch.Tensor:
    """uint8 ``[rows * row_bytes]`` on the host: row ``i`` is ``src``'s row ``index[i]``; where ``index < 0``
    zeros (``zero_missing``) or the bytes of ``initial`` (the same rows, as they were)."""
    rt = get_runtime()
    src_bytes = transfer.host_array(src).reshape(-1).view(np.uint8)
    if initial is None:
        dst = transfer.scratch(rt, rows * row_bytes)
    else:
        dst = transfer.upload(rt, transfer.host_array(initial).reshape(-1).view(np.uint8), writable=True)
    idx = transfer.upload(rt, index.reshape(-1).to(torch.int64))
    wide = row_bytes % 16 == 0
    words = row_bytes // 16 if wide else row_bytes
    _launch(rt, "moe_gather_rows16" if wide else "moe_gather_rows1",
            (transfer.upload(rt, src_bytes), idx, dst, np.int32(words), np.int32(zero_missing)), (words, rows))
    return transfer.download(rt, dst, (rows * row_bytes,), torch.uint8)


def place_rows(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, zero_missing: bool) -> None:
    """``dst[g, i] = src[index[g, i]]`` bit for bit for every ``index >= 0``; ``-1`` rows are zeroed when
    ``zero_missing``, else left as they were. ``src [n, C]``, ``dst [G, R, C]`` (any strides)."""
    groups, rows, cols = (int(d) for d in dst.shape)
    if groups * rows == 0 or cols == 0:
        return
    raw = _gather(src, index, groups * rows, cols * dst.element_size(), zero_missing,
                  None if zero_missing else dst)
    dst.copy_(raw.view(dst.dtype).view(dst.shape))


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` (``x [n, C]``, ``index`` int64 ``[k]`` without ``-1``) as a new tensor on ``x``'s device."""
    rows, cols = int(index.shape[0]), int(x.shape[1])
    if rows == 0 or cols == 0:
        return torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    raw = _gather(x, index, rows, cols * x.element_size(), True, None)
    return raw.view(x.dtype).view(rows, cols).to(x.device)


def cast_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``[T, H]`` (``H`` a multiple of 128) to ``(e4m3 [T, H], float32 scales [T, H / 128])`` on ``x``'s
    device: per token and 128 channels ``amax = max(|x|, 1e-4)``, ``scale = amax * float32(1/448)`` (DeepEP's rule),
    ``q = e4m3(x * (448 / amax))`` with IEEE quotients."""
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


def _segment_sums(src: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor, num_dst: int,
                  weights: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[num_dst, H]`` on ``src``'s device: ``out[d] = sum w_e * src[rows[e]]`` over the entries
    ``e`` with ``dst[e] == d``, in entry order (``w_e = 1`` without weights); ``src`` bf16 or float32."""
    if src.dtype not in (torch.bfloat16, torch.float32) or src.dim() != 2:
        raise TypeError(f"deepport.opencl: expected bfloat16 or float32 rows [N, H], got {src.dtype} "
                        f"{tuple(src.shape)}")
    hidden = int(src.shape[1])
    if num_dst == 0 or hidden == 0:
        return torch.zeros((num_dst, hidden), dtype=torch.float32, device=src.device)
    rt = get_runtime()
    dst_host = dst.to("cpu", torch.int64)
    order = torch.argsort(dst_host, stable=True)
    offsets = torch.zeros(num_dst + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(dst_host, minlength=num_dst), 0)
    w = np.zeros(1, dtype=np.float32) if weights is None else transfer.host_array(weights.cpu()[order])
    out = transfer.scratch(rt, 4 * num_dst * hidden)
    i32 = np.int32
    _launch(rt, "moe_reduce_rows", (transfer.upload(rt, src), transfer.upload(rt, offsets),
                                    transfer.upload(rt, rows.to("cpu", torch.int64)[order]), transfer.upload(rt, w),
                                    out, i32(hidden), i32(src.dtype == torch.bfloat16), i32(weights is not None)),
            (hidden, num_dst))
    return transfer.download(rt, out, (num_dst, hidden), torch.float32).to(src.device)


def weighted_rows(y: torch.Tensor, src_pos: torch.Tensor, dst_row: torch.Tensor, weights: torch.Tensor,
                  num_rows: int) -> torch.Tensor:
    """float32 ``[num_rows, C]``: ``out[dst_row[j]] += weights[j] * y[src_pos[j]]`` (the weighted un-permute)."""
    return _segment_sums(y, src_pos, dst_row, num_rows, weights)


def sum_rows(rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[n, ...]``: row ``d`` is the sum of the ``rows[e]`` with ``dst[e] == d`` (0 where none)."""
    width = 1
    for size in rows.shape[1:]:
        width *= int(size)
    entries = torch.arange(int(rows.shape[0]))
    return _segment_sums(rows.reshape(int(rows.shape[0]), width), entries, dst, n, None).view(n, *rows.shape[1:])
