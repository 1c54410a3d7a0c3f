"""One device call that sweeps launch configurations of the triton backend's MLA decode and FP8 GEMM kernels.

    python3 scripts/gpu_triton_sweep.py [--out DIR] [--budget-s 185] [--only mla,fp8,certify] [--workers N]
    python3 scripts/gpu_triton_sweep.py --only grouped --budget-s 300 [--out DIR]   # M-grouped FP8 GEMMs alone
    python3 scripts/gpu_triton_sweep.py --dry-run [--only ...] [--out DIR]          # no GPU needed

Every candidate is a configuration of the backend's real kernels (``configs.MLAConfig`` /
``fp8_configs.GemmConfig``, launched through ``mla_decode.run`` / ``fp8_gemm.launch`` /
``fp8_grouped_gemm.launch_contiguous`` / ``launch_masked``), so a winner becomes the default by editing
one entry of ``configs.py`` / ``fp8_configs.py`` (the script prints the entries). Stages, in order, each
bounded by ``--budget-s`` (a stage that would start late is skipped and says so):

1. compile: every (candidate, specialisation) once, in parallel worker processes (a small launch on the
   GPU fills triton's on-disk cache), for at most 45% of the budget; a candidate that fails to compile
   or launch there, or was not reached, is reported and never timed (this process launches only code
   that has run once elsewhere).
2. ceilings, this run: HBM copy (1 GiB bf16), bf16 matmul (8192^3), fp8 matmul (torch._scaled_mm).
3. MLA decode, compute-bound (b=128, h_q=128, s_q 1 and 2 causal, s_k=4096), then FP8 dense at M=4096
   on the three shapes below 0.85x cuBLAS (N x K: 2112 x 7168, 4096 x 7168, 7168 x 16384; the candidates
   include tail splits, ``tail_split`` 0 (auto) and 4, whose compile launches put every tile in the tail
   so both kernels compile), then MLA memory-bound (h_q=16, s_q=1: b=128 s_k=4096, b=128 ragged
   4096..32768, b=64 s_k=32768), then FP8 at M=64 and 128 (spot checks), then (``--only ...,grouped``,
   not in the default) the M-grouped FP8 GEMMs on DeepGEMM's MoE shapes
   (``deepport/bench/configs/fp8_grouped_gemm.py``; N x K: 4096 x 7168, 7168 x 2048): contiguous with
   G=4 x 8192 and G=8 x 4096 rows, masked with G in {1, 2, 4} and expected_m = masked_m 1024 / 512 / 256
   of M_max 4096. Per shape the peer is timed first (torch backend: gather + SDPA for MLA, cuBLAS
   block-scaled ``scaled_mm`` for FP8, plus raw ``scaled_mm`` on
   pre-staged scales; grouped: the torch backend's op, checked against float64, and after the candidates
   the triton dense GEMM at the same total M with the configuration ``fp8_configs.py`` picks); each
   candidate's output is checked first (MLA: against the torch backend's out within 2.01 bf16 ulps of
   |ref| + rms and its LSE within 1e-4 relative; FP8: 64 sampled rows against float64 with the bench
   tolerance; grouped: 64 sampled rows in use against the torch backend's output of the same call with
   that tolerance, and masked rows past ``masked_m`` bit for bit what they held before the call): a
   wrong one is reported WRONG and not timed. Timing: ``deepport.bench.timing.time_calls`` (a CUDA graph
   of many calls below 1 ms, else events with the L2 flushed; FP8 inputs rotated past twice the L2).
   Grouped candidates (30 per contiguous shape, 21 per masked shape, 102 specialisations to compile):
   today's choice, the H200 entries of ``_H200_CONTIGUOUS`` / ``_H200_MASKED``, the dense table's entries
   for the same (N, K), and a grid pruned by shared memory and spills (``GROUPED_GRID``). Estimated, not
   yet measured: 246 checked timings at about 0.5 s plus peers and inputs, about 150 s of GPU time after
   the compile stage, hence ``--budget-s 300`` when the part runs alone.
4. certify (``--only ...,certify``, default on; starts only within the budget, takes about 40 s):
   ``deepport certify --tier smoke --op mla_decode`` in this process with each MLA bucket's winner (the
   config fastest on most shapes of the bucket) patched in as the H200 entry of ``configs.py``, after
   the smoke cases ran once in parallel workers with the same patch (compiling their specialisations),
   so a new default has a conformance run behind it from the same call.

Counting (BENCH.md): MLA FLOP = b*s_q*h_q*mean_s_k*2*(576+512), bytes = b*(s_q*h_q*576 + mean_s_k*576 +
s_q*h_q*512)*2; FP8 FLOP = 2*M*N*K (grouped: M = the rows in use of all groups). Output: a table on
stdout, ``DIR/triton_sweep.json`` (every figure), and the entries to adopt per shape (dense
``_H200_DENSE``, grouped ``_H200_CONTIGUOUS`` / ``_H200_MASKED``, keyed by the M bucket of M_sum / G or
of expected_m).

``--dry-run`` (CPU, ``TRITON_INTERPRET`` unset): runs the same launchers on CPU tensors of the GPU
calls' shapes and strides with the kernel launches recorded (``deepport.backends.triton.aot``), compiles
each for sm_90a (``GPUTarget("cuda", 90, 32)``) and reports per candidate the tensor-core instructions
(``wgmma`` and its operand types, ``mma.sync``), bulk tensor copies, shared memory, registers and spills
(ptxas) and the programs one SM holds; a candidate without Hopper tensor-core instructions, over the
227 KiB of shared memory, or that fails to compile is marked, so the device call wastes no time on it.
Writes ``DIR/triton_sweep_dry_run.json``.

``--cpu-smoke`` runs the device stages end to end on CPU-sized shapes under ``TRITON_INTERPRET=1`` (two
grid candidates per kind, grouped: one plus today's and the tables' entries; one certify case): a test of
this script, not of the kernels' speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

if "--cpu-smoke" in sys.argv:  # before triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# this directory's helpers: FP8 inputs, float64 check and cuBLAS peer; MLA inputs, counting and check
import gpu_triton_gemm as gemm  # noqa: E402
import gpu_triton_mla as mla_tools  # noqa: E402

from deepport.backends.triton import configs, fp8_configs  # noqa: E402
from deepport.backends.triton.configs import MLAConfig  # noqa: E402
from deepport.backends.triton.fp8_configs import GemmConfig  # noqa: E402
from deepport.bench.check import sample_rows, sampled_rows_check  # noqa: E402
from deepport.bench.configs import fp8_grouped_gemm as grouped_bench  # noqa: E402
from deepport.bench.configs.fp8_gemm import TOLERANCE  # noqa: E402
from deepport.conformance.call import synchronize  # noqa: E402
from deepport.kernels.fp8_grouped_gemm import OP_CONTIGUOUS, OP_MASKED, ContiguousCall  # noqa: E402

SMEM_PER_BLOCK = 227 * 1024  # the most shared memory one Hopper block can have
D_QK, D_V = mla_tools.D_QK, mla_tools.D_V

# ---- what is swept ------------------------------------------------------------------------------------

M = MLAConfig
# name -> (b, s_q, h_q, s_k or None for ragged 4096..32768, causal, kind); compute-bound first (timing order)
MLA_SHAPES: dict[str, tuple[int, int, int, int | None, bool, str]] = {
    "b128_sq1_hq128_sk4096": (128, 1, 128, 4096, False, "cb"),
    "b128_sq2_hq128_sk4096_causal": (128, 2, 128, 4096, True, "cb"),
    "b128_sq1_hq16_sk4096": (128, 1, 16, 4096, False, "mb"),
    "b128_sq1_hq16_ragged4096-32768": (128, 1, 16, None, False, "mb"),
    "b64_sq1_hq16_sk32768": (64, 1, 16, 32768, False, "mb"),
}
MLA_CANDIDATES: dict[str, list[MLAConfig]] = {
    # compute-bound (q_rows 128 / 256). Shared memory: Q [block_h, 576] stays resident (72 KiB at 64 rows)
    # plus num_stages K tiles [block_n, 576]; v2: two programs per row tile, each owning 256 of the 512
    # output channels (accumulator 64 x 256 per warpgroup, S computed by both).
    "cb": [
        M(64, 64, 8, 2),                        # the default before this sweep (pointer loads)
        M(64, 64, 8, 2, k_tma=True),            # same, K tiles by TMA (no per-element addresses)
        M(64, 32, 8, 3, k_tma=True),            # smaller K tiles, one more in flight
        M(64, 32, 8, 2, k_tma=True),
        M(64, 64, 8, 1, k_tma=True),            # 147 KiB: no prefetch, room for the compiler
        M(64, 64, 4, 2, v_split=2, k_tma=True),  # one warpgroup per program, P stays in registers
        M(64, 32, 4, 2, v_split=2, k_tma=True),
        M(64, 32, 4, 1, programs_per_sm=2, v_split=2, k_tma=True),  # 110 KiB: two programs per SM
        M(64, 16, 4, 2, programs_per_sm=2, v_split=2, k_tma=True),  # 110 KiB: two programs per SM
        M(128, 32, 8, 2, v_split=2, k_tma=True),  # 128 rows: each K tile feeds 128 rows, no cross-warp softmax
        M(128, 16, 8, 3, v_split=2, k_tma=True),
        M(128, 64, 8, 1, v_split=2, k_tma=True),
    ],
    # memory-bound (q_rows 16): mma.sync on 16 rows; the plan deals programs_per_sm * SMs parts. Shared
    # memory (dry run, triton 3.9): TMA-loaded K keeps num_stages tiles, pointer-loaded K num_stages - 1
    # (none extra at 16 rows with 2 stages), so two programs fit an SM up to about 110 KiB each.
    "mb": [
        M(16, 64, 8, 3),                        # the default before this sweep (164 KiB, 1 program/SM)
        M(16, 64, 4, 2, programs_per_sm=2),     # fastest of 2026-12-01 (3.0-3.6 TB/s; 90 KiB, 2/SM)
        M(16, 64, 4, 2, programs_per_sm=3),
        M(16, 32, 4, 2, programs_per_sm=2),
        M(16, 64, 4, 1, programs_per_sm=2, k_tma=True),  # one 64-token tile by TMA, 2/SM
        M(16, 64, 4, 2, programs_per_sm=2, k_tma=True),  # two tiles in flight, 1/SM (156 KiB)
        M(16, 32, 4, 2, programs_per_sm=2, k_tma=True),  # 87 KiB, 2/SM
        M(16, 32, 4, 2, programs_per_sm=3, k_tma=True),
        M(16, 32, 4, 3, programs_per_sm=2, k_tma=True),  # 123 KiB, 1/SM
        M(16, 16, 4, 4, programs_per_sm=3, k_tma=True),  # 88 KiB, 2/SM
        M(16, 32, 8, 4, programs_per_sm=1, k_tma=True),  # 159 KiB, no spills
    ],
}
BUCKET_OF_KIND = {"cb": "rows>32", "mb": "rows<=16"}

C = GemmConfig
FP8_LARGE_M = 4096
FP8_LARGE_NK = ((2112, 7168), (4096, 7168), (7168, 16384), (576, 7168))
FP8_CANDIDATES_LARGE: list[GemmConfig] = [
    C(128, 128, 8, 4),                                    # tuned for 2112 x 7168 before this sweep
    C(128, 128, 8, 3, split_n=2, maxnreg=128),            # two 64-wide halves, 2 programs/SM (tuned for the others)
    C(128, 128, 8, 3, group_m=16, split_n=2, maxnreg=128),
    C(128, 128, 8, 3, group_m=4, split_n=2, maxnreg=128),
    C(128, 128, 4, 3, split_n=2, maxnreg=232),            # one warpgroup on 128 rows, 2 programs/SM
    C(128, 64, 4, 4),                                     # 2112 = 33 tiles of 64: 1056 tiles = 4 waves of 2x132
    C(128, 64, 4, 3, maxnreg=168),                        # 3 programs per SM
    C(128, 64, 8, 4),
    C(256, 128, 8, 3, split_n=2),                         # tall tile: each warpgroup 128 rows
    C(64, 128, 4, 4),
    # tail split (not yet measured): the tiles of the last, partial wave each over s K ranges in the same launch,
    # then a reduce of their partials. 128 x 128 tiles of 8 warps hold 1 program/SM: on 132 SMs 2112 x 7168 has
    # 544 tiles = 4 x 132 + 16 (auto s = 8), 4096 x 7168 1024 = 7 x 132 + 100 (auto 5), 7168 x 16384 1792 =
    # 13 x 132 + 76 (auto 5); the halves hold 2/SM, 264 slots: tails 16 (auto 8), 232 (off), 208 (auto 5).
    # s = 4: fewer, longer pieces (less partial traffic and reduce) than auto's on 2112 x 7168.
    C(128, 128, 8, 4, tail_split=0),
    C(128, 128, 8, 4, tail_split=4),
    C(128, 128, 8, 3, split_n=2, maxnreg=128, tail_split=0),
    # 7168 x 16384 (0.80x cuBLAS with t5 or the group_m 16 halves): the two winners combined and a deeper
    # pipeline (128 x 256 as two halves spills 2 KB at 255 registers in the dry run: left out)
    C(128, 128, 8, 4, group_m=16, tail_split=5),
    C(128, 128, 8, 5, tail_split=5),
    # 576 x 7168 (0.82x with 64 x 128 through pointers): N = 9 tiles of 64, so 128 x 64 tiles (288 = 2 x 132
    # + 24) with the tail split, 64 x 64 (576 tiles), and today's tile with the tail split
    C(128, 64, 4, 4, tail_split=0),
    C(128, 64, 8, 4, tail_split=0),
    C(64, 64, 4, 5),
    C(64, 128, 4, 3, tma=False, tail_split=0),
]
FP8_SMALL_M = (64, 128)
FP8_CANDIDATES_SMALL: list[GemmConfig] = [C(64, 64, 4, 5, split_k=0), C(64, 128, 4, 4, split_k=0),
                                          C(64, 128, 4, 4, split_k=0, split_n=2)]

# M-grouped FP8: DeepGEMM's MoE shapes of the grouped bench configs (up/gate N x K = 4096 x 7168, down 7168 x 2048)
GROUPED_NK: tuple[tuple[int, int], ...] = grouped_bench.NK
GROUPED_CONTIGUOUS = ((4, 8192), (8, 4096))  # (G, rows per group)
GROUPED_MASKED = ((1, 1024), (2, 512), (4, 256))  # (G, expected_m = masked_m of every group)
GROUPED_M_MAX = grouped_bench.M_MAX  # masked: rows allocated per group
GroupedShape = tuple[str, int, int, int, int]  # (layout, G, rows per group or expected_m, N, K)
GROUPED_GRID: dict[str, list[GemmConfig]] = {
    # block_m divides 128 (a tile holds one group); waves unused. Shared memory a stage: (block_m + block_n) KiB.
    # Pruned by the dry run (triton 3.9, sm_90a): 256-wide tiles with one accumulator spill 300-470 bytes at
    # 255 registers (128 x 256: 420-920 whatever the split), with two halves 0-80
    "contiguous": [
        # 128 x 128, two warpgroups: depth x raster x halves; the 128-register cap (two programs per SM) only at
        # 3 stages, where two programs fit in shared memory (2 x 96 KiB); the halves hold two without it
        *(C(128, 128, 8, s, group_m=g, split_n=h, maxnreg=r) for s in (3, 4, 5) for g in (8, 16) for h in (1, 2)
          for r in ((None, 128) if s == 3 else (None,))),
        *(C(128, 256, 8, s) for s in (3, 4)),  # half the A re-reads of 128 x 128 (48 KiB a stage), spills
        # one warpgroup: 64 x 128, DeepGEMM's 64 x 256 (as halves), 128 x 64
        *(C(64, 128, 4, s, group_m=g) for s in (3, 4, 5) for g in (8, 16)),
        *(C(64, 256, 4, s, split_n=2) for s in (3, 4, 5)),
        *(C(128, 64, 4, s) for s in (4, 5)),
    ],
    # persistent: waves programs per SM walk the tiles in use (1024 rows in all: 8 x 32 to 8 x 56 tiles of
    # 128 x 128, so smaller tiles first); the kernel has no group_m
    "masked": [
        # 64 x 128, one warpgroup (today's entries): depth x waves, and halves at 3 stages (72 KiB: three
        # programs per SM, which a register cap would not raise)
        *(C(64, 128, 4, s, waves=w) for s in (3, 4, 5) for w in (2, 3, 4)),
        *(C(64, 128, 4, 3, waves=w, split_n=2) for w in (3, 4)),
        *(C(64, 64, 4, s, waves=w) for s in (4, 5) for w in (3, 4)),  # twice the tiles of 64 x 128
        *(C(64, 256, 4, s, split_n=2) for s in (3, 4)),  # half the A re-reads
        *(C(128, 128, 8, 3, split_n=2, maxnreg=128, waves=w) for w in (2, 3)),  # the dense winner (_HALVES)
        C(128, 128, 8, 4),
    ],
}


def mla_candidates(kind: str, device_name: str, q_rows: int) -> list[MLAConfig]:
    """The kind's candidates, the configuration ``configs.py`` picks today first (added if missing)."""
    default = configs.mla_config(device_name, q_rows)
    found = MLA_CANDIDATES[kind]
    return [default, *[c for c in found if c != default]]


