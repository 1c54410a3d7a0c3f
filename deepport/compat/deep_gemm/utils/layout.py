"""DeepGEMM's ``deep_gemm.utils.layout``: scale-factor layouts and the contiguous-layout alignment.

deepport's own helpers (:mod:`deepport.kernels.fp8_layout`) under DeepGEMM's names, plus the v1
name ``get_col_major_tma_aligned_tensor`` and the ``get_m``/``get_k`` alignment aliases. Not
provided: ``get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor`` (the K-grouped GEMMs take float32
SFs only; the UE8M0 K-grouped form is SM100's).
"""

from __future__ import annotations

import torch

from deepport.compat.deep_gemm._runtime import (
    get_theoretical_mk_alignment_for_contiguous_layout,
    set_mk_alignment_for_contiguous_layout,
)
from deepport.kernels import _checks as chk
from deepport.kernels import fp8_layout
from deepport.kernels.fp8_layout import (
    align,
    get_mk_alignment_for_contiguous_layout,
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


def _psum_rows(ends: torch.Tensor, mn: int) -> torch.Tensor:
    """bool ``[mn]``: the rows some group of the psum layout ``ends`` owns (``[align(end[g-1], 128), end[g])``)."""
    chk.expect_dtype("psum_layout", ends, (torch.int32,))
    chk.expect_ndim("psum_layout", ends, 1, "[num_groups] end offsets")
    owned = torch.zeros(mn, dtype=torch.bool)
    previous = 0
    for end in (int(e) for e in ends.detach().to("cpu")):
        owned[align(previous, get_mk_alignment_for_contiguous_layout()):max(end, 0)] = True
        previous = end
    return owned.to(ends.device)


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor, psum_layout: torch.Tensor | None = None
                                                 ) -> torch.Tensor:
    """float32 power-of-two SFs ``[MN, kb]`` / ``[G, MN, kb]`` packed four per int32 along K, MN-major and
    TMA-aligned (:func:`deepport.kernels.fp8_layout.get_mn_major_tma_aligned_packed_ue8m0_tensor`).

    ``psum_layout`` (int32 end offsets of a psum grouped layout, 2-D ``sf`` only, as upstream): the
    alignment gap rows between groups may hold anything (upstream skips them); they come out as 0 words.
    """
    if psum_layout is None:
        return fp8_layout.get_mn_major_tma_aligned_packed_ue8m0_tensor(sf)
    chk.expect_tensor("sf", sf)
    chk.expect_ndim("sf", sf, 2, "[MN, kb] (a psum layout has no group dimension)")
    owned = _psum_rows(chk.expect_tensor("psum_layout", psum_layout), int(sf.shape[0]))
    packed = fp8_layout.get_mn_major_tma_aligned_packed_ue8m0_tensor(torch.where(owned[:, None], sf, 1.0))
    packed[~owned] = 0
    return packed
