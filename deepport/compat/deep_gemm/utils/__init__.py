"""DeepGEMM's ``deep_gemm.utils`` package: :mod:`.math` (quantizers, UE8M0 packing) and :mod:`.layout`
(scale-factor layouts, alignment), re-exported here as upstream does (``from deep_gemm.utils import *``
and ``from deep_gemm.utils.math import per_token_cast_to_fp8`` both work). Not provided: the ``dist``
helpers of DeepGEMM's tests (``init_dist``, ``uneven_all_gather``).
"""

from __future__ import annotations

from deepport.compat.deep_gemm.utils import layout, math
from deepport.compat.deep_gemm.utils.layout import (
    get_col_major_tma_aligned_tensor,
    get_k_alignment_for_contiguous_layout,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    set_mk_alignment_for_contiguous_layout,
)
from deepport.compat.deep_gemm.utils.math import (
    align,
    ceil_div,
    ceil_to_ue8m0,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp8,
    unpack_ue8m0_from_int,
)

__all__ = [
    "align", "ceil_div", "ceil_to_ue8m0", "get_col_major_tma_aligned_tensor", "get_k_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor", "get_mn_major_tma_aligned_tensor",
    "get_theoretical_mk_alignment_for_contiguous_layout", "get_tma_aligned_size", "layout", "math",
    "pack_ue8m0_to_int", "per_block_cast_to_fp8", "per_channel_cast_to_fp8", "per_custom_dims_cast_to_fp8",
    "per_token_cast_to_fp8", "set_mk_alignment_for_contiguous_layout", "unpack_ue8m0_from_int",
]
