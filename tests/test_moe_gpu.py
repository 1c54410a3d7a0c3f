"""GPU tests for MoE dispatch/combine: one CUDA device, and 2-rank NCCL (needs 2 GPUs of one host).

Skipped without CUDA (or with fewer GPUs than ranks). On two H200s:
``python3 -m pytest -q -m gpu tests/test_moe_gpu.py`` (``bash scripts/gpu_check.sh moe-tests``). Rank jobs
of the tests live in tests/rank_jobs.py (ranks import it: they get this process's ``sys.path``).
"""

from __future__ import annotations

import time

import pytest
import torch

import deepport
from deepport.conformance import Status, run_suite
from deepport.conformance.rank_group import RankGroup, RankGroupError
from deepport.conformance.suites import SUITES
from deepport.examples import deepseek_v3_moe_layer as layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MOE_OPS = [op for op in SUITES if op.startswith("moe_")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for 2-rank NCCL")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_gpu_round_trip_matches_reference_bit_for_bit(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 7168, generator=g).to("cuda", torch.bfloat16)
    idx = torch.rand(512, 256, generator=g).topk(8, dim=1).indices.cuda()
    w = torch.rand(512, 8, generator=g).cuda()
    t = deepport.moe_dispatch(x, idx, w, 256, expert_alignment=128, backend=backend)
    r = deepport.moe_dispatch(x, idx, w, 256, expert_alignment=128, backend="reference")
    assert isinstance(t.recv_x, torch.Tensor) and t.recv_x.device.type == "cuda"
    assert torch.equal(t.recv_x, r.recv_x) and t.num_recv_tokens_per_expert == r.num_recv_tokens_per_expert
    out, weights = deepport.moe_combine(t.recv_x, t.handle, t.recv_topk_weights, backend=backend)
    assert torch.equal(out, x) and weights is not None and torch.equal(weights, w)


@pytest.mark.timeout(900)
def test_moe_smoke_on_cuda_one_gpu_cases_pass() -> None:
    run = run_suite(["torch", "reference"], "smoke", device="cuda", ops=MOE_OPS, case_pattern="world1",
                    run_seed=20261128)
    bad = [f"{r.case_id} {r.backend}: {r.status.value} {r.message}" for r in run.cases if r.status != Status.PASS]
    assert not bad, "\n".join(bad)


@two_gpus
@pytest.mark.timeout(480)
def test_nccl_rank_group_never_hangs_on_a_stalled_rank_or_an_empty_send() -> None:
    """The rank group's deadlines on NCCL: a rank sending nothing completes; a rank that never joins a
    collective fails the job within its deadline (plus the stack dump), naming the rank and its phase."""
    group = RankGroup(2, "cuda", timeout_s=30)
    try:
        assert group.run("rank_jobs:exchange_rows", 2, rows_from=[2, 0]) == [[[0.0] * 3] * 2, [[0.0] * 3] * 2]
        assert group.run("rank_jobs:exchange_rows", 2, rows_from=[0, 0]) == [[], []]
        started = time.monotonic()
        with pytest.raises(RankGroupError, match=r"rank 1 of 2 \(phase 'job stall: running'"):
            group.run("rank_jobs:all_reduce_unless_stalled", 2, label="stall", stalled=1)
        assert time.monotonic() - started < 30 + 15
    finally:
        group.close()


@two_gpus
@pytest.mark.timeout(480)
def test_two_rank_nccl_cases_pass() -> None:
    run = run_suite(["torch", "reference"], "full", device="cuda", ops=MOE_OPS, case_pattern="world2",
                    run_seed=20261128)
    assert run.cases, "no 2-rank cases selected"
    bad = [f"{r.case_id} {r.backend}: {r.status.value} {r.message}" for r in run.cases if r.status != Status.PASS]
    assert not bad, "\n".join(bad)


def test_four_rank_cases_are_not_supported_with_a_reason_when_gpus_are_missing() -> None:
    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs: the 4-rank cases run")
    run = run_suite(["torch"], "smoke", device="cuda", ops=["moe_dispatch"], case_pattern="world4_uneven",
                    run_seed=1)
    (result,) = run.cases
    assert result.status == Status.NOT_SUPPORTED and "needs 4 CUDA devices" in result.message


def test_deepseek_v3_moe_layer_on_gpu() -> None:
    cfg = layer.LayerConfig(hidden=1024, intermediate=512, num_experts=32, topk=8)
    assert layer.run(cfg, 256, 0, torch.device("cuda")) <= layer.MAX_CALC_DIFF
