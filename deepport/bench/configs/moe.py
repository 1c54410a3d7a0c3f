"""Bench configs for MoE dispatch and combine (DeepEP's shapes: 4096 tokens, hidden 7168, top-8 of 256
experts; 128 tokens for latency), with raw NCCL ``all_to_all_single`` of the same bytes as the yardstick.

- GPU configs run over 2 processes (``ep2_*``, issue 14) or 4 (``ep4_*``, issue 15), one GPU each, NCCL
  (:func:`run_distributed`); with fewer GPUs visible the runner skips them with the reason. Per backend, one
  checked call (every output of the backend equal, bit for bit, to the ``reference`` backend's on the
  same group and inputs: routes, counts, payload rows; combine within one bf16 rounding), then timing:
  a barrier, then CUDA events around each public call on every rank (``DEEPPORT_CHECK_VALUES=0``, as
  the bench times every config: the checked call validated the inputs; the calls still read their
  counts on the host); a sample is the slowest rank's time.
  The same run times ``all_to_all_single`` of exactly the payload bytes the dispatch moves (same
  split sizes), reported as backend ``nccl_all_to_all``. Bytes counted (``benchmarks/README.md``): payload bytes
  this rank sends to other ranks (dispatch) or returns to them (combine), rank 0's figure.
- The ceiling ``nvlink_all_to_all`` (registered here) is the microbenchmark of ``benchmarks/README.md``: NCCL
  ``all_to_all_single`` of 4096 x 8 rows of 7168 bf16 over 2 GPUs, cross-GPU bytes / time;
  ``nvlink_all_to_all_ep4`` the same over 4 GPUs (the ``ep4_*`` configs' ceiling).
- CPU configs (CI) are single-process (``group=None``: dispatch is a gather), checked by the suite's
  conformance case.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import torch

import deepport
from deepport.bench import ceilings
from deepport.bench.configs import BenchConfig, Workload, bound_runner
from deepport.bench.results import BenchResult
from deepport.bench.timing import environment_var
from deepport.errors import BackendNotSupportedError
from deepport.kernels.moe_args import Alloc

HIDDEN, TOPK, EXPERTS, WORLD = 7168, 8, 256, 2
CPU_HIDDEN = 256
RAW = "nccl_all_to_all"


def routing(tokens: int, hidden: int, experts: int, topk: int, seed: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x bf16 [T, H], topk_idx [T, k], weights [T, k])``: DeepEP's test routing (top-k of |randn| + 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    scores = torch.randn(tokens, experts, generator=g).abs() + 1
    idx = scores.topk(topk, dim=1).indices
    w = torch.rand(tokens, topk, generator=g) + 0.5
    return x.to(device), idx.to(device), w.to(device)


class Pool:
    """An ``alloc`` handing out the same buffers call after call (outputs are reused, never reallocated)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.i = device, 0
        self.buffers: list[torch.Tensor] = []

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.i == len(self.buffers):
            self.buffers.append(torch.empty(shape, dtype=dtype, device=self.device))
        t: torch.Tensor = self.buffers[self.i]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = self.buffers[self.i] = torch.empty(shape, dtype=dtype, device=self.device)
        self.i += 1
        return t

    def start(self) -> Alloc:
        self.i = 0
        return self.alloc


# --- single-process configs (CPU) -------------------------------------------------------------------


