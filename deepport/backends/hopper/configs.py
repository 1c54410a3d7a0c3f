"""Kernel configurations of the sm90 FP8 GEMM and the per-shape choice among them.

A :class:`GemmConfig` fixes the compile-time parameters of ``kernels/sm90_fp8_gemm.cu``: the tile
(``BLOCK_M`` x ``BLOCK_N``), the pipeline depth, the variant (dense, grouped contiguous, grouped
masked) and the rasterisation group. :func:`choose` takes a measured winner from :data:`TUNED` (the
DeepSeek-V3 shapes on an H200) or else picks the tile with a traffic model in the manner of DeepGEMM's
SM90 heuristic: for each candidate, the bytes the tiles pull through L2 and shared memory, divided
by the fraction of the last wave that is busy; the smallest wins. ``BLOCK_M`` 64 (one consumer
warpgroup) serves small M; 256 (two warpgroups of two 64-row waves, ``BLOCK_N <= 128``) pulls the
fewest bytes per FLOP and wins at large M (measured: 1.2-1.4x over 128x160 at M=4096, where the
kernel is bound by operand traffic from L2); ``BLOCK_N`` from 16 to 160 in steps of 16 lets a small
problem still spread over every SM. Stages fill the shared memory.

``cluster_n = 2`` (opt-in, never chosen by :func:`choose` unless a :data:`TUNED` entry names it; not yet
measured) runs the kernel in 2-CTA clusters that take a pair of tiles side by side along N (one m block,
n blocks ``2u`` and ``2u + 1``) and TMA-multicast the shared A tile: each CTA loads half of its rows into
both CTAs' shared memory, so a pair pulls ``BLOCK_M + 2 BLOCK_N`` rows of operands from L2 per K
instead of ``2 (BLOCK_M + BLOCK_N)`` (256x128: 0.67x). The pair is along N, sharing A, rather than along
M sharing B, because A is the larger operand of the tiles that win at large M (256 rows) and because
two tiles of one m block always belong to the same group (contiguous: same expert, masked: same
group), so every pair can multicast, with no per-pair fallback; an odd number of n blocks leaves the
last pair's second CTA a tile past N that it computes but does not store.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

VARIANT_DENSE = 0
VARIANT_CONTIGUOUS = 1
VARIANT_MASKED = 2
VARIANT_NAMES = {VARIANT_DENSE: "dense", VARIANT_CONTIGUOUS: "contiguous", VARIANT_MASKED: "masked"}

SMEM_CAPACITY = 232448  # bytes of dynamic shared memory one block may opt into on sm_90
SMEM_ALIGN_SLACK = 1024  # the kernel aligns its base to 1024 bytes inside the allocation
MAX_STAGES = 10
MIN_STAGES = 3
BLOCK_K = 128
BLOCK_MS = (64, 128, 256)
BLOCK_NS = tuple(range(16, 161, 16))  # 160: two 80-register accumulator sets stay within 232 registers
MAX_BLOCK_N_256 = 128  # 256-row tiles keep two wave totals and one block accumulator: 3 x 64 registers
GROUP_M = 16
CLUSTER_NS = (1, 2)


def stage_bytes(block_m: int, block_n: int) -> int:
    """Shared memory of one pipeline stage: A and B tiles, the SFA column, 16 bytes of SFB, 2 mbarriers."""
    return (block_m + block_n) * BLOCK_K + block_m * 4 + 16 + 2 * 8


def max_stages(block_m: int, block_n: int) -> int:
    return min(MAX_STAGES, (SMEM_CAPACITY - SMEM_ALIGN_SLACK) // stage_bytes(block_m, block_n))


@dataclass(frozen=True)
class GemmConfig:
    """Compile-time parameters of one FP8 GEMM kernel."""

    block_m: int
    block_n: int
    stages: int
    variant: int
    group_m: int = GROUP_M
    cluster_n: int = 1  # 2: 2-CTA clusters along N multicasting the A tile (opt-in, unmeasured)

    def __post_init__(self) -> None:
        if self.block_m not in BLOCK_MS:
            raise ValueError(f"block_m must be one of {BLOCK_MS}, got {self.block_m}")
        if self.block_n % 8 or not 8 <= self.block_n <= 256:
            raise ValueError(f"block_n must be a multiple of 8 in [8, 256], got {self.block_n}")
        if not 1 <= self.stages <= max_stages(self.block_m, self.block_n):
            raise ValueError(f"stages must be in [1, {max_stages(self.block_m, self.block_n)}], got {self.stages}")
        if self.variant not in VARIANT_NAMES:
            raise ValueError(f"variant must be one of {sorted(VARIANT_NAMES)}, got {self.variant}")
        if self.block_m == 256 and (self.block_n > MAX_BLOCK_N_256 or self.variant == VARIANT_CONTIGUOUS):
            raise ValueError(f"256-row tiles need block_n <= {MAX_BLOCK_N_256} and a dense or masked variant "
                             f"(contiguous groups align to 128 rows), got {self}")
        if self.cluster_n not in CLUSTER_NS:
            raise ValueError(f"cluster_n must be one of {CLUSTER_NS}, got {self.cluster_n}")

    @property
    def threads(self) -> int:
        """One producer warpgroup plus one consumer warpgroup per 64 rows, at most two (256-row tiles run
        two 64-row waves per consumer warpgroup)."""
        return 128 + 128 * min(2, self.block_m // 64)

    @property
    def smem_bytes(self) -> int:
        return SMEM_ALIGN_SLACK + self.stages * stage_bytes(self.block_m, self.block_n)

    @property
    def a_box_rows(self) -> int:
        """Rows of the A tensor map's box: the slice of the A tile one CTA of a cluster loads."""
        return self.block_m // self.cluster_n

    def defines(self) -> tuple[str, ...]:
        """NVRTC defines; ``CLUSTER_N`` only when clustered, so the unclustered kernels compile as before."""
        cluster = (f"-DCLUSTER_N={self.cluster_n}",) if self.cluster_n != 1 else ()
        return (f"-DBLOCK_M={self.block_m}", f"-DBLOCK_N={self.block_n}", f"-DNUM_STAGES={self.stages}",
                f"-DVARIANT={self.variant}", f"-DGROUP_M={self.group_m}", *cluster)

    def grid(self, m_blocks: int, n_blocks: int, num_sms: int) -> int:
        """CTAs of the persistent launch over ``m_blocks`` x ``n_blocks`` tiles (``m_blocks`` summed over
        the groups): one per tile up to one per SM, and with clusters one cluster per pair of tiles
        (``ceil(n_blocks / cluster_n)`` pairs per m block) up to ``num_sms // cluster_n`` clusters, so the
        grid is always a multiple of the cluster size."""
        units = m_blocks * ceil_div(n_blocks, self.cluster_n)
        return self.cluster_n * max(1, min(units, num_sms // self.cluster_n))

    def __str__(self) -> str:
        cluster = f" cluster {self.cluster_n}" if self.cluster_n != 1 else ""
        return f"{VARIANT_NAMES[self.variant]} {self.block_m}x{self.block_n} {self.stages} stages{cluster}"


MULTICAST_SWEEP: dict[int, tuple[tuple[int, int, int], ...]] = {
    # variant -> tiles (block_m, block_n, group_m) that scripts/gpu_hopper_gemm.py's sweep tries with
    # cluster_n = 2 next to the unclustered ones (each float64-checked before it is timed), and that
    # tests/test_hopper_multicast_compile.py compiles. Dense 64-row tiles serve M <= 128.
    VARIANT_DENSE: ((256, 128, 8), (256, 128, 16), (256, 96, 16), (256, 64, 16), (128, 128, 16), (128, 144, 16),
                    (128, 160, 16), (64, 16, 16), (64, 32, 16), (64, 64, 16), (64, 128, 16)),
    VARIANT_CONTIGUOUS: ((128, 128, 16), (128, 144, 16), (128, 160, 16), (128, 160, 8)),
    VARIANT_MASKED: ((256, 128, 16), (256, 96, 16), (128, 128, 16), (64, 128, 16)),
}


def multicast_configs() -> list[GemmConfig]:
    """Every cluster-2 configuration of :data:`MULTICAST_SWEEP` (stages filling the shared memory)."""
    return [GemmConfig(bm, bn, max_stages(bm, bn), variant, gm, 2)
            for variant, tiles in MULTICAST_SWEEP.items() for bm, bn, gm in tiles]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _cost(m: int, n: int, k: int, groups: int, block_m: int, block_n: int, num_sms: int) -> float:
    """Modelled cycles: tile traffic through L2 and shared memory over the busy fraction of the waves."""
    blocks = ceil_div(m, block_m) * ceil_div(n, block_n) * groups
    waves = ceil_div(blocks, num_sms)
    efficiency = blocks / (waves * num_sms)
    k_pad = ceil_div(k, BLOCK_K) * BLOCK_K
    out_bytes = block_m * block_n * 2
    l2_bytes = k_pad * (block_m + block_n) + out_bytes
    smem_bytes = k_pad * (block_m + block_n) + k_pad * (max(64, block_m) + block_n) + out_bytes
    l2_per_cycle = min(64.0 * num_sms, 8e6 / 1.3e3)
    smem_per_cycle = 128.0 * num_sms
    cycles = max(l2_bytes * blocks / l2_per_cycle, smem_bytes * blocks / smem_per_cycle)
    return cycles / efficiency


TunedKey = tuple[int, int, int, int, int, int]  # (variant, m, n, k, groups, num_sms)
TUNED: dict[TunedKey, tuple[int, ...]] = {
    # The fastest tile of a sweep on an H200 (132 SMs), each candidate float64-checked before it was
    # timed: scripts/gpu_hopper_gemm.py, benchmarks/results/2026-12-01-h200-hopper-gemm/run2/sweep.json.
    # m is rows per group (contiguous: M_sum / G; masked: min(expected_m, M_max)).
    (VARIANT_DENSE, 64, 2112, 7168, 1, 132): (64, 16, 16),  # m64_n2112_k7168
    (VARIANT_DENSE, 64, 576, 7168, 1, 132): (64, 16, 16),  # m64_n576_k7168
    (VARIANT_DENSE, 64, 24576, 1536, 1, 132): (64, 64, 16),  # m64_n24576_k1536
    (VARIANT_DENSE, 64, 32768, 512, 1, 132): (64, 128, 16),  # m64_n32768_k512
    (VARIANT_DENSE, 64, 7168, 16384, 1, 132): (64, 64, 16),  # m64_n7168_k16384
    (VARIANT_DENSE, 64, 4096, 7168, 1, 132): (64, 32, 16),  # m64_n4096_k7168
    (VARIANT_DENSE, 64, 7168, 2048, 1, 132): (64, 64, 16),  # m64_n7168_k2048
    (VARIANT_DENSE, 128, 2112, 7168, 1, 132): (64, 32, 16),  # m128_n2112_k7168
    (VARIANT_DENSE, 128, 576, 7168, 1, 132): (64, 16, 16),  # m128_n576_k7168
    (VARIANT_DENSE, 128, 24576, 1536, 1, 132): (128, 96, 16),  # m128_n24576_k1536
    (VARIANT_DENSE, 128, 32768, 512, 1, 132): (128, 128, 16),  # m128_n32768_k512
    (VARIANT_DENSE, 128, 7168, 16384, 1, 132): (64, 128, 16),  # m128_n7168_k16384
    (VARIANT_DENSE, 128, 4096, 7168, 1, 132): (64, 64, 16),  # m128_n4096_k7168
    (VARIANT_DENSE, 128, 7168, 2048, 1, 132): (128, 64, 16),  # m128_n7168_k2048
    (VARIANT_DENSE, 4096, 2112, 7168, 1, 132): (256, 96, 16),  # m4096_n2112_k7168
    (VARIANT_DENSE, 4096, 576, 7168, 1, 132): (128, 144, 16),  # m4096_n576_k7168
    (VARIANT_DENSE, 4096, 24576, 1536, 1, 132): (256, 128, 16),  # m4096_n24576_k1536
    (VARIANT_DENSE, 4096, 32768, 512, 1, 132): (256, 128, 8),  # m4096_n32768_k512
    (VARIANT_DENSE, 4096, 7168, 16384, 1, 132): (256, 128, 8),  # m4096_n7168_k16384
    (VARIANT_DENSE, 4096, 4096, 7168, 1, 132): (256, 128, 8),  # m4096_n4096_k7168
    (VARIANT_DENSE, 4096, 7168, 2048, 1, 132): (256, 128, 8),  # m4096_n7168_k2048
    (VARIANT_CONTIGUOUS, 8192, 4096, 7168, 4, 132): (128, 128, 16),  # g4_m8192_n4096_k7168
    (VARIANT_CONTIGUOUS, 8192, 7168, 2048, 4, 132): (128, 128, 16),  # g4_m8192_n7168_k2048
    (VARIANT_CONTIGUOUS, 4096, 4096, 7168, 8, 132): (128, 128, 16),  # g8_m4096_n4096_k7168
    (VARIANT_CONTIGUOUS, 4096, 7168, 2048, 8, 132): (128, 128, 16),  # g8_m4096_n7168_k2048
    (VARIANT_MASKED, 1024, 4096, 7168, 1, 132): (256, 128, 16),  # g1_m1024_n4096_k7168
    (VARIANT_MASKED, 1024, 7168, 2048, 1, 132): (256, 128, 16),  # g1_m1024_n7168_k2048
    (VARIANT_MASKED, 512, 4096, 7168, 2, 132): (256, 128, 16),  # g2_m512_n4096_k7168
    (VARIANT_MASKED, 512, 7168, 2048, 2, 132): (256, 128, 16),  # g2_m512_n7168_k2048
    (VARIANT_MASKED, 256, 4096, 7168, 4, 132): (256, 128, 16),  # g4_m256_n4096_k7168
    (VARIANT_MASKED, 256, 7168, 2048, 4, 132): (256, 128, 16),  # g4_m256_n7168_k2048
}
"""Measured winners, ``(variant, m, n, k, groups, num_sms) -> (block_m, block_n, group_m[, cluster_n])``,
consulted before the model (see :func:`choose`); ``cluster_n`` is 1 where left out."""


@functools.lru_cache(maxsize=1024)
def choose(m: int, n: int, k: int, variant: int, num_sms: int, groups: int = 1) -> GemmConfig:
    """The configuration for ``groups`` GEMMs of ``m x n x k`` (``m``: rows per group, or the expected
    rows for the masked layout) on a device with ``num_sms`` multiprocessors: a measured winner from
    :data:`TUNED` if there is one, else the model's choice (cached per shape)."""
    tuned = TUNED.get((variant, m, n, k, groups, num_sms))
    if tuned is not None:
        block_m, block_n, group_m, *cluster = tuned
        return GemmConfig(block_m, block_n, max_stages(block_m, block_n), variant, group_m, *cluster)
    return _modelled(m, n, k, variant, num_sms, groups)


def _modelled(m: int, n: int, k: int, variant: int, num_sms: int, groups: int) -> GemmConfig:
    block_ms = (128,) if variant == VARIANT_CONTIGUOUS else BLOCK_MS  # contiguous segments align to 128
    best: tuple[float, int, GemmConfig] | None = None
    for block_m in block_ms:
        for block_n in BLOCK_NS:
            if block_m == 256 and block_n > MAX_BLOCK_N_256:
                continue
            stages = max_stages(block_m, block_n)
            if stages < MIN_STAGES:
                continue
            cost = _cost(max(m, 1), n, k, groups, block_m, block_n, num_sms)
            candidate = (cost, -block_m * block_n, GemmConfig(block_m, block_n, stages, variant))
            if best is None or candidate[:2] < best[:2]:
                best = candidate
    assert best is not None
    return best[2]
