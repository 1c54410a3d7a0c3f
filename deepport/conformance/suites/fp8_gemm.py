"""Conformance cases, input generator and references for the dense FP8 GEMMs ``fp8_gemm_{nt,nn,tn,tt}``.

Generator (version 2), from ``numpy.random.Generator(PCG64(seed))``:

- values: ``x`` ``[M, K]`` and ``w`` ``[N, K]`` ~ N(0, 1) rounded to bfloat16 (DeepGEMM's test data);
  ``values="outliers"``: one element in 512 (of ``x`` and ``w``) multiplied by ``+-U(4, 16)``, so block
  amaxes (and the float32 scales ``amax * float32(1/448)``) vary; ``values="wide"``: every row of ``x`` multiplied by
  ``2**U(-4, 4)``, so its scales span 8 binades. Heavier outliers or wider rows leave outputs dominated by
  a few elements, and the unquantized reference's ``calc_diff`` (mean ~7e-4 for e4m3, bound 1e-3) too
  noisy to judge: sizes and data were chosen so its maximum over 150 seeds stays below ~8.5e-4. UE8M0
  cases use plain values (a power-of-two scale leaves an outlier up to 1/16 off).
- quantization: ``x`` per token (1x128, :func:`per_token_cast_to_fp8`); ``w`` per 128x128 block
  (:func:`per_block_cast_to_fp8`), or per row for ``recipe="1d1d"``; ``sf="ue8m0"`` rounds scales up to
  powers of two and packs them four per int32 (recipe (1, 1, 128)).
- storage: A, B and their SFs stored as the case's ``layout`` names them (``t``: A as ``[K, M]``, SFA as
  ``[kb, M]``; ``n`` second: B as ``[K, N]``, SFB as ``[kb, rows_b]``). ``sfa_layout="mn"`` passes SFA
  MN-major with the column stride ``align(M, 4)`` (DeepGEMM's TMA alignment) or ``sfa_pad`` more, every
  padding element poisoned (NaN, or UE8M0 words of 0xFF bytes = inf): an op that reads past M fails.
  ``sfb_layout="transposed"`` passes SFB as the transpose of a contiguous tensor. The harness stages
  dense storage tensors (``sfa_storage``, ``sfb_storage``); :func:`invoke` builds the strided views.
- ``accumulate``: ``c = N(0, 1) * 32`` float32 (DeepGEMM's wgrad test), out float32; with ``c_in_place``
  the harness writes C into the output buffer before the call and passes that buffer as ``c``.

Two references per case: the **simulated** one (:func:`reference`, float64 on the exact dequantized
operands: the op's definition, tight element-wise bound) and the **exact** one (:func:`exact_reference`,
float64 ``C + x @ w^T`` on the unquantized data: DeepGEMM's own test, ``calc_diff < 1e-3``).
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
from deepport.kernels import fp8_gemm as op
from deepport.kernels.f64.fp8_gemm import reference_f64
from deepport.kernels.f64.products import matmul_nt
from deepport.kernels.fp8_layout import get_tma_aligned_size, pack_ue8m0, per_block_cast_to_fp8, per_token_cast_to_fp8

GENERATOR_VERSION = 2  # 2: scale factors by DeepEP's float32 rule, amax * float32(1/448)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_RECIPES = {"1d2d": (1, 128, 128), "1d1d": (1, 1, 128)}
_UE8M0_POISON = -1  # every byte 0xFF: exponent 255 decodes to inf

_DEFAULTS: dict[str, Any] = dict(
    m=16, n=256, k=512, layout="nt", recipe="1d2d", sf="float32", sfa_layout="row", sfa_pad=0,
    sfb_layout="row", accumulate=False, c_in_place=False, dtype="bfloat16", values="normal",
)
# DeepSeek-V3 projection shapes (N, K) of DeepGEMM's normal-GEMM test, and its token counts
DEEPSEEK_V3_NK = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
DEEPSEEK_V3_M = (1, 64, 128, 4096)


def _features(p: Mapping[str, Any]) -> tuple[str, ...]:
    f = [f"layout_{p['layout']}", f"recipe_{p['recipe']}", f"sf_{p['sf']}", p["dtype"]]
    if p["m"] in (0, 1):
        f.append(f"m{p['m']}")
    if p["n"] % 128:
        f.append("n_partial_block")
    if p["k"] % 128:
        f.append("k_tail")
    if p["sfa_layout"] == "mn":
        f.append("sfa_mn_major" + ("_padded" if p["sfa_pad"] else ""))
    if p["sfb_layout"] == "transposed":
        f.append("sfb_transposed")
    if p["accumulate"]:
        f.append("accumulate_in_place" if p["c_in_place"] else "accumulate")
    if p["m"] > 128 or p["n"] > 1024:
        f.append("chunked")
    if p["values"] != "normal":
        f.append(f"values_{p['values']}")
    return tuple(f)


def _case(tier: str, name: str | None = None, **overrides: Any) -> Case:
    p = {**_DEFAULTS, **overrides}
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fp8_gemm case parameters {sorted(unknown)}")
    if p["accumulate"] and p["dtype"] != "float32":
        raise ValueError("accumulate needs dtype float32")
    if p["c_in_place"] and not p["accumulate"]:
        raise ValueError("c_in_place needs accumulate")
    if name is None:
        name = f"m{p['m']}_n{p['n']}_k{p['k']}"
    # K tails and SF column strides beyond DeepGEMM's TMA alignment go beyond what upstream promises
    profile = "extension" if p["k"] % 128 or p["sfa_pad"] else "core"
    return make_case(f"fp8_gemm_{p['layout']}", name, tier, profile, _features(p), p)


def _smoke(layout: str) -> list[Case]:
    """CPU-sized cases of one layout: every edge. Sizes keep a few thousand outputs (or K >= 1024 at M = 1),
    so the unquantized reference's calc_diff (mean ~7e-4 for e4m3) stays clear of its 1e-3 bound."""
    c = [
        _case("smoke", "m40_n256_k512", layout=layout, m=40, n=256, k=512, values="outliers"),
        _case("smoke", "m1_n1024_k1024", layout=layout, m=1, n=1024, k=1024),
        _case("smoke", "ue8m0_m10_n256_k640_mn", layout=layout, m=10, n=256, k=640, sf="ue8m0", recipe="1d1d",
              sfa_layout="mn"),
        _case("smoke", "accumulate_m32_n200_k512", layout=layout, m=32, n=200, k=512, accumulate=True,
              dtype="float32", values="wide"),
        _case("smoke", "ext_k_tail_m17_n130_k328_mn", layout=layout, m=17, n=130, k=328, sfa_layout="mn"),
    ]
    if layout != "nt":
        return c
    return [
        *c,
        _case("smoke", "m0_n192_k256", m=0, n=192, k=256),
        _case("smoke", "m64_n256_k512", m=64, n=256, k=512),
        _case("smoke", "deepseek_like_m16_n264_k896", m=16, n=264, k=896, values="outliers"),  # 2112/8, 7168/8
        _case("smoke", "deepseek_like_m32_n72_k896", m=32, n=72, k=896),  # 576/8: one partial block
        _case("smoke", "sfa_mn_m22_n256_k384", m=22, n=256, k=384, sfa_layout="mn"),
        _case("smoke", "sfb_transposed_m12_n384_k512", m=12, n=384, k=512, sfb_layout="transposed"),
        _case("smoke", "recipe_1d1d_m16_n200_k384", m=16, n=200, k=384, recipe="1d1d", sfb_layout="transposed"),
        _case("smoke", "ue8m0_accumulate_m20_n128_k1024", m=20, n=128, k=1024, sf="ue8m0", recipe="1d1d",
              accumulate=True, dtype="float32"),
        _case("smoke", "float32_out_m24_n256_k256", m=24, n=256, k=256, dtype="float32", values="wide"),
        _case("smoke", "wide_values_m32_n256_k1024_mn", m=32, n=256, k=1024, values="wide", sfa_layout="mn"),
        _case("smoke", "ext_k_tail_m9_n256_k1000", m=9, n=256, k=1000, values="outliers"),
        _case("smoke", "ext_sfa_pad_m7_n384_k512", m=7, n=384, k=512, sfa_layout="mn", sfa_pad=5),
        # across the chunks of the work: N > 1024 (the float64 oracle dequantizes B 1024 rows at a time;
        # 1100 also ends in a partial 128-row block), M = 130 past a 128-row tile, and M*N*(K/128)*8 bytes
        # above the torch backend's 8 MB CPU working set (two K chunks: 7 blocks, then 2)
        _case("smoke", "chunks_m130_n1100_k1152", m=130, n=1100, k=1152),
        # D = D + A B^T: C is the output buffer itself, read before it is written
        _case("smoke", "accumulate_in_place_m70_n1100_k640", m=70, n=1100, k=640, accumulate=True, c_in_place=True,
              dtype="float32", values="outliers"),
    ]


