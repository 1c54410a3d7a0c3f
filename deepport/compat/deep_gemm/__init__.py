"""DeepGEMM's API (``deep_gemm``) on deepport's FP8 GEMM ops: current names, v1 names and helpers.

Drop-in for the FP8 entry points callers use::

    from deepport.compat import deep_gemm

    deep_gemm.fp8_gemm_nt((a_fp8, sfa), (b_fp8, sfb), d)                      # 2025-07 onwards
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)            # grouped_layout= too
    deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
    deep_gemm.gemm_fp8_fp8_bf16_nt((a_fp8, sfa), (b_fp8, sfb), out)           # v1 (2025-02) names

Each call validates and runs through deepport (:func:`deepport.fp8_gemm_nt`,
:func:`deepport.m_grouped_fp8_gemm_nt_contiguous`, :func:`deepport.m_grouped_fp8_gemm_nt_masked`),
so it runs on any backend and device deepport has. Provided: ``fp8_gemm_{nt,nn,tn,tt}`` (and their
2026 ``fp8_fp4_*`` names, FP8 operands only), ``m_grouped_fp8_gemm_{nt,nn}_contiguous`` (psum layout
included), ``m_grouped_fp8_gemm_nt_masked`` (alias ``fp8_m_grouped_gemm_nt_masked``), the v1
``gemm_fp8_fp8_bf16_nt``, ``m_grouped_gemm_fp8_fp8_bf16_nt_{contiguous,masked}``,
``wgrad_gemm_fp8_fp8_fp32_nt``; the layout/alignment helpers and quantizers of ``deep_gemm.utils``;
``get_num_sms``/``set_num_sms``; ``calc_diff``. Not provided (no deepport op behind them): BF16 and
cuBLASLt GEMMs, k-grouped GEMMs, FP4, the MQA-logits indexer kernels, Mega MoE, einsum,
``transform_sf_into_required_layout``; they are absent rather than stubbed.
"""

from __future__ import annotations

from deepport.compat.deep_gemm import testing, utils
from deepport.compat.deep_gemm._gemm import (
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from deepport.compat.deep_gemm._legacy import (
    gemm_fp8_fp8_bf16_nt,
    m_grouped_gemm_fp8_fp8_bf16_nt_contiguous,
    m_grouped_gemm_fp8_fp8_bf16_nt_masked,
    wgrad_gemm_fp8_fp8_fp32_nt,
)
from deepport.compat.deep_gemm._runtime import get_num_sms, set_num_sms
from deepport.compat.deep_gemm.testing import calc_diff
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
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
    set_mk_alignment_for_contiguous_layout,
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

__all__ = [
    "align", "calc_diff", "ceil_div", "ceil_to_ue8m0", "fp8_fp4_gemm_nn", "fp8_fp4_gemm_nt", "fp8_fp4_gemm_tn",
    "fp8_fp4_gemm_tt", "fp8_gemm_nn", "fp8_gemm_nt", "fp8_gemm_tn", "fp8_gemm_tt", "fp8_m_grouped_gemm_nt_masked",
    "gemm_fp8_fp8_bf16_nt", "get_col_major_tma_aligned_tensor", "get_k_alignment_for_contiguous_layout",
    "get_m_alignment_for_contiguous_layout", "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor", "get_mn_major_tma_aligned_tensor", "get_num_sms",
    "get_theoretical_mk_alignment_for_contiguous_layout", "get_tma_aligned_size",
    "m_grouped_fp8_fp4_gemm_nn_contiguous", "m_grouped_fp8_fp4_gemm_nt_contiguous",
    "m_grouped_fp8_fp4_gemm_nt_masked", "m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked", "per_block_cast_to_fp8", "per_token_cast_to_fp8",
    "set_mk_alignment_for_contiguous_layout", "set_num_sms", "testing", "utils", "wgrad_gemm_fp8_fp8_fp32_nt",
]
