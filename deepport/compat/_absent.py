"""Upstream names a compat module deliberately leaves out, and why (``AttributeError`` says it).

A missing name stays missing (``hasattr`` is false, so callers that probe for a feature take their
fallback), but ``from deepport.compat.deep_gemm import bf16_gemm_nt`` or ``deep_gemm.bf16_gemm_nt``
fails with the reason instead of a bare "has no attribute".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


def module_getattr(module: str, reasons: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` raising ``AttributeError`` for every name, with ``reasons[name]``
    appended for the upstream names listed there."""

    def __getattr__(name: str) -> object:
        reason = reasons.get(name)
        if reason is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}: the upstream name is not provided "
                             f"by deepport ({reason})")

    return __getattr__
