"""A DeepSeek-V3 decode step on deepport's ops: MLA decode over a paged latent cache, then the MoE layer.

    python -m deepport.examples.deepseek_v3_decode_step                   # reduced width, CPU: seconds
    python -m deepport.examples.deepseek_v3_decode_step --device cuda     # full width, one GPU
    python -m deepport.examples.deepseek_v3_decode_step --device cuda --cuda-graph   # and the step as one graph

One layer of one decode step, in one process holding every routed expert:

1. ``get_mla_metadata``: the split-KV plan, made once per step and shared by every layer;
2. ``mla_decode``: absorbed MLA, ``q [b, 1, h_q, 576]`` over the latent cache ``[blocks, 64, 1, 576]``,
   ``d_v = 512``;
3. ``W_UV`` per head (a bf16 matmul, plain torch) and the output projection: per-token FP8 cast, then
   ``fp8_gemm_nt`` ``[b, h_q * 128] x [hidden, h_q * 128]^T`` with 128x128-block weight scales;
4. the router (plain torch, :func:`deepseek_v3_moe_layer.route`) and the routed experts on DeepEP's
   low-latency path: ``moe_low_latency_dispatch`` (FP8 cast) -> ``m_grouped_fp8_gemm_nt_masked``
   (gate/up) -> SwiGLU and per-token cast -> ``m_grouped_fp8_gemm_nt_masked`` (down) ->
   ``moe_low_latency_combine``. With ``--moe expanded``, :func:`deepseek_v3_moe_layer.moe_layer` instead
   (the prefill layout: expanded dispatch, contiguous grouped GEMMs, expanded combine).

Printed per op: the backend that ran it (``deepport.explain``: dispatch's choice for that exact call) and
the time per call (:func:`deepport.bench.timing.time_calls`: on a GPU a CUDA graph of many calls when the
call can be captured, so value checks are off while timing; ``time.perf_counter`` on the CPU). At
reduced width the attention is checked against the float64 oracle and the MoE output against
:func:`deepseek_v3_moe_layer.reference_f64` (DeepGEMM's ``calc_diff``); at full width the check is left
to ``python -m deepport certify``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import deepport
from deepport.bench.timing import environment_var, host_time_us, time_calls
from deepport.examples import deepseek_v3_moe_layer as moe
from deepport.kernels.f64.mla_decode import mla_decode_f64

D_QK, D_V, D_HEAD_V, PAGE = 576, 512, 128, 64  # latent + rope channels, latent, per-head value, page size


@dataclass(frozen=True)
class StepConfig:
    batch: int
    heads: int  # query heads of MLA (128 in V3); one latent KV head
    context: int  # longest sequence; lengths are drawn from [1, context]
    layer: moe.LayerConfig


REDUCED = StepConfig(batch=4, heads=16, context=256, layer=moe.LayerConfig(512, 256, 16, 4))
FULL = StepConfig(batch=64, heads=128, context=8192, layer=moe.LayerConfig())  # V3: 7168, 2048, 256 experts, top 8


@dataclass
class Weights:
    w_uv: torch.Tensor  # bf16 [heads, 512, 128]
    o_proj: tuple[torch.Tensor, torch.Tensor]  # e4m3 [hidden, heads * 128], fp32 block scales
    router: torch.Tensor  # fp32 [experts, hidden]
    experts: moe.ExpertWeights
    bf16_experts: tuple[list[torch.Tensor], list[torch.Tensor]] | None  # for the float64 check


@dataclass
class Inputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor


@dataclass
class OpRun:
    """One deepport op call of the step, kept to explain and time it again with the same arguments."""

    label: str
    op: str
    call: Callable[[], Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Recorder:
    """Runs each op of the step (on ``backend`` if given) and keeps the call."""

    backend: str | None = None
    runs: list[OpRun] = field(default_factory=list)

    def __call__(self, label: str, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        given = {**kwargs, "backend": self.backend} if self.backend is not None else kwargs
        self.runs.append(OpRun(label, op, lambda: fn(*args, **given), args, given))
        return fn(*args, **given)


def make_weights(cfg: StepConfig, seed: int, device: torch.device, keep_bf16: bool) -> Weights:
    g = torch.Generator(device=device).manual_seed(seed)
    hidden, heads = cfg.layer.hidden, cfg.heads
    w_uv = (torch.randn(heads, D_V, D_HEAD_V, device=device, generator=g) / D_V**0.5).to(torch.bfloat16)
    o_proj = deepport.per_block_cast_to_fp8(torch.randn(hidden, heads * D_HEAD_V, device=device, generator=g)
                                            / (heads * D_HEAD_V)**0.5)
    if keep_bf16:  # the MoE example's weights, kept in bf16 for its float64 reference
        router, gate_up, down = moe.make_weights(cfg.layer, seed, device)
        experts = moe.ExpertWeights(moe.quantize_experts(gate_up, 0, len(gate_up)),
                                    moe.quantize_experts(down, 0, len(down)))
        return Weights(w_uv, o_proj, router, experts, (gate_up, down))
    lc = cfg.layer  # full width: quantize expert by expert on the device (the bf16 set would be 22 GB)
    router = torch.randn(lc.num_experts, hidden, device=device, generator=g) / hidden**0.5
    up = _stacked([deepport.per_block_cast_to_fp8(torch.randn(2 * lc.intermediate, hidden, device=device,
                                                              generator=g) / hidden**0.5)
                   for _ in range(lc.num_experts)])
    dn = _stacked([deepport.per_block_cast_to_fp8(torch.randn(hidden, lc.intermediate, device=device, generator=g)
                                                  / lc.intermediate**0.5) for _ in range(lc.num_experts)])
    return Weights(w_uv, o_proj, router, moe.ExpertWeights(up, dn), None)


def _stacked(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def make_inputs(cfg: StepConfig, seed: int, device: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, cfg.context + 1, (cfg.batch,), generator=g, dtype=torch.int32)
    pages = -(-cfg.context // PAGE)
    table = torch.randperm(cfg.batch * pages, generator=g).view(cfg.batch, pages).to(torch.int32)
    gd = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(cfg.batch, 1, cfg.heads, D_QK, device=device, generator=gd)
    k_cache = torch.randn(cfg.batch * pages, PAGE, 1, D_QK, device=device, generator=gd)
    return Inputs(q.to(torch.bfloat16), k_cache.to(torch.bfloat16), table.to(device), lens.to(device))


def plan_step(x: Inputs, cfg: StepConfig) -> deepport.MLAMetadata:
    """The step's split-KV plan, made once per step (on the host) and passed to every layer."""
    return deepport.get_mla_metadata(x.cache_seqlens, cfg.heads, 1)


