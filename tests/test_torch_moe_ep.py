"""The torch backend's expert-parallel path: collectives per call, host syncs, ragged and empty ranks,
agreement with the reference backend (handles crossing backends), a stalled peer, and the index steps.

Multi-rank tests run ranks as gloo processes (``deepport.conformance.rank_group``); the rank jobs live
in ``tests/moe_ep_probe.py``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from moe_ep_probe import bf16_ulps, probe

from deepport.backends.torch.moe_comm import RowFormat, same_bits
from deepport.backends.torch.moe_index import compact, first_occurrence, running_slot, slot_weight_sums
from deepport.conformance.rank_group import rank_group
from deepport.conformance.tolerance import tolerance

JOBS = "tests.moe_ep_probe"
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden=256, experts=16, topk=4, t_max=16)


def _run(job: str, world: int, **kwargs: Any) -> list[Any]:
    return rank_group(world, "cpu").run(f"{JOBS}:{job}", world, **kwargs)


# --- one payload collective per direction ---------------------------------------------------------


@pytest.mark.parametrize("world, tokens", [(2, (12, 7)), (4, (6, 0, 9, 3))])
def test_each_direction_moves_its_payload_in_one_collective(world: int, tokens: tuple[int, ...]) -> None:
    params = dict(world=world, tokens=tokens, **SMALL)
    per_rank = _run("measure_all", world, params=params)
    num_local = SMALL["experts"] // world
    for rank, ops in enumerate(per_rank):
        names = {op: [c[0] for c in rec["collectives"]] for op, rec in ops.items()}
        assert all(n == "all_to_all_single" for ns in names.values() for n in ns), names
        count = {op: len(ns) for op, ns in names.items()}
        # normal and expanded dispatch: the count table (int64 [world, 1 + L]) then the payload
        for op in ("moe_dispatch", "moe_dispatch_expanded"):
            table, payload = ops[op]["collectives"]
            assert count[op] == 2 and table[1] == world * (1 + num_local) * 8 and table[2] == ("int64",), ops[op]
            assert payload[2] == ("uint8",)
            assert ops[op]["syncs"] == {"tolist": 1}, (rank, op, ops[op]["syncs"])
        assert count["moe_combine"] == count["moe_combine_expanded"] == count["moe_dispatch (cached)"] == 1
        assert count["moe_low_latency_dispatch"] == count["moe_low_latency_dispatch (fp8)"] == 1
        # low-latency combine: the forwarded weights (float32 [world * T_max, K]) and the payload
        weights, payload = ops["moe_low_latency_combine"]["collectives"]
        assert weights[1] == world * SMALL["t_max"] * SMALL["topk"] * 4
        for op in ("moe_combine", "moe_combine_expanded", "moe_dispatch (cached)", "moe_low_latency_dispatch",
                   "moe_low_latency_dispatch (fp8)", "moe_low_latency_combine"):
            assert ops[op]["syncs"] == {}, (rank, op, ops[op]["syncs"])
        assert all(rec["host_tensors"] == 0 for rec in ops.values()), {op: r["host_tensors"] for op, r in ops.items()}


def test_low_latency_combine_sends_bf16_rows_without_weights_when_one_expert_per_rank() -> None:
    per_rank = _run("measure_all", 2, params=dict(world=2, tokens=(5, 8), hidden=256, experts=2, topk=2, t_max=8))
    for ops in per_rank:
        ((_, sent, dtypes),) = ops["moe_low_latency_combine"]["collectives"]
        assert dtypes == ("bfloat16",) and sent == 2 * 8 * 256 * 2


# --- the low-latency path never waits for the device ---------------------------------------------


@pytest.mark.parametrize("world, tokens, use_fp8", [(1, (9,), True), (2, (16, 3), False), (2, (0, 11), True),
                                                    (4, (5, 12, 0, 7), False)])
def test_low_latency_dispatch_and_combine_make_no_host_sync(world: int, tokens: tuple[int, ...],
                                                           use_fp8: bool) -> None:
    params = dict(world=world, tokens=tokens, **SMALL)
    if world == 1:
        from moe_ep_probe import low_latency_without_sync

        results = [low_latency_without_sync(0, None, torch.device("cpu"), params, use_fp8=use_fp8)]
    else:
        results = _run("low_latency_without_sync", world, params=params, use_fp8=use_fp8)
    for r in results:  # probe(forbid_syncs=True) raised inside the job on any sync
        assert r["host_tensors"] == 0
        assert r["dtype"] == "torch.bfloat16" and r["bf16_steps_from_reference"] <= 1


def test_probe_catches_host_syncs() -> None:
    t = torch.arange(6)
    for sync in (lambda: t.tolist(), lambda: int(t.sum()), lambda: t[t > 2], lambda: t.nonzero()):
        with pytest.raises(AssertionError, match="host sync"), probe(forbid_syncs=True):
            sync()
    with probe(forbid_syncs=True) as p:
        compact(t > 2, 3)
        torch.tensor([1, 2])
    assert p.num_syncs == 0 and p.host_tensors == 1


# --- ragged worlds, empty ranks, agreement with the reference backend ---------------------------


@pytest.mark.parametrize("world, params", [
    (2, dict(tokens=(13, 0))),  # rank 1 sends nothing
    (3, dict(tokens=(9, 0, 5), experts=12, topk=2)),  # no tokens and more ranks than slots (low-latency)
    (3, dict(tokens=(7, 0, 11), experts=12, dup=0.3, fp8=True)),
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2)),
    (2, dict(tokens=(6, 10), experts=2, topk=2, dup=0.5)),  # one expert per rank: bf16 rows back
    (4, dict(tokens=(4, 9, 2, 7), topk=1)),  # top-1: bf16 rows back
    (4, dict(tokens=(6, 3, 8, 5), experts=8, topk=8)),  # more slots than ranks, every expert picked
])
def test_torch_and_reference_agree_and_share_handles(world: int, params: dict[str, Any]) -> None:
    p = {**SMALL, "world": world, **params}
    for rank, bad in enumerate(_run("agreement", world, params=p, seed=3)):
        assert bad == [], f"rank {rank}: {bad}"


def test_tokens_routed_nowhere_move_nothing() -> None:
    for rank, bad in enumerate(_run("nothing_routed", 2, params=dict(world=2, tokens=(9, 6), **SMALL))):
        assert bad == [], f"rank {rank}: {bad}"


# --- a stalled peer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("into", [False, True])
@pytest.mark.parametrize("world, tokens", [(2, (10, 0)), (3, (7, 12, 4))])
def test_optional_take_rows_and_sum_rows_steps_run_on_every_rank(world: int, tokens: tuple[int, ...],
                                                                 into: bool) -> None:
    """A backend's ``take_rows`` (opencl's kernels) or ``take_rows_into`` (triton's) and ``sum_rows`` replace
    the transport's own gather and per-token sums: used on every rank, same bits moved, combines within one
    bf16 step (summation order)."""
    params = {**SMALL, "experts": 12, "world": world, "tokens": tokens}
    take = "take_rows_into" if into else "take_rows"
    for rank, got in enumerate(_run("optional_steps", world, params=params, seed=4, into=into)):
        assert not got["bad"], (rank, got["bad"])
        assert got["used"].get(take, 0) >= 2 and got["used"].get("sum_rows", 0) >= 4, (rank, got["used"])
        assert got["bf16_steps"] <= 1, (rank, got)


@pytest.mark.parametrize("world, params", [
    (2, dict(tokens=(13, 0))),  # rank 1 sends nothing
    (3, dict(tokens=(9, 0, 5), experts=12, topk=2)),  # more ranks than slots
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2)),
    (2, dict(tokens=(6, 10), experts=2, topk=2, dup=0.5)),  # one expert per rank: bf16 rows back
    (4, dict(tokens=(6, 3, 8, 5), experts=8, topk=8)),  # every expert picked, full blocks
])
def test_triton_low_latency_steps_give_the_torch_routes_rows_and_sums(world: int, params: dict[str, Any]) -> None:
    """The triton backend's sender (routes, meta and FP8-cast rows in one kernel; also torch's sender in front
    of triton's receiver), receive routes (one program per local expert), source-side placement, the combine's
    terms per token and per received slot (one kernel each) and their sums, on gloo ranks: the torch steps'
    routes and rows bit for bit, the combines too; each optional step ran on every rank."""
    pytest.importorskip("triton")
    p = {**SMALL, "world": world, **params}
    for rank, got in enumerate(_run("low_latency_steps", world, params=p, seed=6)):
        assert got["bad"] == [], (rank, got["bad"])
        # two dispatches (bf16, FP8) per variant: triton's one-kernel sender, or torch's sender
        used = got["used"]
        assert used.get("low_latency_send_rows") == 2 and used.get("low_latency_receive") == 4, (rank, got)
        # received rows: bf16 (one part), FP8 and scales (two parts, one kernel): one step per dispatch
        assert used.get("scatter_row_pair", 0) == 4 and used.get("scatter_rows", 0) == 0, (rank, got)
        single = p["topk"] == 1 or p["experts"] == world
        # two combines on triton steps: each sums per token once, and per received slot unless single
        assert got["used"].get("token_rows_into", 0) == (2 if single else 4), (rank, got)
        assert got["used"].get("low_latency_return") == 2 and got["used"].get("low_latency_pairs") == 2, (rank, got)


@pytest.mark.parametrize("wire", ["split", "packed"])
@pytest.mark.parametrize("world, params", [
    (2, dict(tokens=(13, 0))),  # rank 1 sends nothing
    (3, dict(tokens=(9, 4, 5), experts=12, topk=2)),  # more ranks than slots
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2)),
])
def test_triton_normal_combine_sums_each_token_in_one_kernel(world: int, params: dict[str, Any], wire: str) -> None:
    """The triton backend's normal dispatch counts its routing in one kernel, the count table or the counts, and
    stores its rows straight into the collective's send buffer or packs them by index (the torch steps' bits every
    way); its normal combine (no weights) sums each token's returned rows where they landed (``rank_rows_at``,
    own rows never sent where they are an end part) or through a per-token table (``token_rows_into``), straight
    into the bf16 output: the bits of its ``sum_rows`` path, within one bf16 step of torch's. ``wire``: the staged
    runs' rows split in two (payload straight into the output, side rows apart: one grouped point-to-point
    launch, ``batch_isend_irecv``) or packed into one row (one ``all_to_all_single``, copied out)."""
    pytest.importorskip("triton")
    p = {**SMALL, "world": world, "wire": wire, **params}
    split = wire == "split"
    for rank, got in enumerate(_run("normal_token_rows", world, params=p, seed=3)):
        assert got["bad"] == [], (rank, got["bad"])
        staged = world <= p["topk"]  # the staged sum needs at most one term per slot
        # dispatch: two runs staged (by table, by counts; each stores the others' rows, before the host read where
        # this rank has tokens, then its own while they travel), one packed by index, one staged by counts with
        # every row stored after the read; combine: staged (or by table where it does not apply), by table.
        # Split: the others' rows in two launches (payload, side rows), so 3 per staged run, not 2.
        stores = 2 + int(split)
        early = {"rows_to_blocks before the read": 2 * (stores - 1)} if p["tokens"][rank] else {}
        used = dict(got["used"])
        moves = used.pop("batch_isend_irecv", 0)
        prelude = {"route_prelude": 3} if p["tokens"][rank] else {}  # three dispatches, the routing in one step
        if p["tokens"][rank] and not split:  # the packed rows for the others stored in that step too, then the
            prelude["rows stored in route_prelude"] = prelude["finish_sent"] = 3  # own rows and copy out in one
        want = {"token_rows_into": 1 if staged else 2, "layout_table": 2, "layout_counts": 2,
                "rows_to_blocks": 3 * stores, **early, **({"rank_rows_at": 1} if staged else {}), **prelude}
        assert used == want, (rank, used)
        # split: each staged run's payload in one grouped launch (a rank with tokens always has some to send): three
        # runs step by step, three after the prelude
        assert (moves == 6 if p["tokens"][rank] else moves <= 6) if split else moves == 0, (rank, moves)


@pytest.mark.parametrize("world", [2, 3])
def test_a_staged_window_moves_each_part_in_one_collective(world: int) -> None:
    """The window over ``all_to_all_single`` that the staged dispatch writes into: None exactly for this rank and
    empty parts, every part's bytes arrive at its source's place, one collective however often it is begun."""
    for rank, bad in enumerate(_run("staged_window", world, ranks=world)):
        assert bad == [], (rank, bad)


@pytest.mark.parametrize("tokens, experts", [((8, 8), 16), ((9, 0, 5), 12), ((3, 11, 0, 6), 16)])
def test_a_stalled_peer_raises_a_timeout_with_a_message(tokens: tuple[int, ...], experts: int) -> None:
    """The last rank never calls the dispatch: every other rank, the one sending nothing included, gets
    MoECommTimeout naming the op, its rank and the group size, within the group's timeout."""
    world, ranks = len(tokens), rank_group(len(tokens), "cpu")
    started = time.monotonic()
    got = ranks.run(f"{JOBS}:stalled_peer", ranks.world_size, timeout_s=2.0, tokens=tokens, experts=experts)
    assert time.monotonic() - started < 30
    assert got[world - 1] == "stayed away" and all(g == "not a member" for g in got[world:]), got
    for rank, text in enumerate(got[: world - 1]):
        assert text.startswith("deepport.backends.torch.moe_comm.MoECommTimeout: moe_dispatch"), (rank, text)
        assert f"over {world} ranks failed on rank {rank}" in text and "timeout" in text, (rank, text)


