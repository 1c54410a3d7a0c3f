#!/usr/bin/env python3
"""The hopper backend's FP8 GEMMs on an H200 in one device call: check, certify, time, sanitize.

    python3 scripts/gpu_hopper_gemm.py            # every stage, within HOPPER_BUDGET_S seconds (default 300)
    python3 scripts/gpu_hopper_gemm.py --stage probe|multicast|sweep|bench|tiny

Stages (each in its own process with a time limit, so a hung kernel costs one stage, not the call):

1. ``probe``: toolchain versions, then small dense / contiguous / masked calls with forced tile configs
   (64- and 128-row tiles, BLOCK_N dividing 128 or straddling 128-column scale blocks, M/N/K edges)
   against float64, outputs poisoned with NaN first; on a mismatch it prints where (row / column
   patterns, best-fit scale) and the run stops there.
   ``multicast`` (its own process and time limit, not gating the later stages): the same for the
   opt-in 2-CTA cluster variant (``cluster_n = 2``, TMA multicast of A, not yet measured) on its edges
   (A slice past M, odd n-block counts, many pairs per cluster), appended to ``probe.json``; only if it
   passes (``HOPPER_MULTICAST=1`` for the later stages) do its GPU tests, sweep candidates and sanitizer
   call run.
2. ``certify``: ``deepport certify --tier smoke --backend hopper`` on the three ops.
3. ``pytest -m gpu tests/test_hopper_gpu.py``, then (multicast passed) ``tests/test_hopper_multicast_gpu.py``.
4. ``sweep``: per bench shape, several tiles, each checked against float64 then timed; the fastest
   correct one per shape is written to ``sweep.json`` (and used by the bench stage of the same run).
   With ``HOPPER_MULTICAST`` not ``0`` the candidates include the cluster-2 tiles of
   ``configs.MULTICAST_SWEEP``; each entry then also holds ``current`` (the tile the backend chooses now:
   ``TUNED`` or the model), ``best_multicast`` and ``multicast_speedup`` (current time / best cluster-2
   time), and a summary table closes the stage. A tile is ``[block_m, block_n, group_m]``, with a fourth
   element ``2`` for the cluster variant (a winner can be pasted into ``TUNED`` as it is).
5. ``bench``: :mod:`deepport.bench`'s runner (quick) on the DeepSeek-V3 dense shapes at M in
   {64, 128, 4096} and the grouped shapes, hopper next to torch (cuBLAS block-scaled) with the
   fp8 matmul ceiling measured in the same run; each backend float64-checked before it is timed;
   CUDA-graph timing under 1 ms per call, L2-flushed events above.
6. ``compute-sanitizer --tool memcheck`` on ``--stage tiny`` (one small call of each op, and of each op's
   cluster variant when the multicast probe passed), if time is left.

Writes under ``$OUT`` (default /tmp/hopper-out; at most 8 files, what the device tool returns):
``probe.json``, ``certify_results.json``, ``certify_summary.md``, ``sweep.json``, ``bench_dense.json``,
``bench_grouped.json``, ``sanitizer.txt``; the caller tees stdout (certify and pytest output too) to ``log.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", "/tmp/hopper-out"))
OPS = ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked")


# ---- stage: probe ---------------------------------------------------------------------------------

def _report(name: str, out: Any, ref: Any, written: Any = None) -> dict[str, Any]:
    """Compare ``out`` (bf16) with the float64 ``ref`` and say where they differ."""
    import torch

    got = out.double()
    mask = torch.ones_like(ref, dtype=torch.bool) if written is None else written
    unwritten = int((torch.isnan(got) & mask).sum())
    g, r = torch.nan_to_num(got, nan=0.0)[mask], ref[mask]
    rms = float(r.pow(2).mean().sqrt()) if r.numel() else 0.0
    err = (g - r).abs()
    bound = 2.01 * 2.0**-8 * r.abs() + 2.0**-8 * rms
    bad = err > bound
    denom = float((g * g + r * r).sum())
    calc_diff = 1.0 - 2.0 * float((g * r).sum()) / denom if denom else 0.0
    scale = float((g * r).sum() / (r * r).sum()) if float((r * r).sum()) else 0.0
    result = {"case": name, "passed": unwritten == 0 and not bool(bad.any()), "unwritten": unwritten,
              "bad": int(bad.sum()), "elements": int(r.numel()), "max_abs_err": float(err.max()) if err.numel() else 0,
              "rms_ref": rms, "calc_diff": calc_diff, "best_fit_scale": scale}
    if not result["passed"] and written is None:
        full_bad = (torch.isnan(got) | ((got - ref).abs() > 2.01 * 2.0**-8 * ref.abs() + 2.0**-8 * rms)).cpu()
        rows = torch.nonzero(full_bad.any(dim=1)).flatten()
        cols = torch.nonzero(full_bad.any(dim=0)).flatten()
        result["bad_rows"] = f"{len(rows)} rows, first {rows[:12].tolist()}, by row % 16: " \
            f"{torch.bincount(rows % 16, minlength=16).tolist()}"
        result["bad_cols"] = f"{len(cols)} cols, first {cols[:12].tolist()}, by col % 8: " \
            f"{torch.bincount(cols % 8, minlength=8).tolist()}"
        result["sample"] = {"got": got[0, :6].tolist(), "ref": ref[0, :6].tolist()}
    return result


def _quantized(m: int, n: int, k: int, seed: int, groups: int = 0) -> tuple[Any, ...]:
    import torch

    from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

    gen = torch.Generator(device="cuda").manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(torch.randn((m, k), generator=gen, device="cuda"))
    if groups == 0:
        b, sfb = per_block_cast_to_fp8(torch.randn((n, k), generator=gen, device="cuda"))
    else:
        parts = [per_block_cast_to_fp8(torch.randn((n, k), generator=gen, device="cuda")) for _ in range(groups)]
        b, sfb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return a, sfa, b, sfb


def _dense(m: int, n: int, k: int, seed: int) -> dict[str, Any]:
    import torch

    import deepport
    from deepport.bench.configs.fp8_gemm import dequantized_a, dequantized_b

    a, sfa, b, sfb = _quantized(m, n, k, seed)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="hopper")
    torch.cuda.synchronize()
    return _report(f"dense m{m} n{n} k{k}", out, dequantized_a(a, sfa) @ dequantized_b(b, sfb).T)


def _contiguous(n: int, k: int, rows: list[int], seed: int) -> dict[str, Any]:
    """Groups of ``rows[g]`` rows, each padded to 128 with -1 rows holding NaN in A and SFA."""
    import torch

    import deepport
    from deepport.bench.configs.fp8_gemm import dequantized_a, dequantized_b

    g = len(rows)
    sizes = [-(-r // 128) * 128 for r in rows]
    m_sum = sum(sizes)
    a, sfa, b, sfb = _quantized(m_sum, n, k, seed, groups=g)
    idx = torch.full((m_sum,), -1, dtype=torch.int32)
    start = 0
    for gi, (r, s) in enumerate(zip(rows, sizes, strict=True)):
        idx[start:start + r] = gi
        start += s
    idx = idx.cuda()
    pad = idx < 0
    a.view(torch.uint8)[pad] = 0x7F  # NaN in e4m3fn
    sfa[pad] = float("nan")
    out = torch.full((m_sum, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deepport.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, idx, backend="hopper")
    torch.cuda.synchronize()
    ref = torch.zeros((m_sum, n), dtype=torch.float64, device="cuda")
    a_clean = a.clone()
    a_clean.view(torch.uint8)[pad] = 0
    sfa_clean = torch.where(pad.unsqueeze(1), torch.ones_like(sfa), sfa)
    da = dequantized_a(a_clean, sfa_clean)
    for gi in range(g):
        rows_g = idx == gi
        ref[rows_g] = da[rows_g] @ dequantized_b(b[gi], sfb[gi]).T
    result = _report(f"contiguous G={g} rows {rows} n{n} k{k}", out, ref)
    zeros = out[pad].float()
    result["padding_rows_exactly_zero"] = bool((zeros == 0).all()) and not bool(torch.signbit(zeros).any())
    result["passed"] = result["passed"] and result["padding_rows_exactly_zero"]
    return result


def _masked(n: int, k: int, masked: list[int], m_max: int, seed: int) -> dict[str, Any]:
    import torch

    import deepport
    from deepport.bench.configs.fp8_gemm import dequantized_a, dequantized_b

    g = len(masked)
    a, sfa, b, sfb = _quantized(g * m_max, n, k, seed, groups=g)
    a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
    for gi, r in enumerate(masked):
        a[gi, r:].view(torch.uint8).fill_(0x7F)
        sfa[gi, r:] = float("nan")
    sentinel = torch.randn((g, m_max, n), device="cuda").to(torch.bfloat16)
    out = sentinel.clone()
    for gi, r in enumerate(masked):
        out[gi, :r] = float("nan")
    mm = torch.tensor(masked, dtype=torch.int32, device="cuda")
    deepport.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, mm, max(1, max(masked)), backend="hopper")
    torch.cuda.synchronize()
    results = []
    untouched = True
    for gi, r in enumerate(masked):
        untouched = untouched and bool(torch.equal(out[gi, r:], sentinel[gi, r:]))
        if r:
            ref = dequantized_a(a[gi, :r], sfa[gi, :r]) @ dequantized_b(b[gi], sfb[gi]).T
            results.append(_report(f"masked g{gi}", out[gi, :r], ref))
    ok = untouched and all(x["passed"] for x in results)
    return {"case": f"masked G={g} masked_m {masked} m_max {m_max} n{n} k{k}", "passed": ok,
            "rows_past_masked_m_untouched": untouched, "groups": results}


def stage_probe() -> int:
    import torch

    from deepport.backends.hopper import configs, fp8_gemm, jit, nvrtc
    from deepport.dispatch import registry

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
            "nvrtc": nvrtc.version(), "driver": jit.driver_version(),
            "hopper_probe": registry.get("hopper").unavailable_reason}
    print("probe:", json.dumps(info))
    results: list[dict[str, Any]] = [{"info": info}]
    real_choose = configs.choose
    forced: list[tuple[int, int, int]] = [(128, 128, 0), (64, 16, 0), (128, 160, 0), (128, 96, 0), (64, 112, 0),
                                          (256, 128, 0), (256, 64, 0)]
    ok = True
    for bm, bn, variant in forced:
        stages = configs.max_stages(bm, bn)
        cfg = configs.GemmConfig(bm, bn, stages, variant)
        fp8_gemm.choose = lambda *args, _c=cfg, **kw: _c  # type: ignore[misc]
        for m, n, k in ((300, 712, 640), (64, 2112, 1024), (1, 256, 128), (200, 328, 328)):
            t0 = time.perf_counter()
            try:
                r = _dense(m, n, k, seed=m + n + k)
            except Exception as exc:
                r = {"case": f"dense m{m} n{n} k{k}", "passed": False, "error": f"{type(exc).__name__}: {exc}"}
            r["config"], r["seconds"] = str(cfg), round(time.perf_counter() - t0, 3)
            print(json.dumps(r)[:900])
            results.append(r)
            ok = ok and (r["passed"] or bm == 256)  # 256-row tiles are new: reported, checked again by the sweep
    fp8_gemm.choose = real_choose
    def masked256() -> dict[str, Any]:
        cfg = configs.GemmConfig(256, 128, configs.max_stages(256, 128), configs.VARIANT_MASKED)
        fp8_gemm.choose = lambda *args, **kw: cfg  # type: ignore[misc]
        try:
            return _masked(384, 512, [300, 0, 520, 1], 520, seed=10)
        finally:
            fp8_gemm.choose = real_choose

    for name, fn in (("contiguous", lambda: _contiguous(384, 640, [200, 0, 128, 37], seed=7)),
                     ("masked", lambda: _masked(256, 512, [100, 0, 64, 1], 192, seed=8)),
                     ("masked64", lambda: _masked(320, 384, [30, 64], 64, seed=9)),
                     ("masked256", masked256)):
        try:
            r = fn()
        except Exception as exc:
            r = {"case": name, "passed": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(r)[:1500])
        results.append(r)
        ok = ok and (r["passed"] or name == "masked256")
    (OUT / "probe.json").write_text(json.dumps(results, indent=1))
    print("PROBE", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def _forced(config: Any, case: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``case()`` with the hopper ops forced to ``config``; an exception is a failed case."""
    from deepport.backends.hopper import fp8_gemm

    real_choose = fp8_gemm.choose
    fp8_gemm.choose = lambda *args, **kw: config  # type: ignore[misc]
    t0 = time.perf_counter()
    try:
        r = case()
    except Exception as exc:
        r = {"case": getattr(case, "__name__", "case"), "passed": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        fp8_gemm.choose = real_choose
    r["config"], r["seconds"] = str(config), round(time.perf_counter() - t0, 3)
    return r


def multicast_cases() -> list[tuple[Any, Callable[[], dict[str, Any]]]]:
    """The cluster-2 (multicast) configurations and edge cases of the ``multicast`` stage."""
    from deepport.backends.hopper import configs

    def cfg(bm: int, bn: int, variant: int) -> Any:
        return configs.GemmConfig(bm, bn, configs.max_stages(bm, bn), variant, cluster_n=2)

    dense_shapes = ((300, 712, 640), (1, 256, 128), (200, 328, 328), (2048, 2112, 1024), (129, 136, 7168))
    cases: list[tuple[Any, Callable[[], dict[str, Any]]]] = []
    for bm, bn in ((256, 128), (256, 96), (128, 160), (128, 128), (64, 16), (64, 128)):
        for m, n, k in dense_shapes:
            cases.append((cfg(bm, bn, configs.VARIANT_DENSE), lambda m=m, n=n, k=k: _dense(m, n, k, seed=m + n + k)))
    for bn in (128, 160):
        cases.append((cfg(128, bn, configs.VARIANT_CONTIGUOUS), lambda: _contiguous(384, 640, [200, 0, 128, 37], 7)))
    for bm, bn in ((256, 128), (128, 128), (64, 128)):
        cases.append((cfg(bm, bn, configs.VARIANT_MASKED), lambda: _masked(328, 512, [300, 0, 520, 1], 520, 10)))
    return cases


def _cluster_occupancy() -> dict[str, Any]:
    """How many 2-CTA clusters of the largest multicast kernels can run at once (the persistent grid
    assumes ``num_sms // 2``; fewer would run the last clusters in a second wave)."""
    import torch
    from cuda.bindings import driver

    from deepport.backends.hopper import configs
    from deepport.backends.hopper import fp8_gemm as hopper

    device = torch.device("cuda:0")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    found: dict[str, Any] = {"num_sms": sms}
    for bm, bn in ((256, 128), (128, 160), (64, 16)):
        config = configs.GemmConfig(bm, bn, configs.max_stages(bm, bn), configs.VARIANT_DENSE, cluster_n=2)
        try:
            launch = driver.CUlaunchConfig()
            launch.gridDimX, launch.gridDimY, launch.gridDimZ = 2 * (sms // 2), 1, 1
            launch.blockDimX, launch.blockDimY, launch.blockDimZ = config.threads, 1, 1
            launch.sharedMemBytes, launch.numAttrs = config.smem_bytes, 0
            function = driver.CUfunction(hopper.kernel_function(config, device).ptr)
            result, clusters = driver.cuOccupancyMaxActiveClusters(function, launch)
            found[str(config)] = clusters if result == driver.CUresult.CUDA_SUCCESS else f"error {result.name}"
        except Exception as exc:
            found[str(config)] = f"{type(exc).__name__}: {exc}"[:200]
    return found


def _append_probe(entry: dict[str, Any]) -> None:
    path = OUT / "probe.json"
    doc = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*doc, entry], indent=1))


