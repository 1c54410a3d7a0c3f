"""The hopper backend's expert-parallel transport: one-sided writes into peers' memory.

On CPU the algorithm runs over shared-memory files between gloo ranks (``ShmPeerMemory``) and must give
every MoE op the same bits as ``all_to_all_single``, in one chunk or many, call after call; a stalled
peer must raise MoECommTimeout with a message. The CUDA side (symmetric memory, the flag kernel) is
compiled for sm_90a here and run by the GPU tests at the bottom (2 GPUs).
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from deepport.backends.hopper import peer_exchange_kernel, peer_memory_cuda
from deepport.backends.hopper.peer_transport import PeerTransport, plan
from deepport.conformance.rank_group import rank_group

JOBS = "tests.moe_peer_jobs"
SMALL = dict(hidden=256, experts=16, topk=4, t_max=16)


# --- the plan ------------------------------------------------------------------------------------------


def test_plan_counts_bytes_per_rank_and_chunks_empty_messages_once() -> None:
    send, out = torch.empty(10, 3, dtype=torch.int32), torch.empty(7, 3, dtype=torch.int32)
    p = plan(out, send, [2, 0, 5], [4, 6, 0], 3, capacity=40)
    assert p.send_bytes == (48, 72, 0) and p.send_offsets == (0, 48, 120)
    assert p.recv_bytes == (24, 0, 60) and p.recv_offsets == (0, 24, 24)
    assert [p.chunks(b) for b in (0, 1, 40, 41, 80)] == [1, 1, 1, 2, 2]
    assert p.rounds == 2
    eq = plan(torch.empty(6, 2), torch.empty(6, 2), None, None, 3, capacity=1 << 20)
    assert eq.send_bytes == eq.recv_bytes == (16, 16, 16)


def test_plan_refuses_split_sizes_that_do_not_match_the_tensors() -> None:
    with pytest.raises(ValueError, match="split sizes do not match"):
        plan(torch.empty(4, 2), torch.empty(5, 2), [2, 2], [2, 2], 2, capacity=64)


class _Loopback:
    """A world of one: the transport copies its own rows and touches no flag."""

    rank, world_size, capacity = 0, 1, 64

    def block(self, owner: int, source: int) -> torch.Tensor:
        raise AssertionError("no peer block in a world of one")

    def wait_acks(self, peers: Any, what: str) -> None:
        raise AssertionError("no flags in a world of one")

    wait_data = wait_acks

    def signal_data(self, peers: Any) -> None:
        raise AssertionError("no flags in a world of one")

    signal_acks = signal_data

    def signal_then_wait_data(self, peers: Any, sources: Any, what: str) -> None:
        raise AssertionError("no flags in a world of one")


def test_own_rows_are_copied_without_flags() -> None:
    send = torch.arange(12, dtype=torch.int64).view(6, 2)
    out = torch.full_like(send, -1)
    PeerTransport(_Loopback()).exchange(out, send, [6], [6], "test")
    assert torch.equal(out, send)


# --- the algorithm on gloo ranks over shared memory -----------------------------------------------------


@pytest.mark.parametrize("world, params, capacity", [
    (2, dict(tokens=(13, 0)), 1 << 20),  # rank 1 sends nothing; one chunk per message
    (2, dict(tokens=(9, 6)), 200),  # many chunks, cut inside rows
    (3, dict(tokens=(7, 0, 11), experts=12, dup=0.3), 1000),
    (3, dict(tokens=(7, 5, 11), experts=12, fp8=True), 512),  # FP8 payload with scales
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2), 4096),
    (4, dict(tokens=(6, 3, 8, 5), experts=8, topk=8), 64),  # more slots than ranks, tiny blocks
])
def test_peer_transport_gives_every_moe_op_the_bits_of_all_to_all(world: int, params: dict[str, Any],
                                                                    capacity: int) -> None:
    p = {**SMALL, "world": world, **params}
    results = rank_group(world, "cpu").run(f"{JOBS}:peer_agreement", world, params=p, capacity=capacity, seed=11)
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"
        assert got["collectives"] == 0, f"rank {rank} still called all_to_all_single {got['collectives']} times"
        assert got["compared"] >= 10 and got["chunks"] >= 2 * (world - 1), (rank, got)
    if capacity <= 200:  # tiny blocks: messages must have travelled in several chunks
        assert max(g["chunks"] for g in results) > 4 * 2 * (world - 1), results


# per call, the equal splits: the count tables of the two normal dispatches, and (bf16 inputs) two low-latency
# dispatches and a combine (two exchanges when weights travel); with small slots the larger ones run in rounds
@pytest.mark.parametrize("world, params, capacity, fixed, fixed_per_call", [
    (2, dict(tokens=(13, 0)), 1 << 20, 1 << 20, 6),  # the combine sends weights: 2 exchanges
    (3, dict(tokens=(7, 5, 11), experts=12, fp8=True), 512, 64 * 1024, 2),  # no low-latency op with FP8 inputs
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2), 4096, 8192, 4),
])
def test_the_fixed_exchange_gives_the_low_latency_ops_the_bits_of_all_to_all(
        world: int, params: dict[str, Any], capacity: int, fixed: int, fixed_per_call: int) -> None:
    p = {**SMALL, "world": world, **params}
    results = rank_group(world, "cpu").run(f"{JOBS}:peer_agreement", world, params=p, capacity=capacity, seed=5,
                                           calls=3, fixed=fixed)
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"
        assert got["collectives"] == 0, (rank, got)
        assert got["fixed_exchanges"] == 3 * fixed_per_call, (rank, got)
        assert got["chunks"] >= 3 * (world - 1), (rank, got)  # the uneven exchanges still run in rounds


# a normal dispatch whose every part fits a block gathers its rows straight into the peers' blocks and copies
# what arrived out of its own (RowsWindow: one round, no send or receive buffer); FP8 cached dispatches too;
# triton's unweighted normal combine also sums the returned rows where they landed (no receive buffer), and
# its dispatch takes two kernels for the whole exchange (rows_to_blocks, blocks_to_rows)
@pytest.mark.parametrize("world, params, backend, windows_per_call", [
    (2, dict(tokens=(13, 0)), "torch", 1),
    (2, dict(tokens=(13, 0)), "triton", 2),
    (3, dict(tokens=(7, 5, 11), experts=12, fp8=True), "torch", 2),
    (3, dict(tokens=(7, 5, 11), experts=12, fp8=True), "triton", 2),
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2), "torch", 1),
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2), "triton", 2),
])
def test_a_dispatch_that_fits_the_blocks_writes_straight_into_the_peers_memory(
        world: int, params: dict[str, Any], backend: str, windows_per_call: int) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    p = {**SMALL, "world": world, **params}
    # triton with the fixed exchange: its normal dispatch's routing up to the host read in one step and its
    # exchange through the blocks in another (moe_route_graph, eager here), on every rank with tokens; a rank
    # without takes the eager routing
    fixed = 1 << 20 if backend == "triton" else 0
    results = rank_group(world, "cpu").run(f"{JOBS}:peer_agreement", world, params=p, capacity=1 << 20, seed=3,
                                           calls=2, backend=backend, fixed=fixed)
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"
        assert got["collectives"] == 0, (rank, got)
        assert got["rows_windows"] == 2 * windows_per_call, (rank, got)
        assert got["prelude"] == got["exchanges"] == (2 if backend == "triton" and p["tokens"][rank] else 0), \
            (rank, got)
        # triton's unweighted combine (bf16 inputs only): the table-driven path of moe_sum_graph (eager here: no
        # CUDA) on every rank with tokens (a rank without takes the window path: the same flags and bytes)
        if backend == "triton":
            assert got["in_place"] == (2 if p["tokens"][rank] and not p.get("fp8") else 0), (rank, got)


# triton's low-latency sender stores its rows straight into the peers' slots, and its combine its weights and
# its float32 partial sums into the sources' (the written fixed exchange): per call two dispatches (bf16, FP8)
# and one combine of two exchanges; a rank with no tokens fills a send buffer for its dispatches instead, within
# the same exchanges. The FP8 dispatch's receiver reads the rows where they landed, and the combine the weights
# and then the partial sums (no copy out of the slots): three landed exchanges per call (two without tokens)
@pytest.mark.parametrize("world, params, written_per_call, landed_per_call", [
    (2, dict(tokens=(13, 5)), [4, 4], [3, 3]),
    (4, dict(tokens=(5, 12, 0, 8), experts=32, topk=6, dup=0.3, nowhere=0.2), [4, 4, 2, 4], [3, 3, 2, 3]),
])
def test_a_sender_writing_straight_into_the_peers_slots_gives_the_bits_of_all_to_all(
        world: int, params: dict[str, Any], written_per_call: list[int], landed_per_call: list[int]) -> None:
    pytest.importorskip("triton")
    p = {**SMALL, "world": world, **params}
    results = rank_group(world, "cpu").run(f"{JOBS}:peer_agreement", world, params=p, capacity=4096, seed=5,
                                           calls=2, fixed=1 << 20, backend="triton")
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"
        assert got["collectives"] == 0, (rank, got)
        assert got["written"] == 2 * written_per_call[rank], (rank, got)
        assert got["landed"] == 2 * landed_per_call[rank], (rank, got)


@pytest.mark.parametrize("world", [2, 3])
def test_back_to_back_fixed_exchanges_never_hand_out_stale_bytes(world: int) -> None:
    sizes = [0, 5, 1000, 4096, 3, 4096, 17, 0, 2048, 4095, 1, 4096, 640, 12, 4096, 100]
    results = rank_group(world, "cpu").run(f"{JOBS}:fixed_exchanges", world, sizes=sizes, fixed=4096, seed=world)
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"
        assert got["fixed_exchanges"] == len(sizes) and got["chunks"] == 0, (rank, got)
    # a slot too small for one size: that exchange (and only that one) runs in rounds
    results = rank_group(world, "cpu").run(f"{JOBS}:fixed_exchanges", world, sizes=[16, 4097, 16], fixed=4096)
    for rank, got in enumerate(results):
        assert got["bad"] == [] and got["fixed_exchanges"] == 2 and got["chunks"] > 0, (rank, got)


@pytest.mark.parametrize("tokens, experts, fixed", [((8, 8), 16, 0), ((9, 0, 5), 12, 0), ((8, 8), 16, 1 << 20),
                                                    ((9, 0, 5), 12, 1 << 20)])
def test_a_stalled_peer_raises_a_timeout_naming_the_rank(tokens: tuple[int, ...], experts: int, fixed: int) -> None:
    world = len(tokens)
    started = time.monotonic()
    got = rank_group(world, "cpu").run(f"{JOBS}:peer_stalled", world, tokens=tokens, experts=experts, fixed=fixed)
    assert time.monotonic() - started < 30
    assert got[world - 1] == "stayed away", got
    for rank, text in enumerate(got[: world - 1]):
        assert text.startswith("deepport.backends.torch.moe_comm.MoECommTimeout: moe_low_latency_dispatch"), text
        assert f"timed out on rank {rank}" in text and "stalled" in text, text


# --- the CUDA side, compiled here ---------------------------------------------------------------------------


def test_flag_params_pack_to_the_kernel_struct() -> None:
    raw = peer_memory_cuda.pack_params([(0x1000, 0x2000), (0x3000, 0x4000)], 0x5000, 7, peer_memory_cuda.WAIT_NEXT)
    assert len(raw) == peer_memory_cuda.PARAMS_SIZE == 64 * 16 + 24
    assert struct.unpack_from("<4Q", raw, 0) == (0x1000, 0x2000, 0x3000, 0x4000)
    assert struct.unpack_from("<Qqii", raw, 64 * 16) == (0x5000, 7, 2, 1)
    with pytest.raises(ValueError, match=r"1\.\.64 flags"):
        peer_memory_cuda.pack_params([], 0, 0, 0)


def test_the_hopper_normal_ops_take_the_triton_routes_steps_where_triton_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The normal dispatch and combine run triton's ROUTES (the two-kernel exchange over the blocks, the
    per-token sums); the other ops triton's TRITON steps; without triton, torch's steps everywhere."""
    pytest.importorskip("triton")
    from deepport.backends.hopper import moe
    from deepport.backends.torch.moe_local import TORCH
    from deepport.backends.triton.moe_permute import TRITON
    from deepport.backends.triton.moe_routes import ROUTES

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(moe, "steps_for", lambda device: TRITON)
    assert moe.normal_steps_for(cuda) is ROUTES and ROUTES.rows_to_blocks is not None
    monkeypatch.setattr(moe, "steps_for", lambda device: TORCH)
    assert moe.normal_steps_for(cuda) is TORCH


