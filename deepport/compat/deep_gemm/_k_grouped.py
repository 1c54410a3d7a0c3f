"""DeepGEMM's K-grouped FP8 GEMMs (MoE weight gradients), one deepport dense GEMM per group.

``D[g] = C[g] + A_g^T @ B_g`` in float32, where group ``g`` owns a run of rows of the K-stacked
operands ``A [sum_K, M]`` and ``B [sum_K, N]``. SFs are per row of ``A_g^T`` / ``B_g^T`` and 128 K (the
1D1D recipe ``(1, 1, 128)``), compact per group: group ``g`` has ``ceil(K_g / 128)`` SF rows, empty
groups none. Two storage forms, as upstream:

- ``k_grouped_fp8_gemm_tn_contiguous`` (SM100 form, MN-major): ``a = (A [sum_K, M], SFA [sum_kb, M])``,
  ``b = (B [sum_K, N], SFB [sum_kb, N])``; with ``use_psum_layout=True`` ``grouped_layout`` holds end
  offsets and group ``g`` owns rows ``[align(end[g-1], 128), end[g])``.
- ``k_grouped_fp8_gemm_nt_contiguous`` (SM90 form, K-major): ``a[0]`` holds each ``A_g^T [M, K_g]``
  row-major, back to back (``sum_K * M`` elements, any shape), ``a[1]`` is ``[M, sum_kb]`` (the
  transpose of the compact ``[sum_kb, M]``); the same for ``b``. No psum layout, as upstream.

Each non-empty group runs :func:`deepport.fp8_gemm_tn` / :func:`deepport.fp8_gemm_nt` with recipe
``(1, 1, 128)`` and ``c`` (``c is d`` accumulates in place); an empty group copies ``C[g]`` into
``D[g]`` (DeepGEMM's ``K == 0`` result). Differences: ``gran_k`` must be 128 and SFs float32 (the SM100
UE8M0 and ``gran_k = 32`` forms are not supported); ``grouped_layout`` is read on the host (one
device-to-host copy) and must agree with ``ks_cpu`` where both are given; ``compiled_dims`` is a JIT
knob, checked and ignored. v2.0 (2025-07) named the two group arguments ``ks`` and ``ks_tensor``:
both spellings are accepted as keywords (positionally they are the same 4th and 5th arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import deepport
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels.fp8_layout import BLOCK_K, align, get_mk_alignment_for_contiguous_layout, num_k_blocks

Pair = tuple[torch.Tensor, torch.Tensor]
Segment = tuple[int, int]  # (first row, K) of one group in the K-stacked operands
RECIPE = (1, 1, BLOCK_K)


def _pair(name: str, value: object) -> Pair:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ArgumentTypeError(name, f"expected a pair (data, scale factors), got {type(value).__name__}")
    data, sf = chk.expect_tensor(f"{name}[0]", value[0]), chk.expect_tensor(f"{name}[1]", value[1])
    chk.expect_dtype(f"{name}[1]", sf, (torch.float32,))
    return data, sf


def _check_common(d: object, c: object, recipe: object, compiled_dims: object) -> tuple[torch.Tensor, torch.Tensor]:
    out = chk.expect_tensor("d", d)
    chk.expect_dtype("d", out, (torch.float32,))
    chk.expect_ndim("d", out, 3, "[num_groups, M, N]")
    if c is None:
        raise InvalidArgumentError("c", "expected a float32 [num_groups, M, N] tensor (DeepGEMM's K-grouped GEMMs "
                                   "always accumulate; pass c=d to accumulate in place), got None")
    acc = chk.expect_tensor("c", c)
    chk.expect_dtype("c", acc, (torch.float32,))
    chk.expect_shape("c", acc, tuple(out.shape), "[num_groups, M, N]")
    if not isinstance(recipe, (tuple, list)) or tuple(recipe) != RECIPE:
        raise InvalidArgumentError("recipe", f"expected {RECIPE} (per-row SFs over 128-wide K blocks; gran_k 32 is "
                                   f"an SM100 UE8M0 form deepport does not have), got {recipe!r}")
    if not isinstance(compiled_dims, str):
        raise ArgumentTypeError("compiled_dims", f"expected a str such as 'mn', got {type(compiled_dims).__name__}")
    return out, acc


def _segments(ks_cpu: Sequence[int] | None, grouped_layout: object, num_groups: int, use_psum_layout: bool,
              total_rows: int | None) -> list[Segment]:
    """Each group's (first row, K) from ``ks_cpu`` and/or ``grouped_layout`` (see the module docstring)."""
    layout = chk.expect_tensor("grouped_layout", grouped_layout)
    chk.expect_dtype("grouped_layout", layout, (torch.int32,))
    chk.expect_shape("grouped_layout", layout, (num_groups,), "[num_groups]")
    values = [int(v) for v in layout.detach().to("cpu")]
    alignment = get_mk_alignment_for_contiguous_layout()
    if ks_cpu is not None and len(ks_cpu) > 0:
        if len(ks_cpu) != num_groups:
            raise InvalidArgumentError("ks_cpu", f"expected {num_groups} group sizes (d.shape[0]), got {len(ks_cpu)}")
        ks = [chk.expect_int(f"ks_cpu[{g}]", k, minimum=0) for g, k in enumerate(ks_cpu)]
        for g, k in enumerate(ks):
            if k % alignment:
                raise InvalidArgumentError(f"ks_cpu[{g}]", f"expected a multiple of {alignment}, got {k}")
    elif not use_psum_layout:
        raise InvalidArgumentError("ks_cpu", "expected the per-group K sizes (a non-empty list) without "
                                   "use_psum_layout, got " + ("None" if ks_cpu is None else "[]"))
    if not use_psum_layout:
        if values != ks:
            raise InvalidArgumentError("grouped_layout", f"expected the group sizes of ks_cpu {ks}, got {values}")
        starts = [sum(ks[:g]) for g in range(num_groups)]
        return list(zip(starts, ks, strict=True))
    segments, previous = [], 0
    for g, end in enumerate(values):
        start = align(previous, alignment)
        if end != previous and not start <= end <= (total_rows if total_rows is not None else end):
            raise InvalidArgumentError("grouped_layout", f"expected end offsets with end[g] == end[g-1] (an empty "
                                       f"group) or align(end[g-1], {alignment}) <= end[g] <= sum_K, got end[{g}] = "
                                       f"{end} after {previous}")
        segments.append((start, end - start) if end > start else (start, 0))
        previous = end
    return segments


