"""Block-scaled FP8 GEMMs on OpenCL: dense ``fp8_gemm_{nt,nn,tn,tt}`` and the M-grouped contiguous and
masked layouts, all through the one kernel of ``fp8_gemm.cl``.

The op layer hands every dense call over in NT form (A ``[M, K]``, B ``[N, K]``, possibly transposed
views); staging copies the logical elements row-major, so the kernel always reads K-major rows and
row-major scale factors (MN-major SF layouts and their padding never reach the device). Scale factors
travel as their raw 32-bit words and are decoded in the kernel (float32 bits, or four UE8M0 exponent
bytes per word).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepport.backends.opencl import transfer
from deepport.backends.opencl.runtime import DeviceLimits, Runtime, get_runtime
from deepport.kernels._fp8_checks import SF_UE8M0
from deepport.kernels.fp8_gemm import FP8GemmCall
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall, ScaledOperand

SOURCE = "fp8_gemm.cl"
MODE_DENSE, MODE_CONTIGUOUS, MODE_MASKED = 0, 1, 2


@dataclass(frozen=True)
class GemmConfig:
    """Compile-time tile of ``fp8_gemm``: ``bm x bn`` outputs per work-group, ``bk`` K per step, 8 x 8 per
    thread."""

    bm: int
    bn: int
    bk: int

    def __post_init__(self) -> None:
        # every thread stages whole 16-byte K chunks of A and of B: the kernel's CHUNKS_A / CHUNKS_B
        if (self.bm * self.bk) % (16 * self.threads) or (self.bn * self.bk) % (16 * self.threads):
            raise ValueError(f"tile {self.bm}x{self.bn}x{self.bk}: {self.threads} threads cannot stage its "
                             f"{self.bm * self.bk // 16} + {self.bn * self.bk // 16} 16-byte chunks evenly")

    @property
    def threads(self) -> int:
        return (self.bm // 8) * (self.bn // 8)

    @property
    def local_bytes(self) -> int:
        return 4 * self.bk * (self.bm + self.bn)


_GPU_TILES = (GemmConfig(128, 128, 32), GemmConfig(64, 64, 32), GemmConfig(64, 64, 16), GemmConfig(32, 32, 16))
# A CPU driver runs a work-group's threads as loops between barriers: the 256-thread tile keeps 256 x 64
# accumulators in memory and ran 6x slower than 64 x 64 x 32 on PoCL (2 x86 cores, 2026-12-01: 2.2-2.5
# against 13-15 GFLOP/s at M x N x K = 256 x 512 x 1024, 1024 x 2048 x 2048 and 4096 x 576 x 7168).
_CPU_TILES = (GemmConfig(64, 64, 32), GemmConfig(32, 32, 16))


def choose_config(limits: DeviceLimits) -> GemmConfig:
    """On a GPU, 128 x 128 x 32 (256 threads, 32 KiB of local memory) where it fits, else smaller; on a CPU
    device, 64 x 64 x 32. ``bm`` always divides 128, so a tile of the contiguous layout never spans two
    groups."""
    for cfg in _GPU_TILES if limits.is_gpu else _CPU_TILES:
        if cfg.threads <= limits.max_work_group_size and cfg.local_bytes <= limits.local_mem_size:
            return cfg
    raise RuntimeError(f"deepport.opencl: no FP8 GEMM tile fits {limits.label}")


class GemmLaunch:
    """One ``fp8_gemm`` launch staged on the device (re-runnable through :meth:`enqueue`)."""

    def __init__(self, rt: Runtime, *, mode: int, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor,
                 sfb: torch.Tensor, sf_format: str, gran_n: int, rows: int, groups: int, out_shape: tuple[int, ...],
                 out_dtype: torch.dtype, m_index: torch.Tensor | None = None, c: torch.Tensor | None = None,
                 cfg: GemmConfig | None = None) -> None:
        self.rt, self.mode, self.rows, self.groups = rt, mode, rows, groups
        self.out_shape, self.out_dtype = out_shape, out_dtype
        self.n, self.k = int(b.shape[-2]), int(b.shape[-1])
        self.cfg = cfg or choose_config(rt.limits)
        self.kernel = rt.kernel(SOURCE, "fp8_gemm", {"BM": self.cfg.bm, "BN": self.cfg.bn, "BK": self.cfg.bk})
        rt.require_work_group(self.kernel, self.cfg.threads)
        self.sf_cols = int(sfa.shape[-1])
        self.ue8m0 = sf_format == SF_UE8M0
        self.gran_n = gran_n
        self.sfb_rows = int(sfb.shape[-2])
        dummy = np.zeros(4, dtype=np.int32)
        out_elems = int(np.prod(out_shape))
        self.buffers = {
            "a": transfer.upload(rt, a), "sfa": transfer.upload(rt, sfa), "b": transfer.upload(rt, b),
            "sfb": transfer.upload(rt, sfb),
            "index": transfer.upload(rt, dummy if m_index is None else m_index),
            "c": transfer.upload(rt, dummy if c is None else c),
            "out": transfer.scratch(rt, out_elems * (4 if out_dtype == torch.float32 else 2)),
        }
        self.has_c = c is not None

    def enqueue(self) -> Any:
        import pyopencl as cl

        i32, buf, cfg = np.int32, self.buffers, self.cfg
        self.kernel.set_args(buf["a"], buf["sfa"], buf["b"], buf["sfb"], buf["index"], buf["c"], buf["out"],
                             i32(self.mode), i32(self.rows), i32(self.n), i32(self.k), i32(self.sf_cols),
                             i32(self.ue8m0), i32(self.gran_n), i32(self.sfb_rows),
                             i32(self.out_dtype == torch.float32), i32(self.has_c), i32(self.k % 16 == 0))
        tiles_n = -(-self.n // cfg.bn)
        tiles_m = -(-self.rows // cfg.bm)
        z = self.groups if self.mode == MODE_MASKED else 1
        return cl.enqueue_nd_range_kernel(self.rt.queue, self.kernel, (tiles_n * cfg.threads, tiles_m, z),
                                          (cfg.threads, 1, 1))

    def result(self) -> torch.Tensor:
        """The whole output buffer as a CPU tensor of ``out_shape``."""
        return transfer.download(self.rt, self.buffers["out"], self.out_shape, self.out_dtype)


def dense_launch(rt: Runtime, call: FP8GemmCall, out_dtype: torch.dtype, cfg: GemmConfig | None = None) -> GemmLaunch:
    return GemmLaunch(rt, mode=MODE_DENSE, a=call.a, sfa=call.sfa, b=call.b.unsqueeze(0), sfb=call.sfb.unsqueeze(0),
                      sf_format=call.sf_format, gran_n=call.gran_n, rows=call.m, groups=1,
                      out_shape=(call.m, call.n), out_dtype=out_dtype, c=call.c, cfg=cfg)


def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Dense ``fp8_gemm_*`` (any layout, given in NT form); ``M >= 1`` here."""
    launch = dense_launch(get_runtime(), call, out.dtype)
    launch.enqueue()
    out.copy_(launch.result())