# --- the pieces ------------------------------------------------------------------------------------------


def test_compact_lists_true_positions_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 5, generator=g) < 0.4
    want = mask.reshape(-1).nonzero()[:, 0]
    assert torch.equal(compact(mask, int(want.numel())), want)
    assert compact(torch.zeros(4, dtype=torch.bool), 0).numel() == 0


def test_running_slot_and_first_occurrence() -> None:
    mask = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    assert running_slot(mask).tolist() == [[0, -1], [1, 0], [-1, 1], [2, 2]]
    ids = torch.tensor([[3, 3, -1, 5], [-1, -1, 2, 2]])
    assert first_occurrence(ids).tolist() == [[True, False, False, True], [False, False, True, False]]
    w = torch.tensor([[0.5, 0.25, 1.0, 2.0], [1.0, 1.0, 4.0, 8.0]])
    assert slot_weight_sums(ids, w, torch.tensor([[3, 5, -1], [2, 3, -1]])).tolist() == [[0.75, 2.0, 0.0],
                                                                                           [12.0, 0.0, 0.0]]


def test_row_format_parts_view_one_buffer() -> None:
    fmt = RowFormat.of([("x", torch.bfloat16, 3), ("s", torch.float32, 2), ("m", torch.int32, 1)])
    assert fmt.offsets == (0, 8, 16) and fmt.row_bytes == 32
    buf = fmt.empty(4, torch.device("cpu"))
    x = torch.randn(4, 3).to(torch.bfloat16)
    fmt.part(buf, "x").copy_(x)
    fmt.part(buf, "m").fill_(-7)
    assert torch.equal(fmt.part(buf, "x"), x) and fmt.part(buf, "m").eq(-7).all()
    a, b = same_bits(fmt.part(buf, "s"), torch.zeros(4, 2))
    assert a.dtype == b.dtype and a.shape == b.shape


