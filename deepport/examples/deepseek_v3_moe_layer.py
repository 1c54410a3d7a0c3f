"""A DeepSeek-V3 MoE layer (routed experts) on deepport's ops, checked against float64.

    python -m deepport.examples.deepseek_v3_moe_layer                       # small, one process, any device
    torchrun --nproc-per-node 2 -m deepport.examples.deepseek_v3_moe_layer  # expert parallel (NCCL/gloo)

The layer: router (sigmoid scores, top-k, weights normalised and scaled by ``routed_scaling``),
per-token FP8 cast of the input (1x128 scales), :func:`deepport.moe_dispatch_expanded` into
DeepGEMM's contiguous layout, grouped FP8 GEMM gate/up (128x128 block-scaled FP8 weights), SwiGLU,
per-token FP8 cast, grouped FP8 GEMM down, :func:`deepport.moe_combine_expanded` (weighted). The
shared expert and the group-limited routing of V3 are left out: they involve no deepport op.

The reference computes the same layer in float64 from the same routing and the same FP8 operands
(dequantized weights; the input and the SwiGLU output quantized per token as the layer does), so the
check, DeepGEMM's global ``calc_diff``, sees the bf16 roundings of the GEMM outputs and the rare FP8
rounding flips they cause.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import deepport

MAX_CALC_DIFF = 5e-4


@dataclass(frozen=True)
class LayerConfig:
    hidden: int = 7168
    intermediate: int = 2048
    num_experts: int = 256
    topk: int = 8
    routed_scaling: float = 2.5


@dataclass
class ExpertWeights:
    """This rank's experts as FP8 with 128x128 block scales (the grouped GEMMs' ``b`` operands)."""

    gate_up: tuple[torch.Tensor, torch.Tensor]  # e4m3 [L, 2I, H], fp32 [L, 2I/128, H/128]
    down: tuple[torch.Tensor, torch.Tensor]  # e4m3 [L, H, I], fp32 [L, H/128, I/128]


def make_weights(cfg: LayerConfig, seed: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                             list[torch.Tensor]]:
    """Router ``[E, H]`` float32 and every expert's bf16 ``W_gate_up [2I, H]``, ``W_down [H, I]``, the
    same on every rank (a pure function of ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(cfg.num_experts, cfg.hidden, generator=g) / cfg.hidden**0.5
    gate_up = [(torch.randn(2 * cfg.intermediate, cfg.hidden, generator=g) / cfg.hidden**0.5).to(torch.bfloat16)
               for _ in range(cfg.num_experts)]
    down = [(torch.randn(cfg.hidden, cfg.intermediate, generator=g) / cfg.intermediate**0.5).to(torch.bfloat16)
            for _ in range(cfg.num_experts)]
    return router.to(device), [w.to(device) for w in gate_up], [w.to(device) for w in down]


def quantize_experts(weights: list[torch.Tensor], first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    casts = [deepport.per_block_cast_to_fp8(w) for w in weights[first: first + count]]
    return torch.stack([c[0] for c in casts]), torch.stack([c[1] for c in casts])


def route(x: torch.Tensor, router: torch.Tensor, cfg: LayerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(x.float() @ router.t())
    top, idx = scores.topk(cfg.topk, dim=1)
    weights = top / top.sum(dim=1, keepdim=True) * cfg.routed_scaling
    return idx.to(torch.int64).contiguous(), weights.contiguous()


def _direct(label: str, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def moe_layer(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: ExpertWeights,
              cfg: LayerConfig, *, group: Any = None, backend: str | None = None,
              run: Callable[..., Any] = _direct) -> torch.Tensor:
    """The routed-expert part of the layer on ``x`` bf16 ``[T, H]``: returns bf16 ``[T, H]``.

    Every deepport op goes through ``run(label, op_name, fn, *args, **kwargs)`` (default: call it), so a
    caller can record or time each op (``deepseek_v3_decode_step`` does)."""
    xq = deepport.per_token_cast_to_fp8(x)
    ex = run("dispatch", "moe_dispatch_expanded", deepport.moe_dispatch_expanded, xq, topk_idx, topk_weights,
             cfg.num_experts, group=group, expert_alignment=deepport.get_mk_alignment_for_contiguous_layout(),
             backend=backend)
    rows, inter = int(ex.m_indices.shape[0]), cfg.intermediate
    y = torch.zeros(rows, cfg.hidden, dtype=torch.bfloat16, device=x.device)
    if rows > 0:
        assert isinstance(ex.recv_x, tuple)
        gate_up = torch.empty(rows, 2 * inter, dtype=torch.bfloat16, device=x.device)
        run("experts gate/up", "m_grouped_fp8_gemm_nt_contiguous", deepport.m_grouped_fp8_gemm_nt_contiguous,
            ex.recv_x, experts.gate_up, gate_up, ex.m_indices, backend=backend)
        act = torch.nn.functional.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()
        run("experts down", "m_grouped_fp8_gemm_nt_contiguous", deepport.m_grouped_fp8_gemm_nt_contiguous,
            deepport.per_token_cast_to_fp8(act), experts.down, y, ex.m_indices, backend=backend)
    combined: torch.Tensor = run("combine", "moe_combine_expanded", deepport.moe_combine_expanded, y, ex.handle,
                                 backend=backend)
    return combined


def reference_f64(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  gate_up: list[torch.Tensor], down: list[torch.Tensor], cfg: LayerConfig) -> torch.Tensor:
    """The same layer in float64 (same routing, same FP8 quantization of weights and activations)."""

    def dequant(w: torch.Tensor) -> torch.Tensor:
        q, sf = deepport.per_block_cast_to_fp8(w)
        blocks = sf.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        return q.double() * blocks[: w.shape[0], : w.shape[1]]

    def fp8_activation(a: torch.Tensor) -> torch.Tensor:
        q, sf = deepport.per_token_cast_to_fp8(a.float())
        return q.double() * sf.double().repeat_interleave(128, 1)[:, : a.shape[1]]

    xd, out = fp8_activation(x), torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    inter = cfg.intermediate
    for e in sorted({int(v) for v in topk_idx.flatten().tolist() if v >= 0}):
        rows = (topk_idx == e).any(dim=1).nonzero()[:, 0]
        w = (topk_weights.double() * (topk_idx == e)).sum(dim=1)[rows]
        h = xd[rows] @ dequant(gate_up[e]).t()
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out[rows] += w[:, None] * (fp8_activation(act) @ dequant(down[e]).t())
    return out


def calc_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denominator = float((a * a + b * b).sum())
    return 0.0 if denominator == 0 else 1.0 - 2.0 * float((a * b).sum()) / denominator


def run(cfg: LayerConfig, tokens: int, seed: int, device: torch.device, backend: str | None = None,
        group: Any = None) -> float:
    """Build the layer, run it on this rank's tokens and return ``calc_diff`` against float64."""
    rank = 0 if group is None else torch.distributed.get_rank(group)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    router, gate_up, down = make_weights(cfg, seed, device)
    local = cfg.num_experts // world
    experts = ExpertWeights(quantize_experts(gate_up, rank * local, local), quantize_experts(down, rank * local, local))
    g = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    x = torch.randn(tokens, cfg.hidden, generator=g).to(torch.bfloat16).to(device)
    topk_idx, topk_weights = route(x, router, cfg)
    out = moe_layer(x, topk_idx, topk_weights, experts, cfg, group=group, backend=backend)
    return calc_diff(out, reference_f64(x, topk_idx, topk_weights, gate_up, down, cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="deepport backend for every op (default: automatic)")
    args = parser.parse_args(argv)
    cfg = LayerConfig(args.hidden, args.intermediate, args.experts, args.topk)
    device, group = torch.device(args.device), None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: expert parallel
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group = torch.distributed.group.WORLD
    diff = run(cfg, args.tokens, args.seed, device, args.backend, group)
    ok = diff <= MAX_CALC_DIFF
    rank = 0 if group is None else torch.distributed.get_rank()
    print(f"rank {rank}: DeepSeek-V3 MoE layer {cfg} on {device}, {args.tokens} tokens: calc_diff vs float64 "
          f"{diff:.3g} ({'ok' if ok else 'FAIL'}, bound {MAX_CALC_DIFF:g})")
    if group is not None:
        torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
