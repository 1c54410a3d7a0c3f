"""One module per op: its cases, its versioned input generator, how to call it, and its reference.

Each module exposes ``OP``, ``GENERATOR_VERSION``, ``cases()``, ``generate(case, seed)``,
``output_specs(inputs)``, ``dtype_name(inputs)``, ``invoke(inputs, tensors, backend, outputs)`` and
``reference(inputs)``. An op family may instead provide one object per op with the same attributes
(``fp8_grouped_gemm.SUITES``). Optional hooks: ``prefill_outputs(inputs, outputs)`` (content ``out`` holds
before the call, where the op may leave elements unwritten) and ``exact_positions(inputs)`` (elements
that must equal the rounded reference bit for bit); ``exact_reference(inputs)``, a second reference
judged by its own tolerance entries ``<output>:exact`` (e.g. the unquantized answer of a quantized op).
"""

from __future__ import annotations

from typing import Any

from deepport.conformance.suites import (
    fp8_gemm,
    fp8_grouped_gemm,
    mla_decode,
    moe_combine,
    moe_combine_expanded,
    moe_dispatch,
    moe_dispatch_expanded,
    moe_layout,
    moe_low_latency_combine,
    moe_low_latency_dispatch,
)

SUITES: dict[str, Any] = {
    mla_decode.OP: mla_decode,
    **{suite.OP: suite for suite in fp8_gemm.SUITES},
    **{s.OP: s for s in (moe_layout, moe_dispatch, moe_combine, moe_dispatch_expanded, moe_combine_expanded,
                         moe_low_latency_dispatch, moe_low_latency_combine)},
    **{suite.OP: suite for suite in fp8_grouped_gemm.SUITES},
}