def _local_workload(op: str, tokens: int, experts: int, topk: int) -> Callable[[torch.device, int], Workload]:
    def build(device: torch.device, seed: int) -> Workload:
        x, idx, w = routing(tokens, CPU_HIDDEN, experts, topk, seed, device)
        pool = Pool(device)
        first = deepport.moe_dispatch(x, idx, w, experts, backend="torch", alloc=pool.start())
        recv = first.recv_x
        assert isinstance(recv, torch.Tensor)
        if op == "moe_dispatch":
            outputs = {"recv_x": recv}
        else:
            outputs = {"combined_x": deepport.moe_combine(recv, first.handle, backend="torch").combined_x}

        def call(backend: str) -> Callable[[], None]:
            combine_pool = Pool(device)

            def dispatch() -> None:
                deepport.moe_dispatch(x, idx, w, experts, backend=backend, alloc=pool.start())

            def combine() -> None:
                outputs["combined_x"].copy_(deepport.moe_combine(recv, first.handle, backend=backend,
                                                                 alloc=combine_pool.start()).combined_x)

            return dispatch if op == "moe_dispatch" else combine

        from deepport.kernels import OPS

        # One bind per backend, reused across calls: a reused pool would alias the first call's outputs and `recv`
        args = (x, idx, w, experts) if op == "moe_dispatch" else (recv, first.handle)
        bound = bound_runner(op, lambda: OPS[op].bind(*args))
        footprint = (x.numel() + recv.numel()) * 2
        return Workload(call, bound, outputs, footprint)

    return build


# --- two-process configs (GPU) --------------------------------------------------------------------