def stage_multicast() -> int:
    """The cluster-2 variant against float64 on its edges; appended to probe.json as {"multicast": [...]}
    with the cluster occupancy (informational). A case that takes over 60 s (a hung kernel: the protocol
    deadlocks) ends the process at once, after saying which case and writing the results so far."""
    import threading

    results: list[dict[str, Any]] = []
    for config, case in multicast_cases():
        def hung(what: str = str(config)) -> None:
            print(f"MULTICAST PROBE HUNG: {what}, after {len(results)} finished cases", flush=True)
            _append_probe({"multicast": [*results, {"config": what, "passed": False, "error": "hung (> 60 s)"}]})
            os._exit(3)
        watchdog = threading.Timer(60.0, hung)
        watchdog.daemon = True
        watchdog.start()
        r = _forced(config, case)
        watchdog.cancel()
        print(json.dumps(r)[:900], flush=True)
        results.append(r)
    try:
        occupancy = _cluster_occupancy()
    except Exception as exc:  # informational only
        occupancy = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("max active 2-CTA clusters:", json.dumps(occupancy), flush=True)
    _append_probe({"multicast": results, "cluster_occupancy": occupancy})
    ok = all(r["passed"] for r in results)
    print("MULTICAST PROBE", "PASSED" if ok else "FAILED", f"({sum(r['passed'] for r in results)}/{len(results)})")
    return 0 if ok else 1


