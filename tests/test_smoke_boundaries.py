"""Smoke cases that cross the places where backends split work: the torch backend's chunks, the float64
oracle's B chunks, tile and wave sizes; and more than one case for softmax_scale and accumulation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from deepport.backends.torch import fp8_gemm as torch_fp8
from deepport.backends.torch import mla_decode as torch_mla
from deepport.conformance import Status, select_cases
from deepport.conformance.runner import run_case
from deepport.kernels.f64 import fp8_gemm as oracle

SMOKE = {c.id: c for c in select_cases("smoke")}


def test_mla_decode_batch_crosses_the_torch_backends_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks: list[tuple[int, int]] = []
    real = torch_mla._decode_chunk

    def counting(call: Any, lens: torch.Tensor, start: int, stop: int, pages: int) -> Any:
        chunks.append((start, stop))
        return real(call, lens, start, stop, pages)

    monkeypatch.setattr(torch_mla, "_decode_chunk", counting)
    (result,) = run_case(SMOKE["mla_decode/chunks_b12_one_long"], ["torch"], "cpu", 1)
    assert result.status is Status.PASS, result.message
    assert len(chunks) >= 2 and chunks[0][0] == 0 and chunks[-1][1] == 12, chunks


def test_mla_decode_has_a_batch_beyond_one_wave_and_two_softmax_scales() -> None:
    assert SMOKE["mla_decode/waves_b140_short_metadata"].params["b"] > 132  # H100/H200 SMs
    scaled = [c for c in SMOKE.values() if c.op == "mla_decode" and "softmax_scale" in c.features]
    assert len({c.params["scale_pow"] for c in scaled}) >= 2


def test_fp8_gemm_crosses_the_oracles_and_the_torch_backends_chunks() -> None:
    p = SMOKE["fp8_gemm_nt/chunks_m130_n1100_k1152"].params
    assert p["n"] > oracle._ROWS_PER_CHUNK and p["n"] % 128 and p["m"] % 128 and p["m"] > 128
    k_blocks = math.ceil(p["k"] / 128)
    assert torch_fp8._BUDGET_BYTES["cpu"] // (8 * p["m"] * p["n"]) < k_blocks  # at least two K chunks


def test_fp8_gemm_accumulation_has_more_than_one_case_including_in_place() -> None:
    acc = [c for c in SMOKE.values() if c.op == "fp8_gemm_nt" and c.params["accumulate"]]
    assert len(acc) >= 3 and any(c.params["c_in_place"] for c in acc)
    assert {c.params["sf"] for c in acc} == {"float32", "ue8m0"}
