"""MLA decode on OpenCL: the split-KV plan, staging, the two kernels of ``mla_decode.cl`` and read-back.

The plan is the call's ``metadata`` (FlashMLA's schedule from ``get_mla_metadata``) when given, else the
same scheduler run for this OpenCL device (:func:`plan_parts`). Each (request, block range) of the plan
becomes one *piece*; ``mla_decode_split`` runs one work-group per (piece, KV head, tile of query rows)
and ``mla_decode_combine`` merges each request's pieces by their log-sum-exps. Every piece, split or
not, goes through the combine (one code path; its traffic is ``pieces x rows x d_v`` floats, small
next to the KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepport.backends.opencl import transfer
from deepport.backends.opencl.runtime import DeviceLimits, Runtime, get_runtime
from deepport.kernels import mla_schedule
from deepport.kernels.mla_decode import MLADecodeCall

SOURCE = "mla_decode.cl"
_ROWS_PER_THREAD = 8
_TOKENS_PER_THREAD = 2
_GPU_PARTS_PER_UNIT = 4  # work-groups in flight per compute unit the plan aims for on a GPU


@dataclass(frozen=True)
class MLAConfig:
    """Compile-time tile of ``mla_decode_split`` (chosen from the device's limits)."""

    rows: int  # query rows per work-group, a multiple of 8
    tokens: int  # KV tokens per tile

    @property
    def threads(self) -> int:
        return (self.rows // _ROWS_PER_THREAD) * (self.tokens // _TOKENS_PER_THREAD)

    def local_bytes(self, d_qk: int) -> int:
        return 4 * (d_qk * self.rows + self.tokens * self.rows + 4 * self.rows) + 8 * self.tokens + \
            4 * self.threads


def choose_config(limits: DeviceLimits, d_qk: int) -> MLAConfig:
    """The largest tile that fits the device's local memory and work-group limits: 16 rows x 128 tokens
    (41 KiB of local memory at d_qk = 576) where it fits, smaller otherwise."""
    for rows in (16, 8):
        for tokens in (128, 64, 32, 16):
            cfg = MLAConfig(rows, tokens)
            if cfg.threads <= limits.max_work_group_size and cfg.local_bytes(d_qk) <= limits.local_mem_size:
                return cfg
    raise RuntimeError(f"deepport.opencl: no MLA tile fits {limits.label} (local memory {limits.local_mem_size} "
                       f"bytes, work-group {limits.max_work_group_size}) at d_qk={d_qk}")


def plan_parts(limits: DeviceLimits) -> int:
    """Parts for the split-KV scheduler: several work-groups per compute unit on a GPU (latency hiding),
    two per unit on a CPU (so that even small batches exercise the split and the combine)."""
    return limits.compute_units * (_GPU_PARTS_PER_UNIT if limits.is_gpu else 2)


def pieces_from_plan(records: np.ndarray, num_splits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int32 ``[num_pieces, 4]``: ``(request, tok_begin, tok_end, acc_row)`` for each piece of the plan
    (see :func:`deepport.kernels.mla_schedule.plan_split_kv`); ``acc_row`` is the piece's row in the split
    accumulator (``num_splits[request]`` plus its index within the request)."""
    b = int(lengths.shape[0])
    blocks = -(-lengths // mla_schedule.BLOCK_N)
    seen = np.zeros(b, dtype=np.int64)
    out: list[tuple[int, int, int, int]] = []
    for begin_req, end_req, begin_blk, end_blk, *_ in records.tolist():
        for req in range(begin_req, min(end_req, b - 1) + 1):
            first = begin_blk if req == begin_req else 0
            last = end_blk if req == end_req else int(blocks[req])
            tok_begin = first * mla_schedule.BLOCK_N
            tok_end = min(last * mla_schedule.BLOCK_N, int(lengths[req]))
            out.append((req, tok_begin, max(tok_begin, tok_end), int(num_splits[req]) + int(seen[req])))
            seen[req] += 1
    if not np.array_equal(seen, np.diff(num_splits.astype(np.int64))):
        raise RuntimeError("deepport.opencl: the split-KV plan does not cover every request once per piece")
    return np.asarray(out, dtype=np.int32).reshape(-1, 4)


class MLALaunch:
    """A call staged on the device: its buffers and kernels; :meth:`enqueue` runs it (re-runnable, which
    the timing script uses), :meth:`read` copies ``out`` and ``lse`` back."""

    def __init__(self, rt: Runtime, call: MLADecodeCall, cfg: MLAConfig | None = None,
                 parts: int | None = None) -> None:
        sig = call.signature
        self.rt, self.sig = rt, sig
        lengths = call.cache_seqlens.detach().to("cpu", torch.int64).numpy()
        if call.metadata is not None:
            records = call.metadata.tile_scheduler_metadata.numpy()
            num_splits = call.metadata.num_splits.numpy()
        else:
            records, num_splits = mla_schedule.plan_split_kv(lengths, parts or plan_parts(rt.limits))
        pieces = pieces_from_plan(records, num_splits, lengths)
        self.cfg = cfg or choose_config(rt.limits, sig.d_qk)
        rows = sig.s_q * sig.h_q // sig.h_kv
        self.row_tiles = math.ceil(rows / self.cfg.rows)
        self.combine_threads = min(128, rt.limits.max_work_group_size)
        defines = {"D_QK": sig.d_qk, "D_V": sig.d_v, "ROWS": self.cfg.rows, "TN": self.cfg.tokens,
                   "IS_HALF": int(sig.dtype == torch.float16), "COMBINE_THREADS": self.combine_threads}
        self.split = rt.kernel(SOURCE, "mla_decode_split", defines)
        self.combine = rt.kernel(SOURCE, "mla_decode_combine", defines)
        rt.require_work_group(self.split, self.cfg.threads)
        rt.require_work_group(self.combine, self.combine_threads)
        b, hs = call.batch, sig.h_q * sig.s_q
        acc_rows = int(num_splits[-1])
        self.buffers = {
            "q": transfer.upload(rt, call.q), "kv": transfer.upload(rt, call.k_cache),
            "table": transfer.upload(rt, call.block_table), "lens": transfer.upload(rt, call.cache_seqlens),
            "pieces": transfer.upload(rt, pieces), "splits": transfer.upload(rt, num_splits.astype(np.int32)),
            "o_acc": transfer.scratch(rt, 4 * acc_rows * hs * sig.d_v),
            "lse_acc": transfer.scratch(rt, 4 * acc_rows * hs),
            "out": transfer.scratch(rt, 2 * b * hs * sig.d_v), "lse": transfer.scratch(rt, 4 * b * hs),
        }
        self.num_pieces = int(pieces.shape[0])
        self.batch = b
        self.max_blocks = int(call.block_table.shape[1])
        self.scale_log2 = float(call.softmax_scale) * math.log2(math.e)
        self.causal = call.causal and sig.s_q > 1

    def enqueue(self) -> list[Any]:
        """Enqueue both kernels; returns their events (profiling-enabled queue)."""
        sig, buf, i32 = self.sig, self.buffers, np.int32
        self.split.set_args(buf["q"], buf["kv"], buf["table"], buf["lens"], buf["pieces"], buf["o_acc"],
                            buf["lse_acc"], i32(sig.s_q), i32(sig.h_q), i32(sig.h_kv), i32(sig.page_block_size),
                            i32(self.max_blocks), i32(self.causal), i32(self.row_tiles), np.float32(self.scale_log2))
        threads = self.cfg.threads
        import pyopencl as cl

        split = cl.enqueue_nd_range_kernel(self.rt.queue, self.split,
                                           (self.num_pieces * threads, sig.h_kv * self.row_tiles), (threads, 1))
        self.combine.set_args(buf["o_acc"], buf["lse_acc"], buf["splits"], buf["out"], buf["lse"], i32(sig.s_q),
                              i32(sig.h_q))
        rows = self.batch * sig.h_q * sig.s_q
        combine = cl.enqueue_nd_range_kernel(self.rt.queue, self.combine, (rows * self.combine_threads,),
                                             (self.combine_threads,))
        return [split, combine]

    def read(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        sig = self.sig
        out.copy_(transfer.download(self.rt, self.buffers["out"], (self.batch, sig.s_q, sig.h_q, sig.d_v), sig.dtype))
        lse.copy_(transfer.download(self.rt, self.buffers["lse"], (self.batch, sig.h_q, sig.s_q), torch.float32))


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Compute the call into ``out`` and ``lse`` (the op layer has validated it; ``b >= 1``)."""
    launch = MLALaunch(get_runtime(), call)
    launch.enqueue()
    launch.read(out, lse)
