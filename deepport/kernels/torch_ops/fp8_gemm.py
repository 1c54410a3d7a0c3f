"""``torch.ops.deepport.fp8_gemm_{nt,nn,tn,tt}`` and ``..._out``: the dense FP8 GEMMs as torch custom ops.

Schemas, for each layout ``L`` (operands, scale factors and math: :func:`deepport.fp8_gemm_nt` and siblings;
DeepGEMM's ``(A, SFA)`` and ``(B, SFB)`` pairs are flattened)::

    fp8_gemm_L(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor? c=None, int[]? recipe=None,
               ScalarType? out_dtype=None) -> Tensor
    fp8_gemm_L_out(Tensor a, Tensor sfa, Tensor b, Tensor sfb, Tensor(a!) out, Tensor? c=None,
                   int[]? recipe=None) -> ()

The functional form returns a new contiguous ``D [M, N]`` of ``out_dtype`` (default bfloat16, or float32
when ``c`` is given, which needs float32): ``D = C + A @ B^T`` with the layout's ``M``/``N`` (``nt``: A
``[M, K]``, B ``[N, K]``; ``nn``: B ``[K, N]``; ``tn``: A ``[K, M]``; ``tt``: A ``[K, M]``, B ``[N, K]``). The out
form writes ``out`` in place like the deepport op (``c`` may be ``out`` itself in eager mode; under
``torch.compile`` the out form is functionalized, so pass a ``c`` that is not ``out``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch

from deepport.kernels import fp8_gemm as op

_OPERANDS = "Tensor a, Tensor sfa, Tensor b, Tensor sfb"


def recipe_arg(recipe: Sequence[int] | None) -> tuple[int, int, int] | None:
    """The schema's ``int[]? recipe`` as the deepport ops take it (the op layer checks the values)."""
    return None if recipe is None else cast(tuple[int, int, int], tuple(recipe))


def output_shape(layout: str, a: torch.Tensor, b: torch.Tensor) -> tuple[int | torch.SymInt, int | torch.SymInt]:
    """``(M, N)`` of ``fp8_gemm_<layout>`` from A's and B's shapes as stored (symbolic sizes pass through)."""
    m = a.shape[1] if layout[0] == "t" else a.shape[0]
    n = b.shape[1] if layout[1] == "n" else b.shape[0]
    return m, n


def _out_dtype(c: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.float32 if c is not None else torch.bfloat16


def _define(layout: str) -> tuple[Callable[..., torch.Tensor], Callable[..., None]]:
    name = f"fp8_gemm_{layout}"
    deepport_op = getattr(op, name)

    @torch.library.custom_op(f"deepport::{name}", mutates_args=(),
                             schema=f"({_OPERANDS}, Tensor? c=None, int[]? recipe=None, "
                                    "ScalarType? out_dtype=None) -> Tensor")
    def functional(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                   c: torch.Tensor | None = None, recipe: Sequence[int] | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.empty(output_shape(layout, a, b), dtype=_out_dtype(c, out_dtype), device=a.device)
        deepport_op((a, sfa), (b, sfb), out, c=c, recipe=recipe_arg(recipe))
        return out

    @functional.register_fake
    def _functional_fake(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                         c: torch.Tensor | None = None, recipe: Sequence[int] | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return a.new_empty(output_shape(layout, a, b), dtype=_out_dtype(c, out_dtype))

    @torch.library.custom_op(f"deepport::{name}_out", mutates_args=("out",),
                             schema=f"({_OPERANDS}, Tensor(a!) out, Tensor? c=None, int[]? recipe=None) -> ()")
    def out_form(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
                 c: torch.Tensor | None = None, recipe: Sequence[int] | None = None) -> None:
        deepport_op((a, sfa), (b, sfb), out, c=c, recipe=recipe_arg(recipe))

    @out_form.register_fake
    def _out_form_fake(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, out: torch.Tensor,
                       c: torch.Tensor | None = None, recipe: Sequence[int] | None = None) -> None:
        return None

    return functional, out_form


OPS = {layout: _define(layout) for layout in op.LAYOUTS}
"""layout -> (functional, out form), the ``torch.library`` op objects."""