def test_a_round_raises_its_data_flags_and_awaits_its_sources_in_one_flag_launch() -> None:
    mem = peer_memory_cuda.CudaPeerMemory.__new__(peer_memory_cuda.CudaPeerMemory)
    launches: list[tuple[list[tuple[int, int]], int]] = []
    mem.__dict__.update(rank=1, world_size=3, flag_base=[0x1000, 0x2000, 0x3000], counters=torch.zeros((3, 3),
                        dtype=torch.int64))
    mem._launch = lambda ops, mode: launches.append((ops, mode))  # type: ignore[method-assign]
    mem.signal_then_wait_data([0, 2], [0, 2], "round")
    (ops, mode), = launches
    assert mode == peer_memory_cuda.SIGNAL_THEN_WAIT | (2 << 8)  # the first two ops signal, the rest wait
    assert [f for f, _ in ops] == [0x1000 + 8 * 1, 0x3000 + 8 * 1, 0x2000 + 8 * 0, 0x2000 + 8 * 2]
    launches.clear()
    mem.signal_then_wait_data([0], [], "round")  # nothing to wait for: a plain signal
    mem.signal_then_wait_data([], [2], "round")  # nothing to signal: a plain wait
    assert [m for _, m in launches] == [peer_memory_cuda.SIGNAL, peer_memory_cuda.WAIT_NEXT]


