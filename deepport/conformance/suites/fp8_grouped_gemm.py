"""Conformance cases, input generator and references for the M-grouped FP8 GEMMs (both layouts).

Generator (version 2), from ``numpy.random.Generator(PCG64(seed))``:

- values: ``x`` (activations) and ``w`` (each group's weights) ~ N(0, 1) rounded to bfloat16, as in
  DeepGEMM's tests; with ``outliers`` one element in 512 is multiplied by ``+-U(8, 64)``, so block
  amaxes (and the float32 scales ``amax * float32(1/448)``) vary, and are not powers of two. UE8M0 cases have no
  outliers (DeepGEMM's data): a power-of-two scale leaves an outlier itself up to 1/16 off, and outputs
  dominated by a few outliers then miss the unquantized reference's ``calc_diff < 1e-3``.
- quantization: ``x`` per token (1x128, :func:`per_token_cast_to_fp8`), each ``w[g]`` per 128x128 block
  (:func:`per_block_cast_to_fp8`), or per row with ``recipe=(1, 1, 128)``; ``sf="ue8m0"`` rounds the scales
  up to powers of two and packs them four per int32 (per-row SFB, DeepGEMM's SM100 form);
  ``sfa_layout="mn"`` passes SFA MN-major TMA-aligned (column stride ``align(rows, 4)``): the harness
  stages the dense storage, whose padding elements are poisoned, and :func:`invoke` builds the view;
  ``sfb_layout="transposed"`` passes SFB contiguous after transposing its last two dims.
- contiguous layout: group ``g`` gets ``ms[g]`` rows (or ``expected_m * U(0.7, 1.3)``), a segment padded
  to a multiple of 128 with ``-1`` rows; ``pad_blocks`` extra all-padding 128-row blocks are inserted
  between segments; ``order="shuffled"`` permutes the segments' group order.
- masked layout: ``masked_m[g] = min(M_max, expected_m * U(0.7, 1.3))`` (or the explicit ``masked``).
- poison: rows never read (``-1`` rows; rows ``>= masked_m[g]``) hold NaN in A (e4m3 NaN bytes) and in
  SFA (float32 NaN, or UE8M0 byte 0xFF). Before the call every element of ``out`` is NaN, or with
  ``prefill="garbage"`` (masked) finite values 4x the output's scale, which the op must leave alone.

Two references per case: the **simulated** one (float64 on the exact dequantized operands: the op's
definition, tight element-wise bound) and the **exact** one (float64 on the unquantized ``x`` and ``w``:
DeepGEMM's own test, ``calc_diff < 1e-3``). Padding rows must be +0.0 and rows past ``masked_m`` bitwise
what they were before the call: both are checked exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import deepport
from deepport.conformance import fp8_bound
from deepport.conformance.case import Case, make_case
from deepport.kernels.f64.fp8_grouped_gemm import contiguous_f64, masked_rows_f64
from deepport.kernels.f64.products import matmul_nt
from deepport.kernels.fp8_grouped_gemm import OP_CONTIGUOUS, OP_MASKED, bind_contiguous, bind_masked
from deepport.kernels.fp8_layout import (
    get_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    pack_ue8m0,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)

GENERATOR_VERSION = 2  # 2: scale factors by DeepEP's float32 rule, amax * float32(1/448)
_E4M3_NAN = 0x7F
_UE8M0_NAN_WORD = -1  # every byte 0xFF

_COMMON: dict[str, Any] = dict(groups=3, n=256, k=384, sf="float32", recipe=None, sfa_layout="row",
                               sfb_layout="row", outliers=True, expected_m=64, dtype="float8_e4m3fn")
_CONTIGUOUS: dict[str, Any] = dict(_COMMON, ms=None, pad_blocks=0, order="sorted")
_MASKED: dict[str, Any] = dict(_COMMON, m_max=96, masked=None, prefill="nan")


def _features(p: Mapping[str, Any]) -> tuple[str, ...]:
    f = [f"sf_{p['sf']}"]
    if p["recipe"] is not None or p["sf"] == "ue8m0":
        f.append("per_row_sfb")
    if p["sfa_layout"] != "row":
        f.append("sfa_mn_major")
    if p["sfb_layout"] != "row":
        f.append("sfb_transposed")
    if p["outliers"]:
        f.append("outliers")
    if p["k"] % 128:
        f.append("k_tail")
    if p["n"] % 128:
        f.append("n_tail")
    rows = p.get("ms") or p.get("masked")
    if rows is not None and 0 in rows:
        f.append("empty_group")
    if p.get("pad_blocks"):
        f.append("padding_blocks")
    if p.get("order") == "shuffled":
        f.append("unsorted_groups")
    if p.get("prefill") == "garbage":
        f.append("finite_prefill")
    return tuple(f)


def _case(op: str, defaults: Mapping[str, Any], tier: str, name: str, **overrides: Any) -> Case:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {op} case parameters {sorted(unknown)}")
    p = {**defaults, **overrides}
    profile = "core" if p["k"] % 128 == 0 else "extension"
    return make_case(op, name, tier, profile, _features(p), p)


def contiguous_cases() -> list[Case]:
    def c(tier: str, name: str, **kw: Any) -> Case:
        return _case(OP_CONTIGUOUS, _CONTIGUOUS, tier, name, **kw)

    smoke = [
        c("smoke", "g1_m200", groups=1, ms=[200]),
        c("smoke", "g4_em64", groups=4),
        c("smoke", "g4_empty_groups", groups=4, ms=[130, 0, 1, 0]),
        c("smoke", "g3_one_group_zero_rows_padding_blocks", groups=3, ms=[64, 0, 128], pad_blocks=2),
        # an all-padding call (every m_indices == -1) has the all-zero answer, so it cannot calibrate here:
        # tests/test_fp8_grouped_gemm_backends.py checks it; this case is 499 padding rows and 13 real ones
        c("smoke", "g2_mostly_padding", groups=2, ms=[13, 0], pad_blocks=3),
        c("smoke", "g3_shuffled_sfa_mn_major", groups=3, ms=[40, 170, 90], order="shuffled", sfa_layout="mn"),
        c("smoke", "g2_ue8m0_packed", groups=2, sf="ue8m0", sfa_layout="mn", outliers=False),
        c("smoke", "g2_per_row_sfb_float32", groups=2, recipe=(1, 1, 128)),
        c("smoke", "g3_sfb_transposed_n_tail", groups=3, n=200, k=384, sfb_layout="transposed"),
        c("smoke", "g2_no_outliers_unit_group_rows", groups=2, ms=[1, 127], outliers=False),
        c("smoke", "ext_g2_k_tail", groups=2, k=320, n=192),
    ]
    full = []
    for g, em in ((4, 8192), (8, 4096)):
        for n, k in ((4096, 7168), (7168, 2048)):
            full.append(c("full", f"g{g}_em{em}_n{n}_k{k}", groups=g, expected_m=em, n=n, k=k))
    full += [
        c("full", "g8_em4096_n4096_k7168_ue8m0", groups=8, expected_m=4096, n=4096, k=7168, sf="ue8m0",
          sfa_layout="mn", outliers=False),
        c("full", "g8_em1024_n7168_k2048_shuffled_padding_blocks", groups=8, expected_m=1024, n=7168, k=2048,
          order="shuffled", pad_blocks=3, sfa_layout="mn"),
    ]
    return smoke + full


def masked_cases() -> list[Case]:
    def c(tier: str, name: str, **kw: Any) -> Case:
        return _case(OP_MASKED, _MASKED, tier, name, **kw)

    smoke = [
        c("smoke", "g1_mmax64_full", groups=1, m_max=64, masked=[64]),
        c("smoke", "g4_em64", groups=4),
        c("smoke", "g4_zero_and_full_hint1", groups=4, m_max=96, masked=[0, 96, 1, 0], expected_m=1),
        c("smoke", "g3_all_zero_garbage_prefill", groups=3, m_max=32, masked=[0, 0, 0], prefill="garbage"),
        c("smoke", "g3_garbage_prefill", groups=3, m_max=72, expected_m=30, prefill="garbage"),
        c("smoke", "g2_ue8m0_packed", groups=2, sf="ue8m0", sfa_layout="mn", expected_m=60, outliers=False),
        c("smoke", "g3_sfa_mn_major_mmax_odd", groups=3, m_max=37, expected_m=20, sfa_layout="mn"),
        c("smoke", "g2_per_row_sfb_n_tail", groups=2, recipe=(1, 1, 128), n=200, expected_m=50,
          sfb_layout="transposed"),
        c("smoke", "ext_g2_k_tail", groups=2, k=320, expected_m=40, prefill="garbage"),
    ]
    full = []
    for g, em, m_max in ((32, 192, 1024), (6, 1024, 4096), (32, 20, 1024), (6, 20, 4096)):
        for n, k in ((4096, 7168), (7168, 2048)):
            full.append(c("full", f"g{g}_em{em}_mmax{m_max}_n{n}_k{k}", groups=g, expected_m=em, m_max=m_max,
                          n=n, k=k, prefill="garbage" if em == 20 else "nan"))
    full.append(c("full", "g32_em192_n4096_k7168_ue8m0", groups=32, expected_m=192, m_max=1024, n=4096, k=7168,
                  sf="ue8m0", sfa_layout="mn", outliers=False))
    return smoke + full


@dataclass
class Inputs:
    """Pristine generated inputs (CPU tensors), the call's other arguments, and what the references need
    but the backend never gets (``unquantized``; ``before``, the content of ``out`` before the call)."""

    op: str
    tensors: dict[str, torch.Tensor]
    expected_m: int
    recipe: tuple[int, int, int] | None
    unquantized: dict[str, torch.Tensor] = field(default_factory=dict)
    before: torch.Tensor | None = None
    rows_in_use: list[int] = field(default_factory=list)  # masked: masked_m; contiguous: rows per group
    sfa_mn_major: bool = False  # tensors["sfa"] is MN-major storage; the op gets sfa_view(...)
    magnitudes: np.ndarray | None = None  # S of the bound, kept by reference() (one pass over the operands)


def _bf16_normal(rng: np.random.Generator, shape: tuple[int, ...], outliers: bool) -> torch.Tensor:
    x = rng.standard_normal(size=shape, dtype=np.float32)
    if outliers and x.size:
        hit = rng.random(size=shape) < 1 / 512
        x[hit] *= rng.choice([-1.0, 1.0], size=int(hit.sum())) * rng.uniform(8, 64, size=int(hit.sum()))
    return torch.from_numpy(x).to(torch.bfloat16)


def _quantize_b(w: torch.Tensor, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    ue8m0 = p["sf"] == "ue8m0"
    g, n, k = (int(s) for s in w.shape)
    if ue8m0 or p["recipe"] is not None:  # per-row scales: one call over all groups' rows
        b, sfb = per_token_cast_to_fp8(w.reshape(g * n, k), use_ue8m0=ue8m0)
    elif n % 128 == 0:  # 128x128 blocks never straddle two groups
        b, sfb = per_block_cast_to_fp8(w.reshape(g * n, k))
    else:
        pairs = [per_block_cast_to_fp8(w[i]) for i in range(g)]
        b, sfb = torch.cat([q for q, _ in pairs]), torch.cat([s for _, s in pairs])
    b, sfb = b.view(g, n, k), sfb.view(g, -1, int(sfb.shape[-1]))
    if ue8m0:
        sfb = pack_ue8m0(sfb)
    if p["sfb_layout"] == "transposed":
        sfb = sfb.transpose(1, 2).contiguous().transpose(1, 2)
    return b, sfb


def _quantize_a(x: torch.Tensor, p: Mapping[str, Any], unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x`` ``[..., rows, K]``; rows where ``unused`` is True are poisoned.
    Returns A and the SFA *storage* (see :func:`sfa_view`)."""
    ue8m0 = p["sf"] == "ue8m0"
    flat = x.reshape(-1, int(x.shape[-1]))
    a, sfa = per_token_cast_to_fp8(flat, use_ue8m0=ue8m0)
    if ue8m0:
        sfa = pack_ue8m0(sfa)
    mask = unused.reshape(-1)
    a.view(torch.uint8)[mask] = _E4M3_NAN
    _poison_sf(sfa, mask)
    sfa = sfa.view(*x.shape[:-1], int(sfa.shape[-1]))
    if p["sfa_layout"] == "mn":  # MN-major storage [..., cols, align(rows, 4)], padding poisoned
        rows = int(sfa.shape[-2])
        storage = torch.empty((*sfa.shape[:-2], int(sfa.shape[-1]), get_tma_aligned_size(rows, 4)), dtype=sfa.dtype)
        _poison_sf(storage, None)
        storage[..., :rows] = sfa.transpose(-1, -2)
        sfa = storage
    return a.view(*x.shape), sfa


