"""The normal combine through a peer transport's blocks as one CUDA graph per shape (``LocalSteps.sum_in_place``).

``deepport bench`` times the normal combine with CUDA events around one eager call, so the host's launches
count wherever the GPU waits for them; issued one by one, the combine's device work (wait for the peers'
acknowledgements, each part of the rows into its source's block, raise and await the data flags, the
per-token sum, acknowledge) costs far more host time than GPU time. Here that work is captured once per shape
(tokens, columns, dtypes, group, transport) and replayed; what changes from call to call (the rows' and the
output's addresses, the handle's counts and ``in_rank``) reaches the graph's kernels through a small table
that one eager kernel writes before each replay (:mod:`.moe_sum_graph_kernels`). Per call the host launches
two things: that kernel and the graph.

The bytes, flags and order of the terms are those of :func:`deepport.backends.torch.moe_routes.return_rows`'
window path with ``rank_rows_at`` (a rank on either path agrees with its peers; the sums have the same bits).
The first call of a shape runs the same kernels eagerly (compiling them); the second captures them. Without
CUDA (the interpreter, CPU transports), inside a caller's own graph capture, or with
``DEEPPORT_MOE_GRAPHS=0`` (read per call: a captured graph waits unused), every call runs them eagerly (still
through the table). Calls of one transport
run on one stream (the table and the graph's copies of ``in_rank`` are reused from call to call in stream
order).
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.backends.torch import moe_comm
from deepport.backends.triton._runtime import interpreting
from deepport.backends.triton.fast_launch import FastLaunch
from deepport.backends.triton.moe_permute import _guard, _sum_tiling, block_for_bytes
from deepport.backends.triton.moe_permute_kernels import moe_rank_rows_kernel
from deepport.backends.triton.moe_sum_graph_kernels import (
    MAX_WORLD,
    TABLE_SIZE,
    moe_parts_to_blocks_kernel,
    moe_sum_table_kernel,
)
from deepport.kernels.moe_args import MoEGroup
from deepport.kernels.moe_handle import MoEHandle

log = logging.getLogger(__name__)

_TABLE = FastLaunch(moe_sum_table_kernel)
_PARTS = FastLaunch(moe_parts_to_blocks_kernel)
_SUM = FastLaunch(moe_rank_rows_kernel)
_PARTS_PROGRAMS = 1024  # programs per column block of the part copies (each strides over its part's rows)
_MOVE_BYTES = 2048  # bytes of a row per program, 2 warps (the row-moving kernels' measured best on the H200)
_SCAN_BLOCK = 1024


def graphs_enabled() -> bool:
    """``DEEPPORT_MOE_GRAPHS`` (default ``1``): whether the normal combine's work is replayed as a CUDA graph."""
    return os.environ.get("DEEPPORT_MOE_GRAPHS", "1").strip() not in ("0", "false", "no", "off")


def _word(row_bytes: int) -> torch.dtype:
    for wide in (torch.int64, torch.int32, torch.int16):
        if row_bytes % wide.itemsize == 0:
            return wide
    return torch.uint8