def test_multicast_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in peer_memory_cuda.MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    peer_memory_cuda.forbid_multicast()
    assert {n: os.environ[n] for n in peer_memory_cuda.MULTICAST_OFF} == peer_memory_cuda.MULTICAST_OFF
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    with pytest.raises(RuntimeError, match="never uses NVLink multicast"):
        peer_memory_cuda.forbid_multicast()


def test_peer_memory_refuses_an_unknown_mapping_and_a_bad_capacity_before_any_collective() -> None:
    device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"mapping must be one of \('symmetric', 'ipc'\), got 'nvshmem'"):
        peer_memory_cuda.CudaPeerMemory(None, device, 4096, 1.0, mapping="nvshmem")
    with pytest.raises(ValueError, match="positive multiple of 16 bytes, got 100"):
        peer_memory_cuda.CudaPeerMemory(None, device, 100, 1.0, mapping="ipc")


def test_the_peer_mapping_comes_from_the_environment_and_reaches_the_peer_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from deepport.backends.hopper import moe

    made: list[dict[str, Any]] = []

    class Made(Exception):
        pass

    def record(*args: Any, **kwargs: Any) -> None:
        made.append(kwargs)
        raise Made

    monkeypatch.setattr(peer_memory_cuda, "CudaPeerMemory", record)
    grp = SimpleNamespace(group=SimpleNamespace(group_name="mapping-test"))
    for setting, expected in (("", "symmetric"), ("ipc", "ipc"), (" symmetric ", "symmetric")):
        monkeypatch.setenv("DEEPPORT_PEER_MAPPING", setting)
        assert moe.peer_mapping() == expected
        with pytest.raises(Made):
            moe.transport_for(grp, torch.device("cpu"))  # type: ignore[arg-type]
        assert made[-1]["mapping"] == expected
    monkeypatch.setenv("DEEPPORT_PEER_MAPPING", "nvshmem")
    with pytest.raises(ValueError, match="DEEPPORT_PEER_MAPPING must be one of symmetric, ipc, got 'nvshmem'"):
        moe.transport_for(grp, torch.device("cpu"))  # type: ignore[arg-type]
    assert len(made) == 3
    moe.forget_transports()


