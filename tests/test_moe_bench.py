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
    assert all(c.world_size == 2 and c.distributed is not None and c.ceiling == "nvlink_all_to_all"
               for c in configs)
    assert ceilings.resolve("nvlink_all_to_all", "cuda") == "nvlink_all_to_all"
