"""Kernel configurations of the Triton FP8 GEMMs, as data: tuned per GPU and shape bucket, a default otherwise.

A configuration is chosen per call from the device name (``torch.cuda.get_device_properties().name``,
e.g. ``"NVIDIA H200"``), the op kind and the shape: M falls into a bucket (``m<=64``, ``m<=128``,
``m<=1024``, ``large``), N and K are matched exactly. The tuned tables were measured on the GPU named
(scripts/gpu_triton_gemm.py, scripts/gpu_triton_sweep.py; figures under benchmarks/results/); a call with
no tuned entry gets :func:`default_config`. Each distinct choice is logged once (logger ``deepport.triton``, INFO).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from types import MappingProxyType

from deepport.kernels.fp8_layout import ceil_div

_log = logging.getLogger("deepport.triton")

DENSE = "dense"
CONTIGUOUS = "contiguous"
MASKED = "masked"
M_BUCKETS: tuple[tuple[int, str], ...] = ((64, "m<=64"), (128, "m<=128"), (1024, "m<=1024"))
LARGE = "large"


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of one FP8 GEMM kernel.

    ``block_m`` x ``block_n`` output tile (K steps are 128, one scale block), ``num_warps`` and
    ``num_stages`` (software-pipelining depth of the K loop), ``group_m`` M tiles that sweep N together,
    ``split_k`` slices of the K blocks (dense only; > 1 adds a reduction kernel; 0 = choose from the
    shape), ``split_n``: 2 computes each tile as two halves along N with one accumulator each (fewer
    registers per thread), ``tma``: load operands through tensor descriptors where their layout allows,
    ``waves``: persistent programs per multiprocessor (masked kernel), ``maxnreg``: a register cap per
    thread (``None``: the compiler's choice), ``tail_split``: the tiles of the last, partial wave each split
    over that many K ranges (dense only, when ``split_k`` resolves to 1; 1 = off, 0 = choose from the
    shape; see :func:`tail_plan`).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1
    tma: bool = True
    waves: int = 2
    split_n: int = 1
    maxnreg: int | None = None
    tail_split: int = 1

    @property
    def label(self) -> str:
        split = "auto" if self.split_k == 0 else str(self.split_k)
        halves = "x2" if self.split_n == 2 else ""
        regs = f"r{self.maxnreg}" if self.maxnreg else ""
        tail = "" if self.tail_split == 1 else f"t{'auto' if self.tail_split == 0 else self.tail_split}"
        return (f"m{self.block_m}n{self.block_n}{halves}w{self.num_warps}s{self.num_stages}g{self.group_m}k{split}"
                f"{'tma' if self.tma else 'ptr'}{regs}{tail}")

    def launch_options(self) -> dict[str, int]:
        """``num_warps``, ``num_stages`` (and ``maxnreg``) for a Triton launch."""
        found = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            found["maxnreg"] = self.maxnreg
        return found


def m_bucket(m: int) -> str:
    """The M bucket of a call (decode batches, small prefill, large)."""
    for limit, name in M_BUCKETS:
        if m <= limit:
            return name
    return LARGE


_C = GemmConfig
# 128x128 tiles as two 64-wide halves capped at 128 registers per thread: two 8-warp programs per SM
_HALVES = _C(128, 128, 8, 3, split_n=2, maxnreg=128)
# Measured on an H200 (132 SMs, triton 3.6, 2026-12-01; benchmarks/results/2026-12-01-h200-triton-gemm/):
# the fastest configuration of the sweep per shape, every one checked against float64 first; the three
# tail-split and group_m=16 entries of the large bucket from the second sweep (benchmarks/results/
# 2026-12-01-h200-tune/: 847 against 764 TFLOP/s at 2112 x 7168) and the third (benchmarks/results/
# 2026-12-02-h200-tune/: 576 x 7168 with tail split 4, 669 against 527 TFLOP/s; 7168 x 16384 without a tail
# split, 909 against 768-790 for the split ones, which the second sweep had measured 873 against 825).
_H200_DENSE: Mapping[tuple[str, int, int], GemmConfig] = MappingProxyType({
    ("m<=64", 2112, 7168): _C(64, 64, 4, 5, split_k=4),
    ("m<=64", 576, 7168): _C(64, 64, 4, 5, split_k=8),
    ("m<=64", 24576, 1536): _C(64, 128, 4, 4),
    ("m<=64", 32768, 512): _C(64, 128, 4, 4),
    ("m<=64", 7168, 16384): _C(64, 128, 4, 4, split_k=3),
    ("m<=64", 4096, 7168): _C(64, 64, 4, 5, split_k=3),
    ("m<=64", 7168, 2048): _C(64, 64, 4, 5),
    ("m<=128", 2112, 7168): _C(64, 64, 4, 5, split_k=2),
    ("m<=128", 576, 7168): _C(64, 64, 4, 5, split_k=8),
    ("m<=128", 24576, 1536): _C(64, 128, 4, 3, tma=False),
    ("m<=128", 32768, 512): _C(64, 128, 4, 4),
    ("m<=128", 7168, 16384): _C(64, 64, 4, 5),
    ("m<=128", 4096, 7168): _C(64, 128, 4, 4, split_k=3),
    ("m<=128", 7168, 2048): _C(64, 64, 4, 5),
    ("m<=1024", 4096, 7168): _HALVES,
    ("m<=1024", 7168, 2048): _HALVES,
    ("large", 2112, 7168): _C(128, 128, 8, 4, tail_split=8),
    ("large", 576, 7168): _C(128, 128, 8, 4, tail_split=4),
    ("large", 24576, 1536): _HALVES,
    ("large", 32768, 512): _C(64, 128, 4, 3),
    ("large", 7168, 16384): _C(128, 128, 8, 4),
    ("large", 4096, 7168): replace(_HALVES, group_m=16),
    ("large", 7168, 2048): _HALVES,
})
# M-grouped: the fastest checked candidate summed over the grouped bench shapes sharing a key (H200, triton 3.6,
# 2026-12-01; benchmarks/results/2026-12-01-h200-triton-grouped-sweep/). The contiguous kernel spills under the
# dense winner's 128-register cap (558 against 806 TFLOP/s at N x K = 7168 x 2048), so it runs uncapped.
_H200_CONTIGUOUS: Mapping[tuple[str, int, int], GemmConfig] = MappingProxyType({  # bucket of M_sum / G
    ("large", 4096, 7168): _C(128, 128, 8, 3, group_m=16, split_n=2),
    ("large", 7168, 2048): _C(128, 128, 8, 3, group_m=16, split_n=2),
})
_H200_MASKED: Mapping[tuple[str, int, int], GemmConfig] = MappingProxyType({  # bucket of expected_m
    ("m<=1024", 4096, 7168): _C(64, 128, 4, 4, waves=2),
    ("m<=1024", 7168, 2048): replace(_HALVES, waves=3),
})

TUNED: Mapping[str, Mapping[str, Mapping[tuple[str, int, int], GemmConfig]]] = MappingProxyType({
    "NVIDIA H200": MappingProxyType({DENSE: _H200_DENSE, CONTIGUOUS: _H200_CONTIGUOUS, MASKED: _H200_MASKED}),
})
"""device name -> op kind -> (M bucket, N, K) -> configuration."""


def default_config(kind: str, m: int) -> GemmConfig:
    """The configuration of a GPU or shape with no tuned entry (``m``: rows, or masked's expected_m): the
    H200 sweep's most frequent winner per kind and M range, without settings tied to one chip."""
    if kind == MASKED:
        return _C(64, 128, 4, 4, waves=3)
    if kind == DENSE and m <= 64:
        return _C(64, 64, 4, 5, split_k=0)
    if kind == DENSE and m <= 128:
        return _C(64, 128, 4, 4, split_k=0)
    return _C(128, 128, 8, 4)


def auto_split_k(m: int, n: int, k: int, config: GemmConfig, multiprocessors: int) -> int:
    """Slices of K that bring the tile count near one wave of ``multiprocessors`` (each slice keeps at
    least 4 K blocks; at most 8 slices); 1 when the tiles alone fill the device."""
    tiles = ceil_div(m, config.block_m) * ceil_div(n, config.block_n)
    k_blocks = ceil_div(k, 128)
    if tiles * 2 > multiprocessors:
        return 1
    return max(1, min(8, ceil_div(multiprocessors, tiles), k_blocks // 4))


# One Hopper multiprocessor (H100 / H200): 228 KiB of shared memory (1 KiB of it reserved per program), 64 Ki
# 32-bit registers. Other GPUs hold fewer programs; the estimate then only makes the tail split's wave too large.
_SMEM_PER_SM = 228 * 1024
_REGS_PER_SM = 64 * 1024


def resident_programs(config: GemmConfig) -> int:
    """Programs of the dense kernel with ``config`` assumed to run at once on one multiprocessor: the
    fewer of what its shared memory holds (``num_stages`` A and B tiles of 128 e4m3 K bytes a row) and
    what its registers hold (``maxnreg`` per thread, or 255 when uncapped: the compiler may take them
    all). 128 x 128 tiles of 8 warps: 1; the two-halves tiles capped at 128 registers: 2."""
    smem = config.num_stages * (config.block_m + config.block_n) * 128 + 1024
    regs = config.num_warps * 32 * (config.maxnreg or 255)
    return max(1, min(_SMEM_PER_SM // smem, _REGS_PER_SM // regs))


def tail_plan(m: int, n: int, k: int, config: GemmConfig, slots: int) -> tuple[int, int, int]:
    """``(full, tail, s)`` of a dense call without split-K: the first ``full`` tiles (in the kernel's tile
    order) fill whole waves of ``slots`` programs and are computed whole, the last ``tail`` each over
    ``s`` K ranges. ``tail_split`` 0 picks the ``s`` (at most 8, each piece keeping at least 4 K blocks)
    that finishes the tail soonest in whole-tile times, ``ceil(tail * s / slots) / s`` (the pieces run in
    waves of ``slots``), the smallest on ties: ``tail * s`` up to one wave when some ``s`` > 1 fits, and no
    split when none gains. Any ``s`` is capped at the K blocks. ``(tiles, 0, 1)`` when nothing is split
    (``tail_split`` 1, no partial wave, or ``s`` = 1)."""
    tiles = ceil_div(m, config.block_m) * ceil_div(n, config.block_n)
    full = tiles // slots * slots
    tail = tiles - full
    k_blocks = ceil_div(k, 128)
    if config.tail_split == 1 or tail == 0:
        return tiles, 0, 1
    s = config.tail_split
    if s == 0:
        def finish(ways: int) -> tuple[Fraction, int]:
            return Fraction(ceil_div(tail * ways, slots), ways), ways

        s = min(range(1, max(1, min(8, k_blocks // 4)) + 1), key=finish)
    s = min(s, k_blocks)
    return (tiles, 0, 1) if s <= 1 else (full, tail, s)


def resolved(config: GemmConfig, m: int, n: int, k: int, multiprocessors: int) -> GemmConfig:
    """A dense ``config`` with ``split_k`` and ``tail_split`` 0 (choose from the shape) made concrete on a
    device of ``multiprocessors``; ``tail_split`` 1 where split-K is on (the two do not combine)."""
    split = config.split_k or auto_split_k(m, n, k, config, multiprocessors)
    tail = 1
    if split == 1 and config.tail_split != 1:
        tail = config.tail_split or tail_plan(m, n, k, config, multiprocessors * resident_programs(config))[2]
    return replace(config, split_k=split, tail_split=tail)


_lock = threading.Lock()
_logged: set[tuple[object, ...]] = set()


def choose(kind: str, device_name: str, multiprocessors: int, m: int, n: int, k: int) -> GemmConfig:
    """The configuration for one call (``kind``: :data:`DENSE`, :data:`CONTIGUOUS` or :data:`MASKED`;
    ``m``: the call's rows, or masked's ``expected_m``), logged once per distinct choice."""
    bucket = m_bucket(m)
    tuned = TUNED.get(device_name, {}).get(kind, {}).get((bucket, n, k))
    config = tuned if tuned is not None else default_config(kind, m)
    if kind == DENSE:
        config = resolved(config, m, n, k, multiprocessors)
    elif config.split_k == 0:
        config = replace(config, split_k=1)
    key = (kind, device_name, bucket, n, k, config)
    with _lock:
        new = key not in _logged
        _logged.add(key)
    if new:
        source = "tuned" if tuned is not None else "default (no tuned entry)"
        _log.info("triton fp8 %s GEMM on %s, %s n=%d k=%d: %s config %s", kind, device_name, bucket, n, k, source,
                  config.label)
    return config