def test_a_peers_ipc_handle_is_opened_on_this_ranks_own_gpu() -> None:
    """torch rebuilds a shared CUDA tensor on the owner's device index; between GPUs the peer's buffer must be
    opened on this rank's device instead (only the device argument changes, at the place torch's rebuild takes
    it)."""
    import inspect

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    names = list(inspect.signature(rebuild_cuda_tensor).parameters)
    assert names[peer_memory_cuda.IPC_DEVICE_ARG] == "storage_device", names
    args = tuple(f"arg{i}" for i in range(len(names)))
    args = (*args[:6], 1, *args[7:])
    opened = peer_memory_cuda._opened_on(args, 0)
    assert opened[peer_memory_cuda.IPC_DEVICE_ARG] == 0 and len(opened) == len(args)
    assert [a for i, a in enumerate(opened) if i != 6] == [a for i, a in enumerate(args) if i != 6]
    with pytest.raises(RuntimeError, match="unexpected CUDA IPC rebuild arguments"):
        peer_memory_cuda._opened_on(("a", "b"), 0)


def test_the_fixed_exchange_limit_never_exceeds_the_slots_laid_out() -> None:
    """``fixed_capacity`` may be lowered (0: rounds only) and raised back, never past the slots a memory laid
    out when it was created: an exchange could otherwise write beyond them."""
    from deepport.backends.hopper.fixed_slots import FixedSlots

    memory = FixedSlots()
    memory._lay_out_slots(4096)
    memory.fixed_capacity = 0
    memory.fixed_capacity = 4096
    assert (memory.slot_bytes, memory.fixed_capacity) == (4096, 4096)
    with pytest.raises(ValueError, match=r"within 0 \.\. 4096 bytes"):
        memory.fixed_capacity = 8192
    with pytest.raises(ValueError, match="multiple of 16"):
        FixedSlots()._lay_out_slots(100)
    assert memory.fixed_capacity == 4096