def _multicast_enabled() -> bool:
    return os.environ.get("HOPPER_MULTICAST", "1") != "0"


def stage_tiny() -> int:
    """One small call of each op (for compute-sanitizer), and of each op's cluster variant if enabled."""
    from deepport.backends.hopper import configs

    results = [_dense(100, 200, 384, 1), _contiguous(256, 384, [100, 20], 2), _masked(128, 256, [50, 0], 64, 3)]
    if _multicast_enabled():
        def cfg(bm: int, bn: int, variant: int) -> Any:
            return configs.GemmConfig(bm, bn, configs.max_stages(bm, bn), variant, cluster_n=2)
        results += [_forced(cfg(128, 128, configs.VARIANT_DENSE), lambda: _dense(100, 328, 384, 1)),
                    _forced(cfg(128, 128, configs.VARIANT_CONTIGUOUS), lambda: _contiguous(384, 384, [100, 20], 2)),
                    _forced(cfg(256, 128, configs.VARIANT_MASKED), lambda: _masked(328, 256, [50, 0], 64, 3))]
    for r in results:
        print(json.dumps(r)[:400])
    return 0 if all(r["passed"] for r in results) else 1


# ---- stage: sweep ---------------------------------------------------------------------------------

def _plain_candidates(config: Any) -> list[tuple[int, int, int]]:
    """Tiles ``(block_m, block_n, group_m)`` to try on one bench config without clusters."""
    if config.op == "fp8_gemm_nt" and config.params["m"] <= 128:
        found = [(64, bn, 16) for bn in (16, 32, 48, 64, 96, 128, 160)]
        if config.params["m"] == 128:
            found += [(128, bn, 16) for bn in (64, 96, 128)]
        return found
    if config.op == "fp8_gemm_nt":
        return [(128, 128, 16), (128, 144, 16), (128, 160, 16), (256, 64, 16), (256, 96, 16), (256, 128, 16),
                (128, 160, 8), (256, 128, 8)]
    if config.op == "m_grouped_fp8_gemm_nt_contiguous":
        return [(128, 128, 16), (128, 144, 16), (128, 160, 16), (128, 160, 8)]
    return [(64, 128, 16), (128, 128, 16), (128, 160, 16), (256, 96, 16), (256, 128, 16)]