def decode_step(w: Weights, x: Inputs, plan: deepport.MLAMetadata, cfg: StepConfig, run: Recorder,
                path: str) -> tuple[torch.Tensor, ...]:
    """One layer of one decode step; returns ``(attention out, MoE input, topk_idx, topk_weights, MoE out)``."""
    lc = cfg.layer
    attn, _ = run("attention", "mla_decode", deepport.mla_decode, x.q, x.k_cache, x.block_table, x.cache_seqlens,
                  D_V, metadata=plan)
    heads_v = torch.matmul(attn[:, 0].transpose(0, 1), w.w_uv).transpose(0, 1)  # [b, heads, 128]
    a = deepport.per_token_cast_to_fp8(heads_v.reshape(cfg.batch, -1))
    hidden = torch.empty(cfg.batch, lc.hidden, dtype=torch.bfloat16, device=attn.device)
    run("o_proj", "fp8_gemm_nt", deepport.fp8_gemm_nt, a, w.o_proj, hidden)
    topk_idx, topk_weights = moe.route(hidden, w.router, lc)
    if path == "expanded":
        return attn, hidden, topk_idx, topk_weights, moe.moe_layer(hidden, topk_idx, topk_weights, w.experts, lc,
                                                                   run=run)
    experts, t_max, inter = lc.num_experts, cfg.batch, lc.intermediate
    expected_m = max(1, math.ceil(cfg.batch * lc.topk / experts))
    d = run("dispatch", "moe_low_latency_dispatch", deepport.moe_low_latency_dispatch, hidden, topk_idx, t_max,
            experts)
    gate_up = torch.zeros(experts, t_max, 2 * inter, dtype=torch.bfloat16, device=attn.device)
    run("experts gate/up", "m_grouped_fp8_gemm_nt_masked", deepport.m_grouped_fp8_gemm_nt_masked, d.recv_x,
        w.experts.gate_up, gate_up, d.recv_count, expected_m)
    act = torch.nn.functional.silu(gate_up[..., :inter].float()) * gate_up[..., inter:].float()
    act_q, act_sf = deepport.per_token_cast_to_fp8(act.view(-1, inter))
    down = torch.zeros(experts, t_max, lc.hidden, dtype=torch.bfloat16, device=attn.device)
    run("experts down", "m_grouped_fp8_gemm_nt_masked", deepport.m_grouped_fp8_gemm_nt_masked,
        (act_q.view(experts, t_max, inter), act_sf.view(experts, t_max, -1)), w.experts.down, down, d.recv_count,
        expected_m)
    y = run("combine", "moe_low_latency_combine", deepport.moe_low_latency_combine, down, topk_idx, topk_weights,
            d.handle)
    return attn, hidden, topk_idx, topk_weights, y


