"""Bench configs of the low-latency MoE ops over 2 ranks (``deepport.bench.configs.moe_low_latency``).

On CPU: the configs (issue 14's decode shape, registration), the bytes, the check rules, the static
buffers, one rank's whole path (check, timing, replay check, raw collective) in a 1-rank gloo group in
this process, wrong backends caught by it, and the 2-process gloo configs end to end through the bench
runner. The 2-GPU NCCL configs (timed as a CUDA graph) run only on 2 GPUs (``gpu`` marker).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import deepport
from deepport.bench import counting
from deepport.bench.check import find_case
from deepport.bench.configs import all_configs, select
from deepport.bench.configs import moe_low_latency as ll
from deepport.bench.configs import moe_low_latency_check as check
from deepport.bench.configs.moe_low_latency_rank import StaticBuffers, run_rank
from deepport.bench.runner import Request, run
from deepport.dispatch import Backend, OpSupport, registered
from deepport.kernels import descriptor

pytestmark = pytest.mark.usefixtures("clean_env")
OPS = [ll.DISPATCH, ll.COMBINE]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_ep_bench.sh"


def _ep(device_type: str, world: int = 2) -> dict[str, Any]:
    return {c.op: c for c in select(device_type, OPS) if c.world_size == world}


# ---- the configs ---------------------------------------------------------------------------------------------------

def test_gpu_configs_are_issue_14s_decode_step_over_two_nccl_ranks() -> None:
    configs = _ep("cuda")
    assert set(configs) == set(OPS)
    for op, c in configs.items():
        assert {k: c.params[k] for k in ("tokens_per_rank", "max_tokens_per_rank", "hidden", "topk", "num_experts",
                                         "world_size")} == {"tokens_per_rank": 128, "max_tokens_per_rank": 128,
                                                            "hidden": 7168, "topk": 8, "num_experts": 256,
                                                            "world_size": 2}
        assert c.params.get("use_fp8") is (True if op == ll.DISPATCH else None)
        assert c.world_size == 2 and c.distributed is ll.run_distributed and not c.cpu
        assert c.ceiling == "nvlink_all_to_all" and c.name.startswith("ep2_")
        assert c.check_case is not None and find_case(c.check_case).op == op
    assert ll.TARGET_US == {ll.DISPATCH: 40.0, ll.COMBINE: 50.0}
    assert {op: ll.target_us(op, c.params) for op, c in configs.items()} == ll.TARGET_US
    assert all(ll.target_us(op, c.params) is None for op, c in _ep("cpu").items())  # other shapes: no target
    assert ll.target_us("moe_dispatch", configs[ll.DISPATCH].params) is None
    assert {c.world_size for c in select("cuda", OPS)} == {1, 2, 4}  # the 1-GPU permutes, EP=2, EP=4


def test_ep4_gpu_configs_are_issue_15s_decode_step_over_four_nccl_ranks() -> None:
    configs = _ep("cuda", 4)
    assert set(configs) == set(OPS)
    for op, c in configs.items():
        assert {k: c.params[k] for k in ("tokens_per_rank", "max_tokens_per_rank", "hidden", "topk", "num_experts",
                                         "world_size")} == {"tokens_per_rank": 128, "max_tokens_per_rank": 128,
                                                            "hidden": 7168, "topk": 8, "num_experts": 256,
                                                            "world_size": 4}
        assert c.world_size == 4 and c.distributed is ll.run_distributed and not c.cpu
        assert c.ceiling == "nvlink_all_to_all_ep4" and c.name.startswith("ep4_")
        assert c.check_case is not None and find_case(c.check_case).op == op
    # issue 15: the low-latency dispatch of 128 tokens at most 50 us; the combine as at EP=2
    assert {op: ll.target_us(op, c.params) for op, c in configs.items()} == {ll.DISPATCH: 50.0, ll.COMBINE: 50.0}
    assert ll.target_us(ll.DISPATCH, {**configs[ll.DISPATCH].params, "world_size": 8}) is None  # no target there
    assert all(ll.target_us(op, c.params) is None for op, c in _ep("cpu", 4).items())


def test_cpu_configs_run_the_same_runner_on_two_and_four_gloo_ranks() -> None:
    for world in (2, 4):
        configs = _ep("cpu", world)
        assert set(configs) == set(OPS)
        assert all(c.cpu and c.world_size == world and c.distributed is ll.run_distributed and c.ceiling == "memory"
                   for c in configs.values())


def test_the_configs_are_registered_through_a_bench_module_of_the_ops_descriptors() -> None:
    ours = {c.id for c in ll.CONFIGS}
    named = sorted({m for m in (descriptor(op).bench for op in OPS) if m})
    registering = [m for m in named if {c.id for c in importlib.import_module(m).CONFIGS} >= ours]
    assert registering, f"expected one of {named} to list the configs, got none"
    assert ours <= {c.id for c in all_configs()}


# ---- bytes (benchmarks/README.md) ----------------------------------------------------------------------------------

def test_bytes_are_the_fixed_rows_a_rank_sends_to_the_other_ranks() -> None:
    configs = _ep("cuda")
    assert configs[ll.DISPATCH].bytes == 128 * (7168 + 4 * 7168 // 128) == 946176  # e4m3 + float32 scales
    assert configs[ll.COMBINE].bytes == 128 * 7168 * 2 == 1835008  # bf16
    four = _ep("cuda", 4)
    assert four[ll.DISPATCH].bytes == 3 * 946176 and four[ll.COMBINE].bytes == 3 * 1835008  # to 3 other ranks
    assert counting.moe_low_latency_bytes(4, 128, 7168, fp8=True) == 3 * 128 * 7392
    assert counting.moe_low_latency_row_bytes(200, fp8=True) == 200 + 4 * 2  # a partial 128-channel block
    assert counting.moe_low_latency_bytes(1, 128, 7168, fp8=False) == 0  # one rank sends to no other


# ---- the check -----------------------------------------------------------------------------------------------------

def _one_process(seed: int = 0) -> tuple[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch's and the reference's FP8 dispatch of one process (group=None), and expert outputs y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 256, generator=g).to(torch.bfloat16)
    idx = torch.rand(24, 16, generator=g).topk(4, dim=1).indices
    w = torch.rand(24, 4, generator=g)
    got = deepport.moe_low_latency_dispatch(x, idx, 24, 16, use_fp8=True, backend="torch")
    ref = deepport.moe_low_latency_dispatch(x, idx, 24, 16, use_fp8=True, backend="reference")
    return got, ref, idx, w, torch.randn(got.recv_x[0].shape, generator=g).to(torch.bfloat16)


def test_dispatch_check_compares_counts_and_the_rows_below_them_bit_for_bit() -> None:
    got, ref, *_ = _one_process()
    assert check.dispatch_differences(got.recv_x, got.recv_count, ref.recv_x, ref.recv_count) == []
    data, scales = got.recv_x
    e = int(got.recv_count.argmax())
    n = int(got.recv_count[e])
    data.view(torch.uint8)[e, n:] ^= 0xFF  # rows past the count: unspecified, not compared
    scales[e, n:] = -1.0
    assert check.dispatch_differences(got.recv_x, got.recv_count, ref.recv_x, ref.recv_count) == []
    data.view(torch.uint8)[e, n - 1, 3] ^= 1
    (found,) = check.dispatch_differences(got.recv_x, got.recv_count, ref.recv_x, ref.recv_count)
    assert "expected the reference's payload" in found and "got 1 rows that differ" in found
    data.view(torch.uint8)[e, n - 1, 3] ^= 1
    scales[e, 0, 1] *= 2
    (found,) = check.dispatch_differences(got.recv_x, got.recv_count, ref.recv_x, ref.recv_count)
    assert found.startswith("recv_x scales: expected") and "got 1 rows" in found
    count = got.recv_count.clone()
    count[e] -= 1
    (found,) = check.dispatch_differences(got.recv_x, count, ref.recv_x, ref.recv_count)
    assert found.startswith("recv_count: expected") and str(ref.recv_count.tolist()) in found


def test_combine_check_allows_one_bf16_step_or_a_cancellation_and_no_more() -> None:
    """One bf16 step anywhere; many steps only where the error stays within 2^-16 of the output's rms (a
    float32 sum of terms that nearly cancel); a term's worth of error never."""
    got, ref, idx, w, y = _one_process()
    out = deepport.moe_low_latency_combine(y, idx, w, got.handle, backend="torch")
    expected = deepport.moe_low_latency_combine(y, idx, w, ref.handle, backend="reference")
    assert check.combine_differences(out, expected) == []
    bits = out.view(torch.int16)
    bits[0, 0] += 1  # one bf16 step away
    assert check.combine_differences(out, expected) == []
    bits[0, 0] += 1
    (found,) = check.combine_differences(out, expected)
    assert "expected every element within 1 bf16 step" in found and "got 1 elements further" in found
    bits[0, 0] -= 2
    rms = float(expected.float().pow(2).mean().sqrt())
    expected[2, 2], out[2, 2] = rms * 2.0 ** -20, rms * 2.0 ** -20 * 1.25  # ~32 steps, 2^-22 x rms
    assert int(check.bf16_steps(out, expected)[2, 2]) >= 16
    assert check.combine_differences(out, expected) == []
    out[2, 2] = rms * 2.0 ** -15  # past the slack
    (found,) = check.combine_differences(out, expected)
    assert "got 1 elements further" in found and "first at flat index 514" in found
    out[2, 2] = expected[2, 2]
    out[1, 1] = float("nan")
    (found,) = check.combine_differences(out, expected)
    assert "expected NaN where the reference has NaN, got 1" in found
    (found,) = check.combine_differences(out[:, :8], expected)
    assert "expected torch.bfloat16 (24, 256) (reference), got torch.bfloat16 (24, 8)" in found


