"""``tests/mirror_cuda_host.py`` on the CPU (gloo group of one, triton through its interpreter): the mirrored
world of two runs the staged dispatch and the combine through the same launches as between two ranks, and the
triton steps give the torch steps' bits under it, so the host figures it takes on a GPU are of a path that
computes what it should."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from deepport.backends.torch import moe_comm, moe_routes
from deepport.backends.torch.moe_local import TORCH
from deepport.backends.triton import _runtime
from deepport.backends.triton.moe_routes import ROUTES
from deepport.bench.configs.moe import routing
from deepport.kernels import moe_combine, moe_dispatch
from tests.mirror_cuda_host import Mirror, mirrored, steps, table

pytestmark = pytest.mark.skipif(not _runtime.interpreting(), reason="the CPU check (TRITON_INTERPRET=1)")
TOKENS, HIDDEN, EXPERTS, TOPK = 40, 256, 16, 4


def assert_same_dispatch(a: Any, b: Any) -> None:
    """Two dispatch results bit for bit: payload, routes, weights, counts and the handle's routes."""
    assert isinstance(a.recv_x, torch.Tensor) and isinstance(b.recv_x, torch.Tensor)
    assert torch.equal(a.recv_x.view(torch.int16), b.recv_x.view(torch.int16))
    assert torch.equal(a.recv_topk_idx, b.recv_topk_idx)
    assert a.recv_topk_weights is not None and b.recv_topk_weights is not None
    assert torch.equal(a.recv_topk_weights, b.recv_topk_weights)
    assert a.num_recv_tokens_per_expert == b.num_recv_tokens_per_expert
    assert torch.equal(a.handle.recv_src_idx, b.handle.recv_src_idx)
    assert torch.equal(a.handle.is_token_in_rank, b.handle.is_token_in_rank)


def test_mirror_runs_the_staged_dispatch_with_the_torch_steps_bits(one_rank: Any) -> None:
    mirror = Mirror(one_rank)
    x, idx, w = routing(TOKENS, HIDDEN, EXPERTS, TOPK, 5, torch.device("cpu"))
    with moe_comm.use_transport(mirror):  # type: ignore[arg-type]
        staged = moe_routes.dispatch(mirrored(moe_dispatch.bind(x, idx, w, EXPERTS, group=one_rank), one_rank),
                                     ROUTES)
        launches = list(mirror.launches)
        steps_ = moe_routes.dispatch(mirrored(moe_dispatch.bind(x, idx, w, EXPERTS, group=one_rank), one_rank),
                                     TORCH)
        h = staged.handle
        assert h.world_size == 2 and h.rank == 0
        sums = [moe_routes.combine(mirrored(moe_combine.bind(r.recv_x, r.handle), one_rank), local).combined_x
                for r, local in ((staged, ROUTES), (steps_, TORCH))]
    # the two exchanges of a dispatch (counts, then the payload rows for rank 1, which come back as rank 1's)
    assert [what for what, _, _ in launches] == ["moe_dispatch (counts)", "moe_dispatch"]
    assert h.recv_counts == h.send_counts and h.send_counts[1] > 0
    assert launches[1][1] >= h.send_counts[1] * HIDDEN * 2
    assert_same_dispatch(staged, steps_)
    # rows from "rank 1" are this rank's rows for rank 1: its token indices, their slots' local ids here
    mine, local = h.recv_counts[0], EXPERTS // 2
    tokens = torch.nonzero(h.is_token_in_rank[:, 1]).flatten()
    assert torch.equal(h.recv_src_idx[mine:], tokens)
    ids = idx[tokens]
    assert torch.equal(staged.recv_topk_idx[mine:], torch.where((ids >= 0) & (ids < local), ids, -1))
    a, b = (s.float() for s in sums)
    assert torch.isfinite(a).all() and ((a - b).abs() <= b.abs() * 2**-7).all()


def test_mirror_refuses_an_exchange_that_does_not_mirror(one_rank: Any) -> None:
    from deepport.kernels.moe_args import MoEGroup

    grp = MoEGroup(one_rank, 0, 2, "gloo")
    send = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="receives what it sends"):
        Mirror(one_rank).start(torch.empty(8, dtype=torch.uint8), send, [0, 3], [0, 8], grp, "x")
    with pytest.raises(RuntimeError, match="equal buffers"):
        Mirror(one_rank).start(torch.empty(4, dtype=torch.uint8), send, [0, 8], [0, 8], grp, "x")


