"""M-grouped block-scaled FP8 GEMMs for MoE experts (DeepGEMM's contiguous and masked layouts).

Public entry points: :func:`m_grouped_fp8_gemm_nt_contiguous` (the prefill / expanded layout) and
:func:`m_grouped_fp8_gemm_nt_masked` (the low-latency decode layout). Only the M axis is grouped: all
groups share N and K, and group ``g`` multiplies its rows by ``B[g]``. Per row and group the math is
the dense ``fp8_gemm_nt``'s: ``D[m, n] = sum_kb SFA[m, kb] * SFB[g, n // 128, kb] * sum_{k in kb}
A[m, k] * B[g, n, k]`` with fp32-or-better accumulation, rounded once to bfloat16.

Backends receive a validated :class:`ContiguousCall` / :class:`MaskedCall` and write into ``out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from deepport.dispatch import selection, settings
from deepport.dispatch.device import DeviceInfo, device_info
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import _fp8_checks as fp8chk
from deepport.kernels.fp8_layout import get_mk_alignment_for_contiguous_layout

OP_CONTIGUOUS = "m_grouped_fp8_gemm_nt_contiguous"
OP_MASKED = "m_grouped_fp8_gemm_nt_masked"
OP_VERSION = 1
FP8 = fp8chk.FP8_DTYPE
Recipe = fp8chk.Recipe


@dataclass(frozen=True)
class ScaledOperand:
    """One validated operand: FP8 ``data``, its scale factors ``sf`` as given (any accepted layout),
    their format (``"float32"`` or ``"ue8m0"``) and rows per scale along MN (``gran_mn``: 1 or 128)."""

    data: torch.Tensor
    sf: torch.Tensor
    sf_format: str
    gran_mn: int


@dataclass(frozen=True)
class GroupedFP8Signature:
    """What dispatch sees of a grouped FP8 GEMM call (hashable; row counts are left out on purpose, so a
    serving loop whose token count changes every step logs its automatic choice once)."""

    device: DeviceInfo
    dtype: torch.dtype  # the operands' dtype, torch.float8_e4m3fn
    layout: str  # "contiguous" or "masked"
    num_groups: int
    n: int
    k: int
    recipe: Recipe
    sf_format: str  # fp8chk.SF_FLOAT32 or fp8chk.SF_UE8M0 (packed int32)

    def __str__(self) -> str:
        return f"e4m3 {self.layout} G={self.num_groups} n={self.n} k={self.k} recipe={self.recipe} sf={self.sf_format}"


@dataclass(frozen=True)
class ContiguousCall:
    """A validated contiguous-layout call, as handed to a backend's ``run_contiguous(call, out)``.

    ``m_indices_host`` is a host copy of ``m_indices`` when the value checks read it (saves a backend
    the device-to-host sync); ``None`` under ``DEEPPORT_CHECK_VALUES=0``.
    """

    a: ScaledOperand  # A [M_sum, K], SFA
    b: ScaledOperand  # B [G, N, K], SFB
    m_indices: torch.Tensor
    signature: GroupedFP8Signature
    m_indices_host: np.ndarray | None = None

    @property
    def m_sum(self) -> int:
        return int(self.a.data.shape[0])

    @property
    def perf_shape(self) -> dict[str, int]:
        """The shape features automatic selection buckets this call by (:func:`contiguous_perf_shape`)."""
        sig = self.signature
        return contiguous_perf_shape({"groups": sig.num_groups, "m_per_group": self.m_sum // sig.num_groups,
                                      "n": sig.n, "k": sig.k})


@dataclass(frozen=True)
class MaskedCall:
    """A validated masked-layout call, as handed to a backend's ``run_masked(call, out)``.

    ``masked_m_host`` is a host copy of ``masked_m`` when the value checks read it, else ``None``.
    """

    a: ScaledOperand  # A [G, M_max, K], SFA
    b: ScaledOperand  # B [G, N, K], SFB
    masked_m: torch.Tensor
    expected_m: int
    signature: GroupedFP8Signature
    masked_m_host: np.ndarray | None = None

    @property
    def m_max(self) -> int:
        return int(self.a.data.shape[1])

    @property
    def perf_shape(self) -> dict[str, int]:
        """The shape features automatic selection buckets this call by (:func:`masked_perf_shape`)."""
        sig = self.signature
        return masked_perf_shape({"groups": sig.num_groups, "expected_m": self.expected_m, "m_max": self.m_max,
                                  "n": sig.n, "k": sig.k})


def contiguous_perf_shape(params: Mapping[str, Any]) -> dict[str, int]:
    """A contiguous grouped GEMM's shape features for measured backend rankings (from a bound call, or from
    the ``params`` of a ``deepport bench`` config): ``m`` (rows per group, ``M_sum // G``), ``groups``, ``n``,
    ``k``."""
    return {"m": int(params["m_per_group"]), "groups": int(params["groups"]), "n": int(params["n"]),
            "k": int(params["k"])}


def masked_perf_shape(params: Mapping[str, Any]) -> dict[str, int]:
    """A masked grouped GEMM's shape features for measured backend rankings: ``m`` (``expected_m``; a bench
    config's params give ``masked_m``, whose mean per group is the ``expected_m`` the bench passes),
    ``groups``, ``m_max``, ``n``, ``k``."""
    groups = int(params["groups"])
    expected = params.get("expected_m")
    m = int(expected) if expected is not None else max(1, sum(int(x) for x in params["masked_m"]) // groups)
    return {"m": m, "groups": groups, "m_max": int(params["m_max"]), "n": int(params["n"]), "k": int(params["k"])}


_Call = TypeVar("_Call", ContiguousCall, MaskedCall, contravariant=True)


class FP8GroupedGemmImpl(Protocol[_Call]):
    """How a backend runs an M-grouped FP8 GEMM: ``run(call, out) -> None``, ``call`` a :class:`ContiguousCall`
    (``m_grouped_fp8_gemm_nt_contiguous``) or a :class:`MaskedCall` (``..._masked``).

    Each group is the dense ``fp8_gemm_nt`` of its rows and ``B[g]`` (bfloat16 ``out``). Contiguous:
    write every row of ``out`` ``[M_sum, N]``: group rows ``m`` get ``A[m] @ B[m_indices[m]]^T``, padding
    rows (``m_indices == -1``, whose ``A``/``SFA`` rows may hold NaN) get 0. Masked: write
    ``out[g, :masked_m[g]]`` of ``out`` ``[G, M_max, N]`` and leave rows past ``masked_m[g]`` as they were
    (the suite checks they are untouched). ``*_host`` copies of the index tensors are set when the op
    layer read them (use them to avoid a device sync). Never modify an input.
    """

    def __call__(self, call: _Call, out: torch.Tensor, /) -> None: ...


def m_grouped_fp8_gemm_nt_contiguous(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    recipe: tuple[int, int, int] | None = None,
    backend: str | None = None,
) -> None:
    """Grouped GEMM, contiguous layout: row ``m`` of ``A`` times ``B[m_indices[m]]^T`` (DeepGEMM's
    ``m_grouped_fp8_gemm_nt_contiguous`` with ``grouped_layout = m_indices``, no psum layout).

    Args:
        a: ``(A, SFA)``. ``A``: ``torch.float8_e4m3fn [M_sum, K]``, K-major (``stride(-1) == 1``), the
            rows of all groups back to back. ``SFA``: per-token 1x128 scales, ``[M_sum, ceil(K/128)]``
            float32 (row-major, or MN-major TMA-aligned as from ``get_mn_major_tma_aligned_tensor``),
            or UE8M0 packed four per int32 ``[M_sum, ceil(ceil(K/128)/4)]``; dequantization multipliers
            (``x ~ A * SFA``). Rows with ``m_indices == -1`` of ``A`` and ``SFA`` are never read: they
            may hold anything, NaN included.
        b: ``(B, SFB)``. ``B``: ``torch.float8_e4m3fn [G, N, K]``, K-major, ``G, N, K > 0``. ``SFB``:
            ``[G, ceil(N/128), ceil(K/128)]`` float32 128x128 block scales (last two dims contiguous,
            or contiguous after transposing them), or with ``recipe=(1, 1, 128)`` / UE8M0 packed int32
            one row of scales per output column, ``[G, N, ...]`` as for ``SFA``.
        out: ``torch.bfloat16 [M_sum, N]``, last dimension contiguous, sharing no memory with the
            inputs. Written in place: every row is written.
        m_indices: ``torch.int32 [M_sum]``, contiguous, on ``A``'s device: the group of each row, in
            ``[0, G)``, or ``-1`` for a padding row. Alignment rule (DeepGEMM's, enforced): with
            ``align = get_mk_alignment_for_contiguous_layout()`` (128), every row ``m >= 0`` that is not
            a multiple of ``align`` and has ``m_indices[m] >= 0`` carries the same group as row
            ``m - 1``. So each group's segments start at multiples of 128, and an aligned 128-row block
            holds rows of one group followed by padding (or only padding). A group may own no rows.
            Checked (one device-to-host copy of ``m_indices``) unless ``DEEPPORT_CHECK_VALUES=0``.
        recipe: ``(gran_m_a, gran_n_b, gran_k)``: ``None`` (the default: ``(1, 128, 128)`` for float32
            SFB, ``(1, 1, 128)`` for packed UE8M0) or one of those two.
        backend: run on this backend (explicit: raises if it cannot, never falls back).

    Result (written into ``out``; nothing is returned, as in DeepGEMM):
        ``out[m] = sum_kb SFA[m, kb] * SFB[g][n_blk, kb] * (A[m, kb-block] . B[g][:, kb-block])`` for
        rows with ``g = m_indices[m] >= 0``, rounded to bfloat16; **padding rows (``-1``) are
        written with +0.0** (DeepGEMM leaves them unspecified; deepport defines them so that a
        following reduction over all rows is safe). ``M_sum == 0`` is a no-op.

    Raises:
        deepport.errors.InvalidArgumentError: an argument breaks this contract (checked before any
            backend runs, ``m_indices`` values included unless ``DEEPPORT_CHECK_VALUES=0``).
        deepport.errors.BackendNotSupportedError / NoBackendError: no backend can run the call.
    """
    call = bind_contiguous(a, b, out, m_indices, recipe=recipe)
    chosen, _ = selection.choose(OP_CONTIGUOUS, call.signature, backend, call.perf_shape)
    if call.m_sum > 0:
        run: FP8GroupedGemmImpl[ContiguousCall] = chosen.implementation(OP_CONTIGUOUS)
        run(call, out)


def m_grouped_fp8_gemm_nt_masked(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
    *,
    recipe: tuple[int, int, int] | None = None,
    backend: str | None = None,
) -> None:
    """Grouped GEMM, masked layout: ``out[g, :masked_m[g]] = A[g, :masked_m[g]] @ B[g]^T`` with block
    scales (DeepGEMM's ``m_grouped_fp8_gemm_nt_masked``; DeepEP's low-latency dispatch output).

    Args:
        a: ``(A, SFA)``. ``A``: ``torch.float8_e4m3fn [G, M_max, K]``, K-major, ``G, M_max, K > 0``.
            ``SFA``: ``[G, M_max, ceil(K/128)]`` float32 (row-major, or each group MN-major TMA-aligned as
            from ``get_mn_major_tma_aligned_tensor``), or UE8M0 packed int32 ``[G, M_max, ceil(K/512)]``.
            Rows ``>= masked_m[g]`` of ``A[g]`` and ``SFA[g]`` are never read (may hold NaN).
        b: ``(B, SFB)`` exactly as for :func:`m_grouped_fp8_gemm_nt_contiguous`: ``B [G, N, K]``,
            ``SFB [G, ceil(N/128), ceil(K/128)]`` (or per-row with ``recipe=(1, 1, 128)`` / UE8M0).
        out: ``torch.bfloat16 [G, M_max, N]``, last dimension contiguous, sharing no memory with the
            inputs.
        masked_m: ``torch.int32 [G]``, contiguous, on ``A``'s device: rows in use per group,
            ``0 <= masked_m[g] <= M_max`` (checked with one device-to-host copy unless
            ``DEEPPORT_CHECK_VALUES=0``). A device tensor so that the call can be graph-captured.
        expected_m: a host int ``> 0``, the caller's estimate of the typical ``masked_m`` (a tuning
            hint for kernel configuration; it never changes the result, whatever its value).
        recipe: as for :func:`m_grouped_fp8_gemm_nt_contiguous`.
        backend: run on this backend (explicit: raises if it cannot, never falls back).

    Result (written into ``out``; nothing is returned, as in DeepGEMM):
        rows ``m < masked_m[g]`` of ``out[g]`` hold the block-scaled product rounded to bfloat16;
        **rows ``m >= masked_m[g]`` are not written**: they keep, bit for bit, whatever ``out`` held
        before the call (DeepGEMM's behaviour; a group with ``masked_m[g] == 0`` leaves ``out[g]``
        untouched).

    Raises:
        deepport.errors.InvalidArgumentError: an argument breaks this contract.
        deepport.errors.BackendNotSupportedError / NoBackendError: no backend can run the call.
    """
    call = bind_masked(a, b, out, masked_m, expected_m, recipe=recipe)
    chosen, _ = selection.choose(OP_MASKED, call.signature, backend, call.perf_shape)
    run: FP8GroupedGemmImpl[MaskedCall] = chosen.implementation(OP_MASKED)
    run(call, out)


def bind_contiguous(a: object, b: object, out: object, m_indices: object, *,
                    recipe: object = None) -> ContiguousCall:
    """Validate the arguments of :func:`m_grouped_fp8_gemm_nt_contiguous` (all but ``backend=``)."""
    a_data, sfa = fp8chk.expect_pair("a", a, "(A [M_sum, K] float8_e4m3fn, SFA)")
    fp8chk.expect_fp8_operand("a[0]", a_data, 2, "[M_sum, K]")
    chk.expect_positive("a[0]", a_data, 1, "K")
    m_sum, k = (int(x) for x in a_data.shape)
    b_op, resolved = _check_b(b, k, a_data.device, sfa, recipe)
    g, n = int(b_op.data.shape[0]), int(b_op.data.shape[1])
    a_op = _check_sfa(a_data, sfa, (m_sum,), k, resolved, b_op.sf_format, "[M_sum, ")
    m_indices = _check_out_and_index(out, (m_sum, n), "[M_sum, N]", a_op, b_op, "m_indices", m_indices,
                                     "[M_sum] (one group id per row of `a`)")
    chk.expect_data("a[0]", a_data)  # every other tensor is on a[0]'s device
    host = None
    if settings.check_values() and m_sum > 0:
        host = m_indices.detach().to("cpu", copy=True).numpy()
        check_m_indices_values(host, g, get_mk_alignment_for_contiguous_layout())
    return ContiguousCall(a_op, b_op, m_indices, _signature(a_data, b_op, resolved, "contiguous"), host)


def bind_masked(a: object, b: object, out: object, masked_m: object, expected_m: object, *,
                recipe: object = None) -> MaskedCall:
    """Validate the arguments of :func:`m_grouped_fp8_gemm_nt_masked` (all but ``backend=``)."""
    a_data, sfa = fp8chk.expect_pair("a", a, "(A [G, M_max, K] float8_e4m3fn, SFA)")
    fp8chk.expect_fp8_operand("a[0]", a_data, 3, "[G, M_max, K]")
    for dim, what in ((0, "G"), (1, "M_max"), (2, "K")):
        chk.expect_positive("a[0]", a_data, dim, what)
    g, m_max, k = (int(x) for x in a_data.shape)
    b_op, resolved = _check_b(b, k, a_data.device, sfa, recipe)
    n = int(b_op.data.shape[1])
    chk.expect_dim("b[0]", b_op.data, 0, g, "G, dimension 0 of `a[0]`")
    a_op = _check_sfa(a_data, sfa, (g, m_max), k, resolved, b_op.sf_format, "[G, M_max, ")
    masked_m = _check_out_and_index(out, (g, m_max, n), "[G, M_max, N]", a_op, b_op, "masked_m", masked_m,
                                    "[G] (rows in use per group)")
    expected = chk.expect_int("expected_m", expected_m, minimum=1)
    chk.expect_data("a[0]", a_data)  # every other tensor is on a[0]'s device
    host = None
    if settings.check_values():
        host = masked_m.detach().to("cpu", copy=True).numpy()
        check_masked_m_values(host, m_max)
    return MaskedCall(a_op, b_op, masked_m, expected, _signature(a_data, b_op, resolved, "masked"), host)


def check_m_indices_values(host: np.ndarray, num_groups: int, align: int) -> None:
    """Group ids in ``[-1, G)`` and DeepGEMM's alignment rule (see the op's docstring)."""
    bad = np.flatnonzero((host < -1) | (host >= num_groups))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgumentError("m_indices", f"expected group ids in [-1, {num_groups}) (-1 marks padding; `b` "
                                   f"has {num_groups} groups), got m_indices[{i}] = {int(host[i])}")
    rows = np.arange(host.size)
    breaks = (rows % align != 0) & (host >= 0)
    breaks[1:] &= host[1:] != host[:-1]
    bad = np.flatnonzero(breaks)
    if bad.size:
        i = int(bad[0])
        raise InvalidArgumentError(
            "m_indices", f"expected each group's rows to start at a multiple of {align} "
            f"(get_mk_alignment_for_contiguous_layout()) and an aligned block to hold one group then padding, got "
            f"m_indices[{i - 1}] = {int(host[i - 1])}, m_indices[{i}] = {int(host[i])} (row {i} is inside the "
            f"block starting at row {i - i % align})")


def check_masked_m_values(host: np.ndarray, m_max: int) -> None:
    bad = np.flatnonzero((host < 0) | (host > m_max))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgumentError("masked_m", f"expected 0 <= masked_m[g] <= M_max = {m_max} (dimension 1 of "
                                   f"`a[0]`), got masked_m[{i}] = {int(host[i])}")


def _check_b(b: object, k: int, device: torch.device, sfa: torch.Tensor,
             recipe: object) -> tuple[ScaledOperand, Recipe]:
    """``(B [G, N, K], SFB)`` and the call's recipe (SFB's format decides the default)."""
    b_data, sfb = fp8chk.expect_pair("b", b, "(B [G, N, K] float8_e4m3fn, SFB)")
    fp8chk.expect_fp8_operand("b[0]", b_data, 3, "[G, N, K]")
    chk.expect_same_device("b[0]", b_data, device, "a")
    chk.expect_positive("b[0]", b_data, 0, "G")
    chk.expect_positive("b[0]", b_data, 1, "N")
    chk.expect_dim("b[0]", b_data, 2, k, "K, the last dimension of `a[0]`")
    g, n = int(b_data.shape[0]), int(b_data.shape[1])
    fmt = fp8chk.sf_format("b[1]", sfb)
    resolved = fp8chk.resolve_recipe(recipe, fmt)
    gran_n = resolved[1]
    rows, cols = fp8chk.sf_shape(n, k, gran_n, fmt)
    what = "ceil(N/128)" if gran_n > 1 else "N"
    words = "ceil(K/128)" if fmt == fp8chk.SF_FLOAT32 else "ceil(K/512) int32 words"
    fp8chk.expect_scale_factors("b[1]", sfb, (g, rows, cols), f"[G, {what}, {words}]", device, "a")
    return ScaledOperand(b_data, sfb, fmt, gran_n), resolved


def _check_out_and_index(out: object, shape: tuple[int, ...], layout: str, a_op: ScaledOperand, b_op: ScaledOperand,
                         name: str, index: object, index_layout: str) -> torch.Tensor:
    """``out`` (bfloat16 ``shape``, sharing no memory with any input) and the contiguous int32 index tensor
    ``name`` of shape ``shape[:1]`` (``[M_sum]`` or ``[G]``) on A's device; returns the index."""
    device = a_op.data.device
    out = fp8chk.expect_gemm_output("out", out, shape, (torch.bfloat16,), device, "a", layout)
    index = chk.expect_tensor(name, index)
    chk.expect_dtype(name, index, (torch.int32,))
    chk.expect_shape(name, index, shape[:1], index_layout)
    chk.expect_same_device(name, index, device, "a")
    chk.expect_contiguous(name, index)
    inputs = {"a[0]": a_op.data, "a[1]": a_op.sf, "b[0]": b_op.data, "b[1]": b_op.sf, name: index}
    chk.expect_no_overlap("out", out, inputs)
    return index


