"""The DeepSeek-V3 decode-step example runs at reduced width on the CPU, names the backend of every op,
times it, and its float64 check would catch a wrong result."""

from __future__ import annotations

import pytest
import torch

from deepport.examples import deepseek_v3_decode_step as example

OPS = ("get_mla_metadata", "mla_decode", "fp8_gemm_nt", "moe_low_latency_dispatch", "m_grouped_fp8_gemm_nt_masked",
       "moe_low_latency_combine")


def test_decode_step_cli_reports_each_op_with_its_backend_and_passes_its_check(
        capsys: pytest.CaptureFixture[str], clean_env: None) -> None:
    assert example.main(["--batch", "2", "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    rows = {op: line.split() for line in printed.splitlines() for op in OPS if op in line.split()}
    assert set(rows) == set(OPS)
    for op in OPS[1:]:
        assert rows[op][-3] == "torch" and float(rows[op][-2]) > 0, rows[op]  # backend, us/call
    assert "check vs float64" in printed and "(ok," in printed


def test_decode_step_check_catches_a_wrong_moe_output(clean_env: None) -> None:
    cfg = example.StepConfig(2, 4, 64, example.REDUCED.layer)
    cpu = torch.device("cpu")
    w, x = example.make_weights(cfg, 1, cpu, keep_bf16=True), example.make_inputs(cfg, 1, cpu)
    got = example.decode_step(w, x, example.plan_step(x, cfg), cfg, example.Recorder(), "low_latency")
    attn_diff, moe_diff = example.check(w, x, cfg, got)
    assert max(attn_diff, moe_diff) <= example.moe.MAX_CALC_DIFF
    wrong = (*got[:4], got[4].roll(1, dims=0))  # each token gets another token's expert output
    assert example.check(w, x, cfg, wrong)[1] > 100 * example.moe.MAX_CALC_DIFF


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_on_the_gpu_at_reduced_width_passes_its_float64_check(clean_env: None) -> None:
    """Whichever backends dispatch picks on the GPU (triton, hopper, torch) against float64."""
    assert example.main(["--device", "cuda", "--width", "reduced", "--samples", "3"]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_at_full_width_runs_and_replays_as_one_cuda_graph(capsys: pytest.CaptureFixture[str],
                                                                      clean_env: None) -> None:
    assert example.main(["--device", "cuda", "--samples", "5", "--cuda-graph"]) == 0
    printed = capsys.readouterr().out
    assert "CUDA graph replay" in printed and all(op in printed for op in OPS)
