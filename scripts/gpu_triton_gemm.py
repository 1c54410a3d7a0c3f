"""Check and time the Triton FP8 GEMMs on one GPU, next to cuBLAS's block-scaled GEMM, in one device call.

    python scripts/gpu_triton_gemm.py --out DIR [--phase sweep|tuned] [--budget-s S]

1. Correctness: ``deepport certify --backend triton --tier smoke --device cuda`` for the six FP8 GEMM ops
   (three processes in parallel), while a process pool compiles every kernel variant of the sweep
   (one small launch each, filling Triton's cache; a variant that fails is left out of the timing).
2. Ceiling: ``fp8_matmul`` (torch._scaled_mm e4m3 8192^3, per-tensor scales), measured in this run.
3. Timing (deepport.bench.timing.time_calls: a CUDA graph of many calls below 1 ms, else events with
   the L2 flushed; inputs rotated when smaller than twice the L2), each output first checked against
   float64 on up to 64 sampled rows:
   - dense NT on DeepSeek-V3's shapes, M in {64, 128, 4096} x 7 (N, K): each candidate configuration
     (``sweep``) or the configuration ``fp8_configs.choose`` picks (``tuned``), the torch backend's cuBLAS
     path (``scaled_mm`` BlockWise1x128 / BlockWise128x128, scale restaging included) and raw
     ``scaled_mm`` on pre-staged scales;
   - grouped contiguous (G=8 x 4096 rows) and masked (G in {1, 2, 4}, 1024 rows in use in total, M_max
     4096) for (N, K) in {(4096, 7168), (7168, 2048)}, next to the Triton dense GEMM at the same total M.
Writes ``DIR/gpu_triton_gemm.json`` (every figure) and ``DIR/certify.txt``; prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepport.backends.torch import fp8_gemm as torch_fp8
from deepport.backends.triton import fp8_configs
from deepport.backends.triton import fp8_gemm as triton_dense
from deepport.backends.triton import fp8_grouped_gemm as triton_grouped
from deepport.backends.triton.fp8_configs import GemmConfig
from deepport.bench import timing
from deepport.bench.check import sample_rows, sampled_rows_check
from deepport.bench.configs.fp8_gemm import TOLERANCE, dequantized_a, dequantized_b
from deepport.dispatch.device import device_info
from deepport.kernels import fp8_gemm, fp8_grouped_gemm
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

NK = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
DENSE_M = (64, 128, 4096)
GROUPED_NK = ((4096, 7168), (7168, 2048))
CONTIGUOUS = tuple((8, 4096, n, k) for n, k in GROUPED_NK)  # (G, rows per group, N, K)
MASKED = tuple((g, 1024 // g, n, k) for g in (1, 2, 4) for n, k in GROUPED_NK)  # (G, expected_m, N, K)
M_MAX = 4096
TINY = {"NK": ((256, 512), (200, 384)), "DENSE_M": (16, 64), "GROUPED_NK": ((256, 512),), "M_MAX": 64}
CERTIFY_OPS = (("fp8_gemm_nt",), ("fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt"),
               ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"))
C = GemmConfig


def dense_candidates(m: int) -> list[GemmConfig]:
    """The configurations the sweep times (call 1 of 2026-12-01 narrowed the first list down to these)."""
    if m <= 128:
        found = [C(64, 64, 4, 5, split_k=0), C(64, 128, 4, 4, split_k=0), C(64, 128, 4, 3, split_k=0, tma=False),
                 C(64, 128, 4, 4, split_k=0, split_n=2)]
        return found + ([C(128, 128, 8, 3, split_k=0, split_n=2)] if m > 64 else [])
    return [C(64, 128, 4, 3), C(64, 128, 4, 3, tma=False), C(128, 128, 8, 4), C(64, 128, 4, 3, split_n=2),
            C(128, 128, 8, 3, split_n=2), C(128, 128, 8, 3, split_n=2, maxnreg=128), C(128, 128, 8, 4, split_n=2)]


def contiguous_candidates() -> list[GemmConfig]:
    return [C(64, 128, 4, 3), C(128, 128, 8, 4), C(64, 128, 4, 3, split_n=2), C(128, 128, 8, 3, split_n=2),
            C(128, 128, 8, 3, split_n=2, maxnreg=128)]


def masked_candidates() -> list[GemmConfig]:
    return [C(64, 128, 4, 4, waves=3), C(64, 128, 4, 3, waves=3), C(128, 128, 8, 4, waves=1),
            C(128, 128, 8, 3, waves=2, split_n=2), C(64, 128, 4, 3, waves=3, split_n=2)]


def resolved(config: GemmConfig, m: int, n: int, k: int, sms: int) -> GemmConfig:
    """``split_k`` / ``tail_split`` 0 made concrete for the shape (as ``fp8_configs.choose`` does)."""
    return fp8_configs.resolved(config, m, n, k, sms)


# ---- inputs ---------------------------------------------------------------------------------------

def dense_inputs(m: int, n: int, k: int, seed: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(torch.randn((m, k), generator=gen, device=device))
    b, sfb = per_block_cast_to_fp8(torch.randn((n, k), generator=gen, device=device))
    out = torch.empty((m, n), dtype=torch.bfloat16, device=device)
    return {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "out": out,
            "call": fp8_gemm.bind("nt", (a, sfa), (b, sfb), out)}


def grouped_weights(g: int, n: int, k: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed + 1000)
    parts = [per_block_cast_to_fp8(torch.randn((n, k), generator=gen, device=device)) for _ in range(g)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def contiguous_inputs(g: int, rows: int, n: int, k: int, seed: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(torch.randn((g * rows, k), generator=gen, device=device))
    b, sfb = grouped_weights(g, n, k, seed, device)
    m_indices = torch.arange(g, dtype=torch.int32, device=device).repeat_interleave(rows)
    out = torch.empty((g * rows, n), dtype=torch.bfloat16, device=device)
    call = fp8_grouped_gemm.bind_contiguous((a, sfa), (b, sfb), out, m_indices)
    return {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "out": out, "call": call,
            "group_of_row": lambda r: r // rows}


def masked_inputs(g: int, expected: int, n: int, k: int, seed: int, device: torch.device,
                  m_max: int | None = None) -> dict[str, Any]:
    m_max = M_MAX if m_max is None else m_max
    gen = torch.Generator(device=device).manual_seed(seed)
    a2, sfa2 = per_token_cast_to_fp8(torch.randn((g * m_max, k), generator=gen, device=device))
    a, sfa = a2.view(g, m_max, k), sfa2.view(g, m_max, -1)
    b, sfb = grouped_weights(g, n, k, seed, device)
    masked_m = torch.full((g,), expected, dtype=torch.int32, device=device)
    out = torch.empty((g, m_max, n), dtype=torch.bfloat16, device=device)
    call = fp8_grouped_gemm.bind_masked((a, sfa), (b, sfb), out, masked_m, expected)
    return {"a": a2, "sfa": sfa2, "b": b, "sfb": sfb, "out": out, "call": call, "m_max": m_max,
            "expected": expected}


# ---- checks ---------------------------------------------------------------------------------------

def dense_reference(inp: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    rows = sample_rows(int(inp["a"].shape[0]))
    ref = dequantized_a(inp["a"][rows], inp["sfa"][rows]) @ dequantized_b(inp["b"], inp["sfb"]).T
    return rows, ref


def grouped_reference(inp: dict[str, Any], rows: list[int], group_of: list[int]) -> torch.Tensor:
    ref = torch.empty((len(rows), int(inp["b"].shape[1])), dtype=torch.float64, device=inp["b"].device)
    for g in sorted(set(group_of)):
        pick = [i for i, gi in enumerate(group_of) if gi == g]
        idx = [rows[i] for i in pick]
        ref[pick] = dequantized_a(inp["a"][idx], inp["sfa"][idx]) @ dequantized_b(inp["b"][g], inp["sfb"][g]).T
    return ref


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checked(fn: Callable[[], None], out2d: torch.Tensor, rows: list[int], ref: torch.Tensor) -> dict[str, Any]:
    out2d.fill_(float("nan"))
    fn()
    sync(out2d.device)
    return sampled_rows_check("out", out2d, ref, TOLERANCE, rows)


# ---- compile pool -----------------------------------------------------------------------------------

Task = tuple[str, tuple[int, ...], dict[str, Any], str]  # (kind, shape, config fields, device type)


def warm(task: Task) -> tuple[str, tuple[int, ...], dict[str, Any], str | None, float]:
    """Compile one (kind, shape, config) with a small launch of the same specialisation."""
    kind, shape, cfg, device_type = task
    start = time.perf_counter()
    try:
        device = torch.device(device_type)
        config = GemmConfig(**cfg)
        if kind == "dense":
            m, n, k = shape
            inp = dense_inputs(min(m, 128), n, k, 0, device)
            triton_dense.launch(inp["call"], inp["out"], config)
        elif kind == "contiguous":
            g, _, n, k = shape
            inp = contiguous_inputs(g, 128, n, k, 0, device)
            triton_grouped.launch_contiguous(inp["call"], inp["out"], config)
        else:
            g, _, n, k = shape
            inp = masked_inputs(g, 32, n, k, 0, device, m_max=64)
            triton_grouped.launch_masked(inp["call"], inp["out"], config)
        sync(device)
        return kind, shape, cfg, None, time.perf_counter() - start
    except Exception as exc:
        return kind, shape, cfg, f"{type(exc).__name__}: {str(exc)[:300]}", time.perf_counter() - start


# ---- main -------------------------------------------------------------------------------------------

def tflops(flops: float, us: float) -> float:
    return flops / (us * 1e-6) / 1e12


class Run:
    def __init__(self, out_dir: str, phase: str, budget_s: float, device: str) -> None:
        self.out_dir, self.phase, self.deadline = out_dir, phase, time.monotonic() + budget_s
        self.device = torch.device(device)
        info = device_info(self.device)
        self.sms, self.name = info.multiprocessors, info.name
        self.results: dict[str, Any] = {
            "device": self.name, "multiprocessors": self.sms, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "phase": phase, "timing_method": "deepport.bench.timing.time_calls (CUDA graph below 1 ms, else "
            "events with L2 flush; inputs rotated when smaller than 2x L2)", "ceiling": None, "certify": {},
            "compile_failures": [], "dense": [], "contiguous": [], "masked": []}
        self.failed: set[tuple[str, tuple[int, ...], str]] = set()

    def save(self) -> None:
        with open(os.path.join(self.out_dir, "gpu_triton_gemm.json"), "w") as f:
            json.dump(self.results, f, indent=1)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def time(self, calls: list[Callable[[], None]]) -> dict[str, Any]:
        t = timing.time_calls(calls, self.device, samples=10 if self.device.type == "cuda" else 2, warmup=2)
        return {"us": t.median_us, "method": t.method, "calls_per_sample": t.calls_per_sample,
                "copies": t.input_copies, "p10_us": sorted(t.samples_us)[len(t.samples_us) // 10],
                "notes": t.notes}

    def configs(self, kind: str, m: int, n: int, k: int) -> list[GemmConfig]:
        if self.phase == "tuned":
            return [fp8_configs.choose(kind, self.name, self.sms, m, n, k)]
        base = {"dense": dense_candidates(m), "contiguous": contiguous_candidates(),
                "masked": masked_candidates()}[kind]
        return list(dict.fromkeys(resolved(c, m, n, k, self.sms) for c in base))  # distinct, in order

    def tasks(self) -> list[tuple[str, tuple[int, ...], dict[str, Any], str]]:
        found = []
        for m in DENSE_M:
            for n, k in NK:
                found += [("dense", (m, n, k), asdict(c)) for c in self.configs("dense", m, n, k)]
        for g, rows, n, k in CONTIGUOUS:
            found += [("contiguous", (g, rows, n, k), asdict(c)) for c in self.configs("contiguous", rows, n, k)]
            found += [("dense", (g * rows, n, k), asdict(c)) for c in self.configs("dense", g * rows, n, k)]
        for g, em, n, k in MASKED:
            found += [("masked", (g, em, n, k), asdict(c)) for c in self.configs("masked", em, n, k)]
            found += [("dense", (g * em, n, k), asdict(c)) for c in self.configs("dense", g * em, n, k)]
        return [(*t, self.device.type) for t in found]

    def copies(self, make: Callable[[int], dict[str, Any]], footprint: int) -> list[dict[str, Any]]:
        count = min(8, timing.copies_for_rotation(footprint, self.device))
        return [make(seed) for seed in range(count)]

    def dense(self, m: int, n: int, k: int, peers: bool = True) -> dict[str, Any]:
        flops = 2.0 * m * n * k
        inputs = self.copies(lambda s: dense_inputs(m, n, k, s, self.device), m * k + n * k + 2 * m * n)
        rows, ref = dense_reference(inputs[0])
        row: dict[str, Any] = {"m": m, "n": n, "k": k, "configs": []}
        for config in self.configs("dense", m, n, k):
            if ("dense", (m, n, k), config.label) in self.failed or self.left() < 0:
                continue
            entry: dict[str, Any] = {"config": config.label}
            try:
                entry["check"] = checked(lambda c=config: triton_dense.launch(inputs[0]["call"], inputs[0]["out"], c),
                                         inputs[0]["out"], rows, ref)
                t = self.time([lambda i=i, c=config: triton_dense.launch(i["call"], i["out"], c) for i in inputs])
                entry.update(t, tflops=tflops(flops, t["us"]))
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["configs"].append(entry)
        good = [c for c in row["configs"] if "tflops" in c and c["check"]["passed"]]
        row["best"] = max(good, key=lambda c: c["tflops"]) if good else None
        if peers:
            row["torch_backend_path"] = torch_fp8.path(inputs[0]["call"].signature)[0]
            row["torch_backend"] = self.peer(lambda i: (lambda: torch_fp8.run(i["call"], i["out"])), inputs, rows,
                                             ref, flops)
            row["cublas_raw"] = self.peer(raw_scaled_mm, inputs, rows, ref, flops)
        return row

    def peer(self, make: Callable[[dict[str, Any]], Callable[[], None]], inputs: list[dict[str, Any]],
             rows: list[int], ref: torch.Tensor, flops: float) -> dict[str, Any]:
        try:
            check = checked(make(inputs[0]), inputs[0]["out"], rows, ref)
            t = self.time([make(i) for i in inputs])
            return {"check": check, **t, "tflops": tflops(flops, t["us"])}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    def grouped(self, kind: str, shape: tuple[int, int, int, int]) -> dict[str, Any]:
        g, rows_or_em, n, k = shape
        total_m = g * rows_or_em
        flops = 2.0 * total_m * n * k
        if kind == "contiguous":
            inputs = self.copies(lambda s: contiguous_inputs(g, rows_or_em, n, k, s, self.device),
                                 total_m * k + g * n * k + 2 * total_m * n)
            launch: Callable[..., None] = triton_grouped.launch_contiguous
            rows = sample_rows(total_m)
            group_of = [r // rows_or_em for r in rows]
            flat_rows = rows
        else:
            inputs = self.copies(lambda s: masked_inputs(g, rows_or_em, n, k, s, self.device),
                                 total_m * k + g * n * k + 2 * total_m * n)
            launch = triton_grouped.launch_masked
            in_use = [gi * M_MAX + r for gi in range(g) for r in range(rows_or_em)]
            flat_rows = [in_use[i] for i in sample_rows(len(in_use))]
            group_of = [r // M_MAX for r in flat_rows]
        ref = grouped_reference(inputs[0], flat_rows, group_of)
        out2d = inputs[0]["out"].view(-1, n)
        row: dict[str, Any] = {"groups": g, "rows": rows_or_em, "total_m": total_m, "n": n, "k": k, "configs": []}
        for config in self.configs(kind, rows_or_em, n, k):
            if (kind, shape, config.label) in self.failed or self.left() < 0:
                continue
            entry: dict[str, Any] = {"config": config.label}
            try:
                entry["check"] = checked(lambda c=config: launch(inputs[0]["call"], inputs[0]["out"], c), out2d,
                                         flat_rows, ref)
                t = self.time([lambda i=i, c=config: launch(i["call"], i["out"], c) for i in inputs])
                entry.update(t, tflops=tflops(flops, t["us"]))
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["configs"].append(entry)
        good = [c for c in row["configs"] if "tflops" in c and c["check"]["passed"]]
        row["best"] = max(good, key=lambda c: c["tflops"]) if good else None
        inputs.clear()
        row["dense_same_total_m"] = self.dense(total_m, n, k, peers=False)
        return row


def raw_scaled_mm(inp: dict[str, Any]) -> Callable[[], None]:
    """cuBLAS block-scaled FP8 (torch scaled_mm) with its scale layouts staged once, outside the timing."""
    api = torch_fp8._scaled_mm_api()
    assert api is not None
    scaled_mm, scaling = api
    a, b = inp["a"], inp["b"]
    scale_a = inp["sfa"].t().contiguous().t()  # [M, kb], strides (1, M)
    scale_b = inp["sfb"].contiguous().t()  # [kb, ceil(N/128)], strides (1, kb)
    out = inp["out"]

    def run() -> None:
        out.copy_(scaled_mm(a, b.t(), scale_a, scaling.BlockWise1x128, scale_b, scaling.BlockWise128x128,
                            output_dtype=torch.bfloat16))
    return run


def start_certify(out_dir: str) -> list[tuple[tuple[str, ...], subprocess.Popen[str], str]]:
    procs = []
    for i, ops in enumerate(CERTIFY_OPS):
        log = f"/tmp/certify-{i}.log"
        cmd = [sys.executable, "-m", "deepport", "certify", "--backend", "triton", "--tier", "smoke", "--device",
               "cuda", "--out", f"/tmp/certify-{i}", "--op", *ops]
        with open(log, "w") as sink:
            procs.append((ops, subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True), log))
    return procs


def finish_certify(run: Run, procs: list[tuple[tuple[str, ...], subprocess.Popen[str], str]]) -> None:
    with open(os.path.join(run.out_dir, "certify.txt"), "w") as text:
        for i, (ops, proc, log) in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(10.0, run.left()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = -9
            with open(log) as f:
                body = f.read()
            text.write(f"==== certify {' '.join(ops)} (exit {rc})\n{body[-6000:]}\n")
            verdicts: dict[str, Any] = {}
            try:
                with open(f"/tmp/certify-{i}/results.json") as f:
                    res = json.load(f)
                for case in res["cases"]:
                    status = verdicts.setdefault(case["op"], {})
                    status[case["status"]] = status.get(case["status"], 0) + 1
                    if case["status"] != "pass":
                        verdicts.setdefault("not_passed", []).append(
                            {"case": case["case_id"], "status": case["status"], "message": case.get("message", "")})
            except Exception as exc:
                verdicts["error"] = f"{type(exc).__name__}: {exc}"
            run.results["certify"][" ".join(ops)] = {"exit": rc, "verdicts": verdicts}
            print(f"certify {' '.join(ops)}: exit {rc} {verdicts}", flush=True)


def table(run: Run) -> None:
    ceiling = run.results["ceiling"] or float("nan")
    print(f"\nfp8 ceiling {ceiling:.0f} TFLOP/s (torch._scaled_mm 8192^3, this run)")
    print(f"{'shape':<26}{'triton':>9}{'%ceil':>7}{'cuBLAS':>9}{'ratio':>7}{'torch-be':>9}  best config")
    for row in run.results["dense"]:
        best, cub, tb = row.get("best"), row.get("cublas_raw", {}), row.get("torch_backend", {})
        t = best["tflops"] if best else float("nan")
        c = cub.get("tflops", float("nan"))
        print(f"m{row['m']} n{row['n']} k{row['k']:<8}".ljust(26) + f"{t:9.0f}{100 * t / ceiling:6.0f}%{c:9.0f}"
              f"{t / c:7.2f}{tb.get('tflops', float('nan')):9.0f}  {best['config'] if best else '-'}")
    for kind in ("contiguous", "masked"):
        for row in run.results[kind]:
            best = row.get("best")
            dense = (row.get("dense_same_total_m") or {}).get("best")
            t = best["tflops"] if best else float("nan")
            d = dense["tflops"] if dense else float("nan")
            print(f"{kind} g{row['groups']} m{row['rows']} n{row['n']} k{row['k']}".ljust(34) +
                  f"{t:7.0f} ({100 * t / ceiling:.0f}%) vs dense m{row['total_m']} {d:.0f}: {t / d:.2f}x  "
                  f"{best['config'] if best else '-'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-triton-gemm"))
    parser.add_argument("--phase", choices=("sweep", "tuned"), default="sweep")
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--no-certify", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes (a dry run of this script)")
    args = parser.parse_args()
    if args.tiny:
        global NK, DENSE_M, GROUPED_NK, CONTIGUOUS, MASKED, M_MAX
        NK, DENSE_M, GROUPED_NK, M_MAX = TINY["NK"], TINY["DENSE_M"], TINY["GROUPED_NK"], TINY["M_MAX"]
        CONTIGUOUS = tuple((2, 128, n, k) for n, k in GROUPED_NK)
        MASKED = tuple((g, 32 // g, n, k) for g in (1, 2) for n, k in GROUPED_NK)
    os.makedirs(args.out, exist_ok=True)
    run = Run(args.out, args.phase, args.budget_s, args.device)
    print(json.dumps({k: run.results[k] for k in ("device", "torch", "triton", "cuda")}), flush=True)
    procs = [] if args.no_certify else start_certify(args.out)
    start = time.monotonic()
    tasks = run.tasks()
    unique = {(kind, shape, json.dumps(cfg, sort_keys=True)): (kind, shape, cfg, dev)
              for kind, shape, cfg, dev in tasks}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(2, (os.cpu_count() or 8) - 4), mp_context=ctx) as pool:
        for kind, shape, cfg, error, _ in pool.map(warm, unique.values()):
            if error is not None:
                label = GemmConfig(**cfg).label
                run.failed.add((kind, shape, label))
                run.results["compile_failures"].append({"kind": kind, "shape": shape, "config": label, "error": error})
                print(f"compile/launch failure {kind} {shape} {label}: {error}", flush=True)
    print(f"compiled {len(unique)} variants in {time.monotonic() - start:.0f} s", flush=True)
    if procs:
        finish_certify(run, procs)
    run.save()
    from deepport.bench import ceilings

    name = ceilings.resolve("fp8_matmul", run.device.type)
    run.results["ceiling"] = ceilings.measure(name, run.device, quick=True).value
    print(f"fp8 ceiling: {run.results['ceiling']}", flush=True)
    for m in DENSE_M:
        for n, k in NK:
            if run.left() < 0:
                break
            run.results["dense"].append(run.dense(m, n, k))
            best = run.results["dense"][-1]["best"]
            print(f"dense m{m} n{n} k{k}: {best and round(best['tflops'])} "
                  f"cublas {run.results['dense'][-1]['cublas_raw'].get('tflops')}", flush=True)
            run.save()
            torch.cuda.empty_cache()
    for kind, shapes in (("contiguous", CONTIGUOUS), ("masked", MASKED)):
        for shape in shapes:
            if run.left() < 0:
                break
            run.results[kind].append(run.grouped(kind, shape))
            run.save()
            torch.cuda.empty_cache()
    run.save()
    table(run)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
