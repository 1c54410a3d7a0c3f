"""The OpenCL backend's host side: device choice, the availability probe, the split-KV pieces and the tile
choice from device limits, and its registration (no device needed except where marked)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pyopencl")
import pyopencl as cl

from deepport.backends.opencl import fp8_gemm, mla_decode, runtime
from deepport.backends.opencl.runtime import DeviceLimits
from deepport.dispatch import registry
from deepport.kernels import mla_schedule

GPU, CPU = int(cl.device_type.GPU), int(cl.device_type.CPU)


def _device(platform: str, name: str, kind: int, units: int = 8, clock: int = 1000) -> Any:
    return SimpleNamespace(platform=SimpleNamespace(name=platform), name=name, type=kind, max_compute_units=units,
                           max_clock_frequency=clock)


DEVICES = [_device("Portable Computing Language", "pthread-Xeon", CPU, 64),
           _device("NVIDIA CUDA", "NVIDIA H200", GPU, 132, 1980),
           _device("Intel(R) OpenCL Graphics", "Intel Arc", GPU, 32, 2400)]


def test_the_fastest_gpu_is_chosen_by_default() -> None:
    device, why = runtime.choose_device(DEVICES, None)
    assert device is DEVICES[1] and "GPU" in why


def test_the_cpu_is_chosen_when_there_is_no_gpu() -> None:
    device, why = runtime.choose_device(DEVICES[:1], None)
    assert device is DEVICES[0] and "no GPU" in why


def test_an_explicit_request_matches_platform_or_device_names_case_insensitively() -> None:
    assert runtime.choose_device(DEVICES, "portable")[0] is DEVICES[0]
    assert runtime.choose_device(DEVICES, "arc")[0] is DEVICES[2]


def test_an_explicit_request_that_matches_nothing_says_what_exists() -> None:
    device, why = runtime.choose_device(DEVICES, "radeon")
    assert device is None
    assert "DEEPPORT_OPENCL_DEVICE='radeon' matches no OpenCL device" in why and "NVIDIA H200" in why


def test_no_device_at_all_is_a_reason() -> None:
    device, why = runtime.choose_device([], None)
    assert device is None and "no OpenCL platform or device" in why


def test_a_device_whose_compiler_fails_is_set_aside_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that cannot build the probe kernel (PoCL 3.0 on a CPU its LLVM does not know) is never chosen:
    another device is, and the reason names the one set aside; with none left the backend is unavailable."""
    old_pocl, new_pocl = _device("Portable Computing Language", "pthread-AMD EPYC", CPU), DEVICES[0]
    errors = {id(old_pocl): "error: unknown target CPU 'generic'", id(new_pocl): None}
    monkeypatch.delenv(runtime.ENV_DEVICE, raising=False)
    monkeypatch.setattr(runtime, "build_failure", lambda d: errors[id(d)])
    monkeypatch.setattr(runtime, "all_devices", lambda: [old_pocl, new_pocl])
    device, why = runtime._choose()
    assert device is new_pocl and "pthread-AMD EPYC: error: unknown target CPU 'generic'" in why
    monkeypatch.setattr(runtime, "all_devices", lambda: [old_pocl])
    reason = runtime.unavailable_reason()
    assert reason is not None and reason.startswith("no OpenCL device builds a kernel") and "generic" in reason


def test_the_probe_kernel_builds_on_the_chosen_device() -> None:
    if runtime.unavailable_reason() is not None:
        pytest.skip(f"no OpenCL device: {runtime.unavailable_reason()}")
    device, _ = runtime._choose()
    assert device is not None and runtime.build_failure(device) is None


def test_the_probe_names_a_missing_pyopencl(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pyopencl'")

    monkeypatch.setattr(runtime, "_cl", missing)
    reason = runtime.unavailable_reason()
    assert reason is not None and "pyopencl is not installed" in reason


def test_the_probe_reports_an_unmatched_device_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.ENV_DEVICE, "no-such-device-anywhere")
    reason = runtime.unavailable_reason()
    assert reason is not None and "matches no OpenCL device" in reason