def fp8_candidates(m: int, n: int, k: int, device_name: str, sms: int) -> list[GemmConfig]:
    """Today's choice for the shape first, then the candidate list (split_k = 0 resolved from the shape)."""
    chosen = fp8_configs.choose(fp8_configs.DENSE, device_name, sms, m, n, k)
    pool = FP8_CANDIDATES_LARGE if m >= FP8_LARGE_M else FP8_CANDIDATES_SMALL
    return list(dict.fromkeys([chosen, *(gemm.resolved(c, m, n, k, sms) for c in pool)]))


def fp8_shapes() -> list[tuple[int, int, int]]:
    return [(FP8_LARGE_M, n, k) for n, k in FP8_LARGE_NK] + [(m, n, k) for m in FP8_SMALL_M for n, k in FP8_LARGE_NK]


def grouped_candidates(layout: str, rows: int, n: int, k: int, device_name: str, sms: int) -> list[GemmConfig]:
    """Today's choice for the shape first (``rows``: per group, or expected_m), then the H200 entries of the
    layout's table, the H200 dense table's entries for (N, K) and the grid; split_k 1 (the grouped kernels
    do not split K), and for the contiguous layout only block_m dividing 128."""
    kind = fp8_configs.CONTIGUOUS if layout == "contiguous" else fp8_configs.MASKED
    h200 = fp8_configs.TUNED["NVIDIA H200"]
    dense = [c for (_, dn, dk), c in h200[fp8_configs.DENSE].items() if (dn, dk) == (n, k)]
    pool = [fp8_configs.choose(kind, device_name, sms, rows, n, k), *h200[kind].values(), *dense,
            *GROUPED_GRID[layout]]
    return list(dict.fromkeys(replace(c, split_k=1) for c in pool if layout == "masked" or 128 % c.block_m == 0))


