"""Dense block-scaled FP8 GEMM (DeepGEMM's ``fp8_gemm_{nt,nn,tn,tt}``), the ops every backend implements.

Public entry points: :func:`fp8_gemm_nt`, :func:`fp8_gemm_nn`, :func:`fp8_gemm_tn`, :func:`fp8_gemm_tt`.
The four differ only in how A and B are stored; the op layer turns each call into the NT form
(A ``[M, K]``, B ``[N, K]``, SFs ``[rows, K blocks]``) by transposing views, exactly as DeepGEMM does,
and backends receive a validated :class:`FP8GemmCall` in that form.

The spec (every variant; ``kb = k // 128``, ``B_blk(n) = n // gran_n_b``)::

    D[m, n] = C[m, n] + sum_kb SFA[m, kb] * SFB[B_blk(n), kb] * sum_{k in block kb} A[m, k] * B[n, k]

with A, B ``float8_e4m3fn`` taken exactly and SFs the **dequantization** multipliers
(``x ~ x_fp8 * sf``). Accumulation is at least float32 with partial sums promoted per 128-K block
(DeepGEMM's SM90 scheme); D is rounded once to its dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from deepport.dispatch import selection
from deepport.dispatch.device import DeviceInfo, device_info
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import _fp8_checks as fchk
from deepport.kernels.fp8_layout import num_k_blocks

OP_VERSION = 1
LAYOUTS = ("nt", "nn", "tn", "tt")
INPUT_DTYPES = (fchk.FP8_DTYPE,)
OUT_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FP8GemmSignature:
    """What dispatch sees of an FP8 GEMM call (hashable; M is left out, so a serving loop whose token
    count changes every step logs its automatic choice once)."""

    device: DeviceInfo
    dtype: torch.dtype  # the operands' dtype, float8_e4m3fn
    layout: str  # "nt", "nn", "tn" or "tt": how the caller stored A and B
    n: int
    k: int
    recipe: fchk.Recipe
    sf_format: str  # fchk.SF_FLOAT32 or fchk.SF_UE8M0
    out_dtype: torch.dtype
    accumulate: bool  # a `c` was given

    def __str__(self) -> str:
        out = str(self.out_dtype).removeprefix("torch.")
        return (f"e4m3 {self.layout} n={self.n} k={self.k} recipe={self.recipe} sf={self.sf_format} out={out}"
                f"{' +c' if self.accumulate else ''}")


@dataclass(frozen=True)
class FP8GemmCall:
    """A validated call in NT form, as handed to a backend's ``run(call, out)``.

    ``a`` ``[M, K]`` and ``b`` ``[N, K]`` are views (for ``tn``/``tt``/``nn`` transposed, so ``K`` may not be
    the contiguous dimension); ``sfa`` ``[M, cols]`` and ``sfb`` ``[rows_b, cols]`` are views in row-major
    or MN-major layout (never read beyond their logical elements); ``c`` is ``None``, ``out`` itself
    (in place) or a disjoint float32 ``[M, N]``.
    """

    a: torch.Tensor
    sfa: torch.Tensor
    b: torch.Tensor
    sfb: torch.Tensor
    c: torch.Tensor | None
    recipe: fchk.Recipe
    sf_format: str
    signature: FP8GemmSignature

    @property
    def m(self) -> int:
        return int(self.a.shape[0])

    @property
    def n(self) -> int:
        return int(self.b.shape[0])

    @property
    def k(self) -> int:
        return int(self.a.shape[1])

    @property
    def gran_n(self) -> int:
        return self.recipe[1]

    @property
    def k_blocks(self) -> int:
        return num_k_blocks(self.k)

    @property
    def perf_shape(self) -> dict[str, int]:
        """The shape features automatic selection buckets this call by (:func:`perf_shape`)."""
        return perf_shape({"m": self.m, "n": self.n, "k": self.k})


def perf_shape(params: Mapping[str, Any]) -> dict[str, int]:
    """A dense FP8 GEMM's shape features for measured backend rankings: ``m``, ``n``, ``k`` (from a bound
    call, or from the ``params`` of a ``deepport bench`` config of the op)."""
    return {"m": int(params["m"]), "n": int(params["n"]), "k": int(params["k"])}


class FP8GemmImpl(Protocol):
    """How a backend runs a dense FP8 GEMM, every layout (``fp8_gemm_{nt,nn,tn,tt}``): ``run(call, out) -> None``.

    The call is in NT form whatever the layout (:class:`FP8GemmCall`). Write, in place, every element of
    ``out`` ``[M, N]`` (bfloat16 or float32, poisoned by the conformance suite before the call):
    ``D[m, n] = C[m, n] + sum_kb SFA[m, kb] * SFB[n // gran_n, kb] * sum_{k in kb} A[m, k] * B[n, k]``
    (``C`` = 0 when ``call.c`` is ``None``; ``call.c`` may be ``out`` itself). Edges: ``M = 0`` writes
    nothing; ``N`` and ``K`` need not be multiples of 128 (the last block is partial); UE8M0 scales are
    packed int32 (``call.sf_format``). Read only the logical elements of the views (strided padding may
    hold NaN) and never modify an input.
    """

    def __call__(self, call: FP8GemmCall, out: torch.Tensor, /) -> None: ...


_DOC = """D = C + A @ B^T with block-scaled FP8 operands (DeepGEMM's ``fp8_gemm_{layout}``), written into ``out``.

    Args:
        a: ``(A, SFA)``. A ``float8_e4m3fn`` {a_shape}, last dimension contiguous (other strides free).
            SFA: the 1x128 dequantization SFs of A, logically ``[M, ceil(K/128)]`` (one per row and
            128-wide K block), given as {sfa_shape}: float32, or int32 packed UE8M0
            (``[.., ceil(ceil(K/128)/4)]`` words, four K-block exponents per int32, see
            :mod:`deepport.kernels.fp8_layout`). Either row-major or MN-major with any column stride
            ``>= M`` (DeepGEMM's TMA-aligned ``align(M, 4)``); padding elements are never read.
        b: ``(B, SFB)``. B ``float8_e4m3fn`` {b_shape}, last dimension contiguous. SFB in B's format,
            given as {sfb_shape} with ``rows_b = ceil(N/128)`` under recipe (1, 128, 128) (one SF per
            128x128 block) or ``rows_b = N`` under (1, 1, 128); row-major or MN-major like SFA.
        out: ``[M, N]`` bfloat16 or float32, last dimension contiguous, rows not overlapping, sharing no
            memory with the inputs. Every element is written (``M == 0``: nothing to do).
        c: optional float32 ``[M, N]`` accumulator (needs ``out`` float32): ``D = C + A @ B^T``. ``c`` may
            be ``out`` itself (in-place accumulation); otherwise it must not overlap ``out``.
        recipe: ``(gran_m_a, gran_n_b, gran_k)``: ``(1, 128, 128)`` (default for float32 SFs; DeepSeek-V3
            inference) or ``(1, 1, 128)`` (per-row SFB; the default and only recipe of UE8M0 SFs).
        backend: run on this backend (explicit: raises if it cannot, never falls back).

    Math: ``D[m, n] = C[m, n] + sum_kb SFA[m, kb] * SFB[n // gran_n_b, kb] * sum_(k in kb) A[m, k] B[n, k]``
    with ``kb = k // 128``; K need not be a multiple of 128 (the last block is shorter and has its own
    SF); ``M`` may be 0, ``N`` and ``K`` must be >= 1, any ``N`` (e.g. 2112 = 16.5 blocks of 128).
    Products of FP8 values are exact; accumulation is at least float32, promoted per K block; D is
    rounded once to its dtype. SFs are not checked for value (NaN/inf/0 propagate as in the formula).

    Raises:
        deepport.errors.InvalidArgumentError: an argument breaks this contract (before any backend runs).
        deepport.errors.BackendNotSupportedError / NoBackendError: no backend can run the call.
    """

_SHAPES = {  # how each variant stores A, SFA, B, SFB
    "nt": ("[M, K]", "[M, kb]", "[N, K]", "[rows_b, kb]"),
    "nn": ("[M, K]", "[M, kb]", "[K, N]", "[kb, rows_b]"),
    "tn": ("[K, M]", "[kb, M]", "[K, N]", "[kb, rows_b]"),
    "tt": ("[K, M]", "[kb, M]", "[N, K]", "[rows_b, kb]"),
}


def _a_transposed(layout: str) -> bool:
    return layout[0] == "t"


def _b_transposed(layout: str) -> bool:
    return layout[1] == "n"  # B given as [K, N]


def bind(layout: str, a: object, b: object, out: object, *, c: object = None, recipe: object = None) -> FP8GemmCall:
    """Validate the arguments of ``fp8_gemm_<layout>`` (all but ``backend=``) and build the NT-form call."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError("layout", f"expected one of {LAYOUTS}, got {layout!r}")
    a_shape, sfa_shape, b_shape, sfb_shape = _SHAPES[layout]
    a_t, b_t = _a_transposed(layout), _b_transposed(layout)
    a_data, sfa = fchk.expect_pair("a", a, "(A, SFA)")
    b_data, sfb = fchk.expect_pair("b", b, "(B, SFB)")

    fchk.expect_fp8_operand("a[0]", a_data, 2, a_shape)
    m, k = (int(a_data.shape[1]), int(a_data.shape[0])) if a_t else (int(a_data.shape[0]), int(a_data.shape[1]))
    if k < 1:
        raise InvalidArgumentError("a[0]", f"expected K >= 1, got shape {tuple(a_data.shape)} {a_shape}")
    device = a_data.device
    fchk.expect_fp8_operand("b[0]", b_data, 2, b_shape)
    chk.expect_same_device("b[0]", b_data, device, "a[0]")
    k_dim = 0 if b_t else 1
    chk.expect_dim("b[0]", b_data, k_dim, k, f"K, from `a[0]` {a_shape}")
    n = int(b_data.shape[1 - k_dim])
    if n < 1:
        raise InvalidArgumentError("b[0]", f"expected N >= 1, got shape {tuple(b_data.shape)} {b_shape}")

    fmt = fchk.sf_format("a[1]", sfa)
    fchk.expect_same_sf_format("b[1]", sfb, fmt, "a[1]")
    resolved = fchk.resolve_recipe(recipe, fmt)
    rows_a, cols = fchk.sf_shape(m, k, resolved[0], fmt)
    rows_b, _ = fchk.sf_shape(n, k, resolved[1], fmt)
    sfa_expect = (cols, rows_a) if a_t else (rows_a, cols)
    sfb_expect = (cols, rows_b) if b_t else (rows_b, cols)
    fchk.expect_scale_factors("a[1]", sfa, sfa_expect, f"{sfa_shape} = {sfa_expect}", device, "a[0]")
    fchk.expect_scale_factors("b[1]", sfb, sfb_expect, f"{sfb_shape} = {sfb_expect}", device, "a[0]")

    d = fchk.expect_gemm_output("out", out, (m, n), OUT_DTYPES, device, "a[0]", "[M, N]")
    inputs = {"a[0]": a_data, "a[1]": sfa, "b[0]": b_data, "b[1]": sfb}
    chk.expect_no_overlap("out", d, inputs)
    acc = None
    if c is not None:
        acc = fchk.expect_gemm_output("c", c, (m, n), (torch.float32,), device, "a[0]", "[M, N]")
        if d.dtype != torch.float32:
            raise InvalidArgumentError("out", f"accumulating into `c` needs out of dtype torch.float32, got {d.dtype}")
        if not fchk.same_view(acc, d):
            chk.expect_no_overlap("c", acc, {"out": d})

    chk.expect_data("a[0]", a_data)  # every other tensor is on a[0]'s device
    signature = FP8GemmSignature(device_info(device), fchk.FP8_DTYPE, layout, n, k, resolved, fmt, d.dtype,
                                 acc is not None)
    a_nt = a_data.t() if a_t else a_data
    sfa_nt = sfa.t() if a_t else sfa
    b_nt = b_data.t() if b_t else b_data
    sfb_nt = sfb.t() if b_t else sfb
    return FP8GemmCall(a_nt, sfa_nt, b_nt, sfb_nt, acc, resolved, fmt, signature)


def _run(layout: str, a: Any, b: Any, out: Any, c: Any, recipe: Any, backend: str | None) -> None:
    call = bind(layout, a, b, out, c=c, recipe=recipe)
    chosen, _ = selection.choose(f"fp8_gemm_{layout}", call.signature, backend, call.perf_shape)
    if call.m > 0:
        run: FP8GemmImpl = chosen.implementation(f"fp8_gemm_{layout}")
        run(call, out)


def fp8_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, *,
                c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None,
                backend: str | None = None) -> None:
    _run("nt", a, b, out, c, recipe, backend)


def fp8_gemm_nn(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, *,
                c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None,
                backend: str | None = None) -> None:
    _run("nn", a, b, out, c, recipe, backend)


def fp8_gemm_tn(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, *,
                c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None,
                backend: str | None = None) -> None:
    _run("tn", a, b, out, c, recipe, backend)


def fp8_gemm_tt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, *,
                c: torch.Tensor | None = None, recipe: tuple[int, int, int] | None = None,
                backend: str | None = None) -> None:
    _run("tt", a, b, out, c, recipe, backend)


for _fn, _layout in ((fp8_gemm_nt, "nt"), (fp8_gemm_nn, "nn"), (fp8_gemm_tn, "tn"), (fp8_gemm_tt, "tt")):
    _a, _sfa, _b, _sfb = _SHAPES[_layout]
    _fn.__doc__ = _DOC.format(layout=_layout, a_shape=_a, sfa_shape=_sfa, b_shape=_b, sfb_shape=_sfb)


@dataclass(frozen=True)
class FP8GemmOp:
    """The op-module protocol (``OP``, ``OP_VERSION``, ``bind``, ``example_signature``) for one variant."""

    layout: str

    @property
    def OP(self) -> str:
        return f"fp8_gemm_{self.layout}"

    @property
    def OP_VERSION(self) -> int:
        return OP_VERSION

    def bind(self, a: object, b: object, out: object, *, c: object = None, recipe: object = None,
             backend: str | None = None) -> FP8GemmCall:
        return bind(self.layout, a, b, out, c=c, recipe=recipe)

    def example_signature(self, device: DeviceInfo) -> FP8GemmSignature:
        """DeepSeek-V3's q_a/kv_a projection shape (N=2112, K=7168), default recipe, bf16 out."""
        return FP8GemmSignature(device, fchk.FP8_DTYPE, self.layout, 2112, 7168, fchk.RECIPE_1D2D, fchk.SF_FLOAT32,
                                torch.bfloat16, False)


VARIANTS: tuple[FP8GemmOp, ...] = tuple(FP8GemmOp(layout) for layout in LAYOUTS)
OPS: tuple[str, ...] = tuple(v.OP for v in VARIANTS)