def _candidates(config: Any) -> list[tuple[int, int, int, int]]:
    """Tiles ``(block_m, block_n, group_m, cluster_n)`` to try on one bench config: the plain ones, then
    (``HOPPER_MULTICAST`` not ``0``) the cluster-2 tiles of ``configs.MULTICAST_SWEEP`` for the op's
    variant (dense: 64-row tiles at M <= 128, 128 rows at M = 128, 128 and 256 rows above)."""
    from deepport.backends.hopper import configs

    found = [(bm, bn, gm, 1) for bm, bn, gm in _plain_candidates(config)]
    if not _multicast_enabled():
        return found
    tiles = configs.MULTICAST_SWEEP[_variant(config.op)]
    if config.op == "fp8_gemm_nt":
        m = config.params["m"]
        tiles = tuple(t for t in tiles if (t[0] == 64 if m <= 64 else t[0] <= 128 if m <= 128 else t[0] >= 128))
    return found + [(bm, bn, gm, 2) for bm, bn, gm in tiles]


def _tile(bm: int, bn: int, gm: int, cluster: int) -> list[int]:
    """A sweep row's tile: ``[block_m, block_n, group_m]``, plus ``cluster_n`` when clustered (as in TUNED)."""
    return [bm, bn, gm] if cluster == 1 else [bm, bn, gm, cluster]


