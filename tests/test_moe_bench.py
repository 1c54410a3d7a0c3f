"""MoE bench configs: the CPU ones are checked and timed; the 2-GPU ones are declared for 2 NCCL ranks."""

from __future__ import annotations

import pytest
import torch

from deepport.bench import ceilings
from deepport.bench.configs import select
from deepport.bench.runner import Request, run

MOE = ["moe_dispatch", "moe_combine"]


@pytest.mark.timeout(600)
def test_cpu_moe_configs_are_checked_and_timed() -> None:
    configs = select("cpu", ops=MOE)
    assert {c.op for c in configs} == set(MOE)
    doc = run(Request(device=torch.device("cpu"), configs=configs, backends=None, quick=True))
    results = doc["results"]
    assert results and all(r["status"] == "ok" and r["gbps"] > 0 for r in results), results


def test_gpu_moe_configs_cover_deepep_shapes_over_two_ranks_with_the_nccl_yardstick() -> None:
    configs = select("cuda", ops=MOE)
    shapes = {(c.op, c.params["tokens"], c.params["hidden"], c.params["topk"], c.params["num_experts"])
              for c in configs}
    assert {(op, t, 7168, 8, 256) for op in MOE for t in (4096, 128)} <= shapes
    ep2 = [c for c in configs if c.world_size == 2]
    assert {(c.op, c.params["tokens"]) for c in ep2} == {(op, t) for op in MOE for t in (4096, 128)}
    assert all(c.name.startswith("ep2_") and c.distributed is not None and c.ceiling == "nvlink_all_to_all"
               for c in ep2)
    assert ceilings.resolve("nvlink_all_to_all", "cuda") == "nvlink_all_to_all"


def test_gpu_moe_configs_at_ep4_are_issue_15s_shapes_with_a_four_gpu_yardstick() -> None:
    ep4 = [c for c in select("cuda", ops=MOE) if c.world_size == 4]
    assert {(c.op, c.params["tokens"], c.params["hidden"], c.params["topk"], c.params["num_experts"])
            for c in ep4} == {(op, t, 7168, 8, 256) for op in MOE for t in (4096, 128)}
    assert all(c.name.startswith("ep4_") and c.params["world_size"] == 4 and c.distributed is not None
               and c.ceiling == "nvlink_all_to_all_ep4" for c in ep4)
    assert ceilings.resolve("nvlink_all_to_all_ep4", "cuda") == "nvlink_all_to_all_ep4"
    assert {c.world_size for c in select("cuda", ops=MOE)} == {2, 4}


def test_expected_cross_bytes_counts_each_other_rank_a_token_reaches_once() -> None:
    from deepport.bench.configs.moe import EXPERTS, HIDDEN, TOPK, expected_cross_bytes, routing

    # against the bench's own routing (DeepEP's): rank 0's (token, other rank) pairs with an expert there
    for world in (2, 4, 8):
        _, idx, _ = routing(4096, 8, EXPERTS, TOPK, seed=world, device=torch.device("cpu"))
        dest = idx // (EXPERTS // world)
        pairs = sum(int((dest == r).any(dim=1).sum()) for r in range(1, world))
        assert expected_cross_bytes(4096, world) == pytest.approx(pairs * HIDDEN * 2, rel=0.02), world
    assert expected_cross_bytes(128, 1) == 0.0


def test_gpu_runners_spawn_one_process_per_rank_of_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the NCCL runners hand ``spawn`` (they run only on GPUs): the config's group size, told to every rank."""
    import importlib

    from deepport.bench.configs import moe

    mp_spawn = importlib.import_module("torch.multiprocessing.spawn")  # the module (the package exports a function)

    seen: list[tuple[int, object]] = []

    def fake_spawn(fn: object, args: tuple[object, ...], nprocs: int, join: bool) -> None:
        seen.append((nprocs, args[0]))
        raise RuntimeError("stop here")

    monkeypatch.setattr(mp_spawn, "spawn", fake_spawn)
    request = Request(device=torch.device("cuda"), configs=[], backends=["torch"], quick=True)
    for world in (2, 4):
        config = next(c for c in select("cuda", ops=MOE) if c.world_size == world)
        with pytest.raises(RuntimeError, match="stop here"):
            moe.run_distributed(config, request)
        nprocs, spec = seen.pop()
        assert nprocs == world and isinstance(spec, dict) and spec["world_size"] == world
    with pytest.raises(RuntimeError, match="needs 4 CUDA GPUs"):
        ceilings.CEILINGS["nvlink_all_to_all_ep4"].measure(torch.device("cpu"), True)