def _timed(fn: Callable[[], object], samples: int, group: Any) -> list[float]:
    """Per-call microseconds, each sample the slowest rank's (a barrier before every call)."""
    import torch.distributed as dist

    for _ in range(3):
        fn()
    times = []
    for _ in range(samples):
        dist.barrier(group)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        t = torch.tensor([start.elapsed_time(end) * 1000.0], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times.append(float(t.item()))
    return times


def _worker(rank: int, spec: dict[str, Any], store: str, out_path: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=spec["world_size"])
    group = dist.group.WORLD
    try:
        rows = _run_rank(rank, spec, device, group)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _run_rank(rank: int, spec: dict[str, Any], device: torch.device, group: Any) -> list[dict[str, Any]]:
    import torch.distributed as dist

    op, tokens, samples = spec["op"], spec["tokens"], spec["samples"]
    x, idx, w = routing(tokens, HIDDEN, EXPERTS, TOPK, spec["seed"] * 100 + rank, device)
    ref = deepport.moe_dispatch(x, idx, w, EXPERTS, group=group, backend="reference")
    assert isinstance(ref.recv_x, torch.Tensor)
    ref_out = deepport.moe_combine(ref.recv_x, ref.handle, backend="reference").combined_x
    sends = list(ref.handle.send_counts) if op == "moe_dispatch" else list(ref.handle.recv_counts)
    recvs = list(ref.handle.recv_counts) if op == "moe_dispatch" else list(ref.handle.send_counts)
    moved = sum(c for r, c in enumerate(sends) if r != rank) * HIDDEN * 2
    rows = [_bench_backend(op, backend, (x, idx, w), ref, ref_out, moved, samples, device, group)
            for backend in spec["backends"]]
    payload = torch.empty(sum(sends), HIDDEN, dtype=torch.bfloat16, device=device).normal_()
    received = torch.empty(sum(recvs), HIDDEN, dtype=torch.bfloat16, device=device)
    raw = _timed(lambda: dist.all_to_all_single(received, payload, recvs, sends, group=group), samples, group)
    rows.append({"backend": RAW, "status": "ok", "bytes": moved, "samples_us": raw,
                 "check": {"passed": True, "note": "raw collective, same split sizes and bytes as the op"}})
    return rows


def _bench_backend(op: str, backend: str, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ref: Any,
                   ref_out: torch.Tensor, moved: int, samples: int, device: torch.device,
                   group: Any) -> dict[str, Any]:
    """One backend on every rank: a checked call, then the timing (rank 0's record)."""
    import torch.distributed as dist

    x, idx, w = inputs
    pool, combine_pool = Pool(device), Pool(device)
    try:
        r = deepport.moe_dispatch(x, idx, w, EXPERTS, group=group, backend=backend, alloc=pool.start())
    except BackendNotSupportedError as exc:  # decided by selection, before any collective: alike on every rank
        return {"backend": backend, "status": "not_supported", "bytes": moved, "message": "; ".join(exc.reasons)}
    assert isinstance(r.recv_x, torch.Tensor)
    recv = r.recv_x

    def dispatch() -> object:
        return deepport.moe_dispatch(x, idx, w, EXPERTS, group=group, backend=backend, alloc=pool.start())

    def combine() -> object:
        return deepport.moe_combine(recv, r.handle, backend=backend, alloc=combine_pool.start())

    if op == "moe_dispatch":
        ok = (torch.equal(recv, ref.recv_x) and torch.equal(r.handle.recv_src_idx, ref.handle.recv_src_idx)
              and r.num_recv_tokens_per_expert == ref.num_recv_tokens_per_expert)
    else:
        out = deepport.moe_combine(recv, r.handle, backend=backend).combined_x.double()
        ok = bool(((out - ref_out.double()).abs() <= ref_out.double().abs() * 2**-8).all())
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not int(flag.item()):
        return {"backend": backend, "status": "failed_check", "bytes": moved,
                "message": "differs from the reference backend on some rank"}
    with environment_var("DEEPPORT_CHECK_VALUES", "0"):  # validated by the checked call, as every config times
        times = _timed(dispatch if op == "moe_dispatch" else combine, samples, group)
    return {"backend": backend, "status": "ok", "bytes": moved, "samples_us": times,
            "check": {"passed": True, "against": "reference backend, same group and inputs"}}


def run_distributed(config: BenchConfig, request: Any) -> list[BenchResult]:
    """Spawn ``config.world_size`` NCCL processes, check and time every backend and the raw collective (module
    docstring)."""
    from torch.multiprocessing.spawn import spawn

    from deepport.bench.runner import backends_for

    backends = backends_for(config, request)
    spec = {"op": config.op, "tokens": config.params["tokens"], "backends": backends, "seed": request.seed,
            "samples": request.samples, "world_size": config.world_size}
    with tempfile.TemporaryDirectory(prefix="deepport-bench-moe-") as tmp:
        out_path = os.path.join(tmp, "rank0.json")
        spawn(_worker, args=(spec, os.path.join(tmp, "store"), out_path), nprocs=config.world_size, join=True)  # type: ignore[no-untyped-call]
        with open(out_path) as f:
            rows = json.load(f)
    found = []
    for row in rows:
        r = BenchResult(config.op, config.name, row["backend"], dict(config.params), row["status"],
                        row.get("message", ""), bytes=float(row["bytes"]), bound="memory", check=row.get("check", {}))
        if row["status"] == "ok":
            r.timing = {"method": "cuda_events_barrier_max_over_ranks", "samples_us": row["samples_us"],
                        "samples": {"n": len(row["samples_us"]), "median_us": statistics.median(row["samples_us"])}}
            r.set_time(statistics.median(row["samples_us"]))
        found.append(r)
    return found


def nvlink_all_to_all(world: int) -> Callable[[torch.device, bool], tuple[float, dict[str, Any]]]:
    """The NVLink ceiling over ``world`` GPUs: all_to_all_single of 4096 x 8 rows of 7168 bf16 per rank;
    the rate counts the bytes each rank sends to the other GPUs ((world - 1) / world of its rows)."""

    def measure(device: torch.device, quick: bool) -> tuple[float, dict[str, Any]]:
        if device.type != "cuda" or torch.cuda.device_count() < world:
            raise RuntimeError(f"needs {world} CUDA GPUs")
        from torch.multiprocessing.spawn import spawn

        with tempfile.TemporaryDirectory(prefix="deepport-bench-a2a-") as tmp:
            out_path = os.path.join(tmp, "rank0.json")
            spawn(_ceiling_worker, args=(os.path.join(tmp, "store"), out_path, 7 if quick else 20, world),  # type: ignore[no-untyped-call]
                  nprocs=world, join=True)
            with open(out_path) as f:
                samples = json.load(f)
        median = statistics.median(samples)
        cross = 4096 * 8 * (world - 1) // world * HIDDEN * 2
        return cross / median / 1e3, {"method": "cuda_events_barrier_max_over_ranks", "median_us": median}

    return measure


def _ceiling_worker(rank: int, store: str, out_path: str, samples: int, world: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = 4096 * 8
        send = torch.randn(rows, HIDDEN, device="cuda").to(torch.bfloat16)
        recv = torch.empty_like(send)
        times = _timed(lambda: dist.all_to_all_single(recv, send), samples, dist.group.WORLD)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


CEILING_OF_WORLD = {2: "nvlink_all_to_all", 4: "nvlink_all_to_all_ep4"}  # the GPU configs' ceiling by group size
for _world, _name in CEILING_OF_WORLD.items():
    ceilings.CEILINGS.setdefault(_name, ceilings.Ceiling(
        _name, "GB/s", f"NCCL all_to_all_single, 4096x8 rows of 7168 bf16 per rank, {_world} GPUs, "
        "cross-GPU bytes / time", nvlink_all_to_all(_world)))

# The suite case whose routing a GPU config's check follows (informational: the runner checks every backend
# against the reference backend on the config's own inputs).
CHECK_CASE_OF_WORLD = {
    2: {"moe_dispatch": "world2_t1024_h7168_top8_of_256", "moe_combine": "world2_t1024_h7168_top8_of_256"},
    4: {"moe_dispatch": "world4_uneven_duplicates", "moe_combine": "world4_empty_rank_hot_expert"},
}


def expected_cross_bytes(tokens: int, world: int = WORLD) -> float:
    """Expected payload bytes a rank sends to the other ``world - 1`` ranks: per other rank, its tokens with
    at least one of their ``TOPK`` distinct experts among that rank's ``EXPERTS / world`` (the run records the
    measured count)."""
    local = EXPERTS // world
    p_none = 1.0
    for i in range(TOPK):
        p_none *= (EXPERTS - local - i) / (EXPERTS - i)
    return tokens * (world - 1) * (1.0 - p_none) * HIDDEN * 2


def _gpu(op: str, name: str, tokens: int, world: int = WORLD) -> BenchConfig:
    return BenchConfig(name=name, op=op, params={"tokens_per_rank": tokens, "tokens": tokens, "hidden": HIDDEN,
                                                 "num_experts": EXPERTS, "topk": TOPK, "world_size": world},
                       build=_no_local_build, flops=0.0, bytes=expected_cross_bytes(tokens, world),
                       ceiling=CEILING_OF_WORLD[world],
                       check_case=f"{op}/{CHECK_CASE_OF_WORLD[world][op]}", world_size=world,
                       distributed=run_distributed)


def _no_local_build(device: torch.device, seed: int) -> Workload:
    raise RuntimeError("a multi-process config runs through run_distributed")


def _cpu(op: str, name: str, tokens: int, experts: int, topk: int) -> BenchConfig:
    return BenchConfig(name=name, op=op, params={"tokens": tokens, "hidden": CPU_HIDDEN, "num_experts": experts,
                                                 "topk": topk, "world_size": 1},
                       build=_local_workload(op, tokens, experts, topk), flops=0.0,
                       bytes=float(2 * tokens * CPU_HIDDEN * 2), ceiling="memory",  # one process: read + write
                       check_case=f"{op}/world1_t24_e16_top4", cpu=True, agreement=0.0)


CONFIGS: tuple[BenchConfig, ...] = (
    _gpu("moe_dispatch", "ep2_t4096_h7168_top8_of_256", 4096),
    _gpu("moe_combine", "ep2_t4096_h7168_top8_of_256", 4096),
    _gpu("moe_dispatch", "ep2_t128_h7168_top8_of_256_latency", 128),
    _gpu("moe_combine", "ep2_t128_h7168_top8_of_256_latency", 128),
    _gpu("moe_dispatch", "ep4_t4096_h7168_top8_of_256", 4096, world=4),
    _gpu("moe_combine", "ep4_t4096_h7168_top8_of_256", 4096, world=4),
    _gpu("moe_dispatch", "ep4_t128_h7168_top8_of_256_latency", 128, world=4),
    _gpu("moe_combine", "ep4_t128_h7168_top8_of_256_latency", 128, world=4),
    _cpu("moe_dispatch", "cpu_t64_top4_of_16", 64, 16, 4),
    _cpu("moe_combine", "cpu_t64_top4_of_16", 64, 16, 4),
)