def _expect_sf_blocks(name: str, sf: torch.Tensor, dim: int, segments: list[Segment]) -> None:
    """``sf`` has ``ceil(K_g / 128)`` K blocks per non-empty group along ``dim``, compact."""
    blocks = sum(num_k_blocks(k) for _, k in segments)
    chk.expect_ndim(name, sf, 2, "[sum_kb, rows]" if dim == 0 else "[rows, sum_kb]")
    chk.expect_dim(name, sf, dim, blocks, "K blocks: ceil(K_g / 128) per non-empty group")


def _run_groups(segments: list[Segment], out: torch.Tensor, acc: torch.Tensor,
                gemm: Callable[[Segment, int, torch.Tensor, torch.Tensor | None], None]) -> None:
    """``gemm(segment, first SF block, d[g], c for it)`` per non-empty group; ``D[g] = C[g]`` for empty ones."""
    in_place = acc is out
    sf_block = 0
    for g, segment in enumerate(segments):
        target = out[g]
        if segment[1] == 0:
            if not in_place:
                target.copy_(acc[g])
            continue
        gemm(segment, sf_block, target, target if in_place else acc[g])
        sf_block += num_k_blocks(segment[1])


def _v2_names(ks_cpu: Sequence[int] | None, grouped_layout: torch.Tensor | None, ks: Sequence[int] | None,
              ks_tensor: torch.Tensor | None) -> tuple[Sequence[int] | None, torch.Tensor | None]:
    """``(ks_cpu, grouped_layout)`` from the current names or v2.0's ``ks``/``ks_tensor`` (one of each pair)."""
    for current, old, value, old_value in (("ks_cpu", "ks", ks_cpu, ks), ("grouped_layout", "ks_tensor",
                                                                         grouped_layout, ks_tensor)):
        if value is not None and old_value is not None:
            raise InvalidArgumentError(current, f"expected either {current} or its v2.0 name {old}, got both")
    if grouped_layout is None and ks_tensor is None:
        raise InvalidArgumentError("grouped_layout", "expected the int32 [num_groups] group layout as the 5th "
                                   "argument (grouped_layout, v2.0: ks_tensor), got None")
    return (ks_cpu if ks is None else ks), (grouped_layout if ks_tensor is None else ks_tensor)


