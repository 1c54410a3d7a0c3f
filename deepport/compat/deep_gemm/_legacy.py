"""DeepGEMM v1 names (2025-02 .. 2025-07, Python JIT, SM90): ``lhs``/``rhs`` tuples, ``out`` positional.

Each routes to the same deepport op as its current name with v1's fixed recipe: 1x128 SFA and
128x128 SFB (float32) for the BF16-output GEMMs, 1x128 SFs on both sides with FP32 accumulation for
the weight-gradient GEMM. v1 accepted only these dtypes; so do these shims (an FP32 ``out`` for a
``*_bf16_*`` name, or int32 UE8M0 SFs, are rejected with the reason).
"""

from __future__ import annotations

import torch

import deepport
from deepport.errors import ArgumentTypeError
from deepport.kernels import _checks as chk
from deepport.kernels.fp8_layout import num_k_blocks

Pair = tuple[torch.Tensor, torch.Tensor]
RECIPE_1D2D = (1, 128, 128)
RECIPE_1D1D = (1, 1, 128)


def _expect_out(out: object, dtype: torch.dtype, name: str) -> None:
    t = chk.expect_tensor("out", out)
    if t.dtype != dtype:
        raise ArgumentTypeError("out", f"expected dtype {dtype} ({name} writes {str(dtype).removeprefix('torch.')}), "
                                f"got {t.dtype}")


def gemm_fp8_fp8_bf16_nt(lhs: Pair, rhs: Pair, out: torch.Tensor, *, backend: str | None = None) -> None:
    """v1 dense GEMM: ``out = lhs @ rhs^T`` with ``lhs = (A [M, K] e4m3, SFA float32 [M, ceil(K/128)])``,
    ``rhs = (B [N, K] e4m3, SFB float32 [ceil(N/128), ceil(K/128)])``, ``out`` bf16 ``[M, N]``.
    Same as ``fp8_gemm_nt(lhs, rhs, out)``; SFA may be row-major or from ``get_col_major_tma_aligned_tensor``."""
    _expect_out(out, torch.bfloat16, "gemm_fp8_fp8_bf16_nt")
    deepport.fp8_gemm_nt(lhs, rhs, out, recipe=RECIPE_1D2D, backend=backend)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs: Pair, rhs: Pair, out: torch.Tensor, m_indices: torch.Tensor, *,
                                              backend: str | None = None) -> None:
    """v1 grouped contiguous GEMM: row ``m`` of ``lhs`` times ``rhs[m_indices[m]]^T`` (``-1``: padding,
    written as zeros by deepport), each group's rows starting at a multiple of 128. Same as
    ``m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices)``."""
    deepport.m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices, recipe=RECIPE_1D2D, backend=backend)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs: Pair, rhs: Pair, out: torch.Tensor, masked_m: torch.Tensor,
                                          expected_m: int, *, backend: str | None = None) -> None:
    """v1 grouped masked GEMM: ``out[g, :masked_m[g]] = lhs[g, :masked_m[g]] @ rhs[g]^T``, other rows
    untouched; ``expected_m`` is a tuning hint. Same as ``m_grouped_fp8_gemm_nt_masked``."""
    deepport.m_grouped_fp8_gemm_nt_masked(lhs, rhs, out, masked_m, expected_m, recipe=RECIPE_1D2D, backend=backend)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs: Pair, rhs: Pair, out: torch.Tensor, *, backend: str | None = None) -> None:
    """v1 weight-gradient GEMM (2025-05): ``out += lhs @ rhs^T`` in float32 with 1x128 SFs on both
    operands: ``lhs = (A [M, K], SFA [M, ceil(K/128)])``, ``rhs = (B [N, K], SFB [N, ceil(K/128)])`` (each
    SF tensor may also be given transposed, ``[ceil(K/128), rows]``, as v1 allowed), ``out`` float32
    ``[M, N]``. Same as ``fp8_gemm_nt(lhs, rhs, out, c=out, recipe=(1, 1, 128))``."""
    _expect_out(out, torch.float32, "wgrad_gemm_fp8_fp8_fp32_nt")
    deepport.fp8_gemm_nt(_rows_first(lhs), _rows_first(rhs), out, c=out, recipe=RECIPE_1D1D, backend=backend)


def _rows_first(pair: Pair) -> Pair:
    """v1's wgrad accepted per-row SFs as ``[rows, kb]`` or ``[kb, rows]``; the second becomes a transposed view."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return pair  # deepport reports it
    data, sf = pair
    if isinstance(data, torch.Tensor) and isinstance(sf, torch.Tensor) and data.dim() == 2 and sf.dim() == 2:
        rows, kb = int(data.shape[0]), num_k_blocks(int(data.shape[1]))
        if tuple(sf.shape) == (kb, rows) and (rows, kb) != (kb, rows):
            return data, sf.t()
    return pair
