"""MLA decode on OpenCL: the split-KV plan, staging, the two kernels of ``mla_decode.cl`` and read-back.

The plan is the call's ``metadata`` (FlashMLA's schedule from ``get_mla_metadata``) when given, else the
same scheduler run for this OpenCL device (:func:`plan_parts`). Each (request, block range) of the plan
becomes one *piece*; ``mla_decode_split`` runs one work-group per (piece, KV head, tile of query rows)
and ``mla_decode_combine`` merges each request's pieces by their log-sum-exps. Every piece, split or
not, goes through the combine (one code path; its traffic is ``pieces x rows x d_v`` floats, small
next to the KV cache).

Two split kernels, one per config type (``mla_decode.cl``'s header describes both):

- :class:`MLAConfig` runs ``mla_decode_split`` (row-wise: each work-item walks whole K rows; any head dims);
- :class:`StagedConfig` runs ``mla_decode_split_staged`` (K staged in local memory chunk by chunk with
  coalesced 16-byte loads, logits in registers; ``d_qk % 8 == 0`` and ``d_v % 4 == 0``).

:func:`choose_config` picks one from the call's shape (head dims, query rows per KV head) and the device's
limits: the staged kernel where its envelope holds, the device's local memory is real
(``local_mem_is_global`` false) and a staged tile fits; the row-wise kernel otherwise (so PoCL, whose
local memory is ordinary memory, keeps the row-wise kernel). The choice is the config, made before
anything is built; :class:`MLALaunch` takes an explicit config too (tests and the bench force either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from deepport.backends.opencl import transfer
from deepport.backends.opencl.runtime import DeviceLimits, Runtime, get_runtime
from deepport.kernels import mla_schedule
from deepport.kernels.mla_decode import MLADecodeCall

SOURCE = "mla_decode.cl"
_ROWS_PER_THREAD = 8
_TOKENS_PER_THREAD = 2
# work-groups in flight per compute unit the plan aims for on a GPU: 2 measured fastest on an H200 through
# NVIDIA's OpenCL (972 against 1025 us at 4 and 1122 us at 8, b=128 h_q=16 s_k=4096; 2026-12-01)
_GPU_PARTS_PER_UNIT = 2


@dataclass(frozen=True)
class MLAConfig:
    """Compile-time tile of ``mla_decode_split`` (the row-wise kernel): each work-item walks whole K rows."""

    rows: int  # query rows per work-group, a multiple of 8
    tokens: int  # KV tokens per tile

    kernel: ClassVar[str] = "mla_decode_split"

    @property
    def threads(self) -> int:
        return (self.rows // _ROWS_PER_THREAD) * (self.tokens // _TOKENS_PER_THREAD)

    def local_bytes(self, d_qk: int) -> int:
        return 4 * (d_qk * self.rows + self.tokens * self.rows + 4 * self.rows) + 8 * self.tokens + \
            4 * self.threads

    def supports(self, d_qk: int, d_v: int) -> bool:
        return True

    def defines(self) -> dict[str, int]:
        return {"ROWS": self.rows, "TN": self.tokens}


@dataclass(frozen=True)
class StagedConfig:
    """Compile-time tile of ``mla_decode_split_staged`` (the staged kernel; see ``mla_decode.cl``).

    ``threads`` work-items; QK: ``rows // rows_per_thread`` row groups x ``token_lanes`` lanes, each lane
    ``rows_per_thread`` rows x ``tokens_per_thread`` tokens, so a tile is ``tokens`` tokens; K is staged
    ``chunk`` channels at a time. PV: ``rows // pv_rows`` row groups x ``dim_lanes`` lanes, each lane
    ``pv_rows`` rows x :meth:`dims_per_lane` output dims. Envelope: ``d_qk % 8 == 0`` (16-byte K loads)
    and ``d_v % 4 == 0`` (8-byte V loads)."""

    rows: int  # query rows per work-group
    threads: int  # work-group size
    chunk: int = 32  # K channels staged per step, a multiple of 8
    rows_per_thread: int = 8  # QK, a multiple of 4
    tokens_per_thread: int = 2  # QK
    pv_rows: int = 8  # PV rows per work-item, a multiple of 4

    kernel: ClassVar[str] = "mla_decode_split_staged"

    @property
    def token_lanes(self) -> int:
        return self.threads // (self.rows // self.rows_per_thread)

    @property
    def tokens(self) -> int:
        return self.token_lanes * self.tokens_per_thread

    @property
    def dim_lanes(self) -> int:
        return self.threads // (self.rows // self.pv_rows)

    def dims_per_lane(self, d_v: int) -> int:
        per_lane = math.ceil(d_v / self.dim_lanes)
        return math.ceil(per_lane / 4) * 4

    def well_formed(self) -> bool:
        """The divisibility the kernel's index arithmetic assumes."""
        rg, pg = self.rows // self.rows_per_thread, self.rows // max(self.pv_rows, 1)
        return (self.rows_per_thread % 4 == 0 and self.pv_rows % 4 == 0 and self.chunk % 8 == 0 and
                self.chunk > 0 and self.tokens_per_thread >= 1 and self.rows % self.rows_per_thread == 0 and
                self.rows % self.pv_rows == 0 and self.threads % rg == 0 and self.threads % pg == 0 and
                self.token_lanes % self.rows_per_thread == 0)  # softmax: threads a multiple of rows

    def supports(self, d_qk: int, d_v: int) -> bool:
        return self.well_formed() and d_qk % 8 == 0 and d_v % 4 == 0

    def local_bytes(self, d_qk: int) -> int:
        tn = self.tokens
        buf = max(16 * tn * (self.chunk // 8 + 1), 4 * tn * self.rows)
        return buf + 4 * self.chunk * self.rows + 8 * tn + 4 * self.threads + 28 * self.rows

    def defines(self) -> dict[str, int]:
        return {"MLA_STAGED": 1, "ROWS": self.rows, "NTHREADS": self.threads, "DC": self.chunk,
                "RPT": self.rows_per_thread, "TPT": self.tokens_per_thread, "PRPT": self.pv_rows}


Config = MLAConfig | StagedConfig


def choose_rowwise_config(limits: DeviceLimits, d_qk: int) -> MLAConfig:
    """The largest row-wise tile that fits the device's local memory and work-group limits: 16 rows x 128
    tokens (46 KiB of local memory at d_qk = 576) where it fits, smaller otherwise."""
    for rows in (16, 8):
        for tokens in (128, 64, 32, 16):
            cfg = MLAConfig(rows, tokens)
            if cfg.threads <= limits.max_work_group_size and cfg.local_bytes(d_qk) <= limits.local_mem_size:
                return cfg
    raise RuntimeError(f"deepport.opencl: no MLA tile fits {limits.label} (local memory {limits.local_mem_size} "
                       f"bytes, work-group {limits.max_work_group_size}) at d_qk={d_qk}")


def staged_candidates(rows: int) -> list[StagedConfig]:
    """Staged tiles in order of preference for a call with ``rows`` query rows per KV head (``s_q * h_q /
    h_kv``): 8 or 16 rows per work-group for up to 8 or 16 rows, 256-token tiles first (128 work-items at 8
    rows, 256 at 16), then smaller ones for devices with less local memory or smaller work-groups. More rows
    (compute-bound): 16 rows x 128 work-items first, which measured fastest at h_q = 128 on an H200 through
    NVIDIA's OpenCL (6924 us, against 7450 us for 16 x 256 and 7936 us for 32 x 256 at 16 rows per
    work-item; b=128 s_k=4096, 2026-12-01), then the 32-row tiles."""
    if rows <= 8:
        return [StagedConfig(8, 128), StagedConfig(8, 64), StagedConfig(8, 64, chunk=16)]
    if rows <= 16:
        return [StagedConfig(16, 256), StagedConfig(16, 128), StagedConfig(16, 128, chunk=16)]
    return [StagedConfig(16, 128), StagedConfig(32, 256, rows_per_thread=16), StagedConfig(32, 256),
            StagedConfig(16, 256), StagedConfig(16, 128, chunk=16)]


def choose_config(limits: DeviceLimits, d_qk: int, d_v: int, rows: int) -> Config:
    """The split kernel and its tile for a call (head dims, query rows per KV head) on a device.

    The staged kernel where its envelope holds (``d_qk % 8 == 0``, ``d_v % 4 == 0``), the device has real
    local memory (``local_mem_is_global`` false: on a CPU driver staging only copies memory to memory) and
    a staged tile fits its local memory and work-group size; the row-wise kernel otherwise."""
    if not limits.local_mem_is_global:
        for cfg in staged_candidates(rows):
            if (cfg.supports(d_qk, d_v) and cfg.threads <= limits.max_work_group_size and
                    cfg.local_bytes(d_qk) <= limits.local_mem_size):
                return cfg
    return choose_rowwise_config(limits, d_qk)


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

    def __init__(self, rt: Runtime, call: MLADecodeCall, cfg: Config | None = None,
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
        rows = sig.s_q * sig.h_q // sig.h_kv
        self.cfg = cfg or choose_config(rt.limits, sig.d_qk, sig.d_v, rows)
        if not self.cfg.supports(sig.d_qk, sig.d_v):
            raise ValueError(f"deepport.opencl: {self.cfg} does not support d_qk={sig.d_qk}, d_v={sig.d_v}")
        self.row_tiles = math.ceil(rows / self.cfg.rows)
        self.combine_threads = min(128, rt.limits.max_work_group_size)
        defines = {"D_QK": sig.d_qk, "D_V": sig.d_v, "IS_HALF": int(sig.dtype == torch.float16),
                   "COMBINE_THREADS": self.combine_threads, **self.cfg.defines()}
        self.split = rt.kernel(SOURCE, self.cfg.kernel, defines)
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
