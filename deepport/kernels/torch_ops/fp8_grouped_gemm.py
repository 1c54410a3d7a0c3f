"""``torch.ops.deepport.m_grouped_fp8_gemm_nt_{contiguous,masked}[_out]``: the grouped FP8 GEMMs as custom ops.

Schemas (operands and math: :func:`deepport.m_grouped_fp8_gemm_nt_contiguous` and ``..._masked``)::

    m_grouped_fp8_gemm_nt_contiguous(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor m_indices,
                                     int[]? recipe=None) -> Tensor
    m_grouped_fp8_gemm_nt_contiguous_out(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) out,
                                         Tensor m_indices, int[]? recipe=None) -> ()
    m_grouped_fp8_gemm_nt_masked(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor masked_m,
                                 int expected_m, int[]? recipe=None) -> Tensor
    m_grouped_fp8_gemm_nt_masked_out(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) out,
                                     Tensor masked_m, int expected_m, int[]? recipe=None) -> ()

Functional results are bfloat16: contiguous ``[M_sum, N]`` (padding rows 0, as the op defines them);
masked ``[G, M_max, N]`` with the rows past ``masked_m[g]`` **zero** (the op leaves them as the caller's
buffer held them, which a functional form has not got: the out form keeps that behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepport.kernels import fp8_grouped_gemm as op
from deepport.kernels.torch_ops.fp8_gemm import recipe_arg

_OPERANDS = "Tensor a, Tensor sfa, Tensor b, Tensor sfb"


@torch.library.custom_op("deepport::m_grouped_fp8_gemm_nt_contiguous", mutates_args=(),
                         schema=f"({_OPERANDS}, Tensor m_indices, int[]? recipe=None) -> Tensor")
def contiguous(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, m_indices: torch.Tensor,
               recipe: Sequence[int] | None = None) -> torch.Tensor:
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    op.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, m_indices, recipe=recipe_arg(recipe))
    return out


@contiguous.register_fake
def _contiguous_fake(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, m_indices: torch.Tensor,
                     recipe: Sequence[int] | None = None) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


@torch.library.custom_op("deepport::m_grouped_fp8_gemm_nt_contiguous_out", mutates_args=("out",),
                         schema=f"({_OPERANDS}, Tensor(a!) out, Tensor m_indices, int[]? recipe=None) -> ()")
def contiguous_out(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
                   m_indices: torch.Tensor, recipe: Sequence[int] | None = None) -> None:
    op.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, m_indices, recipe=recipe_arg(recipe))


@contiguous_out.register_fake
def _contiguous_out_fake(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
                         m_indices: torch.Tensor, recipe: Sequence[int] | None = None) -> None:
    return None


@torch.library.custom_op("deepport::m_grouped_fp8_gemm_nt_masked", mutates_args=(),
                         schema=f"({_OPERANDS}, Tensor masked_m, int expected_m, int[]? recipe=None) -> Tensor")
def masked(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, masked_m: torch.Tensor,
           expected_m: int, recipe: Sequence[int] | None = None) -> torch.Tensor:
    out = torch.zeros((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    op.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, masked_m, expected_m, recipe=recipe_arg(recipe))
    return out


@masked.register_fake
def _masked_fake(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, masked_m: torch.Tensor,
                 expected_m: int, recipe: Sequence[int] | None = None) -> torch.Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.bfloat16)


@torch.library.custom_op("deepport::m_grouped_fp8_gemm_nt_masked_out", mutates_args=("out",),
                         schema=f"({_OPERANDS}, Tensor(a!) out, Tensor masked_m, int expected_m, "
                                "int[]? recipe=None) -> ()")
def masked_out(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
               masked_m: torch.Tensor, expected_m: int, recipe: Sequence[int] | None = None) -> None:
    op.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, masked_m, expected_m, recipe=recipe_arg(recipe))


@masked_out.register_fake
def _masked_out_fake(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
                     masked_m: torch.Tensor, expected_m: int, recipe: Sequence[int] | None = None) -> None:
    return None
