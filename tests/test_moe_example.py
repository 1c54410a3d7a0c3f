"""The DeepSeek-V3 MoE layer example runs on the CPU and matches its float64 reference."""

from __future__ import annotations

import pytest
import torch

from deepport.examples import deepseek_v3_moe_layer as layer


@pytest.mark.parametrize("backend", [None, "reference"])
def test_moe_layer_example_matches_float64(backend: str | None) -> None:
    cfg = layer.LayerConfig(hidden=256, intermediate=256, num_experts=8, topk=3)
    diff = layer.run(cfg, 24, 0, torch.device("cpu"), backend)
    assert diff <= layer.MAX_CALC_DIFF


def test_moe_layer_example_detects_a_wrong_expert() -> None:
    cfg = layer.LayerConfig(hidden=256, intermediate=256, num_experts=8, topk=3)
    router, gate_up, down = layer.make_weights(cfg, 0, torch.device("cpu"))
    experts = layer.ExpertWeights(layer.quantize_experts(gate_up, 0, 8), layer.quantize_experts(down, 0, 8))
    x = torch.randn(24, cfg.hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    idx, w = layer.route(x, router, cfg)
    out = layer.moe_layer(x, idx, w, experts, cfg)
    wrong = layer.reference_f64(x, (idx + 1) % cfg.num_experts, w, gate_up, down, cfg)
    assert layer.calc_diff(out, wrong) > 100 * layer.MAX_CALC_DIFF


def test_moe_layer_example_cli() -> None:
    assert layer.main(["--tokens", "16", "--hidden", "256", "--intermediate", "128", "--experts", "8"]) == 0