def k_grouped_fp8_gemm_tn_contiguous(a: Pair, b: Pair, d: torch.Tensor, ks_cpu: Sequence[int] | None = None,
                                     grouped_layout: torch.Tensor | None = None, c: torch.Tensor | None = None,
                                     recipe: tuple[int, int, int] = RECIPE, compiled_dims: str = "mn",
                                     use_psum_layout: bool = False, *, ks: Sequence[int] | None = None,
                                     ks_tensor: torch.Tensor | None = None, backend: str | None = None) -> None:
    """DeepGEMM's MN-major K-grouped GEMM (see the module docstring): ``d[g] = c[g] + A_g^T @ B_g``.
    ``ks``/``ks_tensor`` are v2.0's keyword names of ``ks_cpu``/``grouped_layout``."""
    ks_cpu, grouped_layout = _v2_names(ks_cpu, grouped_layout, ks, ks_tensor)
    out, acc = _check_common(d, c, recipe, compiled_dims)
    (a_data, sfa), (b_data, sfb) = _pair("a", a), _pair("b", b)
    chk.expect_ndim("a[0]", a_data, 2, "[sum_K, M]")
    chk.expect_ndim("b[0]", b_data, 2, "[sum_K, N]")
    psum = chk.expect_bool("use_psum_layout", use_psum_layout)
    segments = _segments(ks_cpu, grouped_layout, int(out.shape[0]), psum, int(a_data.shape[0]))
    rows = int(a_data.shape[0]) if psum else sum(k for _, k in segments)
    chk.expect_dim("a[0]", a_data, 0, rows, "sum_K, the rows of all groups")
    chk.expect_dim("b[0]", b_data, 0, rows, "sum_K, the rows of all groups")
    chk.expect_dim("a[0]", a_data, 1, int(out.shape[1]), "M of d")
    chk.expect_dim("b[0]", b_data, 1, int(out.shape[2]), "N of d")
    _expect_sf_blocks("a[1]", sfa, 0, segments)
    _expect_sf_blocks("b[1]", sfb, 0, segments)

    def gemm(segment: Segment, sf_block: int, target: torch.Tensor, c_g: torch.Tensor | None) -> None:
        (start, k), kb = segment, num_k_blocks(segment[1])
        deepport.fp8_gemm_tn((a_data[start:start + k], sfa[sf_block:sf_block + kb]),
                             (b_data[start:start + k], sfb[sf_block:sf_block + kb]), target, c=c_g, recipe=RECIPE,
                             backend=backend)

    _run_groups(segments, out, acc, gemm)


def k_grouped_fp8_gemm_nt_contiguous(a: Pair, b: Pair, d: torch.Tensor, ks_cpu: Sequence[int] | None = None,
                                     grouped_layout: torch.Tensor | None = None, c: torch.Tensor | None = None,
                                     recipe: tuple[int, int, int] = RECIPE, compiled_dims: str = "mn",
                                     use_psum_layout: bool = False, *, ks: Sequence[int] | None = None,
                                     ks_tensor: torch.Tensor | None = None, backend: str | None = None) -> None:
    """DeepGEMM's K-major K-grouped GEMM (see the module docstring): ``d[g] = c[g] + A_g^T @ B_g`` with each
    ``A_g^T [M, K_g]`` / ``B_g^T [N, K_g]`` stored row-major back to back. ``ks``/``ks_tensor`` as for the
    ``tn`` form."""
    ks_cpu, grouped_layout = _v2_names(ks_cpu, grouped_layout, ks, ks_tensor)
    out, acc = _check_common(d, c, recipe, compiled_dims)
    (a_data, sfa), (b_data, sfb) = _pair("a", a), _pair("b", b)
    if chk.expect_bool("use_psum_layout", use_psum_layout):
        raise InvalidArgumentError("use_psum_layout", "expected False: the K-major form has no psum layout "
                                   "(DeepGEMM's SM90 kernel), got True")
    m, n = int(out.shape[1]), int(out.shape[2])
    segments = _segments(ks_cpu, grouped_layout, int(out.shape[0]), False, None)
    sum_k = sum(k for _, k in segments)
    for name, data, rows in (("a[0]", a_data, m), ("b[0]", b_data, n)):
        if data.numel() != sum_k * rows:
            raise InvalidArgumentError(name, f"expected sum_K * {'M' if rows == m else 'N'} = {sum_k * rows} "
                                       f"elements (each group's [rows, K_g] back to back), got {data.numel()}")
    for name, sf, rows in (("a[1]", sfa, m), ("b[1]", sfb, n)):
        _expect_sf_blocks(name, sf, 1, segments)
        chk.expect_dim(name, sf, 0, rows, "rows (M for a, N for b)")
    flat_a, flat_b = a_data.reshape(-1), b_data.reshape(-1)

    def gemm(segment: Segment, sf_block: int, target: torch.Tensor, c_g: torch.Tensor | None) -> None:
        (start, k), kb = segment, num_k_blocks(segment[1])
        a_g = flat_a[start * m:(start + k) * m].view(m, k)
        b_g = flat_b[start * n:(start + k) * n].view(n, k)
        deepport.fp8_gemm_nt((a_g, sfa[:, sf_block:sf_block + kb]), (b_g, sfb[:, sf_block:sf_block + kb]), target,
                             c=c_g, recipe=RECIPE, backend=backend)

    _run_groups(segments, out, acc, gemm)
