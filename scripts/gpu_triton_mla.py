"""One device call for the triton backend's MLA decode: correctness, then timing of kernel configs.

    python3 scripts/gpu_triton_mla.py [--stages warm,smoke,full,time] [--budget-s 150] [--mb A,B] [--cb C,D]

Stages run in this order (each optional): warm, smoke, time, full.

1. ``warm``: compiles every kernel specialisation the later stages launch, in parallel worker processes
   (triton's on-disk cache is shared), so the certify and timing stages do not compile serially.
2. ``smoke`` / ``full``: ``python3 -m deepport certify --device cuda --backend triton --op mla_decode``
   at that tier (``full`` runs its head-grid cases, ``--case b8_``, when ``--full-pattern`` says so).
4. ``profile`` (alone): runs each selected shape twice with the tuned config and writes nothing; for
   ``ncu --kernel-name regex:mla_decode_split ... scripts/gpu_triton_mla.py --stages profile --shapes ...``.
3. ``time``: BENCH's MLA configs (memory-bound: b=128 h_q=16 s_q=1 s_k 4096 / 16384, b=64 s_k=32768, b=128
   ragged s_k in [4096, 32768]; compute-bound: b=128 h_q=128 s_q in {1, 2 causal} s_k=4096), each
   kernel config as a CUDA graph of many calls (median of replays), next to the torch backend (events)
   and the HBM copy ceiling measured in the same run. Every config's output is checked against the torch
   backend's (2 bf16 ulps of |ref| + rms) before it is timed.

Counting (BENCH.md): FLOP = b*s_q*h_q*mean_s_k*2*(d_qk+d_v); bytes = b*(s_q*h_q*d_qk + mean_s_k*h_kv*d_qk
+ s_q*h_q*d_v)*2. Prints a table last; writes ``$OUT/triton_mla.json`` (and certify summaries).
``--cpu`` runs a tiny version of every stage under TRITON_INTERPRET=1 (to test this script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import torch

D_QK, D_V, PAGE = 576, 512, 64
RUN_SEED = 20261201

# name -> (block_h, block_n, num_warps, num_stages, programs_per_sm)
MB_VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "h16n64w4s2p2": (16, 64, 4, 2, 2),
    "h16n64w8s2": (16, 64, 8, 2, 1),
    "h16n32w8s4": (16, 32, 8, 4, 1),
    "h16n32w8s3": (16, 32, 8, 3, 1),
    "h16n32w8s5": (16, 32, 8, 5, 1),
    "h16n64w8s3": (16, 64, 8, 3, 1),
    "h16n16w4s6p2": (16, 16, 4, 6, 2),
    "h16n16w4s4p2": (16, 16, 4, 4, 2),
    "h16n32w4s3p2": (16, 32, 4, 3, 2),
    "h64n32w8s3": (64, 32, 8, 3, 1),  # wgmma on 64 rows, 48 of them padding
}
CB_VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "h64n32w8s3": (64, 32, 8, 3, 1),
    "h64n32w8s2": (64, 32, 8, 2, 1),
    "h64n64w8s2": (64, 64, 8, 2, 1),
    "h32n64w8s2": (32, 64, 8, 2, 1),  # mma.sync on 32 rows, 4 row tiles
    "h64n16w8s4": (64, 16, 8, 4, 1),
}
# name -> (b, s_q, h_q, s_k or None for ragged, causal, kind)
SHAPES: dict[str, tuple[int, int, int, int | None, bool, str]] = {
    "b128_sq1_hq16_sk4096": (128, 1, 16, 4096, False, "mb"),
    "b128_sq1_hq16_sk16384": (128, 1, 16, 16384, False, "mb"),
    "b64_sq1_hq16_sk32768": (64, 1, 16, 32768, False, "mb"),
    "b128_sq1_hq16_ragged4096-32768": (128, 1, 16, None, False, "mb"),
    "b128_sq1_hq128_sk4096": (128, 1, 128, 4096, False, "cb"),
    "b128_sq2_hq128_sk4096_causal": (128, 2, 128, 4096, True, "cb"),
}
CPU_SHAPES: dict[str, tuple[int, int, int, int | None, bool, str]] = {
    "tiny_mb": (2, 1, 16, 256, False, "mb"),
    "tiny_ragged": (3, 1, 16, None, False, "mb"),
    "tiny_cb": (1, 2, 64, 128, True, "cb"),
}


def lengths(b: int, s_k: int | None, cpu: bool, seed: int = 1) -> list[int]:
    if s_k is not None:
        return [s_k] * b
    g = torch.Generator().manual_seed(seed)
    lo, hi = (64, 512) if cpu else (4096, 32768)
    return [int(x) for x in torch.randint(lo, hi + 1, (b,), generator=g)]


def build(b: int, s_q: int, h_q: int, lens: list[int], device: torch.device, seed: int = 0,
          table_width: int | None = None) -> tuple[torch.Tensor, ...]:
    """bench-style inputs: N(0,1)/10 bf16, each request's pages a random permutation of the blocks."""
    g = torch.Generator(device=device).manual_seed(seed)
    pages = [-(-n // PAGE) for n in lens]
    width = table_width or -(-max(pages) // 16) * 16
    total = sum(pages)
    q = (torch.randn((b, s_q, h_q, D_QK), generator=g, device=device) / 10).clamp_(-1, 1).to(torch.bfloat16)
    k = (torch.randn((total, PAGE, 1, D_QK), generator=g, device=device) / 10).clamp_(-1, 1).to(torch.bfloat16)
    perm = torch.randperm(total, generator=g, device=device).to(torch.int32)
    table = torch.zeros((b, width), dtype=torch.int32, device=device)
    at = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[at: at + n]
        at += n
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, table, seqlens


def counting(b: int, s_q: int, h_q: int, lens: list[int]) -> tuple[float, float]:
    mean = sum(lens) / len(lens)
    flops = b * s_q * h_q * mean * 2 * (D_QK + D_V)
    nbytes = b * (s_q * h_q * D_QK + mean * 1 * D_QK + s_q * h_q * D_V) * 2
    return flops, nbytes


def config_of(v: tuple[int, int, int, int, int]) -> Any:
    from deepport.backends.triton.configs import MLAConfig

    return MLAConfig(block_h=v[0], block_n=v[1], num_warps=v[2], num_stages=v[3], programs_per_sm=v[4])


# ---------------------------------------------------------------- warm-up (parallel compilation)
def _warm_job(job: tuple[str, Any]) -> str:
    kind, what = job
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if kind == "case":
            from deepport.conformance.suites import mla_decode as suite

            case = next(c for c in suite.cases() if c.id == what)
            inputs = suite.generate(case, case.seed(RUN_SEED))
            tensors = {n: t.to(device) for n, t in inputs.tensors.items()}
            outputs = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in suite.output_specs(inputs).items()}
            suite.invoke(inputs, tensors, "triton", outputs)
        else:
            _, (shape, v) = what
            run_variant_once(shape[1], shape[2], shape[4], v, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return f"ok {kind} {what if kind == 'case' else what[0]} {time.perf_counter() - t0:.1f}s"
    except Exception as exc:  # reported, the later stages show the failure in context
        return f"ERROR {kind} {what}: {type(exc).__name__}: {str(exc)[:300]}"


def run_variant_once(s_q: int, h_q: int, causal: bool, v: tuple[int, int, int, int, int],
                     device: torch.device) -> None:
    """A small call with the bench shape's specialisation (same strides, table width a multiple of 16)."""
    import deepport
    from deepport.backends.triton import mla_decode as tm
    from deepport.kernels import mla_decode as mla

    lens = [max(256, s_q)] * 2
    q, k, table, seqlens = build(2, s_q, h_q, lens, device, table_width=64)
    md = deepport.get_mla_metadata(seqlens, s_q * h_q, 1)
    call = mla.bind(q, k, table, seqlens, D_V, causal=causal, metadata=md)
    out = torch.empty((2, s_q, h_q, D_V), dtype=torch.bfloat16, device=device)
    lse = torch.empty((2, h_q, s_q), dtype=torch.float32, device=device)
    tm.run(call, out, lse, config=config_of(v))


def warm(jobs: list[tuple[str, Any]], workers: int, log: list[str]) -> None:
    import multiprocessing as mp

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for line in pool.map(_warm_job, jobs):
            if line.startswith("ERROR"):
                print(line, flush=True)
            log.append(line)
    print(f"warm: {len(jobs)} jobs in {time.perf_counter() - t0:.1f}s on {workers} workers", flush=True)


# ---------------------------------------------------------------- certify
def certify(tier: str, pattern: str | None, out: str, timeout: float, cpu: bool) -> dict[str, Any]:
    name = f"certify_{tier}"
    cmd = [sys.executable, "-m", "deepport", "certify", "--device", "cpu" if cpu else "cuda", "--backend", "triton",
           "--tier", tier, "--op", "mla_decode", "--seed", str(RUN_SEED), "--no-isolate", "--out", f"{out}/{name}"]
    if pattern:
        cmd += ["--case", pattern]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        tail, rc = (res.stdout + res.stderr)[-3000:], res.returncode
    except subprocess.TimeoutExpired as exc:
        tail, rc = f"timed out after {timeout}s: {str(exc.stdout)[-1500:]}", -1
    print(tail, flush=True)
    for f in ("summary.md", "results.json"):
        src = f"{out}/{name}/{f}"
        if os.path.exists(src):
            shutil.copy(src, f"{out}/{name}_{f}")
    shutil.rmtree(f"{out}/{name}", ignore_errors=True)
    return {"tier": tier, "pattern": pattern, "returncode": rc, "seconds": time.perf_counter() - t0, "tail": tail}


# ---------------------------------------------------------------- timing
def _median_graph_us(fn: Any, calls: int, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def _median_events_us(fn: Any, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000.0)
    return statistics.median(times)


def _median_cpu_us(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_ceiling_gbs(cpu: bool) -> float:
    n = (1 << 20) if cpu else (1 << 29)  # bf16 elements: 2 MiB / 1 GiB
    device = "cpu" if cpu else "cuda"
    x = torch.randn(n, device=device).to(torch.bfloat16)
    y = torch.empty_like(x)
    us = _median_cpu_us(lambda: y.copy_(x), 5) if cpu else _median_events_us(lambda: y.copy_(x), 7)
    return 2 * n * 2 / (us * 1e-6) / 1e9


def within(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """2.01 bf16 ulps of |ref| + rms(ref) (the suite's bound, here against the torch backend)."""
    g, r = got.double(), ref.double()
    rms = float(r.pow(2).mean().sqrt())
    ratio = float(((g - r).abs() / (2.01 * 2.0**-7 * (r.abs() + rms))).max())
    return bool(torch.isfinite(g).all()) and ratio <= 1.0, ratio


def time_shape(name: str, shape: tuple[int, int, int, int | None, bool, str], variants: dict[str, Any],
               cpu: bool, deadline: float) -> dict[str, Any]:
    import deepport
    from deepport.backends.triton import configs
    from deepport.backends.triton import mla_decode as tm
    from deepport.dispatch import registry
    from deepport.kernels import mla_decode as mla

    b, s_q, h_q, s_k, causal, kind = shape
    device = torch.device("cpu" if cpu else "cuda")
    lens = lengths(b, s_k, cpu)
    q, k, table, seqlens = build(b, s_q, h_q, lens, device)
    md = deepport.get_mla_metadata(seqlens, s_q * h_q, 1)
    out = torch.empty((b, s_q, h_q, D_V), dtype=torch.bfloat16, device=device)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=device)
    call = mla.bind(q, k, table, seqlens, D_V, causal=causal, metadata=md, out=out, lse=lse)
    flops, nbytes = counting(b, s_q, h_q, lens)
    row: dict[str, Any] = {"shape": name, "kind": kind, "b": b, "s_q": s_q, "h_q": h_q, "causal": causal,
                           "mean_s_k": sum(lens) / b, "min_s_k": min(lens), "max_s_k": max(lens),
                           "flops": flops, "bytes": nbytes, "variants": {}}

    torch_impl = registry.get("torch").implementation("mla_decode")
    ref_out, ref_lse = torch.empty_like(out), torch.empty_like(lse)
    torch_impl(call, ref_out, ref_lse)
    reps = 3 if cpu else 5
    torch_us = _median_cpu_us(lambda: torch_impl(call, ref_out, ref_lse), 1) if cpu else \
        _median_events_us(lambda: torch_impl(call, ref_out, ref_lse), reps)
    row["torch_us"] = torch_us
    default = configs.mla_config(call.signature.device.name, s_q * h_q)
    row["default_config"] = asdict(default)
    row["default_variant"] = next((n for n, v in variants.items() if config_of(v) == default), None)
    # the public op's host overhead: validation (one value-check sync), dispatch, launch
    op_us = _median_cpu_us(lambda: deepport.mla_decode(q, k, table, seqlens, D_V, causal=causal, metadata=md,
                                                       backend="triton", out=out, lse=lse), 5)
    row["public_op_wall_us"] = op_us
    for vname, v in variants.items():
        if time.perf_counter() > deadline:
            row["variants"][vname] = {"skipped": "budget"}
            continue
        rec: dict[str, Any] = {"config": asdict(config_of(v))}
        try:
            out.fill_(float("nan"))
            lse.fill_(float("nan"))
            tm.run(call, out, lse, config=config_of(v))
            ok, ratio = within(out, ref_out)
            lse_err = float(((lse - ref_lse).abs() / ref_lse.abs().clamp(min=1e-6)).max())
            rec.update(ok=ok and lse_err < 1e-4, err_ratio=ratio, lse_rel_err=lse_err)
            cfg = config_of(v)
            fn = lambda cfg=cfg: tm.run(call, out, lse, config=cfg)  # noqa: E731
            us = _median_cpu_us(fn, 1) if cpu else _median_graph_us(fn, calls=10, reps=7)
            rec.update(us=us, tflops=flops / us / 1e6, gbs=nbytes / us / 1e3, x_torch=torch_us / us)
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["variants"][vname] = rec
        print(f"  {name} {vname}: {rec}", flush=True)
    return row


def table(rows: list[dict[str, Any]], copy_gbs: float, bf16_tflops: float | None) -> str:
    lines = [f"HBM copy ceiling (this run): {copy_gbs:.0f} GB/s"
             + (f"; bf16 matmul ceiling: {bf16_tflops:.0f} TFLOP/s" if bf16_tflops else ""),
             f"{'shape':34} {'variant':14} {'us':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'x torch':>8} ok"]
    for r in rows:
        gbs = r["bytes"] / r["torch_us"] / 1e3
        lines.append(f"{r['shape']:34} {'torch':14} {r['torch_us']:8.1f} {gbs:7.0f} "
                     f"{100 * gbs / copy_gbs:6.1f} {r['flops'] / r['torch_us'] / 1e6:8.1f}")
        for name, v in r["variants"].items():
            if "us" not in v:
                lines.append(f"{r['shape']:34} {name:14} {v.get('error', v.get('skipped', ''))[:60]}")
                continue
            mark = "*" if name == r.get("default_variant") else " "
            lines.append(f"{r['shape']:34} {name + mark:14} {v['us']:8.1f} {v['gbs']:7.0f} "
                         f"{100 * v['gbs'] / copy_gbs:6.1f} {v['tflops']:8.1f} {v['x_torch']:8.2f} "
                         f"{'ok' if v['ok'] else 'WRONG ' + format(v['err_ratio'], '.2f')}")
    return "\n".join(lines)


def bf16_ceiling(cpu: bool) -> float | None:
    if cpu:
        return None
    a = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    us = _median_events_us(lambda: a @ bm, 5)
    return 2 * 8192**3 / us / 1e6


def profile(shapes: dict[str, tuple[int, int, int, int | None, bool, str]], cpu: bool) -> int:
    """Run each shape twice with the tuned config and write nothing (for ``ncu ... --stages profile``)."""
    import deepport

    device = torch.device("cpu" if cpu else "cuda")
    for name, (b, s_q, h_q, s_k, causal, _) in shapes.items():
        q, k, table, seqlens = build(b, s_q, h_q, lengths(b, s_k, cpu), device)
        md = deepport.get_mla_metadata(seqlens, s_q * h_q, 1)
        for _ in range(2):
            deepport.mla_decode(q, k, table, seqlens, D_V, causal=causal, metadata=md, backend="triton")
        if not cpu:
            torch.cuda.synchronize()
        print("profiled", name, flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="warm,smoke,time")
    ap.add_argument("--budget-s", type=float, default=150.0, help="deadline for starting a timing")
    ap.add_argument("--total-s", type=float, default=240.0, help="no certify --tier full starts after this")
    ap.add_argument("--mb", default=",".join(MB_VARIANTS))
    ap.add_argument("--cb", default=",".join(CB_VARIANTS))
    ap.add_argument("--shapes", default="")
    ap.add_argument("--full-pattern", default="b8_", help="comma-separated --case patterns, run in turn")
    ap.add_argument("--full-timeout", type=float, default=120.0)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget_s
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    out = os.environ.get("OUT", "/tmp/triton-mla-out")
    os.makedirs(out, exist_ok=True)
    stages = args.stages.split(",")
    shapes = CPU_SHAPES if args.cpu else SHAPES
    if args.shapes:
        shapes = {n: s for n, s in shapes.items() if any(p in n for p in args.shapes.split(","))}
    mb = {n: MB_VARIANTS[n] for n in args.mb.split(",") if n}
    cb = {n: CB_VARIANTS[n] for n in args.cb.split(",") if n}
    report: dict[str, Any] = {"argv": sys.argv, "env": {}, "stages": stages}
    if stages == ["profile"]:
        return profile(shapes, args.cpu)
    import triton

    report["env"] = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(report["env"], flush=True)
    log: list[str] = []
    if "warm" in stages:
        jobs: list[tuple[str, Any]] = []
        for sname, shape in shapes.items():
            for v in (mb if shape[5] == "mb" else cb).values():
                if shape[3] is not None or shape[5] == "cb":
                    jobs.append(("variant", (sname, (shape, v))))
        if "smoke" in stages or "full" in stages:
            from deepport.conformance.suites import mla_decode as suite

            patterns = args.full_pattern.split(",") if "full" in stages else []
            jobs += [("case", c.id) for c in suite.cases() if c.tier == "smoke" or any(p in c.id for p in patterns)]
        warm(jobs, 2 if args.cpu else args.workers, log)
    report["warm_log"] = log
    report["certify"] = []
    if "smoke" in stages:
        report["certify"].append(certify("smoke", None, out, max(30.0, deadline - time.perf_counter()), args.cpu))
    rows: list[dict[str, Any]] = []
    copy_gbs = bf16 = None
    if "time" in stages:
        copy_gbs = copy_ceiling_gbs(args.cpu)
        bf16 = bf16_ceiling(args.cpu)
        report["ceilings"] = {"hbm_copy_gbs": copy_gbs, "bf16_matmul_tflops": bf16}
        for sname, shape in shapes.items():
            if time.perf_counter() > deadline:
                rows.append({"shape": sname, "skipped": "budget"})
                continue
            rows.append(time_shape(sname, shape, mb if shape[5] == "mb" else cb, args.cpu, deadline))
            if not args.cpu:
                torch.cuda.empty_cache()  # the shape's inputs are gone with time_shape's frame
    if "full" in stages:
        for pattern in args.full_pattern.split(","):
            left = start + args.total_s - time.perf_counter()
            if left < 20:
                report["certify"].append({"tier": "full", "pattern": pattern, "skipped": "budget"})
                continue
            report["certify"].append(certify("full", pattern, out, min(args.full_timeout, left), args.cpu))
    report["timing"] = rows
    report["seconds"] = time.perf_counter() - start
    with open(f"{out}/triton_mla.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    for c in report["certify"]:
        if "skipped" in c:
            print(f"certify {c['tier']} {c['pattern']}: skipped ({c['skipped']})")
        else:
            print(f"certify {c['tier']} {c['pattern'] or ''}: rc={c['returncode']} in {c['seconds']:.0f}s")
    done = [r for r in rows if "variants" in r]
    if done and copy_gbs:
        print(table(done, copy_gbs, bf16))
    print(f"total {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