def _poison_sf(sf: torch.Tensor, rows: torch.Tensor | None) -> None:
    """NaN (float32) or 0xFF bytes (packed UE8M0: exponent 255, decodes to inf) in ``sf[rows]`` (all if None)."""
    target = sf if rows is None else sf[rows]
    if sf.dtype == torch.int32:
        target = torch.full_like(target, _UE8M0_NAN_WORD)
    else:
        target = torch.full_like(target, float("nan"))
    if rows is None:
        sf.copy_(target)
    else:
        sf[rows] = target


def sfa_view(inputs: Inputs, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SFA as the op receives it: the staged storage itself (row-major), or its MN-major TMA-aligned view
    ``[..., rows, cols]`` with strides ``(..., 1, align(rows, 4))`` (``sfa_layout="mn"``)."""
    storage = tensors["sfa"]
    return storage.transpose(-1, -2)[..., : int(tensors["a"].shape[-2]), :] if inputs.sfa_mn_major else storage


def _contiguous_layout(p: Mapping[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    g = p["groups"]
    ms = list(p["ms"]) if p["ms"] is not None else \
        [int(p["expected_m"] * rng.uniform(0.7, 1.3)) for _ in range(g)]
    align = get_mk_alignment_for_contiguous_layout()
    order = list(rng.permutation(g)) if p["order"] == "shuffled" else list(range(g))
    pieces: list[np.ndarray] = []
    for grp in order:
        m = ms[grp]
        seg = np.full(-(-m // align) * align, -1, dtype=np.int32)
        seg[:m] = grp
        pieces.append(seg)
    for _ in range(p["pad_blocks"]):
        pieces.insert(int(rng.integers(0, len(pieces) + 1)), np.full(align, -1, dtype=np.int32))
    idx = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return idx, ms


def generate(case: Case, seed: int) -> Inputs:
    """Build the case's inputs (see the module docstring for the recipe and the poison)."""
    p = case.params
    rng = np.random.Generator(np.random.PCG64(seed))
    g, n, k = p["groups"], p["n"], p["k"]
    recipe = None if p["recipe"] is None else tuple(p["recipe"])
    w = _bf16_normal(rng, (g, n, k), p["outliers"])
    b, sfb = _quantize_b(w, p)
    if case.op == OP_CONTIGUOUS:
        idx, ms = _contiguous_layout(p, rng)
        unused = torch.from_numpy(idx < 0)
        x = torch.zeros((idx.size, k), dtype=torch.bfloat16)
        x[~unused] = _bf16_normal(rng, (int((~unused).sum()), k), p["outliers"])
        a, sfa = _quantize_a(x, p, unused)
        tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "m_indices": torch.from_numpy(idx)}
        return Inputs(case.op, tensors, p["expected_m"], recipe, {"x": x, "w": w}, None, ms,
                      p["sfa_layout"] == "mn")
    m_max = p["m_max"]
    masked = list(p["masked"]) if p["masked"] is not None else \
        [min(m_max, int(p["expected_m"] * rng.uniform(0.7, 1.3))) for _ in range(g)]
    unused = torch.arange(m_max)[None, :] >= torch.tensor(masked)[:, None]
    x = torch.zeros((g, m_max, k), dtype=torch.bfloat16)
    x[~unused] = _bf16_normal(rng, (int((~unused).sum()), k), p["outliers"])
    a, sfa = _quantize_a(x, p, unused)
    before = None
    if p["prefill"] == "garbage":
        scale = 4.0 * float(np.sqrt(k))
        before = torch.from_numpy(rng.standard_normal((g, m_max, n), dtype=np.float32) * scale).to(torch.bfloat16)
    tensors = {"a": a, "sfa": sfa, "b": b, "sfb": sfb, "masked_m": torch.tensor(masked, dtype=torch.int32)}
    return Inputs(case.op, tensors, p["expected_m"], recipe, {"x": x, "w": w}, before, masked,
                  p["sfa_layout"] == "mn")