@dataclass
class _Program:
    """One shape's table, copies of ``in_rank``, block addresses and (after its second call) graph."""

    tokens: int
    cols: int
    world: int
    me: int
    capacity: int
    rows_dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device
    table: torch.Tensor = field(init=False)
    flags: torch.Tensor = field(init=False)
    cumsum: torch.Tensor = field(init=False)
    send_bases: torch.Tensor | None = None
    recv_bases: torch.Tensor | None = None
    graph: Any = None
    calls: int = 0
    broken: bool = False

    def __post_init__(self) -> None:
        self.table = torch.zeros(TABLE_SIZE, dtype=torch.int64, device=self.device)
        self.flags = torch.zeros((self.tokens, self.world), dtype=torch.uint8, device=self.device)
        self.cumsum = torch.zeros((self.world, self.tokens), dtype=torch.int64, device=self.device)
        self.row_bytes = self.cols * torch.empty((), dtype=self.rows_dtype).element_size()
        self.word = torch.empty(1, dtype=_word(self.row_bytes), device=self.device)
        self.like = torch.empty(1, dtype=self.rows_dtype, device=self.device)
        # the interpreter rounds float32 to 16 bits wrongly: there the sums land in float32, torch rounds them
        self.scratch = torch.empty((self.tokens, self.cols), dtype=torch.float32, device=self.device) \
            if interpreting() and self.out_dtype != torch.float32 else None
        self.out_like = torch.empty(1, dtype=self.out_dtype if self.scratch is None else torch.float32,
                                    device=self.device)

    def prepare(self, rows: torch.Tensor, out: torch.Tensor, in_rank: torch.Tensor, sends: list[int]) -> None:
        """The eager kernel: this call's table and ``in_rank``'s copy and running counts."""
        starts = [sum(sends[:r]) for r in range(self.world)]
        counts = [0 if r == self.me else c for r, c in enumerate(sends)]
        pad = [0] * (MAX_WORLD - self.world)
        flags = in_rank.contiguous().view(torch.uint8)
        target = out if self.scratch is None else self.scratch
        with _guard(self.device):
            _TABLE((self.world,), self.table, rows, target, int(rows.data_ptr()) + starts[self.me] * self.row_bytes,
                   flags, self.flags, self.cumsum, self.tokens, *starts, *pad, *counts, *pad, self.world, _SCAN_BLOCK,
                   num_warps=4)

    def record(self, grp: MoEGroup, what: str) -> None:
        """The combine's device work reading the table: issued eagerly, or under a graph capture."""
        full = [0 if r == self.me else self.capacity for r in range(self.world)]
        window = moe_comm.rows_window(full, full, grp, what)
        if window is None:
            raise RuntimeError(f"{what}: the transport refused a window of its own capacity ({self.capacity} bytes)")
        send = tuple(0 if p is None else int(p.data_ptr()) for p in window.send)
        if self.send_bases is None:
            self.send_bases = torch.tensor(send, dtype=torch.int64).to(self.device)
        words = self.row_bytes // self.word.element_size()
        block = block_for_bytes(words, self.word.element_size(), _MOVE_BYTES)
        with _guard(self.device):
            _PARTS((_PARTS_PROGRAMS, -(-words // block)), self.table, self.send_bases, self.word, self.me, words,
                   self.world, block, num_warps=2)
        got = window.receive()
        recv = tuple(0 if g is None else int(g.data_ptr()) for g in got)
        if self.recv_bases is None:
            self.recv_bases = torch.tensor(recv, dtype=torch.int64).to(self.device)
        block, warps = _sum_tiling(self.cols, self.like.element_size())
        with _guard(self.device):
            _SUM((self.tokens, -(-self.cols // block)), self.like, self.flags, self.cumsum, self.recv_bases, 0,
                 self.me, self.out_like, self.cols, self.tokens, self.table, self.world, block, True, num_warps=warps)
        window.release()


_PROGRAMS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], _Program]] = weakref.WeakKeyDictionary()


def sum_in_place(rows: torch.Tensor, handle: MoEHandle, grp: MoEGroup, out: torch.Tensor, what: str) -> bool:
    """``LocalSteps.sum_in_place``: the normal combine's return of ``rows`` (``[num_recv, ...]``, 16-bit) to
    their sources summed per token into ``out`` (``[num_tokens, ...]``) through the active transport's blocks
    (module docstring); False, nothing started, where this path does not apply (no transport with blocks,
    more ranks than top-k slots or than :data:`MAX_WORLD`, rows not dense and 16-byte aligned, a part larger
    than a block)."""
    transport = moe_comm.active_transport()
    capacity = moe_comm.rows_window_capacity(grp)
    world, me, t = grp.world_size, grp.rank, handle.num_tokens
    if transport is None or capacity is None or not 2 <= world <= min(MAX_WORLD, handle.num_topk) or t == 0:
        return False
    cols = int(torch.Size(rows.shape[1:]).numel())
    width = rows.element_size() * cols
    sends, recvs = list(handle.recv_counts), list(handle.send_counts)
    if width == 0 or width % 16 or int(rows.data_ptr()) % 16 or not rows.is_contiguous() \
            or not out.is_contiguous() or max(sends + recvs) * width > capacity:
        return False
    device = rows.device
    key = (t, cols, rows.dtype, out.dtype, world, me, capacity, str(device))
    programs = _PROGRAMS.setdefault(transport, {})
    program = programs.get(key)
    if program is None:
        program = programs[key] = _Program(t, cols, world, me, capacity, rows.dtype, out.dtype, device)
    program.prepare(rows, out, handle.is_token_in_rank, sends)
    if program.graph is not None and graphs_enabled():
        moe_comm.raise_if_transport_failed(what)
        program.graph.replay()
    elif program.graph is None and program.calls and _may_capture(device, program):
        _capture(program, grp, what)
    else:
        program.record(grp, what)
    program.calls += 1
    if program.scratch is not None:
        out.view(t, cols).copy_(program.scratch)
    return True


def _may_capture(device: torch.device, program: _Program) -> bool:
    return device.type == "cuda" and not interpreting() and graphs_enabled() and not program.broken \
        and not torch.cuda.is_current_stream_capturing()


def _capture(program: _Program, grp: MoEGroup, what: str) -> None:
    """Capture ``program``'s work and replay it (this call's work); on a capture failure run it eagerly from now
    on and log why (the same kernels and results, only more host calls)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            program.record(grp, what)
    except RuntimeError as exc:  # e.g. a launch the capture refused: nothing of this call has run
        program.broken = True
        log.warning("%s: capturing the combine as a CUDA graph failed (%s); it runs eagerly from now on", what, exc)
        program.record(grp, what)
        return
    program.graph = graph
    graph.replay()


def usage(transport: object) -> tuple[int, int]:
    """``(calls, graphs)``: the combines that took this path over ``transport``, and the shapes captured."""
    programs = _PROGRAMS.get(transport, {})
    return sum(p.calls for p in programs.values()), sum(p.graph is not None for p in programs.values())