def test_the_table_times_every_step_once(one_rank: Any) -> None:
    mirror = Mirror(one_rank)
    device = torch.device("cpu")
    with moe_comm.use_transport(mirror):  # type: ignore[arg-type]
        chosen = steps(one_rank, device, TOKENS, HIDDEN, EXPERTS, TOPK)
        lines = table(one_rank, mirror, device, 1, chosen)
    assert len(lines) == 1 + len(chosen)
    rows = {line[:42].strip(): line[42:].split() for line in lines[1:]}
    assert float(rows["triton: dispatch"][0]) > 0 and rows["triton: dispatch"][-1] == "2"
    assert rows["triton: combine"][-1] == "1" and rows["op layer (bind + choose)"][-1] == "0"


def test_the_timeline_lists_the_pieces_of_a_dispatch_in_order(one_rank: Any) -> None:
    from tests.mirror_cuda_host import dispatch_runner, timeline

    with moe_comm.use_transport(Mirror(one_rank)):  # type: ignore[arg-type]
        lines = timeline(dispatch_runner(one_rank, torch.device("cpu"), TOKENS, HIDDEN, EXPERTS, TOPK),
                         torch.device("cpu"), 2, ROUTES)
    pieces = [line.split()[-1] for line in lines[2:]]
    assert pieces[-1] == "(call)" and "steps.layout_table" in pieces and "steps.blocks_to_rows" in pieces
    starts = [float(line.split()[0]) for line in lines[2:-1]]
    assert starts == sorted(starts) and pieces.index("torch.moe_routes._read_counts") < \
        pieces.index("steps.blocks_to_rows")
    nested = next(line for line in lines if line.endswith("steps.blocks_to_rows"))
    assert nested.index("steps.") > lines[-1].index("(call)")  # inside _dispatch_blocks: indented
    # torch and Tensor methods are restored afterwards
    assert torch.empty.__module__ != __name__ and "run" not in repr(torch.Tensor.to)


