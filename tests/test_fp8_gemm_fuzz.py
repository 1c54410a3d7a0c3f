"""Property-based fuzzing of the dense FP8 GEMMs' boundary checks (``fp8_gemm_{nt,nn,tn,tt}``).

A valid call is drawn (layout, M from 0, N and K from 1 across the 128 block edges, float32 or packed
UE8M0 scale factors, row-major or MN-major SFs, recipe, bf16/float32 out with free row stride, optional
``c`` in place or separate), then exactly one thing is made invalid; the op must refuse it by name before
any backend runs and change no input (see tests/fuzz_support.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from fuzz_support import Call, assert_reaches_backend, assert_refused, fuzz_settings, sharing_memory, strided_last_dim
from hypothesis import event, given
from hypothesis import strategies as st

import deepport
from deepport.kernels.fp8_layout import get_mn_major_tma_aligned_tensor

pytestmark = pytest.mark.usefixtures("clean_env")

FP8 = torch.float8_e4m3fn


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class GemmCase:
    layout: str
    m: int
    n: int
    k: int
    a: torch.Tensor
    sfa: torch.Tensor
    b: torch.Tensor
    sfb: torch.Tensor
    out: torch.Tensor
    c: torch.Tensor | None
    recipe: tuple[int, int, int] | None

    @property
    def a_t(self) -> bool:
        return self.layout[0] == "t"

    @property
    def b_t(self) -> bool:
        return self.layout[1] == "n"

    def call(self, **changes: Any) -> Call:
        case = replace(self, **changes)
        kwargs: dict[str, Any] = {}
        if case.c is not None:
            kwargs["c"] = case.c
        if case.recipe is not None:
            kwargs["recipe"] = case.recipe
        return Call(getattr(deepport, f"fp8_gemm_{case.layout}"), ((case.a, case.sfa), (case.b, case.sfb), case.out),
                    kwargs, runs=case.m > 0, note=f"{case.layout} m={case.m} n={case.n} k={case.k} "
                    f"sfa={getattr(case.sfa, 'dtype', case.sfa)} recipe={case.recipe} c={case.c is not None}")


def sf_tensor(rows: int, cols: int, dtype: torch.dtype, transposed: bool, mn_major: bool) -> torch.Tensor:
    """SFs stored as the caller gives them: ``[rows, cols]`` (or ``[cols, rows]`` when ``transposed``),
    row-major or MN-major TMA-aligned; float32 ones, or int32 words of exponent 127 (1.0)."""
    shape = (cols, rows) if transposed else (rows, cols)
    t = torch.ones(shape) if dtype == torch.float32 else torch.full(shape, 0x7F7F7F7F, dtype=torch.int32)
    return get_mn_major_tma_aligned_tensor(t) if mn_major else t


@st.composite
def gemm_cases(draw: st.DrawFn) -> GemmCase:
    layout = draw(st.sampled_from(["nt", "nn", "tn", "tt"]))
    m = draw(st.integers(0, 5))
    n = draw(st.sampled_from([1, 2, 3, 127, 128, 129, 200]))
    k = draw(st.sampled_from([1, 2, 127, 128, 129, 300, 513]))
    ue8m0 = draw(st.booleans())
    recipe = draw(st.sampled_from([None, (1, 1, 128)] if ue8m0 else [None, (1, 128, 128), (1, 1, 128)]))
    gran_n = 1 if ue8m0 or recipe == (1, 1, 128) else 128
    cols = ceil_div(ceil_div(k, 128), 4) if ue8m0 else ceil_div(k, 128)
    sf_dtype = torch.int32 if ue8m0 else torch.float32
    a_t, b_t = layout[0] == "t", layout[1] == "n"
    a = torch.zeros((k, m) if a_t else (m, k), dtype=FP8)
    b = torch.zeros((k, n) if b_t else (n, k), dtype=FP8)
    sfa = sf_tensor(m, cols, sf_dtype, a_t, draw(st.booleans()))
    sfb = sf_tensor(ceil_div(n, gran_n), cols, sf_dtype, b_t, draw(st.booleans()))
    out_dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    pad = draw(st.sampled_from([0, 0, 3]))  # a row stride larger than N is allowed
    out = torch.zeros(m, n + pad, dtype=out_dtype)[:, :n]
    c = None
    if out_dtype == torch.float32:
        accumulate = draw(st.sampled_from([None, "out", "separate"]))
        c = out if accumulate == "out" else torch.zeros(m, n) if accumulate == "separate" else None
    return GemmCase(layout, m, n, k, a, sfa, b, sfb, out, c, recipe)


Mutation = Callable[[st.DataObject, GemmCase], tuple[Call, str]]
OPERANDS = {"a[0]": "a", "a[1]": "sfa", "b[0]": "b", "b[1]": "sfb"}


def not_a_pair(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    which = data.draw(st.sampled_from(["a", "b"]))
    pair = (g.a, g.sfa) if which == "a" else (g.b, g.sfb)
    value = data.draw(st.sampled_from([pair[0], (*pair, pair[1]), [pair[0]], None, {"data": pair[0]}]))
    call = g.call()
    return call.replace(0 if which == "a" else 1, value), which


def not_a_tensor(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from([*OPERANDS, "out", "c"]))
    value = data.draw(st.sampled_from([None, 1.0, [[0]], "x"] if name != "c" else [1.0, [[0]], "x"]))
    if name == "out":
        return g.call().replace(2, value), name
    if name == "c":
        return g.call().replace("c", value), name
    return g.call(**{OPERANDS[name]: value}), name


def wrong_dtype(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from([*OPERANDS, "out"]))
    if name in ("a[0]", "b[0]"):
        dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float8_e5m2, torch.int8, torch.uint8]))
        return g.call(**{OPERANDS[name]: getattr(g, OPERANDS[name]).view(torch.uint8).to(dtype)}), name
    if name == "out":
        dtype = data.draw(st.sampled_from([torch.float16, torch.float64, FP8]))
        return g.call(out=torch.zeros(g.m, g.n, dtype=dtype), c=None), name
    t = getattr(g, OPERANDS[name])
    if name == "b[1]":  # the other accepted dtype: SFA and SFB must share one format
        other = torch.float32 if t.dtype == torch.int32 else torch.int32
        dtype = data.draw(st.sampled_from([other, torch.bfloat16]))
    else:
        dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float64, torch.int64, torch.uint8]))
    return g.call(**{OPERANDS[name]: t.to(dtype)}), name


def wrong_rank(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from([*OPERANDS, "out"]))
    field = OPERANDS.get(name, "out")
    t = getattr(g, field)
    bad = t.unsqueeze(0) if data.draw(st.booleans()) else t.reshape(-1)
    return g.call(**{field: bad, **({"c": None} if name == "out" else {})}), name


def empty_n_or_k(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    if data.draw(st.booleans()):
        return g.call(a=g.a.narrow(0 if g.a_t else 1, 0, 0)), "a[0]"
    return g.call(b=g.b.narrow(1 if g.b_t else 0, 0, 0)), "b[0]"


def mismatched_k(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    k = g.k + data.draw(st.sampled_from([1, 128]))
    return g.call(b=torch.zeros((k, g.n) if g.b_t else (g.n, k), dtype=FP8)), "b[0]"


def wrong_sf_shape(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from(["a[1]", "b[1]"]))
    t = getattr(g, OPERANDS[name])
    dim = data.draw(st.integers(0, 1))
    shape = list(t.shape)
    shape[dim] += 1
    return g.call(**{OPERANDS[name]: torch.zeros(shape, dtype=t.dtype)}), name


def strided(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    """A non-contiguous last dimension of an operand or out, a scale-factor layout that is neither row-major
    nor MN-major, or out rows that overlap (a row stride below N, or zero)."""
    options = [name for name in ("a[0]", "b[0]") if getattr(g, OPERANDS[name]).shape[-1] > 1]
    options += [name for name in ("a[1]", "b[1]") if min(getattr(g, OPERANDS[name]).shape) > 1]
    options += ["out"] if g.n > 1 and g.m > 0 else []
    options += ["out_rows"] if g.n > 1 and g.m > 1 else []
    if not options:
        return g.call(out=torch.zeros(g.m + 1, g.n, dtype=g.out.dtype), c=None), "out"
    name = data.draw(st.sampled_from(options))
    if name == "out":
        return g.call(out=strided_last_dim(g.out), c=None), "out"
    if name == "out_rows":
        row = data.draw(st.integers(0, g.n - 1))
        bad = torch.zeros(g.m * g.n + g.n, dtype=g.out.dtype).as_strided((g.m, g.n), (row, 1))
        return g.call(out=bad, c=None), "out"
    t = getattr(g, OPERANDS[name])
    return g.call(**{OPERANDS[name]: strided_last_dim(t.contiguous())}), name


def bad_recipe(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    bad = data.draw(st.sampled_from([(2, 128, 128), (1, 64, 128), (1, 128, 64), (1, 128), (1, 128, 128, 1),
                                     (1.0, 128, 128), (True, 128, 128), "1d2d", 128]
                                    + ([(1, 128, 128)] if g.sfa.dtype == torch.int32 else [])))
    return g.call(recipe=bad), "recipe"


def on_meta(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    extra = ["c"] if g.c is not None and g.c is not g.out else []
    name = data.draw(st.sampled_from(["a[1]", "b[0]", "b[1]", "out", "all", *extra]))  # a[0] is the anchor
    if name == "all":
        moved = {f: getattr(g, f).to("meta") for f in ("a", "sfa", "b", "sfb", "out")}
        return g.call(**moved, c=None), "a[0]"
    field = OPERANDS.get(name, name)
    return g.call(**{field: getattr(g, field).to("meta")}), name


def huge_on_meta(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    """A, B and out of more than 2^31 elements on the meta device: the shape checks accept them (64-bit
    sizes, no limit); the call is refused only because meta tensors hold no data."""
    m = data.draw(st.sampled_from([1, 2**17, 2**20]))
    n, k = data.draw(st.sampled_from([(129280, 7168), (2**31 + 1, 128), (7168, 2**31 + 1)]))
    meta: dict[str, Any] = {"device": "meta"}
    a = torch.empty(m, k, dtype=FP8, **meta)
    sfa = torch.empty(m, ceil_div(k, 128), **meta)
    b = torch.empty(n, k, dtype=FP8, **meta)
    sfb = torch.empty(ceil_div(n, 128), ceil_div(k, 128), **meta)
    out = torch.empty(m, n, dtype=torch.bfloat16, **meta)
    return Call(deepport.fp8_gemm_nt, ((a, sfa), (b, sfb), out), note=f"meta m={m} n={n} k={k}"), "a[0]"


def bad_out(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    kind = data.draw(st.sampled_from(["shape", "c_dtype", "c_shape", "c_with_bf16_out", "c_overlaps_out"]))
    if kind == "shape":
        dim = data.draw(st.integers(0, 1))
        return g.call(out=torch.zeros(g.m + (dim == 0), g.n + (dim == 1), dtype=g.out.dtype), c=None), "out"
    if kind == "c_with_bf16_out":
        return g.call(out=torch.zeros(g.m, g.n, dtype=torch.bfloat16), c=torch.zeros(g.m, g.n)), "out"
    out = torch.zeros(g.m, g.n)
    if kind == "c_dtype":
        return g.call(out=out, c=torch.zeros(g.m, g.n, dtype=torch.bfloat16)), "c"
    if kind == "c_shape" or g.m * g.n < 2:
        return g.call(out=out, c=torch.zeros(g.m + 1, g.n)), "c"
    buffer = torch.zeros(g.m * g.n + 1)  # c shifted by one element against out: overlapping, not the same view
    return g.call(out=buffer[1:].view(g.m, g.n), c=buffer[:-1].view(g.m, g.n)), "c"


def aliased_out(data: st.DataObject, g: GemmCase) -> tuple[Call, str]:
    """out sharing bytes with an operand or scale factors (read while written)."""
    victims = [name for name in OPERANDS if getattr(g, OPERANDS[name]).numel() > 0]
    if g.m == 0 or not victims:
        return g.call(out=torch.zeros(g.m, g.n + 1, dtype=g.out.dtype), c=None), "out"
    name = data.draw(st.sampled_from(victims))
    copy, out = sharing_memory(getattr(g, OPERANDS[name]), (g.m, g.n), g.out.dtype, data.draw(st.integers(0, 4096)))
    return g.call(**{OPERANDS[name]: copy, "out": out, "c": None}), "out"


MUTATIONS: tuple[Mutation, ...] = (not_a_pair, not_a_tensor, wrong_dtype, wrong_rank, empty_n_or_k, mismatched_k,
                                   wrong_sf_shape, strided, bad_recipe, on_meta, huge_on_meta, bad_out, aliased_out)


@fuzz_settings()
@given(case=gemm_cases(), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_every_invalid_call_is_refused_by_name_before_any_backend(case: GemmCase, mutation: Mutation,
                                                                   data: st.DataObject) -> None:
    call, name = mutation(data, case)
    event(f"{mutation.__name__} -> {name}")
    call.note = f"{mutation.__name__}: {call.note}"
    assert_refused(call, name)


@fuzz_settings(default=300)
@given(case=gemm_cases())
def test_every_valid_call_reaches_the_backend(case: GemmCase) -> None:
    assert_reaches_backend(case.call())