def _full() -> list[Case]:
    """DeepGEMM's normal-GEMM sweep on the DeepSeek-V3 shapes (NT, bf16 out, default recipe)."""
    cases = []
    for i, (n, k) in enumerate(DEEPSEEK_V3_NK):
        for j, m in enumerate(DEEPSEEK_V3_M):
            cases.append(_case("full", f"deepseek_m{m}_n{n}_k{k}", m=m, n=n, k=k, values="outliers",
                               sfa_layout="mn" if (i + j) % 2 else "row"))
    return [
        *cases,
        _case("full", "deepseek_wgrad_accumulate_m4096_n7168_k2048", m=4096, n=7168, k=2048, recipe="1d1d",
              accumulate=True, dtype="float32"),
        _case("full", "deepseek_ue8m0_m128_n7168_k2048", m=128, n=7168, k=2048, sf="ue8m0", recipe="1d1d",
              sfa_layout="mn"),
        _case("full", "deepseek_tn_m128_n2112_k7168", m=128, n=2112, k=7168, layout="tn"),
    ]


def cases(layout: str) -> list[Case]:
    """Every case of ``fp8_gemm_<layout>``: the smoke tier, then the full tier (DeepSeek-V3 shapes, NT)."""
    full = [c for c in _full() if c.params["layout"] == layout]
    return _smoke(layout) + full


