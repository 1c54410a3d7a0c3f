"""The normal dispatch's routing up to its one host read as one CUDA graph per shape (``LocalSteps.route_prelude``).

Before the dispatch can size its outputs it must know how many rows every source sends: the layout (which
ranks each token reaches, the count table), the count exchange, the sums of the received counts and their
copy to the host. Issued one by one these are a dozen host calls (allocations, kernels, the exchange's
launch, a blocking ``tolist``); here they are captured once per shape (tokens, top-k, experts, group,
transport) and replayed. Per call the host copies ``topk_idx`` into the graph's own input (one copy), replays
the graph, waits on an event and reads the counts from pinned memory.

The graph also leaves the running count of ``in_rank`` by rank (``[R, T]``: each token's row among a rank's
rows) for ``rows_to_blocks``. Its count exchange is the transport's one-launch fixed exchange of the same
table the eager path sends, so a rank on either path agrees with its peers. The first call of a shape runs
the same work eagerly (compiling the kernels); the second captures it. Without CUDA, inside a caller's
capture, with ``DEEPPORT_MOE_GRAPHS=0``, or where the transport has no one-launch exchange for the table,
the same steps run eagerly (``DEEPPORT_MOE_GRAPHS`` is read per call: a captured graph waits unused).

Over ``all_to_all_single`` (no transport made active: NCCL between GPUs; :func:`collective_prelude`) the same
routing is captured with the count exchange as an equal-split ``all_to_all_single`` in the graph, keyed by the
process group: the host's dozen calls before its read become one copy, one replay and the read. Given the rows
to send, a second graph replayed after it (after the event the read waits on) stores the other ranks' rows into a
send buffer of its own (:mod:`deepport.backends.triton.moe_route_send`; one more copy per call brings their
addresses), so after the read the host launches the payload's exchange at once. Every rank
captures its own graph of the same collective, so a rank replaying and a rank running it eagerly (a rank
without tokens, or one whose capture failed) meet in the same NCCL call. The exchange through the blocks that
follows over a peer transport that follows (:func:`blocks_exchange`: ``rows_to_blocks`` and ``blocks_to_rows``
reading this call's addresses from a table copied in from pinned memory, with the flags) is captured over the
routing's graph and replayed after it. Calls over one transport run on one stream (the graph's buffers are reused
from call to call in stream order): the returned ``in_rank``, ``table``, ``got``, ``cumsum`` and ``per_expert``
are valid until the next dispatch of the same shape (the exchange writes the handle's copies of ``in_rank`` and
``topk_idx``, and the caller's local ids and weights, in its kernels).
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.backends.torch import moe_comm
from deepport.backends.torch.moe_comm import RowFormat
from deepport.backends.torch.moe_local import BlockOutputs, CountedParts, PeerRows, RoutePrelude
from deepport.backends.triton._runtime import interpreting
from deepport.backends.triton.fast_launch import FastLaunch
from deepport.backends.triton.moe_blocks import _MOVE_BYTES, _WARPS, _offset, _pow2
from deepport.backends.triton.moe_permute import _guard, block_for_bytes, layout_table_into
from deepport.backends.triton.moe_permute_kernels import moe_blocks_to_rows_kernel, moe_rows_to_blocks_kernel
from deepport.backends.triton.moe_route_send import PeerStore, peer_key, peer_store
from deepport.backends.triton.moe_sum_graph import graphs_enabled
from deepport.kernels.moe_args import MoEGroup

log = logging.getLogger(__name__)

_TO_BLOCKS = FastLaunch(moe_rows_to_blocks_kernel)
_FROM_BLOCKS = FastLaunch(moe_blocks_to_rows_kernel)
_ROW_PROGRAMS = 1024  # programs per column block of the rows out of the blocks (each strides over the rows)


@dataclass
class _Program:
    tokens: int
    topk: int
    num_experts: int
    world: int
    device: torch.device
    idx: torch.Tensor = field(init=False)
    host: torch.Tensor = field(init=False)
    outputs: tuple[torch.Tensor, ...] | None = None  # this call's (the graph's own while it replays)
    graph_outputs: tuple[torch.Tensor, ...] | None = None
    graph: Any = None
    calls: int = 0
    broken: bool = False
    exchanges: dict[tuple[Any, ...], _Exchange] = field(default_factory=dict)
    peers: PeerStore | None = None  # over all_to_all_single: the other ranks' rows stored in the graph too

    def __post_init__(self) -> None:
        self.idx = torch.zeros((self.tokens, self.topk), dtype=torch.int64, device=self.device)
        num_local = self.num_experts // self.world
        pinned = self.device.type == "cuda"
        self.host = torch.zeros(2 * self.world + num_local, dtype=torch.int64, pin_memory=pinned)
        self.done = torch.cuda.Event() if pinned else None  # type: ignore[no-untyped-call]

    def record(self, grp: MoEGroup, what: str) -> tuple[torch.Tensor, ...]:
        """The routing's device work from ``self.idx``, ending with the counts' copy into ``self.host``."""
        num_local = self.num_experts // self.world
        table = torch.zeros((self.world, 1 + num_local), dtype=torch.int64, device=self.device)
        in_rank = torch.zeros((self.tokens, self.world), dtype=torch.bool, device=self.device)
        layout_table_into(self.idx, self.num_experts, self.world, in_rank, table)
        got = moe_comm.exchange_table(table, grp, f"{what} (counts)").wait()
        cumsum = torch.cumsum(in_rank.view(torch.uint8).t().contiguous(), 1, dtype=torch.int64)
        per_expert = got[:, 1: 1 + num_local].sum(0)
        counts = torch.cat([table[:, 0], got[:, 0], per_expert])
        self.host.copy_(counts, non_blocking=self.done is not None)
        return in_rank, table, got, cumsum, per_expert


@dataclass
class _Exchange:
    """One payload format's exchange through the blocks: the table of this call's addresses (entries 0-11:
    ``x``, its scales, the weights, the five outputs, this rank's first own row, the copies of ``in_rank`` and
    ``idx`` and of the local ids), the block addresses, the tensors that give the kernels their types, and
    (once captured) the graph."""

    fmt: RowFormat
    words: torch.dtype
    x_words: int
    num_scales: int
    has_weights: bool
    device: torch.device
    table: torch.Tensor = field(init=False)
    send_bases: torch.Tensor | None = None
    recv_bases: torch.Tensor | None = None
    graph: Any = None
    calls: int = 0
    broken: bool = False

    def __post_init__(self) -> None:
        self.table = torch.zeros(16, dtype=torch.int64, device=self.device)
        # the table's values go through pinned memory, rewritten at the next call only after that call's routing
        # read (an event after everything this call enqueued, the copy included)
        self.staging = torch.zeros(16, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self.like_words = torch.zeros(2, dtype=self.words, device=self.device)
        self.like_f32 = torch.zeros(2, dtype=torch.float32, device=self.device)
        self.like_i64 = torch.zeros(2, dtype=torch.int64, device=self.device)

    def prepare(self, data: torch.Tensor, scales: torch.Tensor | None, weights: torch.Tensor | None,
                outs: BlockOutputs, own_start: int) -> bool:
        """Write this call's table (one copy from pinned memory: on the lent H200's host a fraction of a kernel
        launch's ~45 us); False, nothing written, when an address is not 16-byte aligned (the graph's kernels
        assume it)."""
        if outs.in_rank is None or outs.idx is None:
            return False
        stand_in = int(self.like_i64.data_ptr())
        local_out = outs.local if outs.local_out is None else outs.local_out
        values = [int(data.data_ptr()), stand_in if scales is None else int(scales.data_ptr()),
                  stand_in if weights is None else int(weights.data_ptr()), int(outs.x.data_ptr()),
                  stand_in if outs.scales is None else int(outs.scales.data_ptr()), int(outs.src.data_ptr()),
                  int(outs.local.data_ptr()), stand_in if outs.weights is None else int(outs.weights.data_ptr())]
        copies = [int(outs.idx.data_ptr()), int(local_out.data_ptr())]
        if any(v % 16 for v in values + copies):
            return False
        self.staging.numpy()[:12] = (*values, own_start, int(outs.in_rank.data_ptr()), *copies)
        self.table.copy_(self.staging, non_blocking=self.device.type == "cuda")
        return True

    def record(self, program: _Program, grp: MoEGroup, num_local: int, what: str) -> None:
        """The exchange's device work reading the table and the routing's buffers: issued eagerly, or under a
        capture."""
        assert program.outputs is not None
        in_rank, _, got, cumsum, _ = program.outputs
        me, world, k = grp.rank, grp.world_size, program.topk
        capacity = moe_comm.rows_window_capacity(grp)
        assert capacity is not None
        full = [0 if r == me else capacity for r in range(world)]
        window = moe_comm.rows_window(full, full, grp, what)
        if window is None:
            raise RuntimeError(f"{what}: the transport refused a window of its own capacity ({capacity} bytes)")
        if self.send_bases is None:
            self.send_bases = _addresses(window.send, self.device)
        fmt, has_scales = self.fmt, self.num_scales > 0
        meta_width = fmt.widths[fmt.names.index("meta")]
        block = block_for_bytes(self.x_words, self.like_words.element_size(), _MOVE_BYTES)
        columns = -(-self.x_words // block)
        scales_pow2 = _pow2(max(self.num_scales, 1))
        with _guard(self.device):
            _TO_BLOCKS((program.tokens, columns), self.like_words, self.like_f32, program.idx, self.like_f32,
                       in_rank.view(torch.uint8), cumsum, self.send_bases, self.like_words, self.like_f32,
                       self.like_i64, self.like_i64, self.like_f32, 0, me, me * num_local, num_local, program.tokens,
                       self.x_words, self.num_scales, max(self.num_scales, 1), 1, fmt.row_bytes, _offset(fmt, "scales"),
                       _offset(fmt, "meta"), self.table, 0, self.table, 0, world, k, _pow2(k), meta_width,
                       _pow2(meta_width), has_scales, self.has_weights, block, scales_pow2, True, 0, False,
                       num_warps=_WARPS)
        got_parts = window.receive()
        if self.recv_bases is None:
            self.recv_bases = _addresses(got_parts, self.device)
        counts = got[:, 0]
        with _guard(self.device):
            _FROM_BLOCKS((_ROW_PROGRAMS, columns), self.recv_bases, counts, counts.stride(0), self.like_words,
                         self.like_f32, self.like_i64, self.like_i64, self.like_f32, me, self.x_words, self.num_scales,
                         fmt.row_bytes, _offset(fmt, "scales"), _offset(fmt, "meta"), me * num_local, num_local,
                         self.table, world, k, _pow2(k), has_scales, self.has_weights, block, scales_pow2, True,
                         num_warps=_WARPS)
        window.release()


def _addresses(parts: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    return torch.tensor([0 if p is None else int(p.data_ptr()) for p in parts], dtype=torch.int64).to(device)


def blocks_exchange(pre: RoutePrelude, fmt: RowFormat, data: torch.Tensor, scales: torch.Tensor | None,
                    weights: torch.Tensor | None, sends: list[int], recvs: list[int], outs: BlockOutputs,
                    grp: MoEGroup, num_local: int, what: str) -> bool:
    """``LocalSteps.blocks_exchange``: the normal dispatch's exchange through the blocks (``rows_to_blocks`` and
    ``blocks_to_rows`` with the flags) after :func:`route_prelude`, replayed as a CUDA graph once the routing's
    own graph is captured (module docstring); False, nothing started, where it does not apply (the caller checked
    that every part fits a block)."""
    program = pre.state
    if not isinstance(program, _Program) or program.outputs is None or "meta" not in fmt.names \
            or not moe_comm.offers_rows_window(grp):
        return False
    x = data.contiguous()
    raw = x.view(torch.uint8)
    words = next((w for w in (torch.int64, torch.int32, torch.int16)
                  if int(raw.shape[1]) % w.itemsize == 0 and fmt.row_bytes % w.itemsize == 0), None)
    if words is None or (scales is not None and not scales.is_contiguous()) or \
            (weights is not None and not weights.is_contiguous()):
        return False
    x_words = int(raw.shape[1]) // words.itemsize
    num_scales = 0 if scales is None else int(scales.shape[1])
    key = (fmt, words, x_words, num_scales, weights is not None)
    exchange = program.exchanges.get(key)
    if exchange is None:
        exchange = program.exchanges[key] = _Exchange(fmt, words, x_words, num_scales, weights is not None,
                                                      data.device)
    if not exchange.prepare(x, scales, weights, outs, sum(recvs[:grp.rank])):
        return False
    static = _replayed(program)
    if exchange.graph is not None and static and graphs_enabled():
        moe_comm.raise_if_transport_failed(what)
        exchange.graph.replay()
    elif exchange.graph is None and exchange.calls and static and _may_capture(data.device, program) \
            and not exchange.broken:
        graph = torch.cuda.CUDAGraph()  # the routing's buffers are the graph's own from now on: capture over them
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                exchange.record(program, grp, num_local, what)
        except RuntimeError as exc:
            exchange.broken = True
            log.warning("%s: capturing the exchange as a CUDA graph failed (%s); it runs eagerly from now on", what,
                        exc)
            exchange.record(program, grp, num_local, what)
        else:
            exchange.graph = graph
            graph.replay()
    else:
        exchange.record(program, grp, num_local, what)
    exchange.calls += 1
    return True


_PROGRAMS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], _Program]] = weakref.WeakKeyDictionary()


def route_prelude(idx: torch.Tensor, num_experts: int, grp: MoEGroup, what: str,
                  peers: PeerRows | None = None) -> RoutePrelude | None:
    """``LocalSteps.route_prelude``: the normal dispatch's layout, count exchange and host read of the counts for
    ``idx`` (int64 ``[T, K]``) through the active transport or ``all_to_all_single`` (module docstring); None,
    nothing started, where this path does not apply (neither a transport with a one-launch exchange for the table
    nor a collective one on a GPU, one rank, no tokens). Over ``all_to_all_single`` with ``peers`` whose tensors
    the store can read (:func:`~deepport.backends.triton.moe_route_send.peer_key`), the other ranks' rows are
    stored before the read too (the result's ``sent``, with the handle's ``copies``)."""
    transport = moe_comm.active_transport()
    world = grp.world_size
    tokens, topk = int(idx.shape[0]), int(idx.shape[1])
    if world < 2 or tokens == 0 or topk == 0:
        return None
    one_step = transport is not None and moe_comm.exchanges_in_one_step(8 * (1 + num_experts // world), grp)
    if not one_step and not (moe_comm.collective_transport(grp) and collective_prelude(idx.device)):
        return None
    store = None if one_step else peer_key(peers)  # over a collective: the others' rows in the graph too
    key = (tokens, topk, num_experts, world, grp.rank, str(idx.device), store)
    programs = _PROGRAMS.setdefault(transport if transport is not None else grp.group, {})
    program = programs.get(key)
    if program is None:
        program = programs[key] = _Program(tokens, topk, num_experts, world, idx.device)
        if store is not None:
            program.peers = peer_store(grp.group, store, tokens, topk, world, grp.rank, idx.device)
    program.idx.copy_(idx)
    copies = program.peers.prepare(peers, topk) if program.peers is not None and peers is not None else None
    if program.graph is not None and graphs_enabled():
        moe_comm.raise_if_transport_failed(what)
        program.graph.replay()
        program.outputs = program.graph_outputs
    elif program.graph is None and program.calls and _may_capture(idx.device, program):
        _capture(program, grp, what)
    else:
        program.outputs = program.record(grp, what)
    program.calls += 1
    if program.done is not None:
        program.done.record()
    if program.peers is not None:  # after the event: the read does not wait for the store
        _store(program)
    if program.done is not None:
        program.done.synchronize()
    host = [int(v) for v in program.host.tolist()]  # the one host read (pinned memory, the event waited)
    assert program.outputs is not None
    in_rank, table, got, cumsum, per_expert = program.outputs
    sent = None if program.peers is None else CountedParts(program.peers.buffer, table[:, 0])
    return RoutePrelude(in_rank, table, got, cumsum, per_expert, host[:world], host[world: 2 * world],
                        host[2 * world:], program, sent, copies)


def collective_prelude(device: torch.device) -> bool:
    """Whether :func:`route_prelude` takes the routing over a collective transport (``all_to_all_single``, NCCL
    between GPUs: the count exchange is an equal split, which a CUDA graph captures like any kernel): on a GPU,
    outside Triton's interpreter. Elsewhere (gloo on CPU) the routing runs step by step, its send buffer filled
    before the read (``moe_routes._early_send``), as it does with :data:`COLLECTIVE_ENV` ``0``."""
    setting = os.environ.get(COLLECTIVE_ENV, "1").strip().lower()
    return device.type == "cuda" and not interpreting() and setting not in ("0", "false", "no", "off")


COLLECTIVE_ENV = "DEEPPORT_MOE_COLLECTIVE_PRELUDE"
"""``0``: over ``all_to_all_single`` the routing runs step by step (with the early send) on GPUs too. Ranks may
differ: both orders send the same count table and the same payload rows."""


def _may_capture(device: torch.device, program: _Program) -> bool:
    return device.type == "cuda" and not interpreting() and graphs_enabled() and not program.broken \
        and not torch.cuda.is_current_stream_capturing()


def _capture(program: _Program, grp: MoEGroup, what: str) -> None:
    """Capture ``program``'s routing and replay it (this call's); on a capture failure it runs eagerly from now on
    (logged: the same work and results, more host calls)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = program.record(grp, what)
    except RuntimeError as exc:
        program.broken = True
        log.warning("%s: capturing the routing as a CUDA graph failed (%s); it runs eagerly from now on", what, exc)
        program.outputs = program.record(grp, what)
        return
    program.graph, program.outputs, program.graph_outputs = graph, outputs, outputs
    graph.replay()


