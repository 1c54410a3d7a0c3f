"""DeepGEMM's ``deep_gemm.utils.layout``: scale-factor layouts and the contiguous-layout alignment.

deepport's own helpers (:mod:`deepport.kernels.fp8_layout`) under DeepGEMM's names, plus the v1
name ``get_col_major_tma_aligned_tensor`` and the ``get_m``/``get_k`` alignment aliases. Not
provided: ``get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor`` (the K-grouped GEMMs take float32
SFs only; the UE8M0 K-grouped form is SM100's).
"""

from __future__ import annotations

from deepport.compat.deep_gemm._runtime import (
    get_theoretical_mk_alignment_for_contiguous_layout,
    set_mk_alignment_for_contiguous_layout,
)
from deepport.kernels.fp8_layout import (
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
)

__all__ = [
    "get_col_major_tma_aligned_tensor", "get_k_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_mn_major_tma_aligned_tensor", "get_theoretical_mk_alignment_for_contiguous_layout", "get_tma_aligned_size",
    "set_mk_alignment_for_contiguous_layout",
]

get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor
"""v1 name of :func:`get_mn_major_tma_aligned_tensor` (MN-major is column-major for ``[MN, K]``)."""
get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