@dataclass
class Inputs:
    """Pristine generated inputs (CPU tensors) and what the call and the references need besides.

    ``tensors`` are what the backend gets (dense storage; :func:`call_args` turns them into the call's
    arguments); ``unquantized`` (``x``, ``w``) only the exact reference reads.
    """

    layout: str
    recipe: tuple[int, int, int]
    m: int
    sfa_layout: str
    sfb_layout: str
    out_dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    unquantized: dict[str, torch.Tensor] = field(default_factory=dict)
    c_in_place: bool = False
    magnitudes: np.ndarray | None = None  # S of the bound, kept by reference() (one pass over the operands)


def _values(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> torch.Tensor:
    x = rng.standard_normal(size=shape, dtype=np.float32)
    if kind == "outliers" and x.size:
        hit = rng.random(size=shape) < 1 / 512
        x[hit] *= rng.choice([-1.0, 1.0], size=int(hit.sum())) * rng.uniform(4, 16, size=int(hit.sum()))
    elif kind == "wide":
        x *= np.exp2(rng.uniform(-4, 4, size=(shape[0], 1))).astype(np.float32)
    return torch.from_numpy(x).to(torch.bfloat16)


def _sfa_storage(sfa: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """SFA ``[M, cols]`` as dense storage: ``[M, cols]`` contiguous (``row``), or MN-major ``[cols, stride]``
    (``mn``) whose padding columns ``M .. stride - 1`` are poisoned (``stride = align(M, 4) + sfa_pad``)."""
    if p["sfa_layout"] == "row":
        return sfa.contiguous()
    m, cols = (int(s) for s in sfa.shape)
    stride = get_tma_aligned_size(m, 4) + p["sfa_pad"]
    poison = float("nan") if sfa.dtype == torch.float32 else _UE8M0_POISON
    storage = torch.full((cols, stride), poison, dtype=sfa.dtype)
    storage[:, :m] = sfa.t()
    return storage


def generate(case: Case, seed: int) -> Inputs:
    """Build the case's inputs (see the module docstring for the recipe and the poison)."""
    p = case.params
    rng = np.random.Generator(np.random.PCG64(seed))
    m, n, k, layout = p["m"], p["n"], p["k"], p["layout"]
    ue8m0 = p["sf"] == "ue8m0"
    x = _values(rng, (m, k), p["values"])
    w = _values(rng, (n, k), "outliers" if p["values"] == "outliers" else "normal")
    a, sfa = per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    b, sfb = per_token_cast_to_fp8(w, use_ue8m0=ue8m0) if p["recipe"] == "1d1d" else per_block_cast_to_fp8(w)
    if ue8m0:
        sfa, sfb = pack_ue8m0(sfa), pack_ue8m0(sfb)
    a_t, b_t = layout[0] == "t", layout[1] == "n"
    sfb_passed = sfb.t() if b_t else sfb  # SFB as the caller passes it
    tensors = {
        "a": a.t().contiguous() if a_t else a,
        "sfa_storage": _sfa_storage(sfa, p),
        "b": b.t().contiguous() if b_t else b,
        "sfb_storage": sfb_passed.t().contiguous() if p["sfb_layout"] == "transposed" else sfb_passed.contiguous(),
    }
    if p["accumulate"]:
        tensors["c"] = torch.from_numpy(rng.standard_normal(size=(m, n), dtype=np.float32) * 32)
    return Inputs(layout, _RECIPES[p["recipe"]], m, p["sfa_layout"], p["sfb_layout"], _DTYPES[p["dtype"]], tensors,
                  {"x": x, "w": w}, p["c_in_place"])


def call_args(inputs: Inputs, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The op's arguments (``a``, ``b``, ``c``, ``recipe``) as the caller of ``fp8_gemm_<layout>`` passes them,
    built as views of the staged storage ``tensors``."""
    a_t = inputs.layout[0] == "t"
    storage = tensors["sfa_storage"]
    if inputs.sfa_layout == "row":  # storage [M, cols]
        sfa = storage.t() if a_t else storage
    else:  # storage [cols, stride], M contiguous
        sfa = storage[:, : inputs.m] if a_t else storage.t()[: inputs.m]
    sfb = tensors["sfb_storage"].t() if inputs.sfb_layout == "transposed" else tensors["sfb_storage"]
    return {"a": (tensors["a"], sfa), "b": (tensors["b"], sfb), "c": tensors.get("c"), "recipe": inputs.recipe}


def output_specs(inputs: Inputs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    b = inputs.tensors["b"]
    n = int(b.shape[1] if inputs.layout[1] == "n" else b.shape[0])
    return {"out": ((inputs.m, n), inputs.out_dtype)}


def dtype_name(inputs: Inputs) -> str:
    """The tolerance key: the output dtype (every case's operands are float8_e4m3fn)."""
    return str(inputs.out_dtype).removeprefix("torch.")


def prefill_outputs(inputs: Inputs, outputs: Mapping[str, torch.Tensor]) -> None:
    """In-place accumulation: ``out`` holds C before the call (``c`` is ``out``)."""
    if inputs.c_in_place:
        outputs["out"].copy_(inputs.tensors["c"])


def invoke(inputs: Inputs, tensors: Mapping[str, torch.Tensor], backend: str,
           outputs: Mapping[str, torch.Tensor]) -> None:
    """Call the public op on ``backend`` with the device copies ``tensors``, writing into ``outputs``."""
    gemm = getattr(deepport, f"fp8_gemm_{inputs.layout}")
    args = call_args(inputs, tensors)
    if inputs.c_in_place:
        args["c"] = outputs["out"]
    gemm(**args, out=outputs["out"], backend=backend)


def _bound_call(inputs: Inputs) -> op.FP8GemmCall:
    """The validated call (NT form) of the pristine inputs, for the oracles."""
    (out_shape, out_dtype), = output_specs(inputs).values()
    dummy = torch.empty(out_shape, dtype=out_dtype)
    args = call_args(inputs, inputs.tensors)
    return op.bind(inputs.layout, args["a"], args["b"], dummy, c=args["c"], recipe=args["recipe"])


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    """The simulated reference: the op's definition in float64 on the exactly dequantized operands (the
    same pass keeps the terms' magnitudes for :func:`elementwise_bound`)."""
    call = _bound_call(inputs)
    inputs.magnitudes = np.zeros((call.m, call.n))
    return {"out": reference_f64(call, magnitudes=inputs.magnitudes)}


def elementwise_bound(inputs: Inputs) -> dict[str, np.ndarray]:
    """The per-element accumulation term ``gamma(K) * S``, ``S = |C| + sum_k |SFA * SFB * A * B|``
    (:mod:`deepport.conformance.fp8_bound`), from the same float64 oracle on the magnitudes."""
    call = _bound_call(inputs)
    magnitudes = inputs.magnitudes if inputs.magnitudes is not None else reference_f64(call, absolute=True)
    return {"out": fp8_bound.elementwise_bound(call.k, magnitudes)}


def exact_reference(inputs: Inputs) -> dict[str, np.ndarray]:
    """The unquantized reference: ``C + x @ w^T`` in float64 on the bfloat16 data before quantization."""
    x = inputs.unquantized["x"].to(torch.float64).numpy()
    w = inputs.unquantized["w"].to(torch.float64).numpy()
    out = matmul_nt(x, w)
    if "c" in inputs.tensors:
        out += inputs.tensors["c"].to(torch.float64).numpy()
    return {"out": out}


class FP8GemmSuite:
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

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.OP = f"fp8_gemm_{layout}"

    def cases(self) -> list[Case]:
        return cases(self.layout)


SUITES: tuple[FP8GemmSuite, ...] = tuple(FP8GemmSuite(layout) for layout in op.LAYOUTS)