def test_registration_automatic_on_cpu_below_torch_explicit_elsewhere() -> None:
    backend = registry.get("opencl")
    assert backend.auto_priority("cpu") == 5 < registry.get("torch").auto_priority("cpu")  # type: ignore[operator]
    assert backend.auto_priority("cuda") is None


@pytest.mark.parametrize("parts", [1, 3, 8, 33])
def test_split_kv_pieces_cover_each_request_once_in_order(parts: int) -> None:
    rng = np.random.default_rng(parts)
    lengths = np.concatenate([[0, 1, 64, 65], rng.integers(0, 700, size=12)]).astype(np.int64)
    records, splits = mla_schedule.plan_split_kv(lengths, parts)
    pieces = mla_decode.pieces_from_plan(records, splits, lengths)
    assert sorted(pieces[:, 3].tolist()) == list(range(int(splits[-1])))  # one accumulator row per piece
    for req, length in enumerate(lengths):
        mine = pieces[pieces[:, 0] == req]
        assert mine[:, 3].tolist() == list(range(int(splits[req]), int(splits[req + 1])))
        covered = [t for _, begin, end, _ in mine for t in range(begin, end)]
        assert covered == list(range(int(length)))  # every token once, in order, none past the length


def _limits(**changes: Any) -> DeviceLimits:
    base = DeviceLimits("P", "D", "OpenCL 3.0", "1", True, 132, 1024, 48 * 1024, False, 1 << 30, True)
    return dataclasses.replace(base, **changes)


def test_rowwise_mla_tile_follows_local_memory_and_work_group_limits() -> None:
    big = mla_decode.choose_rowwise_config(_limits(), 576)
    assert (big.rows, big.tokens, big.threads) == (16, 128, 128) and big.local_bytes(576) <= 48 * 1024
    small = mla_decode.choose_rowwise_config(_limits(local_mem_size=32 * 1024, max_work_group_size=64), 576)
    assert small.local_bytes(576) <= 32 * 1024 and small.threads <= 64
    with pytest.raises(RuntimeError, match="no MLA tile fits"):
        mla_decode.choose_rowwise_config(_limits(local_mem_size=4 * 1024), 576)
    with pytest.raises(RuntimeError, match="no MLA tile fits"):
        mla_decode.choose_config(_limits(local_mem_size=4 * 1024), 576, 512, 16)


def test_a_gpu_with_local_memory_gets_the_staged_kernel_within_its_envelope() -> None:
    gpu = _limits()  # 48 KiB of local memory, work-groups of 1024, 132 compute units
    memory_bound = mla_decode.choose_config(gpu, 576, 512, 16)  # h_q 16, s_q 1, one KV head
    assert memory_bound == mla_decode.StagedConfig(16, 256)
    assert (memory_bound.kernel, memory_bound.tokens, memory_bound.dims_per_lane(512)) == \
        ("mla_decode_split_staged", 256, 4)
    compute_bound = mla_decode.choose_config(gpu, 576, 512, 128)  # h_q 128
    assert compute_bound == mla_decode.StagedConfig(16, 128)
    assert mla_decode.choose_config(gpu, 576, 512, 3) == mla_decode.StagedConfig(8, 128)
    for cfg in (memory_bound, compute_bound):
        assert cfg.well_formed() and cfg.local_bytes(576) <= 48 * 1024 and cfg.threads <= 1024
    # outside the envelope (16-byte K loads, 8-byte V loads), on emulated local memory, or where no staged
    # tile fits: the row-wise kernel, chosen here rather than at run time
    assert isinstance(mla_decode.choose_config(gpu, 100, 96, 16), mla_decode.MLAConfig)
    assert isinstance(mla_decode.choose_config(gpu, 576, 510, 16), mla_decode.MLAConfig)
    cpu = _limits(is_gpu=False, local_mem_is_global=True, local_mem_size=4 << 20, max_work_group_size=4096)
    assert mla_decode.choose_config(cpu, 576, 512, 16) == mla_decode.MLAConfig(16, 128)
    tight = mla_decode.choose_config(_limits(local_mem_size=16 * 1024, max_work_group_size=128), 576, 512, 16)
    assert isinstance(tight, mla_decode.StagedConfig) and tight.local_bytes(576) <= 16 * 1024 and tight.threads <= 128


