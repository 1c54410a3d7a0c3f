"""M-grouped FP8 GEMM bench configs (DeepGEMM's grouped benchmark shapes) and tiny CPU ones.

- ``m_grouped_fp8_gemm_nt_contiguous``: G groups of ``expected_m`` rows each (multiples of 128, no
  padding rows), B ``[G, N, K]``; (G, expected_m) in {(4, 8192), (8, 4096)} for the MoE up/gate
  (N=4096, K=7168) and down (N=7168, K=2048) projections.
- ``m_grouped_fp8_gemm_nt_masked``: A ``[G, 4096, K]`` with ``masked_m[g] = expected_m`` rows in use;
  (G, expected_m) in {(1, 1024), (2, 512), (4, 256)} for the same (N, K). Only rows in use count.

Inputs: as the dense configs (``per_token_cast_to_fp8`` / ``per_block_cast_to_fp8`` per group). The
float64 check recomputes up to 64 sampled rows in use from the dequantized operands of their group.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.bench import counting
from deepport.bench.check import sample_rows, sampled_rows_check
from deepport.bench.configs import BenchConfig, Workload, bound_runner
from deepport.bench.configs.fp8_gemm import TOLERANCE, dequantized_a, dequantized_b
from deepport.kernels import fp8_grouped_gemm as grouped
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

NK = ((4096, 7168), (7168, 2048))
M_MAX = 4096  # masked layout: rows per group allocated (DeepGEMM's test)


def _weights(g: int, n: int, k: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [per_block_cast_to_fp8(torch.randn((n, k), generator=gen, device=device)) for _ in range(g)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def _rows_check(out: torch.Tensor, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                rows: list[int], group_of: list[int]) -> dict[str, Any]:
    """``out`` ``[rows_total, N]`` (flattened) at ``rows``, each against its group's float64 product."""
    reference = torch.empty((len(rows), out.shape[-1]), dtype=torch.float64, device=out.device)
    for g in sorted(set(group_of)):
        pick = [i for i, gi in enumerate(group_of) if gi == g]
        idx = [rows[i] for i in pick]
        reference[pick] = dequantized_a(a[idx], sfa[idx]) @ dequantized_b(b[g], sfb[g]).T
    return sampled_rows_check("out", out, reference, TOLERANCE, rows)


def _contiguous_builder(g: int, m: int, n: int, k: int) -> Any:
    op = grouped.OP_CONTIGUOUS

    def build(device: torch.device, seed: int) -> Workload:
        gen = torch.Generator(device=device).manual_seed(seed)
        a, sfa = per_token_cast_to_fp8(torch.randn((g * m, k), generator=gen, device=device))
        b, sfb = _weights(g, n, k, gen, device)
        m_indices = torch.arange(g, dtype=torch.int32, device=device).repeat_interleave(m)
        out = torch.empty((g * m, n), dtype=torch.bfloat16, device=device)

        def call(backend: str) -> Any:
            def run() -> None:
                grouped.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, m_indices, backend=backend)
            return run

        bound_call = bound_runner(op, lambda: grouped.bind_contiguous((a, sfa), (b, sfb), out, m_indices), out)

        def reference_check() -> dict[str, Any]:
            rows = sample_rows(g * m)
            return _rows_check(out, a, sfa, b, sfb, rows, [r // m for r in rows])

        footprint = sum(t.numel() * t.element_size() for t in (a, sfa, b, sfb, m_indices, out))
        return Workload(call, bound_call, {"out": out}, footprint, reference_check)

    return build


def _masked_builder(g: int, m_max: int, masked: list[int], n: int, k: int) -> Any:
    op = grouped.OP_MASKED
    expected = max(1, sum(masked) // g)

    def build(device: torch.device, seed: int) -> Workload:
        gen = torch.Generator(device=device).manual_seed(seed)
        a2, sfa2 = per_token_cast_to_fp8(torch.randn((g * m_max, k), generator=gen, device=device))
        a, sfa = a2.view(g, m_max, k), sfa2.view(g, m_max, -1)
        b, sfb = _weights(g, n, k, gen, device)
        masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
        out = torch.empty((g, m_max, n), dtype=torch.bfloat16, device=device)

        def call(backend: str) -> Any:
            def run() -> None:
                grouped.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, masked_m, expected, backend=backend)
            return run

        bound_call = bound_runner(op, lambda: grouped.bind_masked((a, sfa), (b, sfb), out, masked_m, expected), out)

        def reference_check() -> dict[str, Any]:
            in_use = [gi * m_max + r for gi in range(g) for r in range(masked[gi])]
            rows = [in_use[i] for i in sample_rows(len(in_use))]
            return _rows_check(out.view(g * m_max, n), a2, sfa2, b, sfb, rows, [r // m_max for r in rows])

        footprint = sum(t.numel() * t.element_size() for t in (a, sfa, b, sfb, masked_m, out))
        return Workload(call, bound_call, {"out": out}, footprint, reference_check)

    return build


def contiguous(g: int, m: int, n: int, k: int, *, cpu: bool = False, prefix: str = "") -> BenchConfig:
    return BenchConfig(
        name=f"{prefix}g{g}_m{m}_n{n}_k{k}", op=grouped.OP_CONTIGUOUS,
        params=dict(groups=g, m_per_group=m, n=n, k=k, recipe=[1, 128, 128], out="bfloat16"),
        build=_contiguous_builder(g, m, n, k), flops=counting.gemm_flops(g * m, n, k),
        bytes=counting.fp8_gemm_bytes(g * m, n, k, groups=g), ceiling="fp8_matmul", check_case=None, cpu=cpu,
        agreement=4e-5,
    )


def masked(g: int, masked_m: list[int], n: int, k: int, *, m_max: int = M_MAX, cpu: bool = False,
           prefix: str = "") -> BenchConfig:
    name = f"{prefix}g{g}_m{'-'.join(map(str, sorted(set(masked_m))))}_n{n}_k{k}"
    return BenchConfig(
        name=name, op=grouped.OP_MASKED,
        params=dict(groups=g, masked_m=list(masked_m), m_max=m_max, n=n, k=k, recipe=[1, 128, 128],
                    out="bfloat16"),
        build=_masked_builder(g, m_max, list(masked_m), n, k), flops=counting.masked_gemm_flops(masked_m, n, k),
        bytes=counting.fp8_gemm_bytes(sum(masked_m), n, k, groups=g), ceiling="fp8_matmul", check_case=None,
        cpu=cpu, agreement=4e-5,
    )


CONFIGS: tuple[BenchConfig, ...] = (
    *(contiguous(g, m, n, k) for g, m in ((4, 8192), (8, 4096)) for n, k in NK),
    *(masked(g, [m] * g, n, k) for g, m in ((1, 1024), (2, 512), (4, 256)) for n, k in NK),
    contiguous(2, 128, 256, 512, cpu=True, prefix="tiny_"),
    masked(2, [40, 17], 256, 512, m_max=64, cpu=True, prefix="tiny_"),
)