def _variant(op: str) -> int:
    from deepport.backends.hopper import configs

    return {"fp8_gemm_nt": configs.VARIANT_DENSE, "m_grouped_fp8_gemm_nt_contiguous": configs.VARIANT_CONTIGUOUS,
            "m_grouped_fp8_gemm_nt_masked": configs.VARIANT_MASKED}[op]


def _precompile(spec: tuple[int, int, int, int, int]) -> str:
    from deepport.backends.hopper import configs, jit
    from deepport.backends.hopper.fp8_gemm import kernel_options
    from deepport.backends.hopper.sources import fp8_gemm_source

    bm, bn, gm, cluster, variant = spec
    cfg = configs.GemmConfig(bm, bn, configs.max_stages(bm, bn), variant, gm, cluster)
    jit.get_cubin(fp8_gemm_source(bn), kernel_options(cfg))
    return str(cfg)


def stage_sweep() -> int:
    """Each bench shape with several tiles: checked against float64, then timed (CUDA graphs, rotated
    inputs); the fastest correct tile per shape goes to sweep.json."""
    import multiprocessing

    import torch

    from deepport.backends.hopper import configs
    from deepport.backends.hopper import fp8_gemm as hopper
    from deepport.bench import configs as bench_configs
    from deepport.bench import timing
    from deepport.bench.runner import _poison

    device = torch.device("cuda:0")
    every = bench_configs.select("cuda", list(OPS))
    chosen = [c for c in every if c.op != "fp8_gemm_nt" or c.params["m"] in (64, 128, 4096)]
    specs = sorted({(*tile, _variant(c.op)) for c in chosen for tile in _candidates(c)})
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_precompile, specs)
    print(f"precompiled {len(specs)} kernels in {time.perf_counter() - t0:.1f} s", flush=True)
    real_choose = hopper.choose
    found: dict[str, Any] = {}
    for config in chosen:
        variant = _variant(config.op)
        seen: list[tuple[int, ...]] = []
        rows = []
        work = config.build(device, 0)
        rotation = [work] + [config.build(device, i) for i in
                             range(1, timing.copies_for_rotation(work.footprint_bytes, device, most=8))]
        for bm, bn, gm, cluster in _candidates(config):
            cfg = configs.GemmConfig(bm, bn, configs.max_stages(bm, bn), variant, gm, cluster)

            def patched(*args: Any, _c: Any = cfg, _seen: list[tuple[int, ...]] = seen, **kwargs: Any) -> Any:
                _seen.append(tuple(args) + tuple(kwargs.values()))
                return _c
            hopper.choose = patched  # type: ignore[assignment]
            row: dict[str, Any] = {"tile": _tile(bm, bn, gm, cluster)}
            try:
                _poison(work.outputs)
                work.call("hopper")()
                torch.cuda.synchronize()
                check = work.reference_check() if work.reference_check else {"passed": False}
                row["passed"], row["check"] = bool(check.get("passed")), check.get("message", "")
                if row["passed"]:
                    with timing.environment_var("DEEPPORT_CHECK_VALUES", "0"):
                        measured = timing.time_calls([w.call("hopper") for w in rotation], device, samples=5)
                    row["time_us"] = measured.median_us
                    row["tflops"] = config.flops / measured.median_us / 1e6
            except Exception as exc:
                row["passed"], row["error"] = False, f"{type(exc).__name__}: {exc}"[:300]
            finally:
                hopper.choose = real_choose
            rows.append(row)
        ok = [r for r in rows if r.get("time_us")]
        best = min(ok, key=lambda r: r["time_us"]) if ok else None
        if not seen:
            print(f"{config.id}: the kernel choice was never reached: {rows[:2]}", flush=True)
            continue
        m, n, k, variant_arg, sms, *rest = seen[0]
        groups = rest[0] if rest else 1
        key = [variant_arg, m, n, k, groups, sms]
        current = configs.choose(m, n, k, variant_arg, sms, groups)
        found[config.id] = {"key": key, "model": str(current),
                            "winner": best["tile"] if best else None, "candidates": rows}
        found[config.id].update(_multicast_comparison(rows, current))
        bad = [r["tile"] for r in rows if not r["passed"]]
        print(f"{config.id:55} best {best['tile'] if best else None} "
              f"{best['tflops'] if best else 0:7.1f} TF  (model {found[config.id]['model']})"
              f"{'  FAILED ' + str(bad) if bad else ''}", flush=True)
        del work, rotation
        # after every shape: a later hang (a new kernel) loses only the shapes after it
        (OUT / "sweep.json").write_text(json.dumps(found, indent=1))
    (OUT / "sweep.json").write_text(json.dumps(found, indent=1))
    _multicast_table(found)
    return 0