def test_the_collective_prelude_gives_the_torch_steps_bits(one_rank: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing up to the read as one step over ``all_to_all_single`` (on a GPU a CUDA graph; here its eager
    record, the same work): two dispatches of one shape reuse its buffers, and each equals the torch steps."""
    from deepport.backends.triton import moe_route_graph

    monkeypatch.setattr(moe_route_graph, "collective_prelude", lambda device: True)
    mirror = Mirror(one_rank)
    got, want = [], []
    with moe_comm.use_transport(mirror):  # type: ignore[arg-type]
        for seed in (5, 6):
            x, idx, w = routing(TOKENS, HIDDEN, EXPERTS, TOPK, seed, torch.device("cpu"))
            call = mirrored(moe_dispatch.bind(x, idx, w, EXPERTS, group=one_rank), one_rank)
            got.append(moe_routes.dispatch(call, ROUTES))
            assert [what for what, _, _ in mirror.launches[-2:]] == ["moe_dispatch (counts)", "moe_dispatch"]
            want.append(moe_routes.dispatch(call, TORCH))
        assert moe_route_graph.usage(mirror)[0] == 2  # both routings took the prelude (keyed by the transport)
    for a, b in zip(got, want, strict=True):  # the first result intact after the second call
        assert_same_dispatch(a, b)


def test_the_tool_checks_the_prelude_against_the_steps(one_rank: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.mirror_cuda_host as tool
    from deepport.backends.triton import moe_route_graph

    monkeypatch.setattr(moe_route_graph, "collective_prelude", lambda device: True)
    monkeypatch.setattr(tool, "TOKENS", TOKENS)
    monkeypatch.setattr(tool, "HIDDEN", HIDDEN)
    monkeypatch.setattr(tool, "EXPERTS", EXPERTS)
    monkeypatch.setattr(tool, "TOPK", TOPK)
    with moe_comm.use_transport(Mirror(one_rank)):  # type: ignore[arg-type]
        line = tool.check_prelude(one_rank, torch.device("cpu"))
    assert line.startswith("checks") and ": ok;" in line and "prelude calls 4," in line, line
    # the packed wire: the others' rows stored in the routing's step, then the own rows and the copy out in one
    # (not for the fourth call, whose payload is not 16-byte aligned)
    assert line.endswith("others' rows stored in it 3, finished in one step 3"), line


@pytest.mark.parametrize("prelude", [True, False], ids=["routing-step", "step-by-step"])
@pytest.mark.parametrize("shift", [2, 4, 16], ids=lambda b: f"payload-at-{b}-bytes")
def test_a_payload_that_starts_anywhere_moves_right(one_rank: Any, monkeypatch: pytest.MonkeyPatch,
                                                    prelude: bool, shift: int) -> None:
    """The triton dispatch moves rows in the widest words the payload's start allows: a contiguous ``x`` 2 or 4
    bytes past an aligned address (a view into a larger buffer) gives the torch steps' bits, through the routing
    step (whose store before the read and finish fall back where an address is not 16-byte aligned) and step by
    step; at 16 bytes the store applies. The same with outputs from an ``alloc`` that places them as far past
    aligned starts (poisoned with NaN: every row must be written)."""
    from deepport.backends.triton import moe_route_graph

    monkeypatch.setattr(moe_route_graph, "collective_prelude", lambda device: prelude)
    assert ROUTES.route_prelude is not None
    taken = ROUTES.route_prelude
    sent: list[bool] = []

    def counted(*args: Any) -> Any:
        found = taken(*args)
        sent.append(found is not None and found.sent is not None)
        return found

    steps_ = ROUTES if not prelude else dataclasses.replace(ROUTES, route_prelude=counted)
    x, idx, w = routing(TOKENS, HIDDEN, EXPERTS, TOPK, 9, torch.device("cpu"))
    room = torch.zeros(x.numel() + 16, dtype=x.dtype)
    shifted = room[shift // x.element_size():][: x.numel()].view(x.shape)
    shifted.copy_(x)
    assert int(shifted.data_ptr()) % 16 == shift % 16 and shifted.is_contiguous()
    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:  # outputs as far past aligned starts
        numel = int(torch.Size(shape).numel())
        space = torch.full((numel + 16,), float("nan")).to(dtype)
        return space[shift // space.element_size():][:numel].view(shape)

    with moe_comm.use_transport(Mirror(one_rank)):  # type: ignore[arg-type]
        call = mirrored(moe_dispatch.bind(shifted, idx, w, EXPERTS, group=one_rank), one_rank)
        assert_same_dispatch(moe_routes.dispatch(call, steps_), moe_routes.dispatch(call, TORCH))
        placed = mirrored(moe_dispatch.bind(shifted, idx, w, EXPERTS, group=one_rank, alloc=alloc), one_rank)
        assert_same_dispatch(moe_routes.dispatch(placed, steps_), moe_routes.dispatch(call, TORCH))
    if prelude:  # stored before the read only where every address allows it (the finish: the outputs' too)
        assert sent == [shift % 16 == 0] * 2, sent


def test_the_store_before_the_read_shares_one_send_buffer_and_grows_it(one_rank: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes of one group share the store's send buffer: a larger shape grows it (to at least twice its size),
    a smaller one reuses it, and a shape made before keeps the buffer it was made with; every dispatch gives the
    torch steps' bits, also a repeat of the first shape after the buffer grew."""
    from deepport.backends.triton import moe_route_graph, moe_route_send

    monkeypatch.setattr(moe_route_graph, "collective_prelude", lambda device: True)
    monkeypatch.setattr(moe_route_send, "_BUFFERS", type(moe_route_send._BUFFERS)())
    sizes = []
    with moe_comm.use_transport(Mirror(one_rank)):  # type: ignore[arg-type]
        for tokens, seed in ((TOKENS, 1), (3 * TOKENS, 2), (TOKENS // 2, 3), (TOKENS, 4)):
            x, idx, w = routing(tokens, HIDDEN, EXPERTS, TOPK, seed, torch.device("cpu"))
            call = mirrored(moe_dispatch.bind(x, idx, w, EXPERTS, group=one_rank), one_rank)
            assert_same_dispatch(moe_routes.dispatch(call, ROUTES), moe_routes.dispatch(call, TORCH))
            sizes.append(int(moe_route_send._BUFFERS[one_rank]["cpu"].numel()))
    row = sizes[0] // TOKENS  # one row for the one other rank per token (EP=2)
    assert sizes == [TOKENS * row, 3 * TOKENS * row, 3 * TOKENS * row, 3 * TOKENS * row], sizes