def grouped_shapes() -> list[GroupedShape]:
    return ([("contiguous", g, rows, n, k) for g, rows in GROUPED_CONTIGUOUS for n, k in GROUPED_NK]
            + [("masked", g, rows, n, k) for g, rows in GROUPED_MASKED for n, k in GROUPED_NK])


def grouped_label(layout: str, cfg: GemmConfig) -> str:
    """The configuration's label, with the waves for the masked layout (the label leaves them out)."""
    return cfg.label + (f" waves{cfg.waves}" if layout == "masked" else "")


def dense_peer_config(m: int, n: int, k: int, device_name: str, sms: int) -> GemmConfig:
    """The dense configuration ``fp8_configs.py`` picks for M rows (the peer at a grouped call's total M)."""
    return fp8_configs.choose(fp8_configs.DENSE, device_name, sms, m, n, k)


def use_cpu_smoke_sizes() -> None:
    """Shrink what is swept to CPU sizes for ``--cpu-smoke`` (the interpreter runs every program in numpy)."""
    global FP8_LARGE_M, FP8_LARGE_NK, FP8_SMALL_M, FP8_CANDIDATES_LARGE, FP8_CANDIDATES_SMALL
    global GROUPED_NK, GROUPED_CONTIGUOUS, GROUPED_MASKED, GROUPED_M_MAX
    MLA_SHAPES.clear()
    MLA_SHAPES.update({"tiny_b1_sq2_hq64_sk128_causal": (1, 2, 64, 128, True, "cb"),
                       "tiny_b2_sq1_hq16_sk192": (2, 1, 16, 192, False, "mb")})
    MLA_CANDIDATES["cb"] = [M(64, 64, 8, 2), M(64, 32, 4, 2, v_split=2, k_tma=True)]
    MLA_CANDIDATES["mb"] = [M(16, 64, 4, 2, programs_per_sm=2), M(16, 32, 4, 2, programs_per_sm=2, k_tma=True)]
    FP8_LARGE_M, FP8_LARGE_NK, FP8_SMALL_M = 1152, ((256, 512),), (64,)
    FP8_CANDIDATES_LARGE = [C(128, 128, 8, 3, split_n=2, maxnreg=128), C(128, 64, 4, 4)]
    FP8_CANDIDATES_SMALL = [C(64, 64, 4, 5, split_k=0)]
    GROUPED_NK, GROUPED_CONTIGUOUS, GROUPED_MASKED, GROUPED_M_MAX = ((256, 512),), ((2, 128),), ((2, 40),), 64
    GROUPED_GRID["contiguous"] = [C(64, 128, 4, 3)]
    GROUPED_GRID["masked"] = [C(64, 128, 4, 3, waves=3)]


# ---- one MLA / FP8 launch, shared by the compile pool, the dry run and the timing --------------------

def mla_call(name: str, device: torch.device, small: bool) -> dict[str, Any]:
    """Inputs and the bound call of an MLA shape (``small``: b=2, 256 tokens, the same specialisation)."""
    import deepport
    from deepport.kernels import mla_decode as mla

    b, s_q, h_q, s_k, causal, _ = MLA_SHAPES[name]
    if small:
        b, lens, width = 2, [256, 256], 64
    else:
        lens, width = mla_tools.lengths(b, s_k, False), None
    q, k, table, seqlens = mla_tools.build(b, s_q, h_q, lens, device, table_width=width)
    md = deepport.get_mla_metadata(seqlens, s_q * h_q, 1)
    out = torch.empty((b, s_q, h_q, D_V), dtype=torch.bfloat16, device=device)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=device)
    call = mla.bind(q, k, table, seqlens, D_V, causal=causal, metadata=md, out=out, lse=lse)
    return {"call": call, "out": out, "lse": lse, "lens": lens, "b": b, "s_q": s_q, "h_q": h_q}