def test_bf16_steps_counts_representable_values_across_zero() -> None:
    a = torch.tensor([1.0, 1.0, 0.0, -0.0, 2.0 ** -133, -(2.0 ** -133), 1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 1.0078125, -0.0, 0.0, -(2.0 ** -133), 2.0 ** -133, 1.015625], dtype=torch.bfloat16)
    assert check.bf16_steps(a, b).tolist() == [0, 1, 0, 0, 2, 2, 2]


def test_static_buffers_hand_every_bound_call_the_same_memory() -> None:
    buffers = StaticBuffers(torch.device("cpu"))
    first, second = buffers.alloc(), buffers.alloc()
    a, b = first((4, 8), torch.float32), first((3,), torch.int32)
    assert second((4, 8), torch.float32) is a and second((3,), torch.int32) is b
    with pytest.raises(ValueError, match=r"static buffer 0: expected torch.float32 \(2, 8\) .* got torch.float32 "
                                         r"\(4, 8\)"):
        buffers.alloc()((2, 8), torch.float32)


# ---- one rank's path, in a 1-rank gloo group -----------------------------------------------------------------------

def _spec(op: str, backends: list[str]) -> dict[str, Any]:
    return {"op": op, "device_type": "cpu", "world_size": 1, "tokens": 20, "max_tokens_per_rank": 24, "hidden": 256,
            "num_experts": 8, "topk": 3, "use_fp8": True, "backends": backends, "seed": 3, "samples": 3,
            "calls_per_graph": 2}