def test_torch_local_steps_place_rows_from_either_side() -> None:
    from deepport.backends.torch.moe_local import TORCH

    assert TORCH.scatter_rows is not None
    src = torch.randn(4, 6).to(torch.bfloat16)
    index = torch.tensor([[2, -1, 0], [3, 1, -1]])
    dst = torch.full((2, 3, 6), float("nan"), dtype=torch.bfloat16)
    TORCH.place_rows(src, dst, index, True)
    want = torch.stack([src[2], torch.zeros(6), src[0], src[3], src[1], torch.zeros(6)]).to(torch.bfloat16)
    assert torch.equal(dst.view(6, 6), want)
    storage = torch.full((2, 5, 3), float("nan"))  # [G, C, R]: a column-major [G, R, C] destination
    scales = storage.transpose(1, 2)
    rows = torch.randn(4, 5)
    TORCH.place_rows(rows, scales, index, True)
    assert torch.equal(scales[1, 1], rows[1]) and torch.equal(scales[0, 1], torch.zeros(5))
    flat = torch.full((6, 6), float("nan"), dtype=torch.bfloat16)
    TORCH.scatter_rows(src, flat.view(2, 3, 6), torch.tensor([[2, 2], [4, 4], [0, 0], [3, 3]]))
    assert torch.equal(flat[[2, 4, 0, 3]], src) and flat[[1, 5]].isnan().all()
    TORCH.scatter_rows(rows, scales, torch.tensor([[5, 5], [0, 0], [1, 1], [2, 2]]))
    assert torch.equal(scales[1, 2], rows[0]) and torch.equal(scales[0, 0], rows[1])
    empty = torch.full((1, 2, 6), 7.0).to(torch.bfloat16)
    TORCH.place_rows(src[:0], empty, torch.full((1, 2), -1), True)
    assert empty.eq(0).all()