def _multicast_comparison(rows: list[dict[str, Any]], current: Any) -> dict[str, Any]:
    """The row of the tile the backend chooses now, the fastest cluster-2 row, and their time ratio."""
    now = _tile(current.block_m, current.block_n, current.group_m, current.cluster_n)
    timed = [r for r in rows if r.get("time_us")]
    cur = next((r for r in timed if r["tile"] == now), None)
    multicast = [r for r in timed if len(r["tile"]) == 4]
    best = min(multicast, key=lambda r: r["time_us"]) if multicast else None
    speedup = cur["time_us"] / best["time_us"] if cur and best else None
    return {"current": cur or {"tile": now, "note": "not among the timed candidates"}, "best_multicast": best,
            "multicast_speedup": speedup}


def _multicast_table(found: dict[str, Any]) -> None:
    print(f"\n{'config':55} {'current tile':>18} {'TF':>7} {'best cluster-2 tile':>22} {'TF':>7} {'speedup':>7}")
    for name, entry in found.items():
        cur, best = entry.get("current") or {}, entry.get("best_multicast") or {}
        print(f"{name:55} {cur.get('tile')!s:>18} {_f(cur.get('tflops')):>7} {best.get('tile')!s:>22} "
              f"{_f(best.get('tflops')):>7} {_f(entry.get('multicast_speedup'), 3):>7}", flush=True)


