"""Bench configs of the low-latency MoE ops over 2 ranks (issue 14's decode step) and 4 (issue 15), next to
the raw collective moving the same fixed bytes.

- GPU configs (EP=2 ``ep2_*`` and EP=4 ``ep4_*``, one GPU per rank, NCCL): 128 tokens per rank, ``T_max =
  max_tokens_per_rank = 128``, hidden 7168, top-8 of 256 experts; ``moe_low_latency_dispatch`` with the FP8 cast
  (``use_fp8=True``), ``moe_low_latency_combine`` of bf16 expert outputs. Per backend, on every rank: a checked
  call (equal to the ``reference`` backend's outputs on the same group and inputs: dispatch bit for bit in the
  rows below ``recv_count``, combine within one bf16 step), then the timing, as a CUDA graph: the op bound once
  per call on static buffers (``alloc=``), captured, replayed (the low-latency ops never sync with the host nor
  allocate anything of a data-dependent size); a sample is one replay / calls in it, the slowest rank's. What
  one rank does: :mod:`deepport.bench.configs.moe_low_latency_rank`.
- The same run times NCCL ``all_to_all_single`` of the same fixed rows (``R * T_max`` each way, ``T_max``
  per rank pair, the op's payload row: ``hidden`` e4m3 bytes + ``hidden / 128`` float32 scales for the
  dispatch, ``hidden`` bf16 for the combine) the same way, reported as backend ``nccl_all_to_all``;
  ``scripts/gpu_ep_bench.sh`` prints raw time / backend time next to issues 14's and 15's targets
  (:func:`target_us`).
- Bytes (``benchmarks/README.md``): :func:`deepport.bench.counting.moe_low_latency_bytes`, the
  ``(R - 1) * T_max`` fixed rows a rank sends to the other ranks, whatever the routing.
- CPU configs (CI): the same runner and checks on 2 gloo processes (32 tokens, ``T_max = 32``, hidden 256,
  top-4 of 16 experts) and on 4 (16 tokens, ``T_max = 16``), timed with the host clock, next to gloo's
  ``all_to_all_single``
  (``gloo_all_to_all``); their ceiling is the CPU's copy (``"memory"``), as for the ``moe`` CPU configs.

The ops' descriptors name different bench modules (the dispatch ``moe``, the combine ``moe_permute``);
``moe_permute`` imports these configs (``moe`` cannot: this module imports it).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from deepport.bench import counting
from deepport.bench.configs import BenchConfig, Workload
from deepport.bench.configs.moe import CEILING_OF_WORLD, CPU_HIDDEN, EXPERTS, HIDDEN, TOPK
from deepport.bench.results import BenchResult
from deepport.bench.timing import Timing

DISPATCH, COMBINE = "moe_low_latency_dispatch", "moe_low_latency_combine"
WORLD = 2
CALLS_PER_GRAPH = 20  # calls captured in one graph (one timing sample = one replay / this)
TIMEOUT_S = 300  # the process group's timeout: a stalled rank fails the config instead of hanging the run
TARGET_US = {DISPATCH: 40.0, COMBINE: 50.0}  # issue 14, EP=2, 128 tokens per rank: backend time at most this
# issue 15, EP=4: the dispatch at most 50 us; the combine "as at EP=2" (50 us)
TARGET_US_OF_WORLD = {WORLD: TARGET_US, 4: {DISPATCH: 50.0, COMBINE: 50.0}}
TARGET_SHAPE = {"tokens_per_rank": 128, "max_tokens_per_rank": 128, "hidden": HIDDEN, "num_experts": EXPERTS,
                "topk": TOPK}  # the shape the targets are for, at each world size of TARGET_US_OF_WORLD


def target_us(op: str, params: Mapping[str, Any]) -> float | None:
    """The issues' time target of a result (``op``, its config's ``params``): :data:`TARGET_US_OF_WORLD` at
    the config's ``world_size`` for the low-latency ops at :data:`TARGET_SHAPE`, else ``None`` (no target for
    other shapes, e.g. the CPU configs)."""
    targets = TARGET_US_OF_WORLD.get(int(params.get("world_size", 0)), {})
    if op not in targets or any(params.get(k) != v for k, v in TARGET_SHAPE.items()):
        return None
    return targets[op]


def _worker(rank: int, spec: dict[str, Any], store: str, out_path: str) -> None:
    """One rank of :func:`run_distributed` (``torch.multiprocessing.spawn`` passes ``rank``)."""
    import torch.distributed as dist

    from deepport.bench.configs.moe_low_latency_rank import run_rank

    if spec["device_type"] == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec["world_size"]))
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=spec["world_size"],
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        rows = run_rank(rank, spec, device, dist.group.WORLD)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def spec_for(config: BenchConfig, request: Any, backends: list[str]) -> dict[str, Any]:
    """What every rank is told: the config's shape, the backends (the baseline first), seed, samples."""
    p = config.params
    return {"op": config.op, "device_type": request.device.type, "world_size": config.world_size,
            "tokens": p["tokens"], "max_tokens_per_rank": p["max_tokens_per_rank"], "hidden": p["hidden"],
            "num_experts": p["num_experts"], "topk": p["topk"], "use_fp8": bool(p.get("use_fp8", True)),
            "backends": backends, "seed": request.seed, "samples": request.samples,
            "calls_per_graph": CALLS_PER_GRAPH}


