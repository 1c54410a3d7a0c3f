"""DeepGEMM's API (``deep_gemm``) on deepport's FP8 GEMM ops: current names, v1 names and helpers.

Drop-in for the FP8 entry points callers use::

    from deepport.compat import deep_gemm

    deep_gemm.fp8_gemm_nt((a_fp8, sfa), (b_fp8, sfb), d)                      # 2025-07 onwards
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)            # grouped_layout= too
    deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, ks_tensor, c)     # MoE weight gradients
    deep_gemm.gemm_fp8_fp8_bf16_nt((a_fp8, sfa), (b_fp8, sfb), out)           # v1 (2025-02) names

Each call validates and runs through deepport (:func:`deepport.fp8_gemm_nt`,
:func:`deepport.m_grouped_fp8_gemm_nt_contiguous`, :func:`deepport.m_grouped_fp8_gemm_nt_masked`),
so it runs on any backend and device deepport has. Provided: ``fp8_gemm_{nt,nn,tn,tt}`` (and their
2026 ``fp8_fp4_*`` names, FP8 operands only), ``fp8_gemm_nt_skip_head_mid``,
``m_grouped_fp8_gemm_{nt,nn}_contiguous`` (psum layout included), ``m_grouped_fp8_gemm_nt_masked``
(alias ``fp8_m_grouped_gemm_nt_masked``), ``k_grouped_fp8_gemm_{tn,nt}_contiguous`` (one dense GEMM
per group), the v1 ``gemm_fp8_fp8_bf16_nt``, ``m_grouped_gemm_fp8_fp8_bf16_nt_{contiguous,masked}``,
``wgrad_gemm_fp8_fp8_fp32_nt``, ``k_grouped_wgrad_gemm_fp8_fp8_fp32_nt``;
``transform_sf_into_required_layout``; the layout/alignment helpers, UE8M0 packing and quantizers
of ``deep_gemm.utils``; the run-time knobs (``get_num_sms``/``set_num_sms``, ``set_tc_util``,
``set_pdl``, ... recorded, no effect on results); ``calc_diff`` and ``bench`` (v1's top-level names)
and ``deep_gemm.testing``. Not provided (no deepport op behind them): BF16 and cuBLASLt GEMMs, FP4,
the MQA-logits indexer kernels, Mega MoE, einsum; asking for one raises ``AttributeError`` with the
reason (:mod:`deepport.compat.deep_gemm._absent`). docs/COMPAT.md has the full table.
"""

from __future__ import annotations

from deepport.compat._absent import module_getattr
from deepport.compat.deep_gemm import testing, utils
from deepport.compat.deep_gemm._absent import REASONS as _REASONS
from deepport.compat.deep_gemm._gemm import (
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from deepport.compat.deep_gemm._k_grouped import k_grouped_fp8_gemm_nt_contiguous, k_grouped_fp8_gemm_tn_contiguous
from deepport.compat.deep_gemm._legacy import (
    gemm_fp8_fp8_bf16_nt,
    k_grouped_wgrad_gemm_fp8_fp8_fp32_nt,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from deepport.compat.deep_gemm._runtime import (
    get_num_sms,
    get_pdl,
    get_tc_util,
    set_block_size_multiple_of,
    set_ignore_compile_dims,
    set_num_sms,
    set_pdl,
    set_tc_util,
)
from deepport.compat.deep_gemm._sf_layout import transform_sf_into_required_layout
from deepport.compat.deep_gemm._skip_head_mid import fp8_gemm_nt_skip_head_mid
from deepport.compat.deep_gemm.testing import bench, calc_diff
from deepport.compat.deep_gemm.utils import (
    align,
    ceil_div,
    ceil_to_ue8m0,
    get_col_major_tma_aligned_tensor,
    get_k_alignment_for_contiguous_layout,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_custom_dims_cast_to_fp8,
    per_token_cast_to_fp8,
    set_mk_alignment_for_contiguous_layout,
    unpack_ue8m0_from_int,
)

# Aliases of later generations (same functions): the masked name of v2.0 and the 2026 fp8_fp4_* names.
fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
fp8_fp4_gemm_nt = fp8_gemm_nt
fp8_fp4_gemm_nn = fp8_gemm_nn
fp8_fp4_gemm_tn = fp8_gemm_tn
fp8_fp4_gemm_tt = fp8_gemm_tt
m_grouped_fp8_fp4_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_fp8_fp4_gemm_nn_contiguous = m_grouped_fp8_gemm_nn_contiguous
m_grouped_fp8_fp4_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked

__version__ = "2.6.1"  # the DeepGEMM API generation emulated

__getattr__ = module_getattr(__name__, _REASONS)

__all__ = [
    "align", "bench", "calc_diff", "ceil_div", "ceil_to_ue8m0", "fp8_fp4_gemm_nn", "fp8_fp4_gemm_nt",
    "fp8_fp4_gemm_tn", "fp8_fp4_gemm_tt", "fp8_gemm_nn", "fp8_gemm_nt", "fp8_gemm_nt_skip_head_mid", "fp8_gemm_tn",
    "fp8_gemm_tt", "fp8_m_grouped_gemm_nt_masked", "gemm_fp8_fp8_bf16_nt", "get_col_major_tma_aligned_tensor",
    "get_k_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout", "get_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_mn_major_tma_aligned_tensor", "get_num_sms", "get_pdl", "get_tc_util",
    "get_theoretical_mk_alignment_for_contiguous_layout", "get_tma_aligned_size", "k_grouped_fp8_gemm_nt_contiguous",
    "k_grouped_fp8_gemm_tn_contiguous", "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", "m_grouped_fp8_fp4_gemm_nn_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nt_masked", "m_grouped_fp8_gemm_nn_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "pack_ue8m0_to_int", "per_block_cast_to_fp8", "per_channel_cast_to_fp8",
    "per_custom_dims_cast_to_fp8", "per_token_cast_to_fp8", "set_block_size_multiple_of", "set_ignore_compile_dims",
    "set_mk_alignment_for_contiguous_layout", "set_num_sms", "set_pdl", "set_tc_util", "testing",
    "transform_sf_into_required_layout", "unpack_ue8m0_from_int", "utils", "wgrad_gemm_fp8_fp8_fp32_nt",
]
