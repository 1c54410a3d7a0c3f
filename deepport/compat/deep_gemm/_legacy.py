"""DeepGEMM v1 names (2025-02 .. 2025-07, Python JIT, SM90): ``lhs``/``rhs`` tuples, ``out`` positional.

Each routes to the same deepport op as its current name with v1's fixed recipe: 1x128 SFA and
128x128 SFB (float32) for the BF16-output GEMMs, 1x128 SFs on both sides with FP32 accumulation for
the weight-gradient GEMMs (``k_grouped_wgrad_gemm_fp8_fp8_fp32_nt`` runs one per batch, as v1
did). v1 accepted only these dtypes; so do these shims (an FP32 ``out`` for a ``*_bf16_*`` name, or
int32 UE8M0 SFs, are rejected with the reason).
"""

from __future__ import annotations

import torch

import deepport
from deepport.errors import ArgumentTypeError, InvalidArgumentError
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


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs: Pair, rhs: Pair, out: torch.Tensor, batch_sizes: list[int], *,
                                         backend: str | None = None) -> None:
    """v1 K-grouped weight-gradient GEMM (2025-05): for each batch ``i`` with ``k = batch_sizes[i]``,
    ``out[i] += A_i @ B_i^T`` as :func:`wgrad_gemm_fp8_fp8_fp32_nt` does, where ``A_i [M, k]`` and
    ``B_i [N, k]`` are stored row-major back to back in ``lhs[0]`` / ``rhs[0]`` (any shape holding
    ``sum(M * k)`` / ``sum(N * k)`` elements) and their SFs are rows ``[sum_{j<i} ceil(k_j/128), + ceil(k/128))``
    of ``lhs[1]`` ``[sum_kb, M]`` / ``rhs[1]`` ``[sum_kb, N]``. ``out`` float32 ``[num_batches, M, N]``; a
    batch with ``k == 0`` leaves its ``out[i]`` unchanged."""
    _expect_out(out, torch.float32, "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt")
    chk.expect_ndim("out", out, 3, "[num_batches, M, N]")
    batches, m, n = (int(s) for s in out.shape)
    if not isinstance(batch_sizes, (list, tuple)) or len(batch_sizes) != batches:
        raise InvalidArgumentError("batch_sizes", f"expected a list of {batches} K sizes (out.shape[0]), got "
                                   f"{batch_sizes!r}")
    ks = [chk.expect_int(f"batch_sizes[{i}]", k, minimum=0) for i, k in enumerate(batch_sizes)]
    pairs = []
    for name, pair, rows in (("lhs", lhs, m), ("rhs", rhs, n)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ArgumentTypeError(name, f"expected a pair (data, scale factors), got {type(pair).__name__}")
        data, sf = chk.expect_tensor(f"{name}[0]", pair[0]), chk.expect_tensor(f"{name}[1]", pair[1])
        if data.numel() != sum(ks) * rows:
            raise InvalidArgumentError(f"{name}[0]", f"expected sum(batch_sizes) * {rows} = {sum(ks) * rows} "
                                       f"elements, got {data.numel()}")
        chk.expect_ndim(f"{name}[1]", sf, 2, "[sum ceil(k / 128), rows]")
        chk.expect_shape(f"{name}[1]", sf, (sum(num_k_blocks(k) for k in ks), rows), "[sum ceil(k / 128), rows]")
        pairs.append((data.reshape(-1), sf))
    (flat_a, sfa), (flat_b, sfb) = pairs
    offset = block = 0
    for i, k in enumerate(ks):
        if k:
            kb = num_k_blocks(k)
            wgrad_gemm_fp8_fp8_fp32_nt((flat_a[offset * m:(offset + k) * m].view(m, k), sfa[block:block + kb]),
                                       (flat_b[offset * n:(offset + k) * n].view(n, k), sfb[block:block + kb]),
                                       out[i], backend=backend)
            block += kb
        offset += k