def test_exchange_params_pack_to_the_kernel_struct() -> None:
    raw = peer_exchange_kernel.pack_params([0x10, 0x20, 0x30], [0x11, 0x21, 0x31], 0x40, 0x50, 0x60, 0x70,
                                           pair_bytes=100, slot_bytes=128, timeout_ns=9, rank=2)
    assert len(raw) == peer_exchange_kernel.PARAMS_SIZE == 64 * 16 + 64
    assert struct.unpack_from("<3Q", raw, 0) == (0x10, 0x20, 0x30) and struct.unpack_from("<Q", raw, 3 * 8) == (0,)
    assert struct.unpack_from("<3Q", raw, 64 * 8) == (0x11, 0x21, 0x31)
    assert struct.unpack_from("<4Q3q2i", raw, 64 * 16) == (0x40, 0x50, 0x60, 0x70, 100, 128, 9, 3, 2)
    with pytest.raises(ValueError, match=r"2\.\.64 ranks"):
        peer_exchange_kernel.pack_params([0x10], [0x11], 0, 0, 0, 0, 0, 16, 1, 0)
    with pytest.raises(ValueError, match="pair_bytes must lie in"):
        peer_exchange_kernel.pack_params([1, 2], [3, 4], 0, 0, 0, 0, pair_bytes=200, slot_bytes=128, timeout_ns=1,
                                         rank=0)
    with pytest.raises(ValueError, match="rank 2 outside a group of 2"):
        peer_exchange_kernel.pack_params([1, 2], [3, 4], 0, 0, 0, 0, 0, 16, 1, rank=2)


def _sass(tmp_path: Path, name: str, entry: str, options: tuple[str, ...]) -> str:
    """The SASS of a shipped kernel compiled for sm_90a here (skips without NVRTC or cuobjdump), after
    checking ptxas reports no stack frame and no spills."""
    pytest.importorskip("cuda.bindings.nvrtc")
    from deepport.backends.hopper import nvrtc
    from deepport.backends.hopper.sources import peer_source

    try:
        nvrtc.version()
    except Exception as exc:  # the NVRTC wheel is part of the CI set-up; say so if it is missing
        pytest.skip(f"NVRTC not loadable: {exc}")
    cubin, log = nvrtc.compile_cubin(peer_source(name, entry), (*options, "-Xptxas=-v"))
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in log, log
    from tests.test_hopper_compile import _cuobjdump

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton or nvidia-cuda-cuobjdump) for the SASS checks")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(tool), "--dump-sass", str(path)], check=True, capture_output=True, text=True).stdout


def test_exchange_kernel_compiles_for_sm90a_with_system_scope_release_acquire_and_l2_reads(tmp_path: Path) -> None:
    sass = _sass(tmp_path, "sm90_peer_exchange.cu", "dp_fixed_exchange_kernel", peer_exchange_kernel.OPTIONS)
    assert "LDG.E.64.STRONG.SYS" in sass  # the acquire load of a peer's flag
    assert "REDG.E.ADD.64.STRONG.SYS" in sass and "MEMBAR.ALL.SYS" in sass  # release increments after a fence
    assert "BPT.TRAP" in sass and "NANOSLEEP" in sass  # a bounded, backed-off spin
    assert "LDG.E.128.STRONG.GPU" in sass  # the slots written by peers are read past L1 (ld.cg), 16 bytes
    assert "LDL" not in sass and "STL" not in sass
    assert "MULTIMEM" not in sass.upper()  # never NVLink multicast