def apply_sweep(path: Path) -> int:
    """Put the sweep's winners into the tile table (this process only); returns how many."""
    from deepport.backends.hopper import configs

    count = 0
    for entry in json.loads(path.read_text()).values():
        if entry.get("winner"):
            configs.TUNED[tuple(entry["key"])] = tuple(entry["winner"])  # type: ignore[assignment]
            count += 1
    configs.choose.cache_clear()
    return count


# ---- stage: bench ---------------------------------------------------------------------------------

def stage_bench() -> int:
    import torch

    from deepport.bench import configs as bench_configs
    from deepport.bench import runner

    device = torch.device("cuda")
    if (OUT / "sweep.json").exists():
        print(f"tiles from the sweep: {apply_sweep(OUT / 'sweep.json')} shapes")
    every = bench_configs.select("cuda", list(OPS))
    dense = [c for c in every if c.op == "fp8_gemm_nt" and c.params["m"] in (64, 128, 4096)]
    grouped = [c for c in every if c.op != "fp8_gemm_nt"]
    code = 0
    for label, chosen in (("dense", dense), ("grouped", grouped)):
        request = runner.Request(device, chosen, ["torch", "hopper"], "torch", quick=True, seed=0,
                                 command=f"scripts/gpu_hopper_gemm.py --stage bench ({label})")
        doc = runner.run(request, progress=lambda msg: print("  ", msg, flush=True))
        (OUT / f"bench_{label}.json").write_text(json.dumps(doc, indent=1))
        _table(doc)
        code |= any(r["status"] not in ("ok", "not_supported") for r in doc["results"])
    return code


