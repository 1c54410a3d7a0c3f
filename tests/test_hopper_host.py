"""The hopper backend's host side without a GPU: what it declares, the tile choice, the packed kernel
parameters and the operand preparation, with the driver calls (tensor maps, module load, launch)
replaced by recorders. The kernels themselves run in tests/test_hopper_gpu.py on an H200."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import torch

from deepport.backends.hopper import configs, params
from deepport.backends.hopper import fp8_gemm as hopper
from deepport.dispatch import registry
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import fp8_gemm, fp8_grouped_gemm
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

H200 = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA H200", (9, 0), 132)


class Launches:
    def __init__(self) -> None:
        self.maps: list[tuple[Any, ...]] = []
        self.launches: list[dict[str, Any]] = []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Launches:
    rec = Launches()

    def tile_map(address: int, k: int, rows: int, groups: int, row_stride: int, group_stride: int,
                 box_rows: int) -> bytes:
        rec.maps.append((address, k, rows, groups, row_stride, group_stride, box_rows))
        return bytes([len(rec.maps)]) * 128

    def launch(function: Any, grid: int, threads: int, smem: int, packed: bytes, device: torch.device) -> None:
        rec.launches.append({"function": function, "grid": grid, "threads": threads, "smem": smem,
                             "params": _unpack(packed)})

    monkeypatch.setattr(hopper.tma, "fp8_tile_map", tile_map)
    monkeypatch.setattr(hopper, "kernel_function", lambda config, device: config)
    monkeypatch.setattr(hopper.launch, "launch", launch)
    return rec


def _unpack(packed: bytes) -> dict[str, Any]:
    assert len(packed) == params.SIZE
    sfa, sfb, groups, out = struct.unpack_from("<4Q", packed, params.OFF_SFA)
    strides = struct.unpack_from("<8q", packed, params.OFF_STRIDES)
    rows, n, k, g = struct.unpack_from("<4i", packed, params.OFF_ROWS)
    return {"tmap_a": packed[:128], "tmap_b": packed[128:256], "sfa": sfa, "sfb": sfb, "groups": groups, "out": out,
            "sfa_strides": strides[0:3], "sfb_strides": strides[3:6], "out_strides": strides[6:8], "rows": rows,
            "n": n, "k": k, "num_groups": g}


def _dense_call(m: int, n: int, k: int) -> tuple[fp8_gemm.FP8GemmCall, torch.Tensor]:
    a, sfa = per_token_cast_to_fp8(torch.randn(m, k))
    b, sfb = per_block_cast_to_fp8(torch.randn(n, k))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    call = fp8_gemm.bind("nt", (a, sfa), (b, sfb), out)
    sig = call.signature
    return fp8_gemm.FP8GemmCall(call.a, call.sfa, call.b, call.sfb, call.c, call.recipe, call.sf_format,
                                type(sig)(H200, sig.dtype, sig.layout, sig.n, sig.k, sig.recipe, sig.sf_format,
                                          sig.out_dtype, sig.accumulate)), out


EP_OPS = {"moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded", "moe_low_latency_dispatch",
          "moe_low_latency_combine"}


def test_backend_declares_mla_three_fp8_ops_and_the_ep_ops_on_cuda_above_torch() -> None:
    backend = registry.get("hopper")
    assert {s.op for s in backend.ops} == {"mla_decode", "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
                                           "m_grouped_fp8_gemm_nt_masked"} | EP_OPS
    assert backend.auto_priority("cuda") == 30 > registry.get("torch").auto_priority("cuda")  # type: ignore[operator]
    assert backend.auto_priority("cpu") is None


def test_probe_says_why_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert registry.get("hopper").unavailable_reason == "no CUDA device visible to torch"


def test_envelope_reasons_name_what_the_call_has() -> None:
    support = registry.get("hopper").support("fp8_gemm_nt")
    assert support is not None
    call, _ = _dense_call(4, 256, 256)
    assert support.reasons(call.signature) == []
    sig = call.signature
    off = type(sig)(DeviceInfo("cuda", 0, "cuda", "nvidia", "A100", (8, 0), 108), sig.dtype, "nt", sig.n, sig.k,
                    (1, 1, 128), "ue8m0", torch.float32, True)
    reasons = support.reasons(off)
    assert any("sm_80" in r for r in reasons)
    assert any("recipe (1, 1, 128) with ue8m0 SFs" in r for r in reasons)
    assert any("out torch.float32 with c" in r or "out float32 with c" in r for r in reasons)


@pytest.mark.parametrize(("m", "n", "k"), [(64, 2112, 7168), (128, 576, 7168), (4096, 7168, 2048), (1, 24576, 1536)])
def test_choice_fills_the_machine_and_shared_memory(m: int, n: int, k: int) -> None:
    config = configs.choose(m, n, k, configs.VARIANT_DENSE, 132)
    assert config.smem_bytes <= configs.SMEM_CAPACITY
    assert config.stages >= configs.MIN_STAGES
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    assert tiles >= 32 or n <= 576  # small problems spread over many SMs (N=576 has at most 36 tiles of 16)
    if m <= 64:
        assert config.block_m == 64


def test_dense_parameters(recorded: Launches) -> None:
    call, out = _dense_call(300, 712, 640)
    hopper.run(call, out)
    (launch,) = recorded.launches
    config, p = launch["function"], launch["params"]
    assert isinstance(config, configs.GemmConfig) and config.variant == configs.VARIANT_DENSE
    assert (p["rows"], p["n"], p["k"], p["num_groups"]) == (300, 712, 640, 1)
    assert p["sfa"] == call.sfa.data_ptr() and p["sfb"] == call.sfb.data_ptr() and p["out"] == out.data_ptr()
    assert p["sfa_strides"] == (0, 5, 1) and p["sfb_strides"] == (0, 5, 1) and p["out_strides"] == (0, 712)
    assert launch["threads"] == config.threads and launch["smem"] == config.smem_bytes
    tiles = -(-300 // config.block_m) * -(-712 // config.block_n)
    assert launch["grid"] == min(tiles, 132)
    a_map, b_map = recorded.maps
    assert a_map == (call.a.data_ptr(), 640, 300, 1, 640, 640 * 300, config.block_m)
    assert b_map == (call.b.data_ptr(), 640, 712, 1, 640, 640 * 712, config.block_n)


def test_k_not_a_multiple_of_16_is_copied_into_padded_rows(recorded: Launches) -> None:
    call, out = _dense_call(17, 130, 328)
    hopper.run(call, out)
    a_map = recorded.maps[0]
    assert a_map[1] == 328 and a_map[4] == 336 and a_map[0] != call.a.data_ptr() and a_map[0] % 16 == 0


def test_output_with_an_odd_row_stride_goes_through_a_temporary(recorded: Launches) -> None:
    call, _ = _dense_call(8, 129, 256)
    storage = torch.zeros(8, 131, dtype=torch.bfloat16)
    out = storage[:, :129]
    hopper.run(call, out)
    p = recorded.launches[0]["params"]
    assert p["out"] != out.data_ptr() and p["out_strides"][1] % 2 == 0


def _grouped_b(g: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(g)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def test_contiguous_parameters(recorded: Launches) -> None:
    g, n, k = 3, 256, 384
    idx = torch.tensor([0] * 100 + [-1] * 28 + [2] * 128, dtype=torch.int32)
    a, sfa = per_token_cast_to_fp8(torch.randn(256, k))
    b, sfb = _grouped_b(g, n, k)
    out = torch.empty(256, n, dtype=torch.bfloat16)
    call = fp8_grouped_gemm.bind_contiguous((a, sfa), (b, sfb), out, idx)
    hopper.run_contiguous(call, out)
    p = recorded.launches[0]["params"]
    assert recorded.launches[0]["function"].block_m == 128
    assert (p["rows"], p["n"], p["k"], p["num_groups"], p["groups"]) == (256, n, k, g, idx.data_ptr())
    assert p["sfa_strides"] == (0, 3, 1) and p["sfb_strides"] == (2 * 3, 3, 1)
    assert recorded.maps[1] == (b.data_ptr(), k, n, g, k, n * k, recorded.launches[0]["function"].block_n)


def test_masked_parameters(recorded: Launches) -> None:
    g, m_max, n, k = 2, 192, 256, 512
    a, sfa = per_token_cast_to_fp8(torch.randn(g * m_max, k))
    a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
    b, sfb = _grouped_b(g, n, k)
    out = torch.empty(g, m_max, n, dtype=torch.bfloat16)
    masked_m = torch.tensor([100, 0], dtype=torch.int32)
    call = fp8_grouped_gemm.bind_masked((a, sfa), (b, sfb), out, masked_m, 64)
    hopper.run_masked(call, out)
    p = recorded.launches[0]["params"]
    assert (p["rows"], p["num_groups"], p["groups"]) == (m_max, g, masked_m.data_ptr())
    assert p["sfa_strides"] == (m_max * 4, 4, 1) and p["out_strides"] == (m_max * n, n)
    assert recorded.maps[0] == (a.data_ptr(), k, m_max, g, k, m_max * k, recorded.launches[0]["function"].block_m)


def test_params_layout_matches_the_kernel_defines() -> None:
    packed = params.GemmParams(bytes(128), bytes(128), 1, 2, 3, 4, (5, 6, 7), (8, 9, 10), (11, 12), 13, 14, 15,
                               16).pack()
    fields = _unpack(packed)
    assert fields["sfa_strides"] == (5, 6, 7) and fields["out_strides"] == (11, 12) and fields["num_groups"] == 16
    assert f"-DDP_PARAMS_SIZE={params.SIZE}" in params.LAYOUT_DEFINES


@pytest.mark.parametrize("op", sorted(EP_OPS))
def test_ep_ops_need_nccl_ranks_and_an_opt_in_until_run_on_gpus(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepport.kernels.moe_args import FP8, MoESignature

    support = registry.get("hopper").support(op)
    assert support is not None and support.device_kinds == frozenset({"cuda"})
    monkeypatch.delenv("DEEPPORT_HOPPER_EP", raising=False)
    dtype = torch.bfloat16 if "combine" in op else FP8
    one = MoESignature(H200, dtype, 7168, 8, 256, 1, "none")
    two = MoESignature(H200, dtype, 7168, 8, 256, 2, "nccl")
    assert any("2 or more ranks over NCCL" in r and "1 rank(s) over none" in r for r in support.reasons(one))
    reasons = support.reasons(two)
    assert len(reasons) == 1 and "DEEPPORT_HOPPER_EP=1" in reasons[0], reasons
    monkeypatch.setenv("DEEPPORT_HOPPER_EP", "1")
    assert support.reasons(two) == []
    assert support.reasons(one) != []
