"""The tolerance table: one entry per (op, output, dtype), owned by the suite. Backends cannot loosen it.

Each output is checked four ways (see :mod:`deepport.conformance.checker`); the element-wise bound is
``|a - r| <= atol + rtol * |r|`` with ``atol = atol_floor + atol_rms * rms(finite r)``, so the absolute
term scales with the case: a case whose outputs are small cannot be passed by returning zeros.

Starting points are FlashMLA's dense-decode bounds (out: rel 2.01/128 = two bf16 ulps, cos-diff 5e-6;
lse: abs 1e-6, rel 8.01/65536). FlashMLA's absolute 8e-4 on ``out`` is replaced by 2.01 ulps of the
output's rms, which is stricter whenever outputs are small (long sequences average V towards 0).
For float16 the ulp-based terms shrink with float16's 10-bit mantissa.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol_rms: float  # multiple of the rms of the finite reference values
    atol_floor: float
    max_calc_diff: float  # DeepGEMM/FlashMLA global diff: 1 - 2*sum(a*r) / sum(a*a + r*r)

    def atol(self, reference: np.ndarray) -> float:
        finite = reference[np.isfinite(reference)]
        rms = math.sqrt(float(np.mean(np.square(finite)))) if finite.size else 0.0
        return self.atol_floor + self.atol_rms * rms

    def to_dict(self, reference: np.ndarray | None = None) -> dict[str, Any]:
        d = asdict(self)
        if reference is not None:
            d["atol"] = self.atol(reference)
        return d


_BF16_ULP = 2.0**-7
_FP16_ULP = 2.0**-10

TOLERANCES: Mapping[tuple[str, str, str], Tolerance] = MappingProxyType({
    ("mla_decode", "out", "bfloat16"): Tolerance(2.01 * _BF16_ULP, 2.01 * _BF16_ULP, 0.0, 5e-6),
    ("mla_decode", "out", "float16"): Tolerance(2.01 * _FP16_ULP, 2.01 * _FP16_ULP, 0.0, 1e-6),
    ("mla_decode", "lse", "bfloat16"): Tolerance(8.01 / 65536, 0.0, 1e-6, 1e-8),
    ("mla_decode", "lse", "float16"): Tolerance(8.01 / 65536, 0.0, 1e-6, 1e-8),
    # M-grouped FP8 GEMMs against the simulated reference (float64 on the dequantized operands): one bf16
    # rounding (<= 2**-8 relative) plus fp32 accumulation, with cuBLAS/WGMMA's per-128-K partial sums in room
    ("m_grouped_fp8_gemm_nt_contiguous", "out", "float8_e4m3fn"): Tolerance(2.01 * 2.0**-8, 2.0**-9, 0.0, 2e-5),
    ("m_grouped_fp8_gemm_nt_masked", "out", "float8_e4m3fn"): Tolerance(2.01 * 2.0**-8, 2.0**-9, 0.0, 2e-5),
})


def tolerance(op: str, output: str, dtype: str) -> Tolerance:
    """The bound for one output of one op at one input dtype (``KeyError`` if the suite has none)."""
    return TOLERANCES[(op, output, dtype)]
