"""Tuned launch configurations of the Triton kernels, as data: per GPU family and shape bucket.

A family key matches as a case-insensitive substring of the device name (``torch.cuda.get_device_name``);
a device or bucket with no entry takes ``DEFAULT``. The choice is logged once per device and bucket
(logger ``deepport.backends.triton``, INFO). Figures behind the entries: benchmarks/results/. Candidates
for an entry are swept, checked and timed in one device call by ``scripts/gpu_triton_sweep.py``, which
prints the entry that makes each shape's fastest checked candidate the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepport.backends.triton import _runtime


@dataclass(frozen=True)
class MLAConfig:
    """Launch shape of the MLA decode split kernel: ``block_h`` query rows per program, ``block_n`` KV
    tokens per step, triton's ``num_warps`` / ``num_stages`` (software pipelining depth), and
    ``programs_per_sm``: the split-KV plan deals the batch to ``SMs * programs_per_sm / (h_kv *
    row tiles * v_split)`` parts (1 reproduces FlashMLA's ``num_sm_parts`` at ``block_h = 64``).
    ``v_split`` = 2: two programs per row tile, each owning half of the ``d_v`` output channels (each
    computes the whole ``QK^T``; 1 is used where a half would have fewer than 16 channels). ``k_tma``:
    K tiles are loaded by bulk tensor copies (Hopper's TMA, no per-element addresses) where the cache
    layout allows it (one KV head, ``page % block_n == 0``, power-of-two channel parts, 16-byte aligned
    rows: ``mla_decode.k_descriptors``), else through pointers."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1
    v_split: int = 1
    k_tma: bool = False

    def __post_init__(self) -> None:
        if self.v_split not in (1, 2):
            raise ValueError(f"MLAConfig.v_split: expected 1 or 2, got {self.v_split}")

    @property
    def label(self) -> str:
        """Short name, e.g. ``h64n64w8s2p1`` (``v2``: split V, ``tma``: K by bulk copies)."""
        return (f"h{self.block_h}n{self.block_n}w{self.num_warps}s{self.num_stages}p{self.programs_per_sm}"
                f"{'v2' if self.v_split == 2 else ''}{'tma' if self.k_tma else ''}")


def mla_bucket(q_rows: int) -> str:
    """Shape bucket of an MLA decode call: the query rows per KV head (``s_q * h_q / h_kv``).
    Up to 16 rows the kernel streams the cache (memory-bound); from 64 on it is compute-bound."""
    if q_rows <= 16:
        return "rows<=16"
    if q_rows <= 32:
        return "rows<=32"
    return "rows>32"


_MLA_PORTABLE: tuple[tuple[str, MLAConfig], ...] = (
    # every K tile loaded through pointers (no TMA): runs on any GPU triton targets
    ("rows<=16", MLAConfig(block_h=16, block_n=64, num_warps=8, num_stages=3)),
    ("rows<=32", MLAConfig(block_h=32, block_n=64, num_warps=8, num_stages=2)),
    ("rows>32", MLAConfig(block_h=64, block_n=64, num_warps=8, num_stages=2)),
)

_MLA_HOPPER: tuple[tuple[str, MLAConfig], ...] = (
    # Winners of the H200 sweep of 2026-12-01 (benchmarks/results/2026-12-01-h200-triton-sweep), each checked
    # there against the torch backend on full-size shapes before it was timed.
    # memory-bound: mma.sync on 16 rows, two 64-token K tiles in flight, two programs per SM (90 KiB each):
    # 2.95-3.47 TB/s, 1.03-1.15x the previous entry (block_n=64, 8 warps, 3 stages, one program per SM).
    ("rows<=16", MLAConfig(block_h=16, block_n=64, num_warps=4, num_stages=2, programs_per_sm=2)),
    ("rows<=32", MLAConfig(block_h=32, block_n=64, num_warps=8, num_stages=2)),
    # compute-bound: wgmma on 64 rows (two warpgroups split the 512 output channels), Q resident in shared
    # memory, K tiles by TMA where the cache layout allows it (one KV head, 16-byte aligned rows, else
    # pointers): 266 TFLOP/s (s_q=1) and 220 TFLOP/s (s_q=2 causal), 1.18x and 1.09x the pointer-loaded tiles.
    ("rows>32", MLAConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, k_tma=True)),
)

MLA_DEFAULT: tuple[tuple[str, MLAConfig], ...] = _MLA_PORTABLE
"""Other GPUs (untuned): the Hopper tiles without TMA."""

MLA_TUNED: dict[str, tuple[tuple[str, MLAConfig], ...]] = {"H200": _MLA_HOPPER, "H100": _MLA_HOPPER}

INTERPRETER = MLAConfig(block_h=16, block_n=64, num_warps=4, num_stages=1)
"""Under TRITON_INTERPRET the tile shape only sets how many numpy steps run: large tiles, few steps."""


def mla_config(device_name: str, q_rows: int) -> MLAConfig:
    """The MLA decode configuration for ``q_rows`` query rows per KV head on ``device_name``."""
    bucket = mla_bucket(q_rows)
    if _runtime.interpreting():
        return MLAConfig(min(max(16, _next_pow2(q_rows)), 64), INTERPRETER.block_n, 4, 1)
    return _runtime.pick_config(MLA_TUNED, MLA_DEFAULT, device_name, bucket, "mla_decode")


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
