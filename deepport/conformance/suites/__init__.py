"""One module per op: its cases, its versioned input generator, how to call it, and its reference.

Each module exposes ``OP``, ``GENERATOR_VERSION``, ``cases()``, ``generate(case, seed)``,
``output_specs(inputs)``, ``dtype_name(inputs)``, ``invoke(inputs, tensors, backend, outputs)`` and
``reference(inputs)``. An op family may instead provide one object per op with the same attributes
(``fp8_grouped_gemm.SUITES``); each op's descriptor (``deepport.kernels.DESCRIPTORS``) names its suite.
Optional hooks: ``prefill_outputs(inputs, outputs)`` (content ``out`` holds before the call, where the op
may leave elements unwritten) and ``exact_positions(inputs)`` (elements that must equal the rounded
reference bit for bit); ``exact_reference(inputs)``, a second reference judged by its own tolerance
entries ``<output>:exact`` (e.g. the unquantized answer of a quantized op); ``footprint_bytes(case)``
(one process's peak host memory for the case, where it is large: the runner runs isolated backends
one after another when their sum would not fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepport.kernels.descriptor import Derived, OpDescriptor


def _suites(ops: tuple[OpDescriptor, ...]) -> dict[str, Any]:
    return {d.name: d.load_suite() for d in ops}


SUITES: Mapping[str, Any] = Derived(_suites)
"""Each op's suite, as its descriptor (``deepport.kernels.DESCRIPTORS``) names it (read-only, imported on
first use; an op added later is included)."""
