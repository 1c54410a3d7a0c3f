"""The dense FP8 GEMMs (``fp8_gemm_{nt,nn,tn,tt}``) on this backend. Spec: :func:`deepport.fp8_gemm_nt`;
convention: :class:`FP8GemmImpl`."""

from __future__ import annotations

import torch

from deepport.kernels.fp8_gemm import FP8GemmCall


def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Write ``out`` of one validated call, every layout in NT form (the :class:`FP8GemmImpl` convention)."""
    raise NotImplementedError(
        "fp8_gemm: write every element of out [M, N] (bfloat16 or float32) in place: D = C + A @ B^T with "
        "D[m, n] = sum_kb SFA[m, kb] * SFB[n // call.gran_n, kb] * sum_{k in block kb} A[m, k] * B[n, k]. "
        "call.a [M, K] and call.b [N, K] are e4m3 views (K may not be contiguous for nn/tn/tt); call.sfa and "
        "call.sfb are float32 or packed UE8M0 int32 (call.sf_format), row-major or MN-major; call.c is None, "
        "out itself, or float32 [M, N]. Edges: M = 0 writes nothing; N, K not multiples of 128 (partial last "
        "block). Oracle: deepport.kernels.f64.fp8_gemm.")
