"""DeepGEMM's current FP8 GEMM entry points (v2.0 2025-07 onwards) on deepport's FP8 GEMM ops.

Argument conventions are DeepGEMM's: ``a = (A, SFA)``, ``b = (B, SFB)``, the output ``d`` written in
place (nothing is returned), optional ``c``, ``recipe`` or ``recipe_a``/``recipe_b``. Calls in v2.0's
positional order (``..., recipe, compiled_dims, disable_ue8m0_cast``, before ``recipe_a``/``recipe_b``
were inserted) are recognised by the ``str`` in ``recipe_a``'s place (:func:`v2_positional`). The math, the
accepted dtypes and layouts, and every check are deepport's (:func:`deepport.fp8_gemm_nt` and
friends); the differences from DeepGEMM are listed per function. Knobs that only tune DeepGEMM's JIT
kernels (``compiled_dims``, ``expected_m``, ``expected_m_for_psum_layout``) are accepted and have no
effect on the result, as in DeepGEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import deepport
from deepport.compat.deep_gemm._empty import answer_empty
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels.fp8_layout import align, get_mk_alignment_for_contiguous_layout

Pair = tuple[torch.Tensor, torch.Tensor]
Recipe = tuple[int, int, int]

_TUNING_NOTE = """
    Differences from DeepGEMM: ``compiled_dims`` is accepted and ignored (a JIT tuning knob).
    ``disable_ue8m0_cast`` has no effect: deepport never rounds float32 SFs to UE8M0 (it uses them as
    given, like DeepGEMM on SM90; DeepGEMM on SM100 casts them unless disabled, which changes the result
    only for SFs that are not powers of two). ``M == 0`` and ``N == 0`` are no-ops and ``K == 0`` gives
    ``D = C`` (or 0), as upstream (dense GEMMs; see :mod:`._empty`). ``c`` with float32 ``d`` runs in deepport's
    op (``c is d``: in-place accumulation); ``c`` with bf16 ``d`` (DeepGEMM 2026-06's BF16 accumulation,
    dense GEMMs only) accumulates into a float32 copy of ``c`` and rounds once to bf16, as the kernel does.
    FP4 operands (``fp8_fp4_*`` with int8 data) are not supported.
