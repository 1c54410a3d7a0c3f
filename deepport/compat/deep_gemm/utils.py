"""DeepGEMM's ``deep_gemm.utils``: scale-factor layouts, alignment helpers and the reference quantizers.

All are deepport's own helpers (:mod:`deepport.kernels.fp8_layout`) under DeepGEMM's names and
signatures. The quantizers follow DeepGEMM's math (``sf = max(amax, 1e-4) / 448`` per 1x128 row block
or 128x128 block, optionally rounded up to a power of two) and divide by ``sf`` where DeepGEMM
multiplies by ``1 / sf``: the SFs are identical, and a rare element whose quotient lies within one
float32 rounding of an FP8 rounding boundary may round to the neighbouring FP8 value (never with
power-of-two SFs, where both are exact).
"""

from __future__ import annotations

import torch

from deepport.compat.deep_gemm._runtime import (
    get_theoretical_mk_alignment_for_contiguous_layout,
    set_mk_alignment_for_contiguous_layout,
)
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import fp8_layout
from deepport.kernels.fp8_layout import (
    align,
    ceil_div,
    ceil_to_ue8m0,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
)

__all__ = [
    "align", "ceil_div", "ceil_to_ue8m0", "get_col_major_tma_aligned_tensor", "get_k_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor", "get_mn_major_tma_aligned_tensor",
    "get_theoretical_mk_alignment_for_contiguous_layout", "get_tma_aligned_size", "per_block_cast_to_fp8",
    "per_token_cast_to_fp8", "set_mk_alignment_for_contiguous_layout",
]

get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor
"""v1 name of :func:`get_mn_major_tma_aligned_tensor` (MN-major is column-major for ``[MN, K]``)."""
get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def _gran_k(gran_k: object) -> None:
    if chk.expect_int("gran_k", gran_k, minimum=1) != fp8_layout.BLOCK_K:
        raise InvalidArgumentError("gran_k", f"expected {fp8_layout.BLOCK_K} (deepport's FP8 GEMMs use 128-wide K "
                                   f"blocks), got {gran_k}")


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(e4m3 [M, K], sf [M, ceil(K/128)])``, one SF per row and 128 K (float32, or with
    ``use_packed_ue8m0`` int32 words of four exponent bytes; that needs ``use_ue8m0=True``)."""
    _gran_k(gran_k)
    data, sf = fp8_layout.per_token_cast_to_fp8(x, use_ue8m0=chk.expect_bool("use_ue8m0", use_ue8m0))
    return data, fp8_layout.pack_ue8m0(sf) if chk.expect_bool("use_packed_ue8m0", use_packed_ue8m0) else sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """``x [N, K]`` -> ``(e4m3 [N, K], sf float32 [ceil(N/128), ceil(K/128)])``, one SF per 128x128 block."""
    _gran_k(gran_k)
    return fp8_layout.per_block_cast_to_fp8(x, use_ue8m0=chk.expect_bool("use_ue8m0", use_ue8m0))