def test_staged_configs_outside_their_envelope_are_refused_before_any_build() -> None:
    assert not mla_decode.StagedConfig(16, 256).supports(100, 96)
    assert not mla_decode.StagedConfig(16, 100).well_formed()  # 100 work-items: not a multiple of the rows
    assert mla_decode.StagedConfig(16, 256).supports(64, 32)


def test_gemm_tile_follows_local_memory_and_work_group_limits() -> None:
    assert fp8_gemm.choose_config(_limits()) == fp8_gemm.GemmConfig(128, 128, 32)
    assert fp8_gemm.choose_config(_limits(is_gpu=False, local_mem_is_global=True)) == fp8_gemm.GemmConfig(64, 64, 32)
    small = fp8_gemm.choose_config(_limits(max_work_group_size=128))
    assert small.threads <= 128 and 128 % small.bm == 0
    with pytest.raises(RuntimeError, match="no FP8 GEMM tile fits"):
        fp8_gemm.choose_config(_limits(max_work_group_size=8))


# ---- the smaller tiles other devices get, run here on whatever device the backend picks -----------------------

def _mla_inputs(seed: int) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([0, 1, 70, 190], dtype=torch.int32)
    page, blocks = 64, 12
    q = (torch.randn(4, 2, 8, 576, generator=g) / 4).to(torch.bfloat16)
    k_cache = (torch.randn(blocks, page, 2, 576, generator=g) / 4).to(torch.bfloat16)
    table = torch.randperm(blocks, generator=g)[:12].view(4, 3).to(torch.int32)
    return q, k_cache, table, lens


@pytest.mark.skipif(runtime.unavailable_reason() is not None, reason="no OpenCL device")
def test_a_small_mla_tile_gives_the_reference_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import deepport

    monkeypatch.setattr(mla_decode, "choose_config", lambda *shape: mla_decode.MLAConfig(8, 32))
    q, k_cache, table, lens = _mla_inputs(0)
    out, lse = deepport.mla_decode(q, k_cache, table, lens, 512, causal=True, backend="opencl")
    ref_out, ref_lse = deepport.mla_decode(q, k_cache, table, lens, 512, causal=True, backend="reference")
    assert (out.float() - ref_out.float()).abs().max() <= 2 ** -7 * ref_out.float().abs().max()
    assert bool(torch.isinf(ref_lse).any())  # the case has queries that see nothing (lse = +inf)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(runtime.unavailable_reason() is not None, reason="no OpenCL device")
@pytest.mark.parametrize("tile", [fp8_gemm.GemmConfig(64, 64, 32), fp8_gemm.GemmConfig(32, 32, 16)])
def test_smaller_gemm_tiles_give_the_reference_answer(monkeypatch: pytest.MonkeyPatch,
                                                      tile: fp8_gemm.GemmConfig) -> None:
    import torch

    import deepport
    from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

    monkeypatch.setattr(fp8_gemm, "choose_config", lambda limits: tile)
    g = torch.Generator().manual_seed(1)
    a = per_token_cast_to_fp8(torch.randn(70, 392, generator=g))
    b = per_block_cast_to_fp8(torch.randn(150, 392, generator=g))
    got = torch.empty(70, 150, dtype=torch.float32)
    want = torch.empty(70, 150, dtype=torch.float32)
    deepport.fp8_gemm_nt(a, b, got, backend="opencl")
    deepport.fp8_gemm_nt(a, b, want, backend="reference")
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