@pytest.mark.parametrize("op", OPS)
def test_one_rank_checks_times_and_rechecks_each_backend_then_the_raw_collective(one_rank: Any, op: str) -> None:
    rows = run_rank(0, _spec(op, ["torch", "reference"]), torch.device("cpu"), one_rank)
    assert [r["backend"] for r in rows] == ["torch", "reference", "gloo_all_to_all"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["bytes"] == 0  # one rank sends nothing to another
        assert r["timing"]["method"] == "host_perf_counter_barrier_max_over_ranks"
        assert len(r["timing"]["samples_us"]) == 3 and all(t > 0 for t in r["timing"]["samples_us"])
    for r in rows[:2]:
        assert r["check"]["reference_backend"]["passed"] is True and r["check"]["timed_output"]["passed"] is True


_RUNS = [0]


def _flip_a_received_byte(call: Any) -> Any:
    """Torch's dispatch, one payload byte of a specified row flipped."""
    from deepport.backends.torch.moe_layouts import dispatch_low_latency

    got = dispatch_low_latency(call)
    e = int(got.recv_count.argmax())
    got.recv_x[0].view(torch.uint8)[e, 0, 0] ^= 1
    return got


def _right_once_then_wrong(call: Any) -> torch.Tensor:
    """Torch's combine, right on the first call only (the checked one), far off after."""
    from deepport.backends.torch.moe_layouts import combine_low_latency

    out: torch.Tensor = combine_low_latency(call)
    _RUNS[0] += 1
    if _RUNS[0] > 1:
        out[0] = out[0] * 3 + 1
    return out


def _raising(call: Any) -> Any:
    raise RuntimeError("kernel launch failed")


def _backend(name: str, op: str, fn: str) -> Backend:
    """``fn`` for ``op``; torch's dispatch too for a combine (the checked combine is on the backend's own handle)."""
    dtypes = frozenset({torch.bfloat16, torch.float8_e4m3fn})
    ops = [OpSupport(op=op, entry=f"{__name__}:{fn}", dtypes=dtypes)]
    if op == ll.COMBINE:
        ops.append(OpSupport(op=ll.DISPATCH, entry="deepport.backends.torch.moe_layouts:dispatch_low_latency",
                             dtypes=dtypes))
    return Backend(name=name, summary=f"test backend {name}", version="0", ops=tuple(ops), priority={})


@pytest.mark.parametrize(("op", "fn", "status", "part", "says"), [
    (ll.DISPATCH, "_flip_a_received_byte", "check_failed", "reference_backend", "rank 0: recv_x: expected"),
    (ll.COMBINE, "_right_once_then_wrong", "check_failed", "timed_output",
     "rank 0: the timed calls' output differs from the checked call's: combined_x: expected"),
    (ll.DISPATCH, "_raising", "error", None, "rank 0: RuntimeError: kernel launch failed"),
])
def test_a_wrong_backend_is_reported_with_what_was_expected_and_not_timed(one_rank: Any, op: str, fn: str,
                                                                         status: str, part: str | None,
                                                                         says: str) -> None:
    _RUNS[0] = 0
    with registered(_backend("wrong_ll", op, fn)):
        rows = run_rank(0, _spec(op, ["torch", "wrong_ll"]), torch.device("cpu"), one_rank)
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["torch"]["status"] == "ok" and by_backend["gloo_all_to_all"]["status"] == "ok"
    wrong = by_backend["wrong_ll"]
    assert wrong["status"] == status and says in wrong["message"], wrong
    assert "timing" not in wrong
    if part is not None:
        assert wrong["check"][part]["passed"] is False


# ---- scripts/gpu_ep_bench.sh ---------------------------------------------------------------------------------------

def test_gpu_ep_bench_benches_the_low_latency_ops_and_prints_ratio_and_target(tmp_path: Path) -> None:
    """The script's bench call names the ops; its summary (run here on made-up GPU results) gives raw NCCL
    time / backend time and issue 14's target, met or not, for the low-latency configs."""
    text = SCRIPT.read_text()
    call = re.search(r'"\$PY" -m deepport bench .*?--out', text, re.S)
    assert call is not None and all(op in call.group(0) for op in OPS)
    summary = re.search(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert summary is not None
    times = {("moe_low_latency_dispatch", "torch", 2): 60.0, ("moe_low_latency_combine", "torch", 2): 45.0,
             ("moe_low_latency_dispatch", "torch", 4): 45.0, ("moe_low_latency_combine", "torch", 4): 55.0}
    results = [{"op": op, "config": c.name, "backend": b, "status": "ok",
                "time_us": times.get((op, b, world), 80.0), "gbps": 1.0, "params": dict(c.params)}
               for world in (2, 4) for op, c in _ep("cuda", world).items() for b in ("torch", "nccl_all_to_all")]
    (tmp_path / "bench.json").write_text(json.dumps({"results": results}))
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run([sys.executable, "-", str(tmp_path / "bench.json"), str(tmp_path / "ep.json")],
                          input=summary.group(1), text=True, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {(r["op"], r["config"][:3], r["backend"]): r for r in json.loads((tmp_path / "ep.json").read_text())["rows"]}
    dispatch, combine = rows[(ll.DISPATCH, "ep2", "torch")], rows[(ll.COMBINE, "ep2", "torch")]
    assert dispatch["raw_over_backend"] == pytest.approx(80 / 60) and dispatch["target_us"] == 40.0
    assert dispatch["meets_target"] is False and combine["meets_target"] is True
    assert rows[(ll.DISPATCH, "ep2", "nccl_all_to_all")]["target_us"] is None
    assert "<=40 NO" in done.stdout and "<=50 yes" in done.stdout
    dispatch, combine = rows[(ll.DISPATCH, "ep4", "torch")], rows[(ll.COMBINE, "ep4", "torch")]  # issue 15's
    assert dispatch["target_us"] == combine["target_us"] == 50.0
    assert dispatch["meets_target"] is True and combine["meets_target"] is False and "<=50 NO" in done.stdout
    assert len(rows) == 8


# ---- the 2-process configs, end to end -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_cpu_configs_run_on_gloo_processes_through_the_bench_runner(world: int) -> None:
    configs = list(_ep("cpu", world).values())
    doc = run(Request(device=torch.device("cpu"), configs=configs, backends=["torch"], quick=True))
    by_key = {(r["op"], r["backend"]): r for r in doc["results"]}
    assert set(by_key) == {(op, b) for op in OPS for b in ("torch", "gloo_all_to_all")}
    for (op, _), r in by_key.items():
        c = _ep("cpu", world)[op]
        t_max = c.params["max_tokens_per_rank"]
        row = counting.moe_low_latency_row_bytes(256, fp8=op == ll.DISPATCH)
        assert r["status"] == "ok" and r["bytes"] == c.bytes == (world - 1) * t_max * row
        samples = r["timing"]["samples"]
        assert r["timing"]["method"] == "host_perf_counter_barrier_max_over_ranks"
        assert samples["n"] == doc["settings"]["samples"] and samples["median_us"] == r["time_us"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3) and r["ceiling"] == "cpu_memcpy"
        assert r["baseline"] == "torch" and r["x_baseline"] == pytest.approx(
            by_key[(op, "torch")]["time_us"] / r["time_us"])
    for op in OPS:
        assert by_key[(op, "torch")]["check"]["reference_backend"]["passed"] is True
        assert by_key[(op, "torch")]["check"]["timed_output"]["passed"] is True


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for 2-rank NCCL")
@pytest.mark.timeout(600)
def test_gpu_configs_check_and_time_each_backend_as_a_cuda_graph_next_to_nccl() -> None:
    configs = list(_ep("cuda").values())
    doc = run(Request(device=torch.device("cuda"), configs=configs, backends=["torch"], quick=True))
    by_key = {(r["op"], r["backend"]): r for r in doc["results"]}
    for op in OPS:
        for backend in ("torch", "nccl_all_to_all"):
            r = by_key[(op, backend)]
            assert r["status"] == "ok", r
            assert r["timing"]["method"] == "cuda_graph_barrier_max_over_ranks", r["timing"]["notes"]
            assert r["timing"]["calls_per_sample"] == ll.CALLS_PER_GRAPH and r["time_us"] > 0