def check(w: Weights, x: Inputs, cfg: StepConfig, got: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """``calc_diff`` of the attention against float64 and of the MoE output against the MoE example's
    float64 reference (same routing and FP8 quantization)."""
    attn, hidden, topk_idx, topk_weights, y = got
    ref_attn, _ = mla_decode_f64(x.q, x.k_cache, x.block_table, x.cache_seqlens, D_V, D_QK**-0.5, False)
    attn_diff = moe.calc_diff(attn, torch.from_numpy(np.ascontiguousarray(ref_attn)).to(attn.device))
    assert w.bf16_experts is not None
    gate_up, down = w.bf16_experts
    moe_diff = moe.calc_diff(y, moe.reference_f64(hidden, topk_idx, topk_weights, gate_up, down, cfg.layer))
    return attn_diff, moe_diff


def report(runs: list[OpRun], device: torch.device, samples: int,
           plan_us: float) -> list[tuple[str, str, str, float, str]]:
    """``(label, op, backend, microseconds per call, timing method)`` per op, printed as a table."""
    rows = [("plan", "get_mla_metadata", "(host)", plan_us, "host_perf_counter")]
    with environment_var("DEEPPORT_CHECK_VALUES", "0" if device.type == "cuda" else "1"):
        for r in runs:
            backend = deepport.explain(r.op, *r.args, **r.kwargs).chosen or "?"
            timing = time_calls([r.call], device, samples=samples, warmup=1)
            rows.append((r.label, r.op, backend, timing.median_us, timing.method))
    width = max(len(r[1]) for r in rows)
    print(f"{'step':<16} {'deepport op':<{width}} {'backend':<10} {'us/call':>10}  timing")
    for label, op, backend, us, method in rows:
        print(f"{label:<16} {op:<{width}} {backend:<10} {us:>10.1f}  {method}")
    print(f"{'deepport ops':<16} {'':<{width}} {'':<10} {sum(r[3] for r in rows):>10.1f}")
    return rows


def _events_us(fn: Callable[[], Any], samples: int) -> float:
    """Median microseconds of ``fn`` between two CUDA events (what the GPU spends, launch gaps included)."""
    found = []
    for _ in range(samples):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        found.append(start.elapsed_time(end) * 1e3)
    return float(np.median(found))


def time_whole_step(step: Callable[[], Any], device: torch.device, samples: int) -> tuple[float, float]:
    """Median microseconds of the eager step and of its CUDA-graph replay (value checks off)."""
    with environment_var("DEEPPORT_CHECK_VALUES", "0"):
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        eager = _events_us(step, samples)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
    return eager, _events_us(graph.replay, samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; cuda runs full width)")
    parser.add_argument("--width", choices=["reduced", "full"], default=None,
                        help="default: full on a GPU, reduced elsewhere")
    parser.add_argument("--batch", type=int, default=None, help="requests in the step (one token each)")
    parser.add_argument("--moe", choices=["low_latency", "expanded"], default="low_latency")
    parser.add_argument("--backend", default=None, help="run every op on this backend (default: automatic)")
    parser.add_argument("--samples", type=int, default=10, help="timing samples per op")
    parser.add_argument("--cuda-graph", action="store_true", help="also capture the whole step in a CUDA graph")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    full = (args.width or ("full" if device.type == "cuda" else "reduced")) == "full"
    cfg = FULL if full else REDUCED
    if args.batch is not None:
        cfg = StepConfig(args.batch, cfg.heads, cfg.context, cfg.layer)
    checked = not full
    w, x = make_weights(cfg, args.seed, device, keep_bf16=checked), make_inputs(cfg, args.seed, device)
    lc = cfg.layer
    print(f"DeepSeek-V3 decode step on {deepport.dispatch.device_info(device).describe()}: batch {cfg.batch}, MLA "
          f"{cfg.heads} heads {D_QK}/{D_V} page {PAGE} (lengths <= {cfg.context}), MoE hidden {lc.hidden}, "
          f"intermediate {lc.intermediate}, top-{lc.topk} of {lc.num_experts} experts ({args.moe} path)")
    recorder = Recorder(args.backend)
    plan = plan_step(x, cfg)
    got = decode_step(w, x, plan, cfg, recorder, args.moe)

    def replan() -> None:
        plan_step(x, cfg)

    report(recorder.runs, device, args.samples, host_time_us(replan, device, args.samples))
    ok = True
    if checked:
        attn_diff, moe_diff = check(w, x, cfg, got)
        ok = attn_diff <= moe.MAX_CALC_DIFF and moe_diff <= moe.MAX_CALC_DIFF
        print(f"check vs float64: attention calc_diff {attn_diff:.3g}, MoE calc_diff {moe_diff:.3g} "
              f"({'ok' if ok else 'FAIL'}, bound {moe.MAX_CALC_DIFF:g})")
    else:
        print("check: left to `python -m deepport certify` at full width (the float64 MoE reference needs the "
              "bf16 expert weights)")
    if args.cuda_graph:
        if device.type != "cuda" or args.moe != "low_latency":
            print("--cuda-graph: needs --device cuda and the low-latency MoE path (the expanded layout's row count "
                  "depends on the routing)")
            return 2
        eager, replay = time_whole_step(lambda: decode_step(w, x, plan, cfg, Recorder(args.backend), args.moe),
                                        device, args.samples)
        print(f"whole step (plan made outside): eager {eager:.1f} us, CUDA graph replay {replay:.1f} us")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