def _check_sfa(a_data: torch.Tensor, sfa: torch.Tensor, lead: tuple[int, ...], k: int, recipe: Recipe,
               fmt: str, layout: str) -> ScaledOperand:
    fp8chk.expect_same_sf_format("a[1]", sfa, fmt, "b[1]")
    rows, cols = fp8chk.sf_shape(lead[-1], k, recipe[0], fmt)
    words = "ceil(K/128)]" if fmt == fp8chk.SF_FLOAT32 else "ceil(K/512)] int32 words"
    fp8chk.expect_scale_factors("a[1]", sfa, (*lead[:-1], rows, cols), layout + words, a_data.device, "a")
    return ScaledOperand(a_data, sfa, fmt, recipe[0])


def _signature(a_data: torch.Tensor, b_op: ScaledOperand, recipe: Recipe, layout: str) -> GroupedFP8Signature:
    g, n, k = (int(x) for x in b_op.data.shape)
    return GroupedFP8Signature(device_info(a_data.device), a_data.dtype, layout, g, n, k, recipe, b_op.sf_format)


@dataclass(frozen=True)
class GroupedFP8GemmOp:
    """The op-spec protocol (``OP``, ``OP_VERSION``, ``bind``, ``example_signature``) of one grouped layout."""

    layout: str  # "contiguous" or "masked"

    @property
    def OP(self) -> str:
        return OP_CONTIGUOUS if self.layout == "contiguous" else OP_MASKED

    @property
    def OP_VERSION(self) -> int:
        return OP_VERSION

    def bind(self, *args: Any, backend: str | None = None, **kwargs: Any) -> ContiguousCall | MaskedCall:
        return (bind_contiguous if self.layout == "contiguous" else bind_masked)(*args, **kwargs)

    def example_signature(self, device: DeviceInfo) -> GroupedFP8Signature:
        """DeepSeek-V3 routed experts at EP32: 8 groups, N=4096, K=7168, default recipe, float32 SFs."""
        return GroupedFP8Signature(device, FP8, self.layout, 8, 4096, 7168, fp8chk.RECIPE_1D2D, fp8chk.SF_FLOAT32)


VARIANTS: tuple[GroupedFP8GemmOp, ...] = (GroupedFP8GemmOp("contiguous"), GroupedFP8GemmOp("masked"))