# --- why the expanded combine does not round partial sums to bf16 ------------------------------------


def test_bf16_partial_sums_would_break_the_combine_bound() -> None:
    """Two ranks each holding two experts of a token: float32 partials (what the backend sends) meet
    the suite's 'sum' bound; the same partials rounded to bf16 before the final sum do not."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2, 2, 4096)).astype(np.float32)  # [rank, local expert, hidden]
    y = torch.from_numpy(y).to(torch.bfloat16).to(torch.float32)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, (2, 2, 1)).astype(np.float32))
    exact = (y.double() * w.double()).sum((0, 1))
    partial = (y * w).sum(1)  # float32 per rank
    bound = tolerance("moe_combine_expanded", "combined_x", "bfloat16").rtol * exact.abs()

    def worst(out: torch.Tensor) -> float:
        return float(((out.double() - exact).abs() - bound).max())

    assert worst(partial.sum(0).to(torch.bfloat16)) <= 0
    assert worst(partial.to(torch.bfloat16).to(torch.float32).sum(0).to(torch.bfloat16)) > 0


# --- launched by torchrun as two "hosts" ----------------------------------------------------------------


def test_torchrun_two_nodes_of_two_gloo_processes_run_the_moe_layer_example(tmp_path: Path) -> None:
    """What docs/EXPERT_PARALLEL.md tells a user to run on each host, with both "hosts" on this machine:
    two ``torchrun --nnodes 2`` agents meet at a c10d rendezvous, 4 gloo ranks run the example's
    expert-parallel layer (normal dispatch, grouped GEMMs, combine) and check it against float64."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "deepport-ep-test",
           "--max-restarts", "0", "-m", "deepport.examples.deepseek_v3_moe_layer", "--device", "cpu",
           "--tokens", "16", "--hidden", "256", "--intermediate", "128", "--experts", "8", "--topk", "2"]
    logs = [tmp_path / f"host{i}.log" for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True) for log in logs]
    try:
        codes = [agent.wait(timeout=150) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    text = "".join(log.read_text() for log in logs)
    assert codes == [0, 0], text
    for rank in range(4):
        assert re.search(rf"rank {rank}: DeepSeek-V3 MoE layer .* \(ok, bound", text), text


# --- GPU (run on the device machine: python -m pytest -q -m gpu tests/test_torch_moe_ep.py) -------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_low_latency_path_syncs_nothing_and_replays_as_a_cuda_graph() -> None:
    """One GPU (``group=None``): the backend's low-latency dispatch + combine run under
    ``set_sync_debug_mode("error")``, are captured in one CUDA graph, and the graph replayed on new
    inputs (written into the captured buffers) gives what an eager call gives (up to the order of the
    float32 additions of ``index_add_``)."""
    from deepport.dispatch import registry
    from deepport.kernels import moe_low_latency_combine as llc
    from deepport.kernels import moe_low_latency_dispatch as lld
    from deepport.kernels.moe_args import default_alloc

    dev, t_max, experts, hidden = torch.device("cuda"), 128, 256, 7168
    g = torch.Generator().manual_seed(0)

    def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(t_max, hidden, generator=g).to(dev, torch.bfloat16)
        idx = torch.rand(t_max, experts, generator=g).topk(8, dim=1).indices.to(dev)
        return x, idx, torch.rand(t_max, 8, generator=g).to(dev)

    x, idx, w = inputs()
    dispatch, combine = registry.get("torch").implementation(lld.OP), registry.get("torch").implementation(llc.OP)
    call = lld.bind(x, idx, t_max, experts, use_fp8=True)

    def step() -> torch.Tensor:
        got = dispatch(call)
        y = (got.recv_x[0].float() * got.recv_x[1]
             .repeat_interleave(128, dim=2, output_size=hidden)).to(torch.bfloat16)  # dequantised identity experts
        c = llc.MoELowLatencyCombineCall(y, idx, w, got.handle, call.group, default_alloc(dev), call.signature)
        out: torch.Tensor = combine(c)
        return out

    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    assert bf16_ulps(captured, eager) <= 1  # float32 sums with atomics (index_add_): the last bit may move
    x2, idx2, w2 = inputs()
    x.copy_(x2)
    idx.copy_(idx2)
    w.copy_(w2)
    graph.replay()
    assert bf16_ulps(captured, step()) <= 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for 2-rank NCCL")
def test_two_rank_nccl_collectives_syncs_and_agreement() -> None:
    params = dict(world=2, tokens=(96, 57), hidden=7168, experts=256, topk=8, t_max=128)
    for ops in rank_group(2, "cuda").run(f"{JOBS}:measure_all", 2, params=params):
        assert len(ops["moe_dispatch"]["collectives"]) == 2 and ops["moe_dispatch"]["syncs"] == {"tolist": 1}
        assert len(ops["moe_low_latency_dispatch"]["collectives"]) == 1
        assert ops["moe_low_latency_dispatch"]["syncs"] == ops["moe_low_latency_combine"]["syncs"] == {}
    for r in rank_group(2, "cuda").run(f"{JOBS}:low_latency_without_sync", 2, params=params, use_fp8=True):
        assert r["host_tensors"] == 0 and r["bf16_steps_from_reference"] <= 1
    for rank, bad in enumerate(rank_group(2, "cuda").run(f"{JOBS}:agreement", 2, params=params, seed=5)):
        assert bad == [], f"rank {rank}: {bad}"
    # triton's steps over NCCL: staged straight into the collective's buffers, against packing by index and torch;
    # the split wire (payload and side rows stored apart, moved by one grouped point-to-point launch per staged run)
    # and the packed one (one row per token and destination, one all_to_all_single)
    # (split: 3 grouped launches step by step, 3 after the prelude)
    for wire, stores, moves in (("split", 9, 6), ("packed", 6, 0)):
        for rank, got in enumerate(rank_group(2, "cuda").run(f"{JOBS}:normal_token_rows", 2,
                                                             params={**params, "wire": wire}, seed=3)):
            assert got["bad"] == [] and got["used"].get("rows_to_blocks") == stores, (wire, rank, got)
            assert got["used"].get("rows_to_blocks before the read") == 2 * (stores // 3 - 1), (wire, rank, got)
            assert got["used"].get("batch_isend_irecv", 0) == moves, (wire, rank, got)
            assert got["used"].get("rank_rows_at") == 1, (wire, rank, got)
            assert got["used"].get("route_prelude") == 3, (wire, rank, got)  # eager, captured, replayed
            stored = got["used"].get("rows stored in route_prelude", 0)  # the packed rows: in the graph too
            assert stored == (3 if wire == "packed" else 0), (wire, rank, got)
            assert got["used"].get("finish_sent", 0) == stored, (wire, rank, got)  # then own rows, copy out: graphs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_bf16_sum_accumulates_in_float32(device: str) -> None:
    """The combine writes ``sum(dtype=bfloat16)`` straight into its output on these devices: that must
    round once from a float32 accumulator (1 + 2**-8 + 2**-8 is 1 + 2**-7 in float32, 1 in bf16 steps)."""
    from deepport.backends.torch.moe_routes import FLOAT_ACCUMULATING_SUM

    assert device in FLOAT_ACCUMULATING_SUM
    x = torch.tensor([1.0, 2.0**-8, 2.0**-8], device=device).to(torch.bfloat16).view(1, 3, 1)
    out = torch.empty((1, 1), dtype=torch.bfloat16, device=device)
    torch.sum(x, 1, dtype=torch.bfloat16, out=out)
    assert float(out) == 1.0 + 2.0**-7


# the normal dispatch's payload in several collectives (DEEPPORT_MOE_CHUNKS): the bits of one collective,
# chunks + 1 collectives (the counts of every range ride in the one count exchange); more chunks than
# tokens, a rank with no tokens, FP8 payloads, and triton's steps
@pytest.mark.parametrize("world, params, chunks, backend", [
    (2, dict(tokens=(13, 0), experts=8), 3, "torch"),
    (3, dict(tokens=(7, 5, 11), experts=12, fp8=True), 4, "torch"),
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2), 7, "torch"),
    (2, dict(tokens=(9, 4), experts=8), 2, "triton"),
])
def test_the_chunked_dispatch_gives_the_bits_of_one_collective(world: int, params: dict[str, Any], chunks: int,
                                                               backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    p = {"hidden": 256, "topk": 4, "world": world, **params}
    results = rank_group(world, "cpu").run("tests.moe_chunk_jobs:chunked_dispatch", world, params=p, chunks=chunks,
                                           backend=backend, seed=2)
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"
        assert got["collectives"] == chunks + 1, (rank, got)


def test_the_chunk_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepport.backends.torch import moe_chunks

    monkeypatch.delenv("DEEPPORT_MOE_CHUNKS", raising=False)
    assert moe_chunks.payload_chunks() == 1
    monkeypatch.setenv("DEEPPORT_MOE_CHUNKS", "5")
    assert moe_chunks.payload_chunks() == 5
    for bad in ("0", "65", "two"):
        monkeypatch.setenv("DEEPPORT_MOE_CHUNKS", bad)
        with pytest.raises(ValueError, match="DEEPPORT_MOE_CHUNKS"):
            moe_chunks.payload_chunks()
