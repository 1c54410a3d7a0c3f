"""The tolerance table: one entry per (op, output, dtype), owned by the suite. Backends cannot loosen it.

Each output is checked four ways (see :mod:`deepport.conformance.checker`); the element-wise bound is
``|a - r| <= atol + rtol * |r|`` with ``atol = atol_floor + atol_rms * rms(finite r)``, so the absolute
term scales with the case: a case whose outputs are small cannot be passed by returning zeros.

Starting points are FlashMLA's dense-decode bounds (out: rel 2.01/128 = two bf16 ulps, cos-diff 5e-6;
lse: abs 1e-6, rel 8.01/65536). FlashMLA's absolute 8e-4 on ``out`` is replaced by 2.01 ulps of the
output's rms, which is stricter whenever outputs are small (long sequences average V towards 0).
For float16 the ulp-based terms shrink with float16's 10-bit mantissa. MLA decode's ``out`` also admits,
per element, rounding the probabilities to q's dtype before ``P V`` (``p_rounding``: tensor-core kernels,
FlashMLA's among them, must; the bound is in :func:`deepport.kernels.f64.mla_decode.mla_decode_p_rounding_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from deepport.kernels.descriptor import Derived, OpDescriptor


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol_rms: float  # multiple of the rms of the finite reference values
    atol_floor: float
    max_calc_diff: float  # DeepGEMM/FlashMLA global diff: 1 - 2*sum(a*r) / sum(a*a + r*r)
    # a per-element absolute term the suite computes from the inputs (its ``elementwise_bound`` hook) and
    # the checker adds to ``atol + rtol * |r|``; the name says which model it comes from
    elementwise: str | None = None

    def atol(self, reference: np.ndarray) -> float:
        if self.atol_rms == 0.0:
            return self.atol_floor
        flat, total, count = reference.reshape(-1), 0.0, 0
        for start in range(0, flat.size, 1 << 22):  # a few MiB of temporaries whatever the output's size
            chunk = flat[start:start + (1 << 22)]
            finite = chunk[np.isfinite(chunk)]
            total, count = total + float(np.dot(finite, finite)), count + finite.size
        rms = math.sqrt(total / count) if count else 0.0
        return self.atol_floor + self.atol_rms * rms

    def to_dict(self, reference: np.ndarray | None = None) -> dict[str, Any]:
        d = asdict(self)
        if self.elementwise is None:
            del d["elementwise"]
        if reference is not None:
            d["atol"] = self.atol(reference)
        return d


# MLA decode's out: plus, per element, what rounding the probabilities to q's dtype before P V adds (FlashMLA
# and any tensor-core kernel do; deepport.kernels.f64.mla_decode.mla_decode_p_rounding_bound)
P_ROUNDING = "p_rounding"
_BF16_ULP = 2.0**-7
_FP16_ULP = 2.0**-10
_FP8_GEMM_OPS = ("fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt")
# FP8 GEMMs (dense and grouped) against the simulated reference (float64 on the dequantized operands):
# per element |a - r| <= u_out * |r| + gamma(K) * S, S = |C| + sum_k |SFA * SFB * A * B|, gamma modelling
# Hopper's limited-precision accumulation inside each 128-K block, the float32 promotion per block and C
# (derivation and constants: deepport.conformance.fp8_bound). u_out: one rounding to the output dtype.
FP8_ACCUMULATION = "fp8_accumulation"
_FP8_BF16_OUT = Tolerance(2.0**-8, 0.0, 0.0, 2e-5, FP8_ACCUMULATION)
_FP8_GEMM = {"bfloat16": _FP8_BF16_OUT,
             "float32": Tolerance(2.0**-24, 0.0, 0.0, 1e-7, FP8_ACCUMULATION)}
# Any FP8 GEMM against the exact reference (unquantized data): DeepGEMM's own test, calc_diff < 1e-3;
# element-wise only gross errors (64 rms), since quantization error per element is not bounded tightly.
_FP8_EXACT = Tolerance(0.0, 64.0, 0.0, 1e-3)

# MoE kinds: "exact" (integers, moved payloads, and the low-latency FP8 scales: DeepEP's float32
# amax * float32(1/448), which the oracle computes in float32 bit for bit); "sum" (float32 sums of bf16
# rows, one bf16 rounding: half a bf16 step); "weight_sum" (float32 sums of float32 weights); "cast"
# (e4m3 of float32(x * float32(448 / amax)): half an e4m3 step, subnormal step 2**-9)
_MOE: Mapping[str, Tolerance] = MappingProxyType({
    "exact": Tolerance(0.0, 0.0, 0.0, 0.0),
    "sum": Tolerance(1.01 * 2.0**-8, 0.0, 0.0, 1e-5),
    "weight_sum": Tolerance(1.01 * 2.0**-24, 0.0, 0.0, 1e-12),
    "cast": Tolerance(1.01 * 2.0**-4, 0.0, 1.01 * 2.0**-10, 2e-3),
})

_Table = Mapping[tuple[str, str, str], Tolerance]

# Each op's descriptor (deepport.kernels.DESCRIPTORS) names the table below that holds its entries.
MLA_DECODE: _Table = MappingProxyType({
    ("mla_decode", "out", "bfloat16"): Tolerance(2.01 * _BF16_ULP, 2.01 * _BF16_ULP, 0.0, 5e-6, P_ROUNDING),
    ("mla_decode", "out", "float16"): Tolerance(2.01 * _FP16_ULP, 2.01 * _FP16_ULP, 0.0, 1e-6, P_ROUNDING),
    ("mla_decode", "lse", "bfloat16"): Tolerance(8.01 / 65536, 0.0, 1e-6, 1e-8),
    ("mla_decode", "lse", "float16"): Tolerance(8.01 / 65536, 0.0, 1e-6, 1e-8),
})

FP8_GEMM: _Table = MappingProxyType({
    (op, out, dt): tol for op in _FP8_GEMM_OPS for dt, simulated in _FP8_GEMM.items()
    for out, tol in (("out", simulated), ("out:exact", _FP8_EXACT))})

FP8_GROUPED_GEMM: _Table = MappingProxyType({
    # M-grouped FP8 GEMMs: the dense op's bound (_FP8_BF16_OUT), per group
    ("m_grouped_fp8_gemm_nt_contiguous", "out", "float8_e4m3fn"): _FP8_BF16_OUT,
    ("m_grouped_fp8_gemm_nt_masked", "out", "float8_e4m3fn"): _FP8_BF16_OUT,
    **{(op, "out:exact", "float8_e4m3fn"): _FP8_EXACT
       for op in ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked")},
})

MOE: _Table = MappingProxyType({
    (op, out, dt): _MOE[kind] for (op, dt), outputs in {
        # MoE, per payload dtype: routes, counts and moved payloads are bit-exact; sums are float32, rounded once
        ("moe_layout", "bfloat16"): {"num_tokens_per_rank": "exact", "num_tokens_per_expert": "exact",
                                     "is_token_in_rank": "exact"},
        **{("moe_dispatch", dt): {n: "exact" for n in (
            "recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert", "recv_src_idx",
            "recv_counts", "cached_recv_x", *(("recv_x_scales", "cached_recv_x_scales") if fp8 else ()))}
           for dt, fp8 in (("bfloat16", False), ("float8_e4m3fn", True))},
        ("moe_combine", "bfloat16"): {"combined_x": "sum", "combined_topk_weights": "exact"},
        **{("moe_dispatch_expanded", dt): {"recv_x": "exact", "m_indices": "exact", "recv_weights": "weight_sum",
                                           "num_recv_tokens_per_expert": "exact", **({"recv_x_scales": "exact"}
                                                                                     if fp8 else {})}
           for dt, fp8 in (("bfloat16", False), ("float8_e4m3fn", True))},
        ("moe_combine_expanded", "bfloat16"): {"combined_x": "sum"},
        ("moe_low_latency_dispatch", "bfloat16"): {"recv_x": "exact", "recv_count": "exact"},
        ("moe_low_latency_dispatch", "float8_e4m3fn"): {"recv_x": "cast", "recv_x_scales": "exact",
                                                        "recv_count": "exact"},
        ("moe_low_latency_combine", "bfloat16"): {"combined_x": "sum"},
    }.items() for out, kind in outputs.items()})


def _every_entry(ops: tuple[OpDescriptor, ...]) -> dict[tuple[str, str, str], Tolerance]:
    return {key: tol for d in ops for key, tol in d.load_tolerances().items()}


TOLERANCES: _Table = Derived(_every_entry)
"""Every op's entries, from the table its descriptor names (read-only; an op added later is included)."""


def exact_output_name(output: str) -> str:
    """The table's name for ``output`` judged against a suite's second, exact reference."""
    return f"{output}:exact"


def tolerance(op: str, output: str, dtype: str) -> Tolerance:
    """The bound for one output of one op at one input dtype (``KeyError`` if the suite has none)."""
    return TOLERANCES[(op, output, dtype)]
