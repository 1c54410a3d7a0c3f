"""The hopper MLA decode's host side without a GPU: what it accepts (reasons as data), the tensor maps
of q and the cache, the grid and the packed kernel parameters, with the driver calls (tensor maps,
module load, launch) replaced by recorders. The kernels run in tests/test_hopper_mla_gpu.py on an H200."""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import pytest
import torch

from deepport.backends.hopper import mla_decode as hopper
from deepport.dispatch import registry
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import mla_decode as mla

H200 = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA H200", (9, 0), 132)
_PARAMS = struct.Struct("<128s128s8Qq6if")


class Recorded:
    def __init__(self) -> None:
        self.maps: list[tuple[Any, ...]] = []
        self.launches: list[dict[str, Any]] = []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    rec = Recorded()

    def tile_map(address: int, dims: tuple[int, ...], strides: tuple[int, ...], box: tuple[int, ...]) -> bytes:
        rec.maps.append((address, dims, strides, box))
        return bytes([len(rec.maps)]) * 128

    def launch(function: Any, grid: Any, threads: int, smem: int, packed: bytes, device: torch.device) -> None:
        rec.launches.append({"function": function, "grid": grid, "threads": threads, "smem": smem, "packed": packed})

    monkeypatch.setattr(hopper.tma, "tile_map_16bit", tile_map)
    monkeypatch.setattr(hopper, "_function", lambda kind, page, dtype, device: kind)
    monkeypatch.setattr(hopper.launch, "launch", launch)
    return rec


def _call(lens: list[int], s_q: int, h_q: int, h_kv: int, page: int, causal: bool = False) -> mla.MLADecodeCall:
    b = len(lens)
    width = max(-(-max(n, 1) // page) for n in lens)
    q = torch.randn(b, s_q, h_q, 576).to(torch.bfloat16)
    cache = torch.randn(b * width, page, h_kv, 576).to(torch.bfloat16)
    table = torch.arange(b * width, dtype=torch.int32).view(b, width)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    md = mla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    call = mla.bind(q, cache, table, seqlens, 512, causal=causal, metadata=md)
    return dataclasses.replace(call, signature=dataclasses.replace(call.signature, device=H200))


def _outputs(call: mla.MLADecodeCall) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, _ = call.q.shape
    return torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16), torch.empty(b, h_q, s_q)


def test_one_kv_head_reads_q_in_place_and_fills_every_sm(recorded: Recorded) -> None:
    call = _call([100, 3000, 64], s_q=2, h_q=128, h_kv=1, page=64, causal=True)
    out, lse = _outputs(call)
    hopper.run(call, out, lse)
    q_map, k_map = recorded.maps
    assert q_map == (call.q.data_ptr(), (576, 256, 3), (1152, 256 * 1152), (64, 64, 1))
    assert k_map == (call.k_cache.data_ptr(), (576, 1, 64, call.k_cache.shape[0]), (1152, 1152, 64 * 1152),
                     (64, 1, 64, 1))
    decode = recorded.launches[0]
    assert decode["function"] == "decode" and decode["grid"] == (132 // 4, 4, 1)
    assert decode["threads"] == hopper.THREADS and decode["smem"] == hopper.SMEM_BYTES
    fields = _PARAMS.unpack(decode["packed"][: _PARAMS.size])
    q_rows, h_q, s_q, causal, h_kv, group, scale_log2 = fields[-7:]
    assert (q_rows, h_q, s_q, causal, h_kv, group) == (256, 128, 2, 1, 1, 128)
    assert scale_log2 == pytest.approx(math.log2(math.e) / math.sqrt(576))
    assert len(decode["packed"]) == hopper.PARAMS_SIZE


def test_several_kv_heads_pack_q_per_head_and_use_a_4d_cache_map(recorded: Recorded) -> None:
    call = _call([40, 97], s_q=2, h_q=32, h_kv=2, page=16)
    out, lse = _outputs(call)
    hopper.run(call, out, lse)
    q_map, k_map = recorded.maps
    assert q_map[0] != call.q.data_ptr()  # a packed copy [b * h_kv, s_q * group, 576]
    assert q_map[1:] == ((576, 32, 4), (1152, 32 * 1152), (64, 64, 1))
    assert k_map[1:] == ((576, 2, 16, call.k_cache.shape[0]), (1152, 2 * 1152, 16 * 2 * 1152), (64, 1, 16, 1))
    assert recorded.launches[0]["grid"] == (132 // 2, 1, 2)


def test_packed_query_orders_rows_by_kv_head_then_token() -> None:
    q = torch.randn(2, 3, 8, 576)
    packed, row, batch = hopper.packed_query(q, h_kv=2)
    assert packed.shape == (2, 2, 3, 4, 576) and (row, batch) == (576, 3 * 4 * 576)
    flat = packed.reshape(4, 12, 576)
    # KV head g, query row r = i * group + h' is query head g * group + h' of token i
    assert torch.equal(flat[1 * 2 + 1, 2 * 4 + 3], q[1, 2, 1 * 4 + 3])


def test_a_cut_request_is_merged_by_the_combine_kernel(recorded: Recorded) -> None:
    call = _call([40000, 50], s_q=1, h_q=16, h_kv=1, page=64)
    out, lse = _outputs(call)
    hopper.run(call, out, lse)
    kinds = [launch["function"] for launch in recorded.launches]
    assert kinds == ["decode", "combine"]
    combine = recorded.launches[1]
    assert combine["grid"][1] == 16 and combine["grid"][0] >= 1


def test_envelope_reasons_name_what_the_call_has() -> None:
    support = registry.get("hopper").support("mla_decode")
    assert support is not None
    sig = _call([10], s_q=1, h_q=16, h_kv=1, page=64).signature
    assert support.reasons(sig) == []
    odd = dataclasses.replace(sig, d_qk=128, d_v=128, page_block_size=48)
    reasons = support.reasons(odd)
    assert any("d_qk=128, d_v=128" in r for r in reasons) and any("page_block_size=48" in r for r in reasons)
