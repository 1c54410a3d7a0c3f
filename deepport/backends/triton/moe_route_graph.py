"""The normal dispatch's routing up to its one host read as one CUDA graph per shape (``LocalSteps.route_prelude``).

Before the dispatch can size its outputs it must know how many rows every source sends: the layout (which
ranks each token reaches, the count table), the count exchange, the sums of the received counts and their
copy to the host. Issued one by one these are a dozen host calls (allocations, kernels, the exchange's
launch, a blocking ``tolist``); here they are captured once per shape (tokens, top-k, experts, group,
transport) and replayed. Per call the host copies ``topk_idx`` into the graph's own input (one copy), replays
the graph, waits on an event and reads the counts from pinned memory, then clones ``in_rank`` (the handle
keeps it).

The graph also leaves the running count of ``in_rank`` by rank (``[R, T]``: each token's row among a rank's
rows) for ``rows_to_blocks``. Its count exchange is the transport's one-launch fixed exchange of the same
table the eager path sends, so a rank on either path agrees with its peers. The first call of a shape runs
the same work eagerly (compiling the kernels); the second captures it. Without CUDA, inside a caller's
capture, with ``DEEPPORT_MOE_GRAPHS=0``, or where the transport has no one-launch exchange for the table,
the same steps run eagerly. Calls over one transport run on one stream (the graph's buffers are reused
from call to call in stream order): the returned ``table``, ``got``, ``cumsum`` and ``per_expert`` are valid
until the next dispatch of the same shape.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.backends.torch import moe_comm
from deepport.backends.torch.moe_local import RoutePrelude
from deepport.backends.triton._runtime import interpreting
from deepport.backends.triton.moe_permute import layout_table_into
from deepport.backends.triton.moe_sum_graph import graphs_enabled
from deepport.kernels.moe_args import MoEGroup

log = logging.getLogger(__name__)


@dataclass
class _Program:
    tokens: int
    topk: int
    num_experts: int
    world: int
    device: torch.device
    idx: torch.Tensor = field(init=False)
    host: torch.Tensor = field(init=False)
    outputs: tuple[torch.Tensor, ...] | None = None
    graph: Any = None
    calls: int = 0
    broken: bool = False

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


_PROGRAMS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], _Program]] = weakref.WeakKeyDictionary()


def route_prelude(idx: torch.Tensor, num_experts: int, grp: MoEGroup, what: str) -> RoutePrelude | None:
    """``LocalSteps.route_prelude``: the normal dispatch's layout, count exchange and host read of the counts for
    ``idx`` (int64 ``[T, K]``) through the active transport (module docstring); None, nothing started, where
    this path does not apply (no transport with a one-launch exchange for the table, one rank, no tokens)."""
    transport = moe_comm.active_transport()
    world = grp.world_size
    tokens, topk = int(idx.shape[0]), int(idx.shape[1])
    if transport is None or world < 2 or tokens == 0 or topk == 0 \
            or not moe_comm.exchanges_in_one_step(8 * (1 + num_experts // world), grp):
        return None
    key = (tokens, topk, num_experts, world, grp.rank, str(idx.device))
    programs = _PROGRAMS.setdefault(transport, {})
    program = programs.get(key)
    if program is None:
        program = programs[key] = _Program(tokens, topk, num_experts, world, idx.device)
    program.idx.copy_(idx)
    if program.graph is not None:
        moe_comm.raise_if_transport_failed(what)
        program.graph.replay()
    elif program.calls and _may_capture(idx.device, program):
        _capture(program, grp, what)
    else:
        program.outputs = program.record(grp, what)
    program.calls += 1
    if program.done is not None:
        program.done.record()
        program.done.synchronize()
    host = [int(v) for v in program.host.tolist()]  # the one host read (pinned memory, the event waited)
    assert program.outputs is not None
    in_rank, table, got, cumsum, per_expert = program.outputs
    return RoutePrelude(in_rank.clone(), table, got, cumsum, per_expert, host[:world], host[world: 2 * world],
                   host[2 * world:])


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
    program.graph, program.outputs = graph, outputs
    graph.replay()


def usage(transport: object) -> tuple[int, int]:
    """``(calls, graphs)``: the dispatches whose routing took this path over ``transport``, the shapes captured."""
    programs = _PROGRAMS.get(transport, {})
    return sum(p.calls for p in programs.values()), sum(p.graph is not None for p in programs.values())
