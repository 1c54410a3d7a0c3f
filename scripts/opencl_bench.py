"""Kernel times of the OpenCL backend from OpenCL profiling events (device time only: the host copies the
backend makes around each call are staged once, outside the timed region; L2 is not flushed), next to
the torch backend timed as ``deepport bench`` times it on the same GPU when there is one (the peer), and
checked against it.

- MLA decode, bf16, 576/512, page 64: b=128, s_q=1, s_k=4096 at h_q=16 (memory-bound on tensor cores;
  target 1.5 TB/s) and h_q=128 (compute-bound): the split kernel ``choose_config`` picks, the row-wise
  kernel's tiles and the staged kernel's tile variants (:func:`mla_variants`), and split-KV variants.
- FP8 GEMM NT, M=4096 on the seven DeepSeek-V3 (N, K) shapes, recipe (1, 128, 128), bf16 out (target
  25 TFLOP/s on float32 FMAs); three tiles on every shape.

Figures are counted as ``deepport bench`` counts them (``deepport.bench.counting``). Writes one JSON
(``--out``) and prints a table. Usage: ``python scripts/opencl_bench.py --out bench.json [--quick] [--mla-only]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from deepport.backends.opencl import fp8_gemm as ocl_gemm
from deepport.backends.opencl import mla_decode as ocl_mla
from deepport.backends.opencl.runtime import Runtime, get_runtime
from deepport.bench import counting
from deepport.bench import timing as deepport_timing
from deepport.kernels import fp8_gemm as gemm_op
from deepport.kernels import mla_decode as mla_op

DEEPSEEK_V3_NK = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
MLA_TARGET_TBPS, GEMM_TARGET_TFLOPS = 1.5, 25.0


def profiled_us(enqueue: Callable[[], Any], reps: int) -> list[float]:
    """Device time per repetition: first event's start to last event's end (profiling counters, ns)."""
    times = []
    for _ in range(reps):
        events = enqueue()
        events = events if isinstance(events, list) else [events]
        events[-1].wait()
        times.append((events[-1].profile.end - events[0].profile.start) / 1e3)
    return times


def peer_us(fn: Callable[[], Any], reps: int) -> list[float]:
    """The torch backend's times per call, measured as ``deepport bench`` measures (CUDA graph or events)."""
    return deepport_timing.time_calls([fn], torch.device("cuda"), samples=reps).samples_us


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    denom = float((x * x + y * y).sum())
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def _record(op: str, config: str, variant: str, times: list[float], flops: float, nbytes: float,
            target: str, extra: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median(times)
    tflops, tbps = flops / med / 1e6, nbytes / med / 1e6
    figure, goal = (tbps, MLA_TARGET_TBPS) if target == "TB/s" else (tflops, GEMM_TARGET_TFLOPS)
    return {"op": op, "config": config, "variant": variant, "median_us": med, "min_us": min(times), "reps": len(times),
            "flops": flops, "bytes": nbytes, "tflops": tflops, "tbps": tbps, "target": f"{goal} {target}",
            "pct_of_target": 100 * figure / goal, **extra}


def bench_mla(rt: Runtime, h_q: int, reps: int, peer: bool, b: int = 128, s_k: int = 4096) -> list[dict[str, Any]]:
    s_q, page, d_qk, d_v = 1, 64, 576, 512
    g = torch.Generator().manual_seed(h_q)
    pages = s_k // page
    q = (torch.randn(b, s_q, h_q, d_qk, generator=g) / 10).to(torch.bfloat16)
    k_cache = (torch.randn(b * pages, page, 1, d_qk, generator=g) / 10).to(torch.bfloat16)
    table = torch.randperm(b * pages, generator=g).to(torch.int32).view(b, pages)
    lens = torch.full((b,), s_k, dtype=torch.int32)
    call = mla_op.bind(q, k_cache, table, lens, d_v)
    config = f"b{b}_sq{s_q}_hq{h_q}_sk{s_k}"
    flops = counting.mla_decode_flops(b, s_q, h_q, s_k, d_qk, d_v)
    nbytes = counting.mla_decode_bytes(b, s_q, h_q, 1, s_k, d_qk, d_v)
    target = "TB/s" if h_q == 16 else "TFLOP/s"
    reference = None
    results = []
    if peer:
        dev = [t.cuda() for t in (q, k_cache, table, lens)]
        out = torch.empty(b, s_q, h_q, d_v, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda")
        bound = mla_op.bind(*dev, d_v, out=out, lse=lse)
        from deepport.backends.torch import mla_decode as torch_mla

        times = peer_us(lambda: torch_mla.run(bound, out, lse), reps)
        reference = (out.cpu(), lse.cpu())
        results.append(_record("mla_decode", config, "torch backend", times, flops, nbytes, target, {}))
    first: tuple[torch.Tensor, torch.Tensor] | None = None  # the first OpenCL variant's out and lse
    for name, cfg, parts in mla_variants(rt, d_qk, d_v, s_q * h_q):
        try:
            launch = ocl_mla.MLALaunch(rt, call, cfg, parts=parts)
            launch.enqueue()
            times = profiled_us(launch.enqueue, reps)
            out = torch.empty(b, s_q, h_q, d_v, dtype=torch.bfloat16)
            lse = torch.empty(b, h_q, s_q, dtype=torch.float32)
            launch.read(out, lse)
            check: dict[str, Any] = {"pieces": launch.num_pieces, "split_config": repr(cfg),
                                     "local_bytes": cfg.local_bytes(d_qk)}
            if reference is not None:
                check.update(out_calc_diff=calc_diff(out, reference[0]),
                             lse_max_abs=float((lse - reference[1]).abs().max()))
            if first is None:  # no peer here: the variants are still checked against each other
                first = (out, lse)
            else:
                check.update(vs_first_calc_diff=calc_diff(out, first[0]),
                             vs_first_lse_max_abs=float((lse - first[1]).abs().max()))
            results.append(_record("mla_decode", config, f"opencl {name}", times, flops, nbytes, target, check))
        except Exception as exc:  # report and go on: one failing variant must not hide the others
            results.append({"op": "mla_decode", "config": config, "variant": f"opencl {name}",
                            "error": f"{type(exc).__name__}: {exc}"})
    return results


def _staged_name(cfg: ocl_mla.StagedConfig) -> str:
    """rows/work-items, tokens per tile, channels per chunk, QK rows x tokens and PV rows per work-item"""
    return (f"staged {cfg.rows}r/{cfg.threads}t tn{cfg.tokens} dc{cfg.chunk} "
            f"qk{cfg.rows_per_thread}x{cfg.tokens_per_thread} pv{cfg.pv_rows}")


def mla_variants(rt: Runtime, d_qk: int, d_v: int, rows: int) -> list[tuple[str, ocl_mla.Config, int]]:
    """(name, split config, split-KV parts) of each variant timed: first what ``choose_config`` picks here,
    then the row-wise kernel's tiles (what GPUs got before the staged kernel) and staged tile variants."""
    units = rt.limits.compute_units
    chosen = ocl_mla.choose_config(rt.limits, d_qk, d_v, rows)
    chosen_name = _staged_name(chosen) if isinstance(chosen, ocl_mla.StagedConfig) else \
        f"rowwise {chosen.rows}x{chosen.tokens} tile"
    per_unit = ocl_mla.plan_parts(rt.limits) // units  # the backend's own plan
    variants: list[tuple[str, ocl_mla.Config, int]] = [
        (f"chosen: {chosen_name}, {per_unit} parts/CU", chosen, per_unit * units),
        ("rowwise 16x128 tile, 4 parts/CU", ocl_mla.MLAConfig(16, 128), 4 * units),
        ("rowwise 16x64 tile, 4 parts/CU", ocl_mla.MLAConfig(16, 64), 4 * units),
        ("rowwise 16x128 tile, 2 parts/CU", ocl_mla.MLAConfig(16, 128), 2 * units),
        ("rowwise 16x128 tile, 8 parts/CU", ocl_mla.MLAConfig(16, 128), 8 * units)]
    S = ocl_mla.StagedConfig
    staged = [S(16, 256), S(16, 128), S(16, 256, chunk=64), S(16, 256, chunk=16), S(16, 256, tokens_per_thread=1),
              S(16, 128, rows_per_thread=16, pv_rows=16), S(16, 256, rows_per_thread=16, pv_rows=16),
              S(16, 128, tokens_per_thread=4), S(16, 256, chunk=16, tokens_per_thread=4), S(16, 128, rows_per_thread=4)]
    if rows > 16:
        staged = [S(32, 256, rows_per_thread=16), S(32, 256), S(32, 256, rows_per_thread=16, chunk=16),
                  S(32, 256, rows_per_thread=16, tokens_per_thread=1), *staged[:3]]
    for cfg in staged:
        fits = cfg.local_bytes(d_qk) <= rt.limits.local_mem_size and cfg.threads <= rt.limits.max_work_group_size
        if cfg != chosen and fits:
            variants.append((f"{_staged_name(cfg)}, 4 parts/CU", cfg, 4 * units))
    if isinstance(chosen, ocl_mla.StagedConfig):
        variants += [(f"chosen, {n} parts/CU", chosen, n * units) for n in (2, 4, 8) if n != per_unit]
    return variants


def _fp8_operand(rows: int, k: int, sf_rows: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 bytes (no NaN code) and positive float32 SFs ``[sf_rows, ceil(K/128)]``."""
    mag = torch.randint(0, 0x7F, (rows, k), generator=g, dtype=torch.uint8)
    sign = torch.randint(0, 2, (rows, k), generator=g, dtype=torch.uint8) << 7
    data = (mag | sign).view(torch.float8_e4m3fn)
    sf = torch.rand(sf_rows, -(-k // 128), generator=g) * 0.01 + 0.001
    return data, sf


def bench_gemm(rt: Runtime, shapes: tuple[tuple[int, int], ...], reps: int, peer: bool,
               m: int = 4096) -> list[dict[str, Any]]:
    results = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(n * 7 + k)
        a = _fp8_operand(m, k, m, g)
        b = _fp8_operand(n, k, -(-n // 128), g)
        out = torch.empty(m, n, dtype=torch.bfloat16)
        call = gemm_op.bind("nt", a, b, out)
        config = f"m{m}_n{n}_k{k}"
        flops, nbytes = counting.gemm_flops(m, n, k), counting.fp8_gemm_bytes(m, n, k)
        reference = None
        if peer:
            out_dev = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            a_dev, b_dev = (a[0].cuda(), a[1].cuda()), (b[0].cuda(), b[1].cuda())
            bound = gemm_op.bind("nt", a_dev, b_dev, out_dev)
            from deepport.backends.torch import fp8_gemm as torch_gemm

            times = peer_us(lambda bound=bound, out_dev=out_dev: torch_gemm.run(bound, out_dev), reps)
            reference = out_dev.cpu()
            path = torch_gemm.path(bound.signature)[0]
            results.append(_record("fp8_gemm_nt", config, f"torch backend ({path})", times, flops,
                                   nbytes, "TFLOP/s", {}))
        tiles = [ocl_gemm.GemmConfig(128, 128, 32), ocl_gemm.GemmConfig(64, 64, 32), ocl_gemm.GemmConfig(64, 64, 16)]
        for cfg in tiles:
            name = f"opencl {cfg.bm}x{cfg.bn}x{cfg.bk}"
            try:
                launch = ocl_gemm.dense_launch(rt, call, torch.bfloat16, cfg)
                launch.enqueue()
                times = profiled_us(launch.enqueue, reps)
                check = {} if reference is None else {"out_calc_diff": calc_diff(launch.result(), reference)}
                results.append(_record("fp8_gemm_nt", config, name, times, flops, nbytes, "TFLOP/s", check))
            except Exception as exc:
                results.append({"op": "fp8_gemm_nt", "config": config, "variant": name,
                                "error": f"{type(exc).__name__}: {exc}"})
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'op':<12} {'config':<24} {'variant':<58} {'median us':>10} {'TFLOP/s':>8} {'TB/s':>6} "
          f"{'% target':>9}  check")
    for r in results:
        if "error" in r:
            print(f"{r['op']:<12} {r['config']:<24} {r['variant']:<58} ERROR {r['error']}")
            continue
        shown = ("out_calc_diff", "lse_max_abs", "vs_first_calc_diff", "vs_first_lse_max_abs", "pieces")
        check = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k in shown)
        print(f"{r['op']:<12} {r['config']:<24} {r['variant']:<58} {r['median_us']:>10.1f} {r['tflops']:>8.2f} "
              f"{r['tbps']:>6.3f} {r['pct_of_target']:>8.1f}%  {check}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="opencl_bench.json")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one GEMM shape, one MLA config")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized problems (tests the script itself on PoCL)")
    parser.add_argument("--mla-only", action="store_true", help="MLA decode only (no FP8 GEMM)")
    args = parser.parse_args()
    started = time.time()
    rt = get_runtime()
    peer = torch.cuda.is_available()
    print(f"OpenCL device: {rt.limits.label} ({rt.limits.version}, driver {rt.limits.driver_version}); "
          f"torch peer on CUDA: {peer}", flush=True)
    results: list[dict[str, Any]] = []
    doc = {"device": asdict(rt.limits), "torch": torch.__version__, "results": results}
    b, s_k, m = (2, 256, 128) if args.tiny else (128, 4096, 4096)
    shapes = ((256, 512),) if args.tiny else DEEPSEEK_V3_NK[:1] if args.quick else DEEPSEEK_V3_NK
    for h_q in (16,) if args.quick or args.tiny else (16, 128):
        results += bench_mla(rt, h_q, args.reps, peer, b, s_k)
        print_table(results[-len(mla_variants(rt, 576, 512, h_q)) - int(peer):])
    if not args.mla_only:
        results += bench_gemm(rt, shapes, args.reps, peer, m)
    doc["seconds"] = time.time() - started
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print()
    print_table(results)
    print(f"wrote {args.out} ({doc['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
