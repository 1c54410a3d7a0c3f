"""One module per op: its cases, its versioned input generator, how to call it, and its reference.

Each module exposes ``OP``, ``GENERATOR_VERSION``, ``cases()``, ``generate(case, seed)``,
``output_specs(inputs)``, ``dtype_name(inputs)``, ``invoke(inputs, tensors, backend, outputs)`` and
``reference(inputs)``.
"""

from __future__ import annotations

from types import ModuleType

from deepport.conformance.suites import mla_decode

SUITES: dict[str, ModuleType] = {
    mla_decode.OP: mla_decode,
}