def _table(doc: dict[str, Any]) -> None:
    ceil = {k: v.get("value") for k, v in doc["ceilings"].items()}
    print(f"ceilings: {json.dumps(ceil)}")
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in doc["results"]:
        by_key.setdefault((r["op"], r["config"]), {})[r["backend"]] = r
    print(f"{'config':34} {'torch us':>9} {'hopper us':>9} {'hopper TF':>9} {'%ceil':>6} {'x torch':>7}  status")
    for (_op, cfg), rs in by_key.items():
        t, h = rs.get("torch", {}), rs.get("hopper", {})
        tu, hu = t.get("time_us"), h.get("time_us")
        tf = h.get("tflops")
        pct = h.get("pct_of_ceiling")
        ratio = (tu / hu) if tu and hu else None
        status = h.get("status", "?") + ("" if h.get("status") == "ok" else f" ({h.get('message', '')[:80]})")
        print(f"{cfg:34} {_f(tu):>9} {_f(hu):>9} {_f(tf):>9} {_f(pct):>6} {_f(ratio, 3):>7}  {status}")


def _f(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


# ---- driver ---------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float, log: Path | None = None) -> int:
    print(f"$ {' '.join(cmd)}  (limit {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=max(5.0, timeout))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        code = 124
        output += f"\n[killed after {timeout:.0f} s]\n"
    print(output[-12000:] if log is None else output[-6000:], flush=True)
    if log is not None:
        log.write_text(output)
    print(f"[exit {code} after {time.perf_counter() - t0:.1f} s]", flush=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=("all", "probe", "multicast", "sweep", "bench", "tiny"), default="all")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.stage == "probe":
        return stage_probe()
    if args.stage == "multicast":
        return stage_multicast()
    if args.stage == "bench":
        return stage_bench()
    if args.stage == "sweep":
        return stage_sweep()
    if args.stage == "tiny":
        return stage_tiny()

    budget = float(os.environ.get("HOPPER_BUDGET_S", "300"))
    t0 = time.perf_counter()

    def left() -> float:
        return budget - (time.perf_counter() - t0)

    os.environ.setdefault("DEEPPORT_CACHE_DIR", "/tmp/deepport-cache")
    py = sys.executable
    me = str(Path(__file__).resolve())
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem", "--format=csv"], check=False)
    if _run([py, me, "--stage", "probe"], min(90.0, left())) != 0:
        print("probe failed: stopping (no certify, bench or sanitizer)")
        return 1
    # the cluster variant is new: a failure or hang here only keeps it out of the later stages
    multicast = _multicast_enabled() and _run([py, me, "--stage", "multicast"], min(150.0, left() - 120)) == 0
    os.environ["HOPPER_MULTICAST"] = "1" if multicast else "0"
    print(f"multicast variant {'passed: in the GPU tests, sweep and sanitizer' if multicast else 'left out'}")
    cert = Path("/tmp/hopper-certify")
    _run([py, "-m", "deepport", "certify", "--device", "cuda", "--tier", "smoke", "--backend", "hopper", "--op",
          *OPS, "--seed", "1", "--out", str(cert)], min(120.0, left() - 60))
    for name in ("results.json", "summary.md"):
        if (cert / name).exists():
            (OUT / f"certify_{name}").write_text((cert / name).read_text())
    _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_hopper_gpu.py"],
         min(60.0, left() - 60))
    if multicast:
        _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_hopper_multicast_gpu.py"],
             min(150.0, left() - 90))
    if left() > 60:
        _run([py, me, "--stage", "sweep"], left() - 40)
    if left() > 25:
        _run([py, me, "--stage", "bench"], left() - 12)
    if left() > 8:
        _run(["compute-sanitizer", "--tool", "memcheck", "--report-api-errors", "no", "--print-limit", "20", py, me,
              "--stage", "tiny"], left() + 15, OUT / "sanitizer.txt")
    else:
        print(f"sanitizer skipped: {left():.0f} s left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
