"""The M-grouped FP8 GEMMs on this backend. Spec: :func:`deepport.m_grouped_fp8_gemm_nt_contiguous` and
``..._masked``; convention: :class:`FP8GroupedGemmImpl`."""

from __future__ import annotations

import torch

from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    """Write every row of ``out`` ``[M_sum, N]`` bfloat16 (the :class:`FP8GroupedGemmImpl` convention)."""
    raise NotImplementedError(
        "m_grouped_fp8_gemm_nt_contiguous: for each row m of call.a.data [M_sum, K] with "
        "g = call.m_indices[m] >= 0, out[m] = the dense fp8_gemm_nt row of A[m] and call.b.data[g] [N, K] "
        "(scales call.a.sf per token, call.b.sf[g] per 128x128 block or per row, call.b.gran_mn); padding rows "
        "(m_indices == -1, whose A rows may hold NaN) get +0.0. call.m_indices_host is a host copy when set. "
        "Oracle: deepport.kernels.f64.fp8_grouped_gemm.")


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    """Write ``out[g, :masked_m[g]]`` of ``out`` ``[G, M_max, N]`` bfloat16, nothing else."""
    raise NotImplementedError(
        "m_grouped_fp8_gemm_nt_masked: for each group g, out[g, :masked_m[g]] = the dense fp8_gemm_nt of "
        "call.a.data[g, :masked_m[g]] and call.b.data[g]; rows past masked_m[g] must stay as they were (the "
        "suite checks). call.masked_m_host is a host copy when set; call.expected_m is only a hint. "
        "Oracle: deepport.kernels.f64.fp8_grouped_gemm.")