def finish_sent(pre: RoutePrelude, outs: BlockOutputs, own_start: int, window: moe_comm.RowsWindow) -> bool:
    """``LocalSteps.finish_sent``: after :func:`route_prelude` stored the other ranks' rows and their exchange
    began, this rank's own rows and the copy out (:meth:`~deepport.backends.triton.moe_route_send.PeerStore.finish`;
    CUDA graphs once the routing's own is replayed); False, nothing started, where it does not apply."""
    program = pre.state
    if not isinstance(program, _Program) or program.peers is None or program.outputs is None or pre.sent is None:
        return False
    return program.peers.finish(program.idx, program.outputs, outs, own_start, window,
                                program.num_experts // program.world, _replayed(program),
                                _may_capture(program.device, program))


def _store(program: _Program) -> None:
    """The store of the other ranks' rows (:mod:`~deepport.backends.triton.moe_route_send`) over the routing's
    outputs: its own graph once the routing's is replayed (captured at the first replay), else eagerly."""
    assert program.peers is not None and program.outputs is not None
    in_rank, table, _, cumsum, _ = program.outputs
    program.peers.store(program.idx, in_rank, table, cumsum, program.num_experts // program.world,
                        _replayed(program), _may_capture(program.device, program))


def _replayed(program: _Program) -> bool:
    """Whether this call's routing outputs are its graph's own (the graph was replayed): steps captured over them
    may replay too."""
    return program.graph is not None and program.outputs is program.graph_outputs


def usage(transport: object) -> tuple[int, int, int, int]:
    """``(calls, graphs, exchanges, exchange graphs)``: the dispatches whose routing took this path over
    ``transport`` and the shapes captured; the exchanges that took :func:`blocks_exchange` and the formats
    captured."""
    programs = list(_PROGRAMS.get(transport, {}).values())
    exchanges = [e for p in programs for e in p.exchanges.values()]
    return (sum(p.calls for p in programs), sum(p.graph is not None for p in programs),
            sum(e.calls for e in exchanges), sum(e.graph is not None for e in exchanges))