def results_from(config: BenchConfig, rows: list[dict[str, Any]]) -> list[BenchResult]:
    """Rank 0's records as the runner's results (each timed one with its median set)."""
    found = []
    for row in rows:
        r = BenchResult(config.op, config.name, row["backend"], dict(config.params), row["status"],
                        row.get("message", ""), bytes=float(row["bytes"]), bound="memory", check=row.get("check", {}))
        if row["status"] == "ok":
            t = row["timing"]
            timing = Timing(t["method"], t["samples_us"], t["calls_per_sample"], notes=t["notes"])
            r.timing = timing.summary()
            r.set_time(statistics.median(timing.samples_us))
        found.append(r)
    return found


def run_distributed(config: BenchConfig, request: Any) -> list[BenchResult]:
    """Spawn ``config.world_size`` processes (NCCL on GPUs, gloo on CPUs), check and time every backend and
    the raw collective (module docstring); rank 0's results."""
    from torch.multiprocessing.spawn import spawn

    from deepport.bench.runner import backends_for

    spec = spec_for(config, request, backends_for(config, request))
    with tempfile.TemporaryDirectory(prefix="deepport-bench-moe-ll-") as tmp:
        out_path = os.path.join(tmp, "rank0.json")
        spawn(_worker, args=(spec, os.path.join(tmp, "store"), out_path), nprocs=config.world_size,  # type: ignore[no-untyped-call]
              join=True)
        with open(out_path) as f:
            rows = json.load(f)
    return results_from(config, rows)


def _runs_distributed(device: torch.device, seed: int) -> Workload:
    raise RuntimeError("a multi-process config runs through its `distributed` runner")


def make_config(op: str, name: str, tokens: int, t_max: int, hidden: int, experts: int, topk: int, cpu: bool,
           check_case: str, world: int = WORLD) -> BenchConfig:
    """One config of ``op`` over ``world`` ranks (dispatch with the FP8 cast, combine of bf16 rows)."""
    fp8 = op == DISPATCH
    params: dict[str, Any] = {"tokens_per_rank": tokens, "tokens": tokens, "max_tokens_per_rank": t_max,
                              "hidden": hidden, "num_experts": experts, "topk": topk, "world_size": world}
    if fp8:
        params["use_fp8"] = True
    return BenchConfig(name=name, op=op, params=params, build=_runs_distributed, flops=0.0,
                       bytes=float(counting.moe_low_latency_bytes(world, t_max, hidden, fp8)),
                       ceiling="memory" if cpu else CEILING_OF_WORLD[world], check_case=check_case, cpu=cpu,
                       world_size=world, distributed=run_distributed)


CONFIGS: tuple[BenchConfig, ...] = (
    make_config(DISPATCH, "ep2_t128_tmax128_h7168_top8_of_256_fp8", 128, 128, HIDDEN, EXPERTS, TOPK, cpu=False,
           check_case=f"{DISPATCH}/world2_fp8_t128_h7168_top8_of_256"),
    make_config(COMBINE, "ep2_t128_tmax128_h7168_top8_of_256", 128, 128, HIDDEN, EXPERTS, TOPK, cpu=False,
           check_case=f"{COMBINE}/world2_t128_h7168_top8_of_256"),
    make_config(DISPATCH, "ep4_t128_tmax128_h7168_top8_of_256_fp8", 128, 128, HIDDEN, EXPERTS, TOPK, cpu=False,
           check_case=f"{DISPATCH}/world4_bf16_empty_rank_hot", world=4),
    make_config(COMBINE, "ep4_t128_tmax128_h7168_top8_of_256", 128, 128, HIDDEN, EXPERTS, TOPK, cpu=False,
           check_case=f"{COMBINE}/world4_empty_rank_hot", world=4),
    make_config(DISPATCH, "cpu_ep2_t32_tmax32_top4_of_16_fp8", 32, 32, CPU_HIDDEN, 16, 4, cpu=True,
           check_case=f"{DISPATCH}/world2_fp8_uneven_tmax24"),
    make_config(COMBINE, "cpu_ep2_t32_tmax32_top4_of_16", 32, 32, CPU_HIDDEN, 16, 4, cpu=True,
           check_case=f"{COMBINE}/world2_uneven"),
    make_config(DISPATCH, "cpu_ep4_t16_tmax16_top4_of_16_fp8", 16, 16, CPU_HIDDEN, 16, 4, cpu=True,
           check_case=f"{DISPATCH}/world4_bf16_empty_rank_hot", world=4),
    make_config(COMBINE, "cpu_ep4_t16_tmax16_top4_of_16", 16, 16, CPU_HIDDEN, 16, 4, cpu=True,
           check_case=f"{COMBINE}/world4_empty_rank_hot", world=4),
)
