"""``fp8_gemm_nt`` bench configs: DeepSeek-V3's projection shapes (DeepGEMM's) and tiny CPU ones.

Inputs (generated on the device from the seed): X ``[M, K]`` and W ``[N, K]`` ~ N(0, 1) in float32,
quantized by ``per_token_cast_to_fp8`` (A: 1x128 SFs) and ``per_block_cast_to_fp8`` (B: 128x128 SFs),
the DeepSeek-V3 inference recipe; D ``[M, N]`` bf16. The float64 check recomputes up to 64 output rows
spread over M (rows of a GEMM are independent) from the exact dequantized operands.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.bench import counting
from deepport.bench.check import sample_rows, sampled_rows_check
from deepport.bench.configs import BenchConfig, Workload, bound_runner
from deepport.conformance.tolerance import Tolerance
from deepport.kernels import fp8_gemm
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

OP = "fp8_gemm_nt"
BLOCK = counting.FP8_BLOCK
# D is bf16: rounding is at most 2**-8 relative; the rms term covers fp32 accumulation under cancellation.
TOLERANCE = Tolerance(rtol=2.01 * 2.0**-8, atol_rms=2.01 * 2.0**-8, atol_floor=0.0, max_calc_diff=1e-5)


def dequantized_a(a: torch.Tensor, sfa: torch.Tensor) -> torch.Tensor:
    """float64 ``A * SFA`` (1x128 scales) of ``a`` ``[rows, K]``."""
    k = a.shape[1]
    return a.to(torch.float64) * sfa.to(torch.float64).repeat_interleave(BLOCK, dim=1)[:, :k]


def dequantized_b(b: torch.Tensor, sfb: torch.Tensor) -> torch.Tensor:
    """float64 ``B * SFB`` (128x128 scales) of ``b`` ``[N, K]``."""
    n, k = b.shape
    scale = sfb.to(torch.float64).repeat_interleave(BLOCK, dim=0)[:n].repeat_interleave(BLOCK, dim=1)[:, :k]
    return b.to(torch.float64) * scale


def _builder(m: int, n: int, k: int) -> Any:
    def build(device: torch.device, seed: int) -> Workload:
        g = torch.Generator(device=device).manual_seed(seed)
        a, sfa = per_token_cast_to_fp8(torch.randn((m, k), generator=g, device=device))
        b, sfb = per_block_cast_to_fp8(torch.randn((n, k), generator=g, device=device))
        out = torch.empty((m, n), dtype=torch.bfloat16, device=device)

        def call(backend: str) -> Any:
            def run() -> None:
                fp8_gemm.fp8_gemm_nt((a, sfa), (b, sfb), out, backend=backend)
            return run

        bound_call = bound_runner(OP, lambda: fp8_gemm.bind("nt", (a, sfa), (b, sfb), out), out)

        def reference_check() -> dict[str, Any]:
            rows = sample_rows(m)
            reference = dequantized_a(a[rows], sfa[rows]) @ dequantized_b(b, sfb).T
            return sampled_rows_check("out", out, reference, TOLERANCE, rows)

        footprint = sum(t.numel() * t.element_size() for t in (a, sfa, b, sfb, out))
        return Workload(call, bound_call, {"out": out}, footprint, reference_check)

    return build


def config(m: int, n: int, k: int, *, cpu: bool = False, prefix: str = "") -> BenchConfig:
    """One dense FP8 GEMM config (NT, recipe (1, 128, 128), float32 SFs, bf16 out)."""
    return BenchConfig(
        name=f"{prefix}m{m}_n{n}_k{k}", op=OP, params=dict(m=m, n=n, k=k, recipe=[1, 128, 128], out="bfloat16"),
        build=_builder(m, n, k), flops=counting.gemm_flops(m, n, k), bytes=counting.fp8_gemm_bytes(m, n, k),
        ceiling="fp8_matmul", check_case=None, cpu=cpu,
        agreement=4e-5,  # two backends each within calc_diff 1e-5 of the float64 answer
    )


# DeepSeek-V3's (N, K) of the dense projections, DeepGEMM's benchmark set
DEEPSEEK_V3_NK = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
CONFIGS: tuple[BenchConfig, ...] = (
    *(config(m, n, k) for m in (1, 64, 128, 4096) for n, k in DEEPSEEK_V3_NK),
    config(4, 256, 512, cpu=True, prefix="tiny_"),
    config(33, 320, 640, cpu=True, prefix="tiny_"),  # N not a multiple of 128, M not a multiple of 4
)