def output_specs(inputs: Inputs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    t = inputs.tensors
    n = int(t["b"].shape[1])
    return {"out": ((*t["a"].shape[:-1], n), torch.bfloat16)}


def prefill_outputs(inputs: Inputs, outputs: Mapping[str, torch.Tensor]) -> None:
    """What ``out`` holds before the call, beyond the harness's NaN (masked cases with finite garbage)."""
    if inputs.before is not None:
        outputs["out"].copy_(inputs.before)


def dtype_name(inputs: Inputs) -> str:
    """The operands' dtype (the tolerance table's key; also the cases' ``dtype`` parameter)."""
    return "float8_e4m3fn"


def invoke(inputs: Inputs, tensors: Mapping[str, torch.Tensor], backend: str,
           outputs: Mapping[str, torch.Tensor]) -> None:
    """Call the public op on ``backend`` with the device copies ``tensors``, writing into ``outputs``."""
    a, b = (tensors["a"], sfa_view(inputs, tensors)), (tensors["b"], tensors["sfb"])
    if inputs.op == OP_CONTIGUOUS:
        deepport.m_grouped_fp8_gemm_nt_contiguous(a, b, outputs["out"], tensors["m_indices"], recipe=inputs.recipe,
                                                  backend=backend)
    else:
        deepport.m_grouped_fp8_gemm_nt_masked(a, b, outputs["out"], tensors["masked_m"], inputs.expected_m,
                                              recipe=inputs.recipe, backend=backend)


def _untouched(inputs: Inputs) -> np.ndarray:
    """Masked: what rows past ``masked_m`` must still hold (float64 of the pre-call content, ``[G, M_max, N]``)."""
    t = inputs.tensors
    if inputs.op != OP_MASKED:
        raise ValueError(f"only the masked layout leaves rows untouched, got {inputs.op}")
    shape = (int(t["a"].shape[0]), int(t["a"].shape[1]), int(t["b"].shape[1]))
    if inputs.before is None:
        return np.full(shape, np.nan)
    values: np.ndarray = inputs.before.to(torch.float64).numpy()
    return values


def _computed(inputs: Inputs, absolute: bool, outside: np.ndarray | None,
              magnitudes: np.ndarray | None = None) -> np.ndarray:
    """The float64 oracle on the rows the op computes (with ``absolute``: the terms' magnitudes; with
    ``magnitudes``, an output's shape of zeros, those too in the same pass); padding rows are 0, masked
    rows past ``masked_m`` hold ``outside`` (zeros when None)."""
    t = inputs.tensors
    n = int(t["b"].shape[1])
    dummy = torch.empty((*t["a"].shape[:-1], n), dtype=torch.bfloat16)
    a, b = (t["a"], sfa_view(inputs, t)), (t["b"], t["sfb"])
    if inputs.op == OP_CONTIGUOUS:
        call = bind_contiguous(a, b, dummy, t["m_indices"], recipe=inputs.recipe)
        return contiguous_f64(call, t["m_indices"].numpy(), absolute=absolute, magnitudes=magnitudes)
    masked = bind_masked(a, b, dummy, t["masked_m"], inputs.expected_m, recipe=inputs.recipe)
    out = np.zeros(tuple(dummy.shape)) if outside is None else outside
    mags: list[np.ndarray] | None = None if magnitudes is None else []
    for g, block in enumerate(masked_rows_f64(masked, t["masked_m"].numpy(), absolute=absolute, magnitudes=mags)):
        out[g, : block.shape[0]] = block
        if magnitudes is not None and mags is not None:
            magnitudes[g, : block.shape[0]] = mags[g]
    return out


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    """The simulated reference: the op's definition in float64 on the dequantized operands (the same pass
    keeps the terms' magnitudes for :func:`elementwise_bound`)."""
    t = inputs.tensors
    inputs.magnitudes = np.zeros((*t["a"].shape[:-1], int(t["b"].shape[1])))
    # only the masked layout has rows the op leaves alone (contiguous padding rows are written as 0)
    outside = _untouched(inputs) if inputs.op == OP_MASKED else None
    return {"out": _computed(inputs, False, outside, inputs.magnitudes)}


def elementwise_bound(inputs: Inputs) -> dict[str, np.ndarray]:
    """The per-element accumulation term ``gamma(K) * S`` of every computed row (0 elsewhere: padding and
    rows past ``masked_m`` are checked bit for bit), as for the dense op (:mod:`deepport.conformance.fp8_bound`)."""
    k = int(inputs.tensors["a"].shape[-1])
    magnitudes = inputs.magnitudes if inputs.magnitudes is not None else _computed(inputs, True, None)
    return {"out": fp8_bound.elementwise_bound(k, magnitudes)}


def exact_reference(inputs: Inputs) -> dict[str, np.ndarray]:
    """The unquantized reference: ``x @ w[g]^T`` in float64 on the bfloat16 inputs before quantization."""
    x = inputs.unquantized["x"].to(torch.float64).numpy()
    w = inputs.unquantized["w"].to(torch.float64).numpy()
    t = inputs.tensors
    if inputs.op == OP_CONTIGUOUS:
        idx = t["m_indices"].numpy()
        out = np.zeros((idx.size, int(w.shape[1])), dtype=np.float64)
        for g in range(int(w.shape[0])):
            rows = np.flatnonzero(idx == g)
            if rows.size:
                out[rows] = matmul_nt(x[rows], w[g])
        return {"out": out}
    out = _untouched(inputs)
    for g, used in enumerate(inputs.rows_in_use):
        if used:
            out[g, :used] = matmul_nt(x[g, :used], w[g])
    return {"out": out}


def exact_positions(inputs: Inputs) -> dict[str, np.ndarray]:
    """Elements of ``out`` that must equal the simulated reference rounded to bfloat16 bit for bit:
    padding rows (+0.0) and rows past ``masked_m`` (the pre-call content)."""
    t = inputs.tensors
    if inputs.op == OP_CONTIGUOUS:
        rows = t["m_indices"].numpy() < 0
        return {"out": np.broadcast_to(rows[:, None], (rows.size, int(t["b"].shape[1])))}
    g, m_max, n = int(t["a"].shape[0]), int(t["a"].shape[1]), int(t["b"].shape[1])
    rows = np.arange(m_max)[None, :] >= np.asarray(inputs.rows_in_use)[:, None]
    return {"out": np.broadcast_to(rows[:, :, None], (g, m_max, n))}


# Peak host bytes of one process generating a case, per FP8 element of its operands: measured 12.2 GB for
# m_grouped_fp8_gemm_nt_masked/g32_em192_mmax1024_n4096_k7168 (1.18 GB of inputs: the bf16 weights, their
# float32 quantisation temporaries and the results live at once).
_PEAK_BYTES_PER_ELEMENT = 11


def footprint_bytes(case: Case) -> int:
    """Roughly the peak host memory (bytes) of one process that generates ``case`` and holds its inputs:
    the runner runs a case's isolated backends at the same time only when that many fit in the memory
    available (:func:`deepport.conformance.runner.run_case`)."""
    p = case.params
    g, n, k = p["groups"], p["n"], p["k"]
    if case.op == OP_CONTIGUOUS:
        most = sum(p["ms"]) if p["ms"] is not None else int(1.3 * g * p["expected_m"])  # ms drawn up to 1.3x
        rows = most + 128 * (g + p["pad_blocks"])  # alignment and padding blocks
    else:
        rows = g * p["m_max"]
    return int(_PEAK_BYTES_PER_ELEMENT * (g * n + rows) * k)


class GroupedSuite:
    """The suite protocol (``OP``, ``GENERATOR_VERSION``, ``cases()`` and the shared hooks) for one layout."""

    GENERATOR_VERSION = GENERATOR_VERSION
    generate = staticmethod(generate)
    output_specs = staticmethod(output_specs)
    prefill_outputs = staticmethod(prefill_outputs)
    dtype_name = staticmethod(dtype_name)
    invoke = staticmethod(invoke)
    reference = staticmethod(reference)
    elementwise_bound = staticmethod(elementwise_bound)
    exact_reference = staticmethod(exact_reference)
    exact_positions = staticmethod(exact_positions)
    footprint_bytes = staticmethod(footprint_bytes)

    def __init__(self, op: str) -> None:
        self.OP = op

    def cases(self) -> list[Case]:
        return contiguous_cases() if self.OP == OP_CONTIGUOUS else masked_cases()


SUITES: tuple[GroupedSuite, ...] = (GroupedSuite(OP_CONTIGUOUS), GroupedSuite(OP_MASKED))