def _grouped(rt: Runtime, mode: int, a: ScaledOperand, b: ScaledOperand, index: torch.Tensor, rows: int,
             out_shape: tuple[int, ...]) -> GemmLaunch:
    return GemmLaunch(rt, mode=mode, a=a.data, sfa=a.sf, b=b.data, sfb=b.sf, sf_format=b.sf_format,
                      gran_n=b.gran_mn, rows=rows, groups=int(b.data.shape[0]), out_shape=out_shape,
                      out_dtype=torch.bfloat16, m_index=index)


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    """Every row of ``out`` is written: products for rows of a group, +0.0 for ``-1`` rows."""
    launch = _grouped(get_runtime(), MODE_CONTIGUOUS, call.a, call.b, call.m_indices, call.m_sum,
                      (call.m_sum, call.signature.n))
    launch.enqueue()
    out.copy_(launch.result())


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    """Rows ``< masked_m[g]`` of ``out[g]`` are written; the others keep their bits (never copied back)."""
    masked = call.masked_m_host if call.masked_m_host is not None else call.masked_m.cpu().numpy()
    groups = int(call.a.data.shape[0])
    launch = _grouped(get_runtime(), MODE_MASKED, call.a, call.b, call.masked_m, call.m_max,
                      (groups, call.m_max, call.signature.n))
    launch.enqueue()
    result = launch.result()
    for g, rows in enumerate(int(x) for x in masked):
        if rows:
            out[g, :rows].copy_(result[g, :rows])
