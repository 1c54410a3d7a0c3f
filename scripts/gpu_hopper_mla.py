"""One device call for the hopper backend's MLA decode: a diagnostic probe, conformance, timing.

    python3 scripts/gpu_hopper_mla.py [--stages probe,smoke,full,bench] [--full-timeout 240]

1. ``probe``: a handful of shapes (bf16/fp16, h_q 16/64/128, s_q 1/2 causal, pages 16/64/128/256,
   ragged lengths with 0, requests cut by the plan, NaN in every cache slot past the lengths) run on
   hopper and on the torch backend with NaN-poisoned outputs; prints per shape the worst error of
   ``out`` in each half of the channels and of ``lse``, the rows and tokens involved, so one call says
   where a wrong kernel goes wrong. Stops the later stages when a shape is wrong.
2. ``smoke`` / ``full``: ``python3 -m deepport certify --device cuda --tier T --backend hopper --op
   mla_decode`` (results under $OUT/certify-T).
3. ``bench``: ``python3 -m deepport bench --device cuda --op mla_decode --backend torch triton hopper``
   ($OUT/bench/bench.json).
4. ``profile`` (alone, under ncu): runs ``--shape memory`` (b=128, h_q=16, s_k=4096) or ``--shape compute``
   (b=128, h_q=128, s_k=4096) twice, e.g. ``ncu --kernel-name regex:sm90_mla_decode --launch-skip 1
   --launch-count 1 --section SpeedOfLight python3 scripts/gpu_hopper_mla.py --stages profile --shape compute``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

D_QK, D_V = 576, 512


def _case(b: int, s_q: int, h_q: int, lens: list[int], page: int, dtype: torch.dtype, causal: bool,
          seed: int, h_kv: int = 1) -> dict[str, object]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages_per = [-(-max(n, 1) // page) for n in lens]
    width = max(pages_per)
    total = sum(pages_per) + 3
    q = (torch.randn((b, s_q, h_q, D_QK), generator=g, device="cuda") / 4).to(dtype)
    cache = (torch.randn((total, page, h_kv, D_QK), generator=g, device="cuda") / 4).to(dtype)
    perm = torch.randperm(total, generator=g, device="cuda").to(torch.int32)
    table = torch.full((b, width), -7, dtype=torch.int32, device="cuda")  # unused slots: garbage ids
    used = torch.zeros(total, dtype=torch.bool, device="cuda")
    cursor = 0
    for i, n in enumerate(lens):
        ids = perm[cursor:cursor + pages_per[i]]
        table[i, :pages_per[i]] = ids
        cursor += pages_per[i]
        for p_i, blk in enumerate(ids.tolist()):
            first_dead = n - p_i * page  # slots at or past the length hold NaN
            if first_dead < page:
                cache[blk, max(first_dead, 0):] = float("nan")
            used[blk] = True
    cache[~used] = float("nan")
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return dict(q=q, cache=cache, table=table, seqlens=seqlens, causal=causal, h_kv=h_kv)


def _run(backend: str, c: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    import deepport

    q, cache, table, seqlens = c["q"], c["cache"], c["table"], c["seqlens"]
    assert isinstance(q, torch.Tensor) and isinstance(seqlens, torch.Tensor)
    b, s_q, h_q, _ = q.shape
    out = torch.full((b, s_q, h_q, D_V), float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full((b, h_q, s_q), float("nan"), dtype=torch.float32, device="cuda")
    h_kv = int(c["h_kv"])  # type: ignore[call-overload]
    md = deepport.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    deepport.mla_decode(q, cache, table, seqlens, D_V, causal=bool(c["causal"]), metadata=md, backend=backend,
                        out=out, lse=lse)
    torch.cuda.synchronize()
    return out, lse


def probe() -> bool:
    shapes = [
        # name, b, s_q, h_q, lens, page, dtype, causal
        ("hq16_p64_ragged", 4, 1, 16, [1, 64, 100, 300], 64, torch.bfloat16, False),
        ("hq16_p64_empty", 3, 1, 16, [0, 65, 128], 64, torch.bfloat16, False),
        ("hq128_sq2_causal", 3, 2, 128, [1, 77, 200], 64, torch.bfloat16, True),
        ("hq64_fp16_p16", 2, 1, 64, [33, 250], 16, torch.float16, False),
        ("hq16_p256", 2, 1, 16, [300, 511], 256, torch.bfloat16, False),
        ("hq16_p32_sq2", 2, 2, 16, [40, 97], 32, torch.bfloat16, True),
        ("cut_long", 2, 1, 16, [40000, 50], 64, torch.bfloat16, False),
        ("hq128_cut", 4, 1, 128, [9000, 3000, 64, 1], 128, torch.bfloat16, False),
        ("hkv2_hq64", 3, 1, 64, [100, 1, 700], 64, torch.bfloat16, False),
        ("hkv2_sq2_causal", 3, 2, 128, [65, 0, 9000], 64, torch.bfloat16, True),
        ("hkv2_hq16_fp16_p16", 2, 4, 16, [30, 300], 16, torch.float16, True),
    ]
    ok = True
    print(f"{'shape':18s} {'out[:, :256]':>13s} {'out[:, 256:]':>13s} {'lse':>10s} {'nan':>5s}  worst (b, i, h, d)")
    for seed, (name, b, s_q, h_q, lens, page, dtype, causal) in enumerate(shapes):
        c = _case(b, s_q, h_q, lens, page, dtype, causal, seed, h_kv=2 if name.startswith("hkv2") else 1)
        try:
            t0 = time.perf_counter()
            got, got_lse = _run("hopper", c)
            elapsed = time.perf_counter() - t0
        except Exception as exc:  # report and go on: one call must say as much as it can
            print(f"{name:18s} ERROR {type(exc).__name__}: {str(exc)[:400]}")
            ok = False
            continue
        ref, ref_lse = _run("torch", c)
        err = (got.float() - ref.float()).abs()
        nan = int(torch.isnan(got).sum() + torch.isnan(got_lse).sum())
        lo = float(torch.nan_to_num(err[..., :256], nan=1e9).max())
        hi = float(torch.nan_to_num(err[..., 256:], nan=1e9).max())
        finite = torch.isfinite(ref_lse)
        lse_err = float(torch.nan_to_num((got_lse - ref_lse).abs()[finite], nan=1e9).max()) if finite.any() else 0.0
        inf_ok = bool(torch.equal(torch.isposinf(got_lse), torch.isposinf(ref_lse)))
        flat = torch.nan_to_num(err, nan=1e9).flatten().argmax().item()
        idx = [int(x) for x in torch.unravel_index(torch.tensor(flat), err.shape)]
        bad = max(lo, hi) > 2e-2 or lse_err > 1e-3 or nan > 0 or not inf_ok
        ok &= not bad
        print(f"{name:18s} {lo:13.3e} {hi:13.3e} {lse_err:10.2e} {nan:5d}  {idx} {'WRONG' if bad else 'ok'}"
              f"{'' if inf_ok else ' (+inf lse mismatch)'} [{elapsed * 1e3:.0f} ms first call]")
        if bad:
            rows = torch.nan_to_num(err, nan=1e9).amax(dim=-1)  # [b, s_q, h_q]
            print("   worst per (b, i):", [[round(float(rows[bi, i].max()), 4) for i in range(s_q)] for bi in range(b)])
            print("   rows wrong (b, i, h):", [tuple(int(v) for v in x) for x in (rows > 2e-2).nonzero()[:12].tolist()])
            dims = torch.nan_to_num(err, nan=1e9).amax(dim=(0, 1, 2))
            wrong = [k for k in range(8) if float(dims[64 * k:64 * k + 64].max()) > 2e-2]
            print("   channel blocks of 64 wrong:", wrong)
    return ok


def profile(shape: str) -> None:
    h_q = 16 if shape == "memory" else 128
    c = _case(128, 1, h_q, [4096] * 128, 64, torch.bfloat16, False, seed=0)
    for _ in range(2):
        _run("hopper", c)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default="probe,smoke,full,bench")
    parser.add_argument("--full-timeout", type=int, default=240)
    parser.add_argument("--shape", choices=("memory", "compute"), default="compute")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if stages == ["profile"]:
        profile(args.shape)
        return 0
    out_dir = os.environ.get("OUT", "/tmp/deepport-out")
    os.makedirs(out_dir, exist_ok=True)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if "probe" in stages and not probe():
        print("probe found wrong results: later stages skipped")
        return 1
    for tier in ("smoke", "full"):
        if tier in stages:
            cmd = [sys.executable, "-m", "deepport", "certify", "--device", "cuda", "--tier", tier, "--backend",
                   "hopper", "--op", "mla_decode", "--out", f"{out_dir}/certify-{tier}"]
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=args.full_timeout if tier == "full" else 120)
                print(f"certify {tier}: exit {proc.returncode} after {time.time() - t0:.0f} s")
                print("\n".join(proc.stdout.splitlines()[-14:]))
                if proc.returncode:
                    print(proc.stderr[-3000:])
            except subprocess.TimeoutExpired:
                print(f"certify {tier}: timed out after {time.time() - t0:.0f} s")
    if "bench" in stages:
        backends = os.environ.get("HOPPER_MLA_BENCH_BACKENDS", "torch triton hopper").split()
        cmd = [sys.executable, "-m", "deepport", "bench", "--device", "cuda", "--op", "mla_decode",
               "--backend", *backends, "--baseline", backends[0], "--out", f"{out_dir}/bench"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        print("\n".join(proc.stdout.splitlines()[-40:]))
        if proc.returncode:
            print(proc.stderr[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
