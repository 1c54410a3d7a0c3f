"""DeepGEMM's ``fp8_gemm_nt_skip_head_mid``: an FP8 GEMM whose output lands in per-head column slices.

``D = A @ B^T`` is ``[M, N]`` with ``N = heads * (left + right)``: each head's ``left + right`` columns.
``d`` is ``[M, heads * (left + mid + right)]``; head ``h`` writes its first ``left`` columns at
``d[:, h * (left + mid + right):][:, :left]`` and its last ``right`` columns after a gap of ``mid``
columns, which are left untouched (upstream's test zeroes them and checks the whole of ``d``).
deepport computes ``D`` with :func:`deepport.fp8_gemm_nt` into a scratch tensor of ``d``'s dtype (one
rounding, as upstream) and copies the two slices per head into ``d``.
"""

from __future__ import annotations

import torch

import deepport
from deepport.compat.deep_gemm._gemm import Pair, Recipe
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk


def fp8_gemm_nt_skip_head_mid(a: Pair, b: Pair, d: torch.Tensor, head_splits: tuple[int, int, int],
                              recipe: Recipe | None = None, compiled_dims: str = "nk",
                              disable_ue8m0_cast: bool = False, *, backend: str | None = None) -> None:
    """``a = (A [M, K], SFA)``, ``b = (B [N, K], SFB)``, ``d`` bf16/float32 ``[M, N / (left + right) *
    (left + mid + right)]``, ``head_splits = (left, mid, right)``; see the module docstring. ``recipe``,
    ``disable_ue8m0_cast`` and ``compiled_dims`` as for ``fp8_gemm_nt``."""
    if not isinstance(head_splits, (tuple, list)) or len(head_splits) != 3:
        raise ArgumentTypeError("head_splits", f"expected (left, mid, right), got {head_splits!r}")
    left, mid, right = (chk.expect_int(f"head_splits[{i}]", v, minimum=0) for i, v in enumerate(head_splits))
    if left + right == 0:
        raise InvalidArgumentError("head_splits", f"expected left + right > 0, got {tuple(head_splits)}")
    if not isinstance(compiled_dims, str):
        raise ArgumentTypeError("compiled_dims", f"expected a str such as 'nk', got {type(compiled_dims).__name__}")
    chk.expect_bool("disable_ue8m0_cast", disable_ue8m0_cast)
    out = chk.expect_tensor("d", d)
    chk.expect_ndim("d", out, 2, "[M, heads * (left + mid + right)]")
    if not isinstance(b, (tuple, list)) or len(b) != 2:
        raise ArgumentTypeError("b", f"expected a pair (data, scale factors), got {type(b).__name__}")
    b_data = chk.expect_tensor("b[0]", b[0])
    chk.expect_ndim("b[0]", b_data, 2, "[N, K]")
    n = int(b_data.shape[0])
    if n % (left + right) != 0:
        raise InvalidArgumentError("head_splits", f"expected left + right = {left + right} to divide N = {n}, got "
                                   f"{tuple(head_splits)}")
    heads = n // (left + right)
    chk.expect_dim("d", out, 1, heads * (left + mid + right), f"{heads} heads of left + mid + right columns")
    m = int(out.shape[0])
    scratch = torch.empty((m, n), dtype=out.dtype, device=out.device)
    deepport.fp8_gemm_nt(a, b, scratch, recipe=recipe, backend=backend)
    per_head = scratch.view(m, heads, left + right)
    target = out.as_strided((m, heads, left + mid + right),  # a view whatever d's row stride
                            (out.stride(0), (left + mid + right) * out.stride(1), out.stride(1)))
    target[:, :, :left] = per_head[:, :, :left]
    target[:, :, left + mid:] = per_head[:, :, left:]
