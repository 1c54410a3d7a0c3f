"""GPU tests: the same code paths as the CPU tests, on a CUDA device. Skipped where none is present;
run on the device machine with `scripts/gpu_check.sh`."""

from __future__ import annotations

import pytest
import torch

import deepport
from deepport.conformance import run_suite
from deepport.dispatch import device_info, registry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _small_call(device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(2, 2, 16, 576, generator=g).div(10).to(device, torch.bfloat16)
    k_cache = torch.randn(6, 64, 1, 576, generator=g).div(10).to(device, torch.bfloat16)
    block_table = torch.tensor([[0, 3, 5], [2, 1, 4]], dtype=torch.int32, device=device)
    cache_seqlens = torch.tensor([150, 70], dtype=torch.int32, device=device)
    return q, k_cache, block_table, cache_seqlens


def test_cuda_device_is_identified_with_its_architecture() -> None:
    info = device_info(torch.device("cuda"))
    assert info.kind in {"cuda", "rocm"}
    if info.kind == "cuda":
        assert info.capability is not None and info.arch.startswith("sm_")
    assert info.multiprocessors > 0


def test_automatic_choice_on_cuda_matches_reference() -> None:
    q, k_cache, block_table, cache_seqlens = _small_call("cuda")
    explanation = deepport.explain("mla_decode", q, k_cache, block_table, cache_seqlens, 512, causal=True)
    # measured on the H200 (deepport/dispatch/perf_tables/nvidia-sm90.json) and by priority: hopper > triton > torch
    sig = explanation.signature
    expected = next(b for b in ("hopper", "triton", "torch") if not registry.get(b).reasons("mla_decode", sig))
    assert explanation.chosen == expected, explanation.reason
    out, lse = deepport.mla_decode(q, k_cache, block_table, cache_seqlens, 512, causal=True)
    ref_out, ref_lse = deepport.mla_decode(q, k_cache, block_table, cache_seqlens, 512, causal=True,
                                           backend="reference")
    assert out.device.type == "cuda" and ref_out.device.type == "cuda"
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-3, rtol=2 / 128)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)


def test_value_checks_run_on_cuda_tensors_before_any_backend() -> None:
    q, k_cache, block_table, cache_seqlens = _small_call("cuda")
    block_table[1, 1] = 99  # request 1 (length 70) uses two pages: slot 1 is in use
    with pytest.raises(deepport.InvalidArgumentError, match=r"block_table\[1, 1\] = 99"):
        deepport.mla_decode(q, k_cache, block_table, cache_seqlens, 512)
    block_table[1, 2] = 2147480000  # an unused slot may hold anything
    block_table[1, 1] = 1
    deepport.mla_decode(q, k_cache, block_table, cache_seqlens, 512)


def test_metadata_plans_for_the_gpus_multiprocessors() -> None:
    _, _, _, cache_seqlens = _small_call("cuda")
    md = deepport.get_mla_metadata(cache_seqlens, 32, 1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert md.num_sm_parts == max(sms // 1 // 1, 1)
    assert md.tile_scheduler_metadata.shape == (md.num_sm_parts, 8)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_smoke_tier_passes_on_cuda(backend: str) -> None:
    run = run_suite([backend], "smoke", device="cuda")
    # Multi-rank MoE cases need one GPU per rank: not_supported on a one-GPU machine, with that reason.
    bad = [f"{r.case_id}: {r.status} {r.message}" for r in run.cases if r.status.value != "pass"
           and not (r.status.value == "not_supported" and "CUDA devices (one per rank)" in (r.message or ""))]
    assert not bad, "\n".join(bad) + f"\nrun seed {run.run_seed}"


@pytest.mark.parametrize("name", ["exploit_side_stream_race", "exploit_writes_after_return", "exploit_control"])
def test_a_write_on_a_side_stream_the_caller_does_not_wait_for_is_rejected(name: str) -> None:
    """The exploit corpus's non-default stream race, on a real CUDA side stream: the harness judges the copy
    it queued on the caller's stream at return (the poison), and sees the memory change afterwards. The
    late thread and the honest control run beside it, on the same case."""
    from deepport.conformance import Status, select_cases
    from deepport.conformance.exploits import exploit
    from deepport.conformance.runner import run_case
    from deepport.dispatch import registered

    (case,) = [c for c in select_cases("smoke", ops=["mla_decode"])
               if c.id == "mla_decode/b3_sq1_hq1_hkv1_d576v512_p64_sk100_bfloat16"]
    with registered(exploit(name)):
        (result,) = run_case(case, [name], torch.device("cuda"), 20261101)
    if name == "exploit_control":
        assert result.status is Status.PASS, result.message
        return
    assert result.status is Status.FAIL, result.message
    assert "changed after the call returned" in result.message or "NaN positions differ" in result.message, \
        result.message