"""


def resolve_recipe(recipe: object, recipe_a: object, recipe_b: object) -> Any:
    """DeepGEMM's ``recipe`` or per-operand ``recipe_a=(gran_m, gran_k)``/``recipe_b=(gran_n, gran_k)``
    as one ``(gran_m_a, gran_n_b, gran_k)`` (validated by deepport), or ``None`` for the default."""
    if recipe_a is None and recipe_b is None:
        return recipe
    if recipe is not None:
        raise InvalidArgumentError("recipe", "expected either recipe or recipe_a/recipe_b, got both")
    pairs = []
    for name, value in (("recipe_a", recipe_a), ("recipe_b", recipe_b)):
        if not isinstance(value, (tuple, list)) or len(value) != 2 or \
                any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ArgumentTypeError(name, f"expected a tuple of 2 ints (gran_mn, gran_k) with the other operand's "
                                    f"recipe, got {value!r}")
        pairs.append((int(value[0]), int(value[1])))
    (gran_m, gran_k_a), (gran_n, gran_k_b) = pairs
    if gran_k_a != gran_k_b:
        raise InvalidArgumentError("recipe_b", f"expected the gran_k of recipe_a ({gran_k_a}): deepport's FP8 GEMMs "
                                   f"use one gran_k for both operands, got {gran_k_b}")
    return (gran_m, gran_n, gran_k_a)


def v2_positional(recipe_a: Any, recipe_b: Any, compiled_dims: Any, disable_ue8m0_cast: Any) -> tuple[Any, ...]:
    """``(recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast)`` with DeepGEMM v2.0's positional order read.

    v2.0 (2025-07) had no ``recipe_a``/``recipe_b``: the arguments after ``recipe`` were ``compiled_dims``
    and ``disable_ue8m0_cast``. A ``str`` where ``recipe_a`` goes (a recipe is never a str) is such a call:
    it is ``compiled_dims``, and a bool after it is ``disable_ue8m0_cast``."""
    if not isinstance(recipe_a, str):
        return recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast
    if recipe_b is not None and not isinstance(recipe_b, bool):
        raise ArgumentTypeError("recipe_b", "expected a bool (disable_ue8m0_cast) after a str compiled_dims in "
                                f"v2.0's positional order, got {type(recipe_b).__name__}")
    return None, None, recipe_a, disable_ue8m0_cast if recipe_b is None else recipe_b


def _check_flags(compiled_dims: object, disable_ue8m0_cast: object) -> None:
    if not isinstance(compiled_dims, str):
        raise ArgumentTypeError("compiled_dims", f"expected a str such as 'nk', got {type(compiled_dims).__name__}")
    chk.expect_bool("disable_ue8m0_cast", disable_ue8m0_cast)


def _dense(op: Callable[..., None]) -> Callable[..., None]:
    layout = op.__name__.removeprefix("fp8_gemm_")

    def gemm(a: Pair, b: Pair, d: torch.Tensor, c: torch.Tensor | None = None, recipe: Recipe | None = None,
             recipe_a: tuple[int, int] | None = None, recipe_b: tuple[int, int] | None = None,
             compiled_dims: str = "nk" if layout[0] == "n" else "mn", disable_ue8m0_cast: bool = False, *,
             backend: str | None = None) -> None:
        recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast = v2_positional(recipe_a, recipe_b, compiled_dims,
                                                                              disable_ue8m0_cast)
        _check_flags(compiled_dims, disable_ue8m0_cast)
        resolved = resolve_recipe(recipe, recipe_a, recipe_b)
        if answer_empty(layout, a, b, d, c):
            return
        if c is not None and isinstance(d, torch.Tensor) and d.dtype == torch.bfloat16:
            _accumulate_in_bf16(op, a, b, d, c, resolved, backend)
        else:
            op(a, b, d, c=c, recipe=resolved, backend=backend)

    gemm.__name__ = gemm.__qualname__ = op.__name__
    gemm.__doc__ = (f"DeepGEMM's ``fp8_gemm_{layout}(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, "
                    f"compiled_dims, disable_ue8m0_cast=False)``: ``D = C + A @ B^T`` written into ``d``, via "
                    f":func:`deepport.fp8_gemm_{layout}` (see it for shapes, layouts and math).\n" + _TUNING_NOTE)
    return gemm


def _accumulate_in_bf16(op: Callable[..., None], a: Pair, b: Pair, d: torch.Tensor, c: object, recipe: Any,
                        backend: str | None) -> None:
    """``d = bf16(c + A @ B^T)``: accumulated into a float32 copy of the bf16 ``c`` (exact), then rounded once."""
    acc = chk.expect_tensor("c", c)
    chk.expect_dtype("c", acc, (torch.bfloat16,))
    chk.expect_shape("c", acc, tuple(d.shape), "[M, N], d's shape")
    scratch = acc.to(torch.float32)
    op(a, b, scratch, c=scratch, recipe=recipe, backend=backend)
    d.copy_(scratch)


fp8_gemm_nt = _dense(deepport.fp8_gemm_nt)
fp8_gemm_nn = _dense(deepport.fp8_gemm_nn)
fp8_gemm_tn = _dense(deepport.fp8_gemm_tn)
fp8_gemm_tt = _dense(deepport.fp8_gemm_tt)


def m_grouped_fp8_gemm_nt_contiguous(
    a: Pair, b: Pair, d: torch.Tensor, grouped_layout: torch.Tensor | None = None, recipe: Recipe | None = None,
    recipe_a: tuple[int, int] | None = None, recipe_b: tuple[int, int] | None = None, compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False, use_psum_layout: bool = False, ensure_zero_padding: bool = True,
    expected_m_for_psum_layout: int | None = None, *, m_indices: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """DeepGEMM's M-grouped contiguous GEMM, via :func:`deepport.m_grouped_fp8_gemm_nt_contiguous`.

    ``a = (A [M_sum, K], SFA)``, ``b = (B [G, N, K], SFB)``, ``d`` bf16 ``[M_sum, N]``. The group layout is
    the 4th argument, named ``grouped_layout`` (current) or ``m_indices`` (v2.0; either keyword, not both):

    - ``use_psum_layout=False``: int32 ``[M_sum]``, the group of each row or -1 for padding, each
      group's rows starting at a multiple of 128 (``get_mk_alignment_for_contiguous_layout()``).
    - ``use_psum_layout=True`` (DeepGEMM 2026-01): int32 ``[G]`` of end offsets; group ``g`` owns rows
      ``[align(end[g-1], 128), end[g])``. deepport converts it to the per-row form on the host (one
      device-to-host copy of ``grouped_layout``); a group is empty when ``end[g] == end[g-1]``.

    Rows outside every group are written with zeros (deepport's contract), which is DeepGEMM's
    ``ensure_zero_padding=True`` and a valid result for ``False`` (unspecified rows upstream).
    """
    recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast = v2_positional(recipe_a, recipe_b, compiled_dims,
                                                                          disable_ue8m0_cast)
    _check_flags(compiled_dims, disable_ue8m0_cast)
    layout = _one_layout(grouped_layout, m_indices)
    chk.expect_bool("ensure_zero_padding", ensure_zero_padding)
    if chk.expect_bool("use_psum_layout", use_psum_layout):
        layout = psum_to_m_indices(layout, a, b)
    deepport.m_grouped_fp8_gemm_nt_contiguous(a, b, d, layout, recipe=resolve_recipe(recipe, recipe_a, recipe_b),
                                              backend=backend)


def m_grouped_fp8_gemm_nn_contiguous(
    a: Pair, b: Pair, d: torch.Tensor, grouped_layout: torch.Tensor | None = None, recipe: Recipe | None = None,
    recipe_a: tuple[int, int] | None = None, recipe_b: tuple[int, int] | None = None, compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False, use_psum_layout: bool = False, ensure_zero_padding: bool = True, *,
    m_indices: torch.Tensor | None = None, backend: str | None = None,
) -> None:
    """As :func:`m_grouped_fp8_gemm_nt_contiguous` with B stored ``[G, K, N]`` and SFB ``[G, kb, nb]``.

    deepport's grouped op takes K-major B, so B is copied to ``[G, N, K]`` once per call (SFB is only
    viewed transposed); for repeated calls store the weights K-major and use the ``nt`` form.
    """
    b_data, sfb = _pair("b", b)
    m_grouped_fp8_gemm_nt_contiguous(a, (b_data.mT.contiguous(), sfb.mT), d, grouped_layout, recipe, recipe_a,
                                     recipe_b, compiled_dims, disable_ue8m0_cast, use_psum_layout,
                                     ensure_zero_padding, m_indices=m_indices, backend=backend)


def m_grouped_fp8_gemm_nt_masked(
    a: Pair, b: Pair, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int, recipe: Recipe | None = None,
    recipe_a: tuple[int, int] | None = None, recipe_b: tuple[int, int] | None = None, compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False, *, backend: str | None = None,
) -> None:
    """DeepGEMM's M-grouped masked GEMM (alias ``fp8_m_grouped_gemm_nt_masked``), via
    :func:`deepport.m_grouped_fp8_gemm_nt_masked`: ``a = (A [G, M_max, K], SFA)``, ``b = (B [G, N, K],
    SFB)``, ``d`` bf16 ``[G, M_max, N]``, ``masked_m`` int32 ``[G]``; rows ``>= masked_m[g]`` of ``d`` are
    left untouched. ``expected_m`` is a tuning hint (checked ``> 0``, no effect on the result).
    """
    recipe_a, recipe_b, compiled_dims, disable_ue8m0_cast = v2_positional(recipe_a, recipe_b, compiled_dims,
                                                                          disable_ue8m0_cast)
    _check_flags(compiled_dims, disable_ue8m0_cast)
    deepport.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m,
                                          recipe=resolve_recipe(recipe, recipe_a, recipe_b), backend=backend)


for _fn in (m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked):
    _fn.__doc__ = (_fn.__doc__ or "") + _TUNING_NOTE


def _pair(name: str, value: object) -> Pair:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ArgumentTypeError(name, f"expected a pair (data, scale factors), got {type(value).__name__}")
    return chk.expect_tensor(f"{name}[0]", value[0]), chk.expect_tensor(f"{name}[1]", value[1])


def _one_layout(grouped_layout: torch.Tensor | None, m_indices: torch.Tensor | None) -> torch.Tensor:
    if (grouped_layout is None) == (m_indices is None):
        got = "both" if grouped_layout is not None else "neither"
        raise InvalidArgumentError("grouped_layout", "expected the group layout as the 4th argument, named "
                                   f"grouped_layout (or m_indices, its v2.0 name), got {got}")
    layout = grouped_layout if grouped_layout is not None else m_indices
    assert layout is not None
    return layout


def psum_to_m_indices(ends: torch.Tensor, a: object, b: object) -> torch.Tensor:
    """DeepGEMM's psum layout (int32 ``[G]`` end offsets) as per-row group ids (int32 ``[M_sum]``, -1 padding)."""
    ends = chk.expect_tensor("grouped_layout", ends)
    chk.expect_dtype("grouped_layout", ends, (torch.int32,))
    chk.expect_ndim("grouped_layout", ends, 1, "[G] (end offsets, use_psum_layout=True)")
    a_data, _ = _pair("a", a)
    b_data, _ = _pair("b", b)
    if b_data.dim() >= 1:
        chk.expect_dim("grouped_layout", ends, 0, int(b_data.shape[0]), "G, the groups of `b[0]`")
    m_sum = int(a_data.shape[0]) if a_data.dim() >= 1 else 0
    alignment = get_mk_alignment_for_contiguous_layout()
    rows = torch.full((m_sum,), -1, dtype=torch.int32)
    previous = 0
    for g, end in enumerate(int(e) for e in ends.detach().to("cpu")):
        start = align(previous, alignment)
        if end != previous and not start <= end <= m_sum:
            raise InvalidArgumentError(
                "grouped_layout", f"expected end offsets with end[g] == end[g-1] (an empty group) or "
                f"align(end[g-1], {alignment}) <= end[g] <= M_sum = {m_sum}, got end[{g}] = {end} after "
                f"end[{g - 1}] = {previous}" if g else f"expected 0 <= end[0] <= M_sum = {m_sum}, got {end}")
        if end > start:
            rows[start:end] = g
        previous = end
    return rows.to(ends.device)