def fp8_call(m: int, n: int, k: int, device: torch.device, empty: bool) -> dict[str, Any]:
    """An FP8 NT call (``empty``: uninitialised operands, for compiling only)."""
    if not empty:
        return gemm.dense_inputs(m, n, k, 0, device)
    from deepport.kernels import fp8_gemm

    a = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=device)
    b = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=device)
    sfa = torch.empty((m, -(-k // 128)), dtype=torch.float32, device=device)
    sfb = torch.empty((-(-n // 128), -(-k // 128)), dtype=torch.float32, device=device)
    out = torch.empty((m, n), dtype=torch.bfloat16, device=device)
    return {"out": out, "call": fp8_gemm.bind("nt", (a, sfa), (b, sfb), out)}


def run_mla(inp: dict[str, Any], cfg: MLAConfig) -> None:
    from deepport.backends.triton import mla_decode as tm

    tm.run(inp["call"], inp["out"], inp["lse"], config=cfg)


def grouped_inputs(shape: GroupedShape, seed: int, device: torch.device, m_max: int | None = None) -> dict[str, Any]:
    """A grouped call of ``shape`` (this directory's builders): B ``[G, N, K]``; contiguous: A ``[G * rows, K]``,
    out ``[G * rows, N]``; masked: A ``[G, m_max, K]`` (default ``GROUPED_M_MAX``) with ``rows`` in use per
    group, out ``[G, m_max, N]``."""
    layout, g, rows, n, k = shape
    if layout == "contiguous":
        return gemm.contiguous_inputs(g, rows, n, k, seed, device)
    return gemm.masked_inputs(g, rows, n, k, seed, device, m_max=GROUPED_M_MAX if m_max is None else m_max)


def grouped_call(shape: GroupedShape, device: torch.device, empty: bool) -> dict[str, Any]:
    """A small call of ``shape``'s specialisation: 128 rows per group (masked: 64 in use of an M_max of 128);
    ``empty``: uninitialised operands, for compiling only (``m_indices`` / ``masked_m`` are real: bind checks
    them)."""
    layout, g, _, n, k = shape
    if not empty:
        return grouped_inputs((layout, g, 128 if layout == "contiguous" else 64, n, k), 0, device, m_max=128)
    from deepport.kernels import fp8_grouped_gemm as grouped

    a = torch.empty((g * 128, k), dtype=torch.float8_e4m3fn, device=device)
    sfa = torch.empty((g * 128, -(-k // 128)), dtype=torch.float32, device=device)
    b = (torch.empty((g, n, k), dtype=torch.float8_e4m3fn, device=device),
         torch.empty((g, -(-n // 128), -(-k // 128)), dtype=torch.float32, device=device))
    if layout == "contiguous":
        out = torch.empty((g * 128, n), dtype=torch.bfloat16, device=device)
        m_indices = torch.arange(g, dtype=torch.int32, device=device).repeat_interleave(128)
        return {"out": out, "call": grouped.bind_contiguous((a, sfa), b, out, m_indices)}
    out = torch.empty((g, 128, n), dtype=torch.bfloat16, device=device)
    masked_m = torch.full((g,), 64, dtype=torch.int32, device=device)
    return {"out": out, "call": grouped.bind_masked((a.view(g, 128, k), sfa.view(g, 128, -1)), b, out, masked_m, 64)}


def run_fp8(inp: dict[str, Any], cfg: GemmConfig, slots: int | None = None) -> None:
    from deepport.backends.triton import fp8_gemm as triton_dense

    triton_dense.launch(inp["call"], inp["out"], cfg, slots=slots)


COMPILE_SLOTS = 1 << 20
"""Slots of the tail split in compile-only launches (the compile pool, the dry run): more than any tile count,
so every tile is in the tail and a tail-split candidate launches (compiles) both of its kernels at any size."""


def run_grouped(inp: dict[str, Any], cfg: GemmConfig) -> None:
    from deepport.backends.triton import fp8_grouped_gemm as triton_grouped

    if isinstance(inp["call"], ContiguousCall):
        triton_grouped.launch_contiguous(inp["call"], inp["out"], cfg)
    else:
        triton_grouped.launch_masked(inp["call"], inp["out"], cfg)


# ("mla", shape name, MLAConfig fields) | ("fp8", (m, n, k), GemmConfig fields) | ("grouped", GroupedShape, ...)
Job = tuple[str, Any, dict[str, Any]]


def compile_key(kind: str, what: Any, fields: dict[str, Any]) -> str:
    """What the compiler sees of a (shape, candidate): MLA shapes differ by ``s_q == 1`` and causality
    (every other integer is a runtime argument divisible by 16) and ``programs_per_sm`` only sets the
    grid; FP8 shapes (``what``: dense (m, n, k), or a :data:`GroupedShape`) differ by whether K / 128, the
    scales' row stride, is divisible by 16 (7168: no; 2048, 16384: yes), dense ones also by whether one SFB
    covers a tile, masked ones by ``G == 1`` (a constant to triton); ``waves`` only sets the masked grid."""
    if kind == "mla":
        _, s_q, _, _, causal, _ = MLA_SHAPES[what]
        cfg = replace(MLAConfig(**fields), programs_per_sm=1)
        return f"mla s_q{'=1' if s_q == 1 else '>1'}{' causal' if causal else ''} {cfg.label.replace('p1', '')}"
    cfg = GemmConfig(**fields)
    scales = "kb%16=0" if -(-what[-1] // 128) % 16 == 0 else "kb%16>0"
    if kind == "grouped":
        return f"{what[0]}{' G=1' if what[0] == 'masked' and what[1] == 1 else ''} {scales} {cfg.label}"
    return f"fp8 {'sfb-scalar' if 128 % cfg.block_n == 0 else 'sfb-vector'} {scales} {cfg.label}"


def compile_jobs(device_name: str, sms: int, only: set[str]) -> dict[str, Job]:
    """One job (a shape that needs it) per distinct compiled specialisation, by :func:`compile_key`."""
    jobs: dict[str, Job] = {}
    if "mla" in only:
        for name, (_, s_q, h_q, _, _, kind) in MLA_SHAPES.items():
            for cfg in mla_candidates(kind, device_name, s_q * h_q):
                jobs.setdefault(compile_key("mla", name, asdict(cfg)), ("mla", name, asdict(cfg)))
    if "fp8" in only:
        for m, n, k in fp8_shapes():
            for cfg in fp8_candidates(m, n, k, device_name, sms):
                jobs.setdefault(compile_key("fp8", (m, n, k), asdict(cfg)), ("fp8", (min(m, 128), n, k), asdict(cfg)))
    if "grouped" in only:  # the candidates, and the dense peer at the same total M
        for shape in grouped_shapes():
            layout, g, rows, n, k = shape
            for cfg in grouped_candidates(layout, rows, n, k, device_name, sms):
                jobs.setdefault(compile_key("grouped", shape, asdict(cfg)), ("grouped", shape, asdict(cfg)))
            dense = asdict(dense_peer_config(g * rows, n, k, device_name, sms))
            jobs.setdefault(compile_key("fp8", (g * rows, n, k), dense), ("fp8", (128, n, k), dense))
    return jobs


def run_job(job: Job, device: torch.device, empty: bool) -> None:
    """A small launch of the job's specialisation (``empty``: uninitialised FP8 operands, for compiling only)."""
    kind, what, fields = job
    if kind == "mla":
        run_mla(mla_call(what, device, small=True), MLAConfig(**fields))
    elif kind == "fp8":
        run_fp8(fp8_call(*what, device, empty=empty), GemmConfig(**fields), slots=COMPILE_SLOTS)
    else:
        run_grouped(grouped_call(what, device, empty=empty), GemmConfig(**fields))


def warm_job(key: str, job: Job) -> tuple[str, str | None, float]:
    """Compile one job on the GPU with a small launch of the same specialisation (fills triton's cache)."""
    start = time.perf_counter()
    try:
        run_job(job, torch.device("cuda"), empty=False)
        torch.cuda.synchronize()
        return key, None, time.perf_counter() - start
    except Exception as exc:
        return key, f"{type(exc).__name__}: {str(exc)[:300]}", time.perf_counter() - start


# ---- dry run: compile for sm_90a on the CPU ------------------------------------------------------------

def dry_job(key: str, job: Job) -> dict[str, Any]:
    """Record the launches of one job on CPU tensors and compile each for sm_90a."""
    from deepport.backends.triton import aot
    from deepport.backends.triton import fp8_gemm_kernels as fk
    from deepport.backends.triton.mla_decode_kernels import mla_decode_combine_kernel, mla_decode_split_kernel

    kind, _, fields = job
    row: dict[str, Any] = {"job": key, "kernels": []}
    start = time.perf_counter()
    try:
        with aot.recorded_launches([mla_decode_split_kernel, mla_decode_combine_kernel, fk.fp8_gemm_nt_kernel,
                                    fk.splitk_reduce_kernel, fk.tail_reduce_kernel,
                                    fk.m_grouped_fp8_gemm_nt_contiguous_kernel,
                                    fk.m_grouped_fp8_gemm_nt_masked_kernel]) as launches:
            run_job(job, torch.device("cpu"), empty=True)
        for launch in launches:
            compiled = aot.compile_launch(launch)
            row["kernels"].append(aot.lowering(compiled, launch.name).to_dict())
        row["verdict"] = dry_verdict(kind, fields, row["kernels"])
    except Exception as exc:
        row["verdict"] = "COMPILE_ERROR"
        row["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def dry_verdict(kind: str, fields: dict[str, Any], kernels: list[dict[str, Any]]) -> str:
    main = kernels[0]  # the split / GEMM kernel is launched first
    problems = []
    if any(k["shared"] > SMEM_PER_BLOCK for k in kernels):
        problems.append(f"SMEM {main['shared'] // 1024} KiB > 227")
    if kind in ("fp8", "grouped"):
        if not main["wgmma"] or not any("e4m3" in t for t in main["wgmma_types"]):
            problems.append("NO_E4M3_WGMMA")
        if fields["tma"] and not main["tma"]:
            problems.append("NO_TMA")
    else:
        if fields["block_h"] >= 64 and not main["wgmma"]:
            problems.append("NO_WGMMA")
        if not main["wgmma"] and not main["mma_sync"]:
            problems.append("NO_TENSOR_CORES")
        if fields["k_tma"] and not main["tma"]:
            problems.append("NO_TMA")
    return "OK" if not problems else " ".join(problems)


def dry_run(out_dir: str, only: set[str], workers: int) -> int:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        print("unset TRITON_INTERPRET: the interpreter replaces compilation", file=sys.stderr)
        return 2
    import triton

    jobs = compile_jobs("NVIDIA H200", 132, only)
    print(f"dry run: {len(jobs)} specialisations, triton {triton.__version__}, target sm_90a", flush=True)
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for row in pool.map(dry_job, jobs.keys(), jobs.values()):
            rows.append(row)
            print(dry_line(row), flush=True)
    with open(os.path.join(out_dir, "triton_sweep_dry_run.json"), "w") as f:
        json.dump({"triton": triton.__version__, "target": "cuda sm_90a", "jobs": rows}, f, indent=1)
    bad = [r for r in rows if r["verdict"] != "OK"]
    print(f"{len(rows) - len(bad)} of {len(rows)} compile for sm_90a with the expected instructions", flush=True)
    return 1 if bad else 0


def dry_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['job']:58} COMPILE_ERROR {row['error'][:200]}"
    k = row["kernels"][0]
    extra = f" (+{len(row['kernels']) - 1} helper kernel)" if len(row["kernels"]) > 1 else ""
    return (f"{row['job']:58} wgmma {k['wgmma']:3} {','.join(k['wgmma_types']) or '-':10} mma.sync {k['mma_sync']:3} "
            f"tma {k['tma']:2} smem {k['shared'] // 1024:3} KiB regs {k['registers']:3} spill {k['spill_bytes']:5} "
            f"progs/SM {k['programs_per_sm']} {row['seconds']:5.1f}s {row['verdict']}{extra}")


# ---- device run -----------------------------------------------------------------------------------------

class Sweep:
    def __init__(self, out_dir: str, budget_s: float, device: str = "cuda") -> None:
        from deepport.dispatch.device import device_info

        self.out_dir = out_dir
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.device = torch.device(device)
        info = device_info(self.device)
        self.name, self.sms = info.name, info.multiprocessors
        import triton

        self.results: dict[str, Any] = {
            "device": self.name, "multiprocessors": self.sms, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "argv": sys.argv, "compile": [],
            "ceilings": {}, "mla": [], "fp8": [], "grouped": [], "skipped": [], "certify": None}
        self.failed: set[str] = set()
        self.compiled: set[str] | None = None  # compile keys warmed without error (None: no compile stage)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        with open(os.path.join(self.out_dir, "triton_sweep.json"), "w") as f:
            json.dump(self.results, f, indent=1)

    def compile_all(self, only: set[str], workers: int, share: float) -> None:
        jobs = compile_jobs(self.name, self.sms, only)
        t0 = time.monotonic()
        limit = max(20.0, share * self.left())
        ctx = multiprocessing.get_context("spawn")
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        futures = {pool.submit(warm_job, key, job): key for key, job in jobs.items()}
        self.compiled = set()
        try:
            for fut in cf.as_completed(futures, timeout=limit):
                try:
                    name, error, seconds = fut.result()
                except Exception as exc:  # a worker died (the pool is broken): the job is not known good
                    name, error, seconds = futures[fut], f"worker: {type(exc).__name__}: {exc}", 0.0
                self.results["compile"].append({"job": name, "error": error, "seconds": round(seconds, 1)})
                if error:
                    self.failed.add(name)
                    print(f"compile/launch FAILED {name}: {error}", flush=True)
                else:
                    self.compiled.add(name)
        except cf.TimeoutError:
            print(f"compile stage stopped after {limit:.0f} s: candidates not compiled by then are skipped",
                  flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        print(f"compile: {len(self.results['compile'])} of {len(jobs)} specialisations in "
              f"{time.monotonic() - t0:.0f} s, {len(self.failed)} failed", flush=True)

    def not_compiled(self, key: str) -> str | None:
        """Why a candidate is not timed: its compile (a small launch) failed, or never ran in the compile
        stage (a candidate first compiled or crashing in this process would cost the rest of the run)."""
        if key in self.failed:
            return "compile/launch failed"
        if self.compiled is not None and key not in self.compiled:
            return "not compiled within the compile stage"
        return None

    def ceilings(self) -> None:
        from deepport.bench import ceilings

        for logical in ("memory", "bf16_matmul", "fp8_matmul"):
            name = ceilings.resolve(logical, self.device.type)
            res = ceilings.measure(name, self.device, quick=logical != "memory")  # 1 GiB copies read low
            self.results["ceilings"][logical] = res.value
            print(f"ceiling {logical} ({name}): {res.value} {res.unit} {res.error or ''}", flush=True)

    def time(self, calls: list[Callable[[], None]]) -> dict[str, Any]:
        from deepport.bench import timing

        cpu = self.device.type == "cpu"
        t = timing.time_calls(calls, self.device, samples=2 if cpu else 10, warmup=1 if cpu else 2)
        return {"us": t.median_us, "method": t.method, "calls_per_sample": t.calls_per_sample,
                "p10_us": sorted(t.samples_us)[len(t.samples_us) // 10], "notes": t.notes}

    # -- MLA
    def mla_shape(self, name: str) -> dict[str, Any]:
        from deepport.dispatch import registry

        b, s_q, h_q, _, _, kind = MLA_SHAPES[name]
        inp = mla_call(name, self.device, small=False)
        flops, nbytes = mla_tools.counting(b, s_q, h_q, inp["lens"])
        row: dict[str, Any] = {"shape": name, "kind": kind, "flops": flops, "bytes": nbytes,
                               "mean_s_k": sum(inp["lens"]) / b, "candidates": []}
        torch_impl = registry.get("torch").implementation("mla_decode")
        ref_out, ref_lse = torch.empty_like(inp["out"]), torch.empty_like(inp["lse"])
        torch_impl(inp["call"], ref_out, ref_lse)
        row["torch"] = self.time([lambda: torch_impl(inp["call"], ref_out, ref_lse)])
        for cfg in mla_candidates(kind, self.name, s_q * h_q):
            entry: dict[str, Any] = {"config": cfg.label, "fields": asdict(cfg)}
            if self.left() < 0:
                entry["skipped"] = "budget"
            elif (why := self.not_compiled(compile_key("mla", name, asdict(cfg)))) is not None:
                entry["skipped"] = why
            else:
                entry.update(self.mla_candidate(inp, cfg, ref_out, ref_lse, flops, nbytes))
            row["candidates"].append(entry)
            print(f"  {name} {cfg.label}: {short(entry)}", flush=True)
        good = [c for c in row["candidates"] if c.get("ok") and "us" in c]
        row["best"] = min(good, key=lambda c: c["us"]) if good else None
        return row

    def mla_candidate(self, inp: dict[str, Any], cfg: MLAConfig, ref_out: torch.Tensor, ref_lse: torch.Tensor,
                      flops: float, nbytes: float) -> dict[str, Any]:
        try:
            inp["out"].fill_(float("nan"))
            inp["lse"].fill_(float("nan"))
            run_mla(inp, cfg)
            synchronize(self.device)
            ok, ratio = mla_tools.within(inp["out"], ref_out)
            lse_err = float(((inp["lse"] - ref_lse).abs() / ref_lse.abs().clamp(min=1e-6)).nan_to_num(1e9).max())
            found: dict[str, Any] = {"ok": ok and lse_err < 1e-4, "err_ratio": ratio, "lse_rel_err": lse_err}
            if not found["ok"]:
                return found
            t = self.time([lambda: run_mla(inp, cfg)])
            found.update(t, tflops=flops / t["us"] / 1e6, gbs=nbytes / t["us"] / 1e3)
            return found
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    # -- FP8
    def fp8_shape(self, m: int, n: int, k: int) -> dict[str, Any]:
        from deepport.backends.torch import fp8_gemm as torch_fp8

        flops = 2.0 * m * n * k
        inputs = self.dense_copies(m, n, k)
        rows, ref = gemm.dense_reference(inputs[0])
        row: dict[str, Any] = {"m": m, "n": n, "k": k, "flops": flops, "candidates": []}
        row["torch_backend"] = self.fp8_peer(lambda i: (lambda: torch_fp8.run(i["call"], i["out"])), inputs, rows,
                                             ref, flops)
        row["cublas_raw"] = self.fp8_peer(gemm.raw_scaled_mm, inputs, rows, ref, flops)
        self.gemm_candidates(row, f"fp8 m{m} n{n} k{k}", fp8_candidates(m, n, k, self.name, self.sms),
                             lambda c: (c.label, compile_key("fp8", (m, n, k), asdict(c))),
                             lambda c: gemm.checked(lambda: run_fp8(inputs[0], c), inputs[0]["out"], rows, ref),
                             run_fp8, inputs)
        inputs.clear()
        return row

    def dense_copies(self, m: int, n: int, k: int) -> list[dict[str, Any]]:
        """Copies of a dense M x N x K call (seeds 0, 1, ...), enough to rotate past twice the L2 (at most 8)."""
        from deepport.bench import timing

        count = min(8, timing.copies_for_rotation(m * k + n * k + 2 * m * n, self.device))
        return [gemm.dense_inputs(m, n, k, seed, self.device) for seed in range(count)]

    def gemm_candidates(self, row: dict[str, Any], tag: str, configs: list[GemmConfig],
                        names: Callable[[GemmConfig], tuple[str, str]],
                        check: Callable[[GemmConfig], dict[str, Any]],
                        run: Callable[[dict[str, Any], GemmConfig], None], inputs: list[dict[str, Any]]) -> None:
        """Fill ``row``'s candidates (one per config, ``names``: its label and compile key) and its best."""
        for cfg in configs:
            label, key = names(cfg)
            entry: dict[str, Any] = {"config": label, "fields": asdict(cfg)}
            calls = [lambda i=i, c=cfg: run(i, c) for i in inputs]
            entry.update(self.gemm_candidate(key, lambda c=cfg: check(c), calls, row["flops"]))
            row["candidates"].append(entry)
            print(f"  {tag} {label}: {short(entry)}", flush=True)
        good = [c for c in row["candidates"] if c.get("ok") and "us" in c]
        row["best"] = min(good, key=lambda c: c["us"]) if good else None

    def gemm_candidate(self, key: str, check: Callable[[], dict[str, Any]], calls: list[Callable[[], None]],
                       flops: float) -> dict[str, Any]:
        """One FP8 GEMM candidate (compile key ``key``): ``check`` (runs it once and judges the output), and
        only if that passes ``calls`` timed (one per input copy); skipped past the budget or not compiled."""
        if self.left() < 0:
            return {"skipped": "budget"}
        if (why := self.not_compiled(key)) is not None:
            return {"skipped": why}
        try:
            found: dict[str, Any] = {"check": check()}
            found["ok"] = bool(found["check"]["passed"])
            if found["ok"]:
                found.update(self.time(calls))
                found["tflops"] = flops / found["us"] / 1e6
            return found
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    def fp8_peer(self, make: Callable[[dict[str, Any]], Callable[[], None]], inputs: list[dict[str, Any]],
                 rows: list[int], ref: torch.Tensor, flops: float) -> dict[str, Any]:
        """A peer's output checked at ``rows`` of ``out`` viewed as ``[rows, N]`` against ``ref`` (float64),
        then timed."""
        try:
            out2d = inputs[0]["out"].view(-1, inputs[0]["out"].shape[-1])
            check = gemm.checked(make(inputs[0]), out2d, rows, ref)
            t = self.time([make(i) for i in inputs])
            return {"ok": bool(check["passed"]), **t, "tflops": flops / t["us"] / 1e6}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    # -- M-grouped FP8
    def grouped_shape(self, shape: GroupedShape) -> dict[str, Any]:
        """One grouped shape: the torch backend's op (checked against float64, then timed), each candidate
        checked against the torch backend's output and timed, then the dense GEMM at the same total M."""
        from deepport.bench import timing
        from deepport.dispatch import registry

        layout, g, rows_or_em, n, k = shape
        total_m = g * rows_or_em  # rows in use
        flops = 2.0 * total_m * n * k
        count = min(8, timing.copies_for_rotation(total_m * k + g * n * k + 2 * total_m * n, self.device))
        inputs = [grouped_inputs(shape, seed, self.device) for seed in range(count)]
        shape_out = inputs[0]["out"].shape  # [G * rows, N] or [G, M_max, N]
        rows, group_of = sampled_in_use(shape, int(shape_out[1]) if layout == "masked" else 0)
        ref = torch_backend_out(inputs[0]).view(-1, n)[rows].double()
        before = None
        if layout == "masked":
            gen = torch.Generator(device=self.device).manual_seed(1)
            before = torch.randn(shape_out, generator=gen, dtype=torch.bfloat16, device=self.device)
        row: dict[str, Any] = {"layout": layout, "groups": g, "rows": rows_or_em, "total_m": total_m, "n": n, "k": k,
                               "flops": flops, "candidates": []}
        torch_impl = registry.get("torch").implementation(OP_CONTIGUOUS if layout == "contiguous" else OP_MASKED)
        row["torch_backend"] = self.fp8_peer(lambda i: (lambda: torch_impl(i["call"], i["out"])), inputs, rows,
                                             gemm.grouped_reference(inputs[0], rows, group_of), flops)
        self.gemm_candidates(row, f"{layout} G{g} x {rows_or_em} n{n} k{k}",
                             grouped_candidates(layout, rows_or_em, n, k, self.name, self.sms),
                             lambda c: (grouped_label(layout, c), compile_key("grouped", shape, asdict(c))),
                             lambda c: grouped_checked(lambda: run_grouped(inputs[0], c), inputs[0], rows, ref, before),
                             run_grouped, inputs)
        inputs.clear()
        row["dense_same_total_m"] = self.dense_peer(total_m, n, k, flops)
        return row

    def dense_peer(self, m: int, n: int, k: int, flops: float) -> dict[str, Any]:
        """The triton dense GEMM at ``m`` rows with the configuration ``fp8_configs.py`` picks, checked and timed."""
        cfg = dense_peer_config(m, n, k, self.name, self.sms)
        if (why := self.not_compiled(compile_key("fp8", (m, n, k), asdict(cfg)))) is not None:
            return {"config": cfg.label, "skipped": why}
        inputs = self.dense_copies(m, n, k)
        rows, ref = gemm.dense_reference(inputs[0])
        return {"config": cfg.label, **self.fp8_peer(lambda i: (lambda: run_fp8(i, cfg)), inputs, rows, ref, flops)}

    # -- certify the MLA winners
    def certify_winners(self, case: str | None, workers: int) -> None:
        from deepport.cli.main import main as cli
        from deepport.conformance.suites import mla_decode as suite

        winners: dict[str, MLAConfig] = {}
        for kind, bucket in BUCKET_OF_KIND.items():
            rows = [r for r in self.results["mla"] if r["kind"] == kind and r.get("best")]
            if rows:  # the config fastest on most shapes of the kind, ties to the lowest total time
                votes: dict[str, list[float]] = {}
                for r in rows:
                    votes.setdefault(r["best"]["config"], []).append(r["best"]["us"])
                best = max(votes, key=lambda c: (len(votes[c]), -sum(votes[c])))
                fields = next(r["best"]["fields"] for r in rows if r["best"]["config"] == best)
                winners[bucket] = MLAConfig(**fields)
        if not winners:
            return
        chosen = {bucket: asdict(cfg) for bucket, cfg in winners.items()}
        t0 = time.monotonic()
        if self.device.type == "cuda":  # compile the cases' specialisations in parallel first
            ids = [c.id for c in suite.cases() if c.tier == "smoke" and (case is None or case in c.id)]
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(ids)), mp_context=ctx) as pool:
                errors = [e for e in pool.map(warm_case, ids, [chosen] * len(ids)) if e]
            print(f"certify warm-up: {len(ids)} cases in {time.monotonic() - t0:.0f} s, errors: {errors[:3]}",
                  flush=True)
        saved = patch_mla_table(chosen)
        out = os.path.join(self.out_dir, "certify_smoke_mla_winners")
        try:
            rc = cli(["certify", "--device", self.device.type, "--backend", "triton", "--tier", "smoke", "--op",
                      "mla_decode", "--no-isolate", "--out", out, *(["--case", case] if case else [])])
        except SystemExit as exc:
            rc = int(exc.code or 0)
        except Exception as exc:
            rc = -1
            print(f"certify raised {type(exc).__name__}: {exc}", flush=True)
        finally:
            configs.MLA_TUNED["H200"] = saved
        statuses: dict[str, int] = {}
        try:
            with open(os.path.join(out, "results.json")) as f:
                for c in json.load(f)["cases"]:
                    statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        except Exception as exc:
            statuses["unreadable results.json"] = 1
            print(f"certify results: {type(exc).__name__}: {exc}", flush=True)
        self.results["certify"] = {"configs": {b: c.label for b, c in winners.items()}, "exit": rc,
                                   "statuses": statuses, "seconds": round(time.monotonic() - t0, 1), "out": out}
        print(f"certify smoke mla_decode with {self.results['certify']['configs']}: exit {rc} {statuses}",
              flush=True)


def sampled_in_use(shape: GroupedShape, m_max: int) -> tuple[list[int], list[int]]:
    """Up to 64 rows in use of a grouped call's ``out`` viewed as ``[rows, N]`` (masked: ``[G * m_max, N]``,
    ``rows`` in use per group), and the group of each."""
    layout, g, rows, _, _ = shape
    if layout == "contiguous":
        found = sample_rows(g * rows)
        return found, [r // rows for r in found]
    in_use = [gi * m_max + r for gi in range(g) for r in range(rows)]
    found = [in_use[i] for i in sample_rows(len(in_use))]
    return found, [r // m_max for r in found]


def torch_backend_out(inp: dict[str, Any]) -> torch.Tensor:
    """The torch backend's output of a grouped call (the public op, ``backend="torch"``) in a new tensor
    shaped as ``out`` (masked: rows past ``masked_m`` uninitialised)."""
    import deepport

    call = inp["call"]
    ref = torch.empty_like(inp["out"])
    a, b = (call.a.data, call.a.sf), (call.b.data, call.b.sf)
    if isinstance(call, ContiguousCall):
        deepport.m_grouped_fp8_gemm_nt_contiguous(a, b, ref, call.m_indices, backend="torch")
    else:
        deepport.m_grouped_fp8_gemm_nt_masked(a, b, ref, call.masked_m, call.expected_m, backend="torch")
    return ref


def grouped_checked(run: Callable[[], None], inp: dict[str, Any], rows: list[int], ref: torch.Tensor,
                    before: torch.Tensor | None) -> dict[str, Any]:
    """``run``'s output at ``rows`` of ``out`` viewed as ``[rows, N]`` against ``ref`` (float64
    ``[len(rows), N]``) with the dense part's bound, rows in use NaN before the call. Masked (``before``:
    ``out``'s shape, the content it holds before the call): rows past ``masked_m`` must keep it bit for bit."""
    out = inp["out"]
    out2d = out.view(-1, out.shape[-1])
    if before is None:
        return gemm.checked(run, out2d, rows, ref)
    call = inp["call"]
    past = torch.arange(out.shape[1], device=out.device)[None, :] >= call.masked_m[:, None]  # [G, M_max]
    out.copy_(before)
    out.masked_fill_(~past[:, :, None], float("nan"))
    run()
    synchronize(out.device)
    found = sampled_rows_check("out", out2d, ref, TOLERANCE, rows)
    found["untouched_past_masked_m"] = torch.equal(out.view(torch.int16)[past], before.view(torch.int16)[past])
    found["passed"] = found["passed"] and found["untouched_past_masked_m"]
    return found


def patch_mla_table(winners: dict[str, dict[str, Any]]) -> tuple[tuple[str, MLAConfig], ...]:
    """Make ``winners`` (bucket -> MLAConfig fields) the H200 entries of ``configs.py`` in this process;
    returns the entries it replaced."""
    saved = configs.MLA_TUNED["H200"]
    table = dict(saved)
    table.update({bucket: MLAConfig(**f) for bucket, f in winners.items()})
    configs.MLA_TUNED["H200"] = tuple(table.items())
    return saved


def warm_case(case_id: str, winners: dict[str, dict[str, Any]]) -> str | None:
    """Run one MLA conformance case on the GPU with ``winners`` patched in (compiles its specialisation)."""
    try:
        from deepport.conformance.suites import mla_decode as suite

        patch_mla_table(winners)
        case = next(c for c in suite.cases() if c.id == case_id)
        inputs = suite.generate(case, case.seed(0))
        tensors = {n: t.to("cuda") for n, t in inputs.tensors.items()}
        outputs = {n: torch.empty(shape, dtype=dtype, device="cuda")
                   for n, (shape, dtype) in suite.output_specs(inputs).items()}
        suite.invoke(inputs, tensors, "triton", outputs)
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return f"{case_id}: {type(exc).__name__}: {str(exc)[:200]}"


def short(entry: dict[str, Any]) -> str:
    if "skipped" in entry:
        return f"skipped ({entry['skipped']})"
    if "error" in entry:
        return "ERROR " + " ".join(entry["error"].split())[:160]
    if not entry.get("ok"):
        return f"WRONG {json.dumps({k: v for k, v in entry.items() if k not in ('fields',)}, default=str)[:200]}"
    figure = f"{entry['tflops']:.0f} TFLOP/s" + (f" {entry['gbs']:.0f} GB/s" if "gbs" in entry else "")
    return f"{entry['us']:.1f} us {figure} ({entry['method']})"


def table(results: dict[str, Any]) -> str:
    ceil = results["ceilings"]
    copy, bf16, fp8 = (ceil.get(k) or float("nan") for k in ("memory", "bf16_matmul", "fp8_matmul"))
    lines = [f"ceilings (this run): HBM copy {copy:.0f} GB/s, bf16 matmul {bf16:.0f} TFLOP/s, "
             f"fp8 matmul {fp8:.0f} TFLOP/s", "",
             f"{'MLA shape':32} {'config':22} {'us':>8} {'TFLOP/s':>8} {'%bf16':>6} {'GB/s':>6} {'%copy':>6} "
             f"{'x dflt':>6} {'x torch':>7}"]
    for r in results["mla"]:
        default = r["candidates"][0] if r["candidates"] else {}
        torch_us = r["torch"]["us"]
        lines.append(f"{r['shape']:32} {'torch backend':22} {torch_us:8.1f} {r['flops'] / torch_us / 1e6:8.1f}")
        for c in sorted(r["candidates"], key=lambda c: c.get("us", float("inf")) if c.get("ok") else float("inf")):
            tag = c["config"] + ("*" if c is default else "")
            if "us" not in c:
                lines.append(f"{'':32} {tag:22} {short(c)[:90]}")
                continue
            x_default = default.get("us", float("nan")) / c["us"]
            lines.append(f"{'':32} {tag:22} {c['us']:8.1f} {c['tflops']:8.1f} {100 * c['tflops'] / bf16:5.0f}% "
                         f"{c['gbs']:6.0f} {100 * c['gbs'] / copy:5.0f}% {x_default:6.2f} {torch_us / c['us']:7.1f}")
    lines += ["", f"{'FP8 m n k':34} {'config':36} {'us':>8} {'TFLOP/s':>8} {'%fp8':>5} {'x torch-be':>10} "
              f"{'x cuBLAS':>10}"]
    for r in results["fp8"]:
        peers = [("torch backend (cuBLAS)", r["torch_backend"]), ("cuBLAS raw scaled_mm", r["cublas_raw"])]
        lines += gemm_lines(f"m{r['m']} n{r['n']} k{r['k']}", peers, r["candidates"], fp8)
    lines += ["", f"{'grouped layout G x rows n k':34} {'config':36} {'us':>8} {'TFLOP/s':>8} {'%fp8':>5} "
              f"{'x torch-be':>10} {'x dense':>10}"]
    for r in results["grouped"]:
        dense = r["dense_same_total_m"]
        peers = [("torch backend", r["torch_backend"]), (f"dense m{r['total_m']} {dense['config']}", dense)]
        lines += gemm_lines(f"{r['layout']} {r['groups']}x{r['rows']} n{r['n']} k{r['k']}", peers, r["candidates"],
                            fp8)
    lines += ["", "* = the configuration configs.py / fp8_configs.py picks today"]
    return "\n".join(lines)


def gemm_lines(shape: str, peers: list[tuple[str, dict[str, Any]]], candidates: list[dict[str, Any]],
               fp8: float) -> list[str]:
    """A GEMM shape's rows of the table: its peers, then its candidates fastest first, each with its share
    of the fp8 ceiling and each peer's time over its own (* marks the first candidate, today's choice)."""
    lines = []
    for name, peer in peers:
        fig = f"{peer['us']:8.1f} {peer['tflops']:8.0f}" if "us" in peer else short(peer)[:90]
        lines.append(f"{shape:34} {name:36} {fig}")
    for c in sorted(candidates, key=lambda c: c.get("us", float("inf")) if c.get("ok") else float("inf")):
        tag = c["config"] + ("*" if c is candidates[0] else "")
        if "us" not in c:
            lines.append(f"{'':34} {tag:36} {short(c)[:90]}")
            continue
        ratios = " ".join(f"{peer.get('us', float('nan')) / c['us']:10.2f}" for _, peer in peers)
        lines.append(f"{'':34} {tag:36} {c['us']:8.1f} {c['tflops']:8.0f} {100 * c['tflops'] / fp8:4.0f}% {ratios}")
    return lines


def suggestions(results: dict[str, Any]) -> str:
    """The table entries that would make each shape's fastest checked candidate the default."""
    lines = ["suggested entries (fastest checked candidate per shape; edit configs.py / fp8_configs.py):"]
    for r in results["mla"]:
        if r.get("best"):
            f = r["best"]["fields"]
            lines.append(f"  {r['shape']:32} ({BUCKET_OF_KIND[r['kind']]!r}, MLAConfig(block_h={f['block_h']}, "
                         f"block_n={f['block_n']}, num_warps={f['num_warps']}, num_stages={f['num_stages']}, "
                         f"programs_per_sm={f['programs_per_sm']}, v_split={f['v_split']}, k_tma={f['k_tma']}))")
    for r in results["fp8"]:
        if r.get("best"):
            entry = gemm_entry(r["best"]["fields"])
            lines.append(f"  ({fp8_configs.m_bucket(r['m'])!r}, {r['n']}, {r['k']}): {entry},")
    for r in results["grouped"]:  # the bucket of M_sum / G (contiguous) or of expected_m (masked)
        if r.get("best"):
            table_name = "_H200_CONTIGUOUS" if r["layout"] == "contiguous" else "_H200_MASKED"
            lines.append(f"  {table_name} (G={r['groups']} x {r['rows']}) ({fp8_configs.m_bucket(r['rows'])!r}, "
                         f"{r['n']}, {r['k']}): {gemm_entry(r['best']['fields'])},")
    return "\n".join(lines)


def gemm_entry(fields: dict[str, Any]) -> str:
    """A ``GemmConfig``'s entry as ``fp8_configs.py`` writes it: ``_C(block_m, block_n, <fields not default>)``."""
    plain = GemmConfig(fields["block_m"], fields["block_n"])
    args = ", ".join(f"{k}={v!r}" for k, v in fields.items()
                     if v != getattr(plain, k) and k not in ("block_m", "block_n"))
    return f"_C({fields['block_m']}, {fields['block_n']}{', ' + args if args else ''})"


def device_run(args: argparse.Namespace, only: set[str]) -> int:
    sweep = Sweep(args.out, args.budget_s, "cpu" if args.cpu_smoke else "cuda")
    print(json.dumps({k: sweep.results[k] for k in ("device", "torch", "triton", "cuda")}), flush=True)
    if not args.cpu_smoke:
        sweep.compile_all(only, args.workers, share=0.45)
    sweep.save()
    sweep.ceilings()
    plan: list[tuple[str, Any]] = []
    if "mla" in only:
        plan += [("mla", n) for n, s in MLA_SHAPES.items() if s[5] == "cb"]
    if "fp8" in only:
        plan += [("fp8", s) for s in fp8_shapes() if s[0] >= FP8_LARGE_M]
    if "mla" in only:
        plan += [("mla", n) for n, s in MLA_SHAPES.items() if s[5] == "mb"]
    if "fp8" in only:
        plan += [("fp8", s) for s in fp8_shapes() if s[0] < FP8_LARGE_M]
    if "grouped" in only:
        plan += [("grouped", s) for s in grouped_shapes()]
    for kind, what in plan:
        if sweep.left() < 0:
            sweep.results["skipped"].append(f"{kind} {what}: budget")
            print(f"skipped {kind} {what}: budget", flush=True)
            continue
        try:
            if kind == "mla":
                sweep.results["mla"].append(sweep.mla_shape(what))
            elif kind == "fp8":
                sweep.results["fp8"].append(sweep.fp8_shape(*what))
            else:
                sweep.results["grouped"].append(sweep.grouped_shape(what))
        except Exception as exc:
            sweep.results["skipped"].append(f"{kind} {what}: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        sweep.save()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "certify" in only and "mla" in only:
        if sweep.left() > 0:
            sweep.certify_winners(args.certify_case, args.workers)
        else:
            sweep.results["skipped"].append("certify: budget")
    sweep.save()
    print("\n" + table(sweep.results) + "\n\n" + suggestions(sweep.results), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/triton-sweep"))
    parser.add_argument("--budget-s", type=float, default=185.0,
                        help="no stage, shape or candidate starts after this many seconds (compile stage: at most "
                             "45%% of it); the certify stage (about 40 s) starts only within it")
    parser.add_argument("--only", default="mla,fp8,certify", help="comma-separated: mla, fp8, grouped, certify")
    parser.add_argument("--workers", type=int, default=max(2, min(14, (os.cpu_count() or 4) - 2)))
    parser.add_argument("--certify-case", default=None, help="certify only cases matching this (--case)")
    parser.add_argument("--dry-run", action="store_true", help="compile every candidate for sm_90a on the CPU")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the device stages on CPU sizes under TRITON_INTERPRET=1 (tests this script)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        return dry_run(args.out, only, min(args.workers, 2))
    if args.cpu_smoke:
        use_cpu_smoke_sizes()
        args.certify_case = args.certify_case or "b3_sq4_hq16_hkv1_d576v512_p64_sk100_bfloat16"
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to compile the candidates for sm_90a", file=sys.stderr)
        return 2
    return device_run(args, only)


if __name__ == "__main__":
    sys.exit(main())
