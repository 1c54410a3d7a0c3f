"""DeepGEMM's ``transform_sf_into_required_layout``: scale factors in the layout the GEMMs consume.

Upstream picks the transformation from the SF dtype, the recipe and the GPU architecture: on SM90
(and whenever ``disable_ue8m0_cast=True``) float32 SFs stay float32, on SM100 they are converted to
packed UE8M0. deepport's GEMMs use float32 SFs as given (DeepGEMM's SM90 behaviour) and take packed
UE8M0 int32 SFs as well, so this function does what upstream does on SM90 for float32 SFs and what it
does on SM100 for int32 SFs, on every device:

- float32, ``gran_mn == 1`` (per-row SFs: SFA, or SFB of the 1D1D recipe): the MN-major, TMA-aligned
  copy or view (:func:`get_mn_major_tma_aligned_tensor`);
- float32, ``gran_mn == 128`` (128x128 SFB): checked to be contiguous, or contiguous after
  transposing the last two dimensions, and returned as is;
- int32 packed UE8M0, ``gran_mn == 1``: checked to be MN-major and TMA-aligned, returned as is.

Anything else raises, naming what was expected. Both generations' calls work: v2.0's
``(sf, mn, k, recipe, num_groups=None, is_sfa=False, disable_ue8m0_cast=False)`` (a 3-int recipe,
``is_sfa`` defaulting to the SFB side) and the current one (``is_sfa=None`` by default, a 2-int
``(gran_mn, gran_k)`` recipe allowed, ``psum_layout``). ``psum_layout`` only matters to upstream's SM100
UE8M0 conversion, which deepport never performs: it is accepted (a tensor or ``None``) and unused.
"""

from __future__ import annotations

import torch

from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import fp8_layout
from deepport.kernels.fp8_layout import ceil_div, get_mn_major_tma_aligned_tensor, is_mn_major_tma_aligned


def _granularity(recipe: object, is_sfa: object) -> tuple[int, int]:
    """``(gran_mn, gran_k)`` of ``recipe`` (3-tuple with ``is_sfa``, or a 2-tuple without), as upstream reads it."""
    if not isinstance(recipe, (tuple, list)) or len(recipe) not in (2, 3) or \
            any(isinstance(v, bool) or not isinstance(v, int) for v in recipe):
        raise ArgumentTypeError("recipe", f"expected (gran_m_a, gran_n_b, gran_k) or (gran_mn, gran_k), got {recipe!r}")
    if len(recipe) == 3:  # is_sfa=None counts as False: v2.0's default (upstream asserts it is given since 2026-01)
        sfa = False if is_sfa is None else chk.expect_bool("is_sfa", is_sfa)
        return (int(recipe[0]) if sfa else int(recipe[1])), int(recipe[2])
    if is_sfa is not None:
        raise InvalidArgumentError("is_sfa", f"expected None with a 2-int recipe (gran_mn, gran_k), got {is_sfa!r}")
    return int(recipe[0]), int(recipe[1])


def _check_shape(sf: torch.Tensor, mn: int, k: int, gran_mn: int, num_groups: int | None) -> None:
    per_word = fp8_layout.UE8M0_PER_INT32 if sf.dtype == torch.int32 else 1
    expected: tuple[int, ...] = (ceil_div(mn, gran_mn), ceil_div(k, fp8_layout.BLOCK_K * per_word))
    if num_groups is not None:
        expected = (num_groups, *expected)
    what = "[num_groups, ceil(mn / gran_mn), ceil(k / gran_k)]" if num_groups is not None else \
        "[ceil(mn / gran_mn), ceil(k / gran_k)]"
    chk.expect_shape("sf", sf, expected, what + (" with four K blocks per int32" if per_word > 1 else ""))


def _is_sfb_layout(sf: torch.Tensor) -> bool:
    """Contiguous, or contiguous after transposing the last two dimensions (groups contiguous)."""
    rows, cols = int(sf.shape[-2]), int(sf.shape[-1])
    if sf.dim() == 3 and int(sf.shape[0]) > 1 and sf.stride(0) != rows * cols:
        return False
    row_major = (cols <= 1 or sf.stride(-1) == 1) and (rows <= 1 or sf.stride(-2) == cols)
    col_major = (rows <= 1 or sf.stride(-2) == 1) and (cols <= 1 or sf.stride(-1) == rows)
    return row_major or col_major


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe: tuple[int, ...],
                                      num_groups: int | None = None, is_sfa: bool | None = None,
                                      disable_ue8m0_cast: bool = False,
                                      psum_layout: torch.Tensor | None = None) -> torch.Tensor:
    """``sf`` (float32 ``[(G,) ceil(mn / gran_mn), ceil(k / 128)]`` or packed UE8M0 int32 with a quarter of
    the K columns) in the layout deepport's FP8 GEMMs consume without another copy; see the module
    docstring for the cases. ``gran_k`` must be 128 (deepport's K blocks). ``disable_ue8m0_cast`` is
    checked and has no effect (deepport never casts float32 SFs to UE8M0)."""
    t = chk.expect_tensor("sf", sf)
    chk.expect_dtype("sf", t, (torch.float32, torch.int32))
    mn, k = chk.expect_int("mn", mn, minimum=0), chk.expect_int("k", k, minimum=0)
    groups = None if num_groups is None else chk.expect_int("num_groups", num_groups, minimum=0)
    chk.expect_bool("disable_ue8m0_cast", disable_ue8m0_cast)
    if psum_layout is not None:
        chk.expect_tensor("psum_layout", psum_layout)
    gran_mn, gran_k = _granularity(recipe, is_sfa)
    chk.expect_int("recipe (gran_mn)", gran_mn, minimum=1)
    if gran_k != fp8_layout.BLOCK_K:
        raise InvalidArgumentError("recipe", f"expected gran_k = {fp8_layout.BLOCK_K} (deepport's FP8 GEMMs use "
                                   f"128-wide K blocks), got {gran_k}")
    chk.expect_ndim("sf", t, 2 if groups is None else 3, "[(num_groups,) rows, cols]")
    _check_shape(t, mn, k, gran_mn, groups)
    if t.dtype == torch.float32 and gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(t)
    if t.dtype == torch.float32 and gran_mn == fp8_layout.BLOCK_MN:
        if not _is_sfb_layout(t):
            raise InvalidArgumentError("sf", "expected 128x128 SFs that are contiguous, or contiguous after "
                                       f"transposing the last two dimensions, got strides {tuple(t.stride())}")
        return t
    if t.dtype == torch.int32 and gran_mn == 1:
        if not is_mn_major_tma_aligned(t):
            raise InvalidArgumentError("sf", "expected packed UE8M0 SFs laid out MN-major and TMA-aligned (see get_mn_"
                                       f"major_tma_aligned_packed_ue8m0_tensor), got strides {tuple(t.stride())}")
        return t
    raise InvalidArgumentError("recipe", f"expected gran_mn 1 or 128 for float32 SFs, 1 for packed UE8M0 (int32) "
                               f"SFs, got gran_mn = {gran_mn} with {str(t.dtype).removeprefix('torch.')} SFs")