def test_flag_kernel_compiles_for_sm90a_with_system_scope_release_and_acquire(tmp_path: Path) -> None:
    sass = _sass(tmp_path, "sm90_peer_flags.cu", "dp_peer_flags_kernel",
                 (f"-DDP_PEER_MAX_OPS={peer_memory_cuda.MAX_OPS}",))
    assert "LDG.E.64.STRONG.SYS" in sass  # the acquire load of a flag, system scope (peer GPUs)
    assert "REDG.E.ADD.64.STRONG.SYS" in sass and "MEMBAR" in sass  # the release increment after a fence
    assert "BPT.TRAP" in sass and "NANOSLEEP" in sass  # a bounded, backed-off spin
    assert "LDL" not in sass and "STL" not in sass
    assert "MULTIMEM" not in sass.upper()  # never NVLink multicast


# --- on GPUs ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_peer_transport_matches_nccl() -> None:
    os.environ.setdefault("DEEPPORT_HOPPER_EP", "1")
    results = rank_group(2, "cuda").run(f"{JOBS}:peer_agreement_cuda", 2, params={**SMALL, "world": 2,
                                                                                  "tokens": (13, 9)})
    for rank, got in enumerate(results):
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"


def _one_gpu(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python -m tests.peer_cuda_one_gpu ARGS`` from the repository root (its own processes, its own CUDA
    contexts: a trap there ends only that run)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "tests.peer_cuda_one_gpu", *args], cwd=root, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stall", ["rounds", "fixed"])
def test_two_processes_on_one_gpu_exchange_through_peer_memory_and_flags(stall: str) -> None:
    """One GPU is enough for the protocols: chunks, acknowledgements, the fixed exchange's parities, graph
    replays, and the stall record of the flag kernel or of the exchange kernel."""
    done = _one_gpu("--stall", stall)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("fixed exchange of") == 2 * 10 and done.stdout.count("fixed graph replay") == 2 * 4
    assert done.stdout.count(": ok") >= 2 * 18 + 1 and "stall: ok" in done.stdout, done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_exchange_kernel_in_loopback_on_one_gpu() -> None:
    done = _one_gpu("--loopback", timeout=300)  # the fixed exchange, the written one, the rounds: 4 sizes each
    assert done.returncode == 0 and done.stdout.count(": ok") == 3 * 4, done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_hopper_ep_path_on_one_gpu_matches_torch_over_gloo() -> None:
    done = _one_gpu("--moe")
    # per rank: 3 cases x (fixed exchange, rounds), 2 cases with a chunked payload, case 0 four times more (its
    # dispatch's routing and exchange and its combine's sums replayed as CUDA graphs, once with the graphs off),
    # the graph replays, an older dispatch's results intact after a newer one; the written exchanges counted
    assert done.returncode == 0 and done.stdout.count(": ok") == 2 * 14, done.stdout + done.stderr
    assert done.stdout.count("an older dispatch's results after a newer one of the same shape: ok") == 2
    assert done.stdout.count("graphs off") == 2, done.stdout
    assert done.stdout.count("3 payload chunks") == 2 * 2, done.stdout
    assert done.stdout.count("written straight into the peer's slots") == 2, done.stdout
    # the normal combine's sums through the table, a repeated shape replayed as a CUDA graph on each rank
    assert done.stdout.count("replayed as CUDA graphs (ok)") == 2, done.stdout
    # the dispatch's routing and its exchange through the blocks, each captured on each rank
    assert done.stdout.count("formats replayed (ok)") == 2, done.stdout
    assert done.stdout.count("(ok)") == 2 * 3, done.stdout
    # triton's steps: with and without the windows; torch's: with them
    assert done.stdout.count("profile low-latency") == 2 * (3 + 2), done.stdout
    assert done.stdout.count("profile dispatch 4096") == done.stdout.count("profile combine 4096") == 2 * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_low_latency_ops_end_to_end_with_both_ranks_on_one_gpu() -> None:
    """tests/peer_ll_loopback.py: the hopper path's low-latency dispatch and combine of both EP=2 ranks in one
    process, eager against the torch steps and replayed as CUDA graphs against the eager outputs."""
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tests.peer_ll_loopback", "--calls", "4"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("eager, against the torch steps: ok") == 2 and "checks: ok" in done.stdout, done.stdout
