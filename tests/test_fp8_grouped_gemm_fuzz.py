"""Property-based fuzzing of the M-grouped FP8 GEMMs' boundary checks (contiguous and masked layouts).

A valid call is drawn (groups, N and K across the 128 block edges, float32 or packed UE8M0 scale factors,
row-major or MN-major SFs; contiguous: group segments in any order, each starting at a multiple of 128,
empty groups and all-padding blocks; masked: any ``masked_m`` in ``[0, M_max]``), then exactly one thing is
made invalid; the op must refuse it by name before any backend runs and change no input (see
tests/fuzz_support.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from fuzz_support import (
    INT32_MAX,
    Call,
    assert_reaches_backend,
    assert_refused,
    fuzz_settings,
    non_contiguous,
    sharing_memory,
    strided_last_dim,
)
from hypothesis import event, given
from hypothesis import strategies as st

import deepport
from deepport.kernels.fp8_layout import get_mn_major_tma_aligned_tensor

pytestmark = pytest.mark.usefixtures("clean_env")

FP8 = torch.float8_e4m3fn
INT32_MIN = -(2**31)
ALIGN = 128


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class GroupedCase:
    masked: bool
    a: torch.Tensor  # [M_sum, K] or [G, M_max, K]
    sfa: torch.Tensor
    b: torch.Tensor  # [G, N, K]
    sfb: torch.Tensor
    out: torch.Tensor
    index: torch.Tensor  # m_indices [M_sum] or masked_m [G]
    expected_m: int
    recipe: tuple[int, int, int] | None

    @property
    def index_name(self) -> str:
        return "masked_m" if self.masked else "m_indices"

    @property
    def g(self) -> int:
        return int(self.b.shape[0])

    @property
    def rows(self) -> int:
        """Rows of A: M_sum, or M_max."""
        return int(self.a.shape[-2])

    def call(self, **changes: Any) -> Call:
        case = replace(self, **changes)
        kwargs: dict[str, Any] = {} if case.recipe is None else {"recipe": case.recipe}
        pairs = ((case.a, case.sfa), (case.b, case.sfb), case.out, case.index)
        if case.masked:
            return Call(deepport.m_grouped_fp8_gemm_nt_masked, (*pairs, case.expected_m), kwargs,
                        note=f"masked a={tuple(self.a.shape)} b={tuple(self.b.shape)} masked_m={self.index.tolist()}")
        return Call(deepport.m_grouped_fp8_gemm_nt_contiguous, pairs, kwargs, runs=self.rows > 0,
                    note=f"contiguous a={tuple(self.a.shape)} b={tuple(self.b.shape)}")


def sf(shape: tuple[int, ...], dtype: torch.dtype, mn_major: bool) -> torch.Tensor:
    t = torch.ones(shape) if dtype == torch.float32 else torch.full(shape, 0x7F7F7F7F, dtype=torch.int32)
    return get_mn_major_tma_aligned_tensor(t) if mn_major else t


@st.composite
def grouped_cases(draw: st.DrawFn) -> GroupedCase:
    masked = draw(st.booleans())
    g = draw(st.integers(1, 3))
    n = draw(st.sampled_from([1, 64, 129]))
    k = draw(st.sampled_from([1, 128, 200]))
    ue8m0 = draw(st.booleans())
    recipe = draw(st.sampled_from([None, (1, 1, 128)] if ue8m0 else [None, (1, 128, 128), (1, 1, 128)]))
    gran_n = 1 if ue8m0 or recipe == (1, 1, 128) else 128
    cols = ceil_div(ceil_div(k, 128), 4) if ue8m0 else ceil_div(k, 128)
    dtype = torch.int32 if ue8m0 else torch.float32
    b = torch.zeros(g, n, k, dtype=FP8)
    sfb = sf((g, ceil_div(n, gran_n), cols), dtype, draw(st.booleans()))
    if masked:
        m_max = draw(st.integers(1, 5))
        lead: tuple[int, ...] = (g, m_max)
        index = torch.tensor(draw(st.lists(st.integers(0, m_max), min_size=g, max_size=g)), dtype=torch.int32)
    else:  # segments of (group, rows) in any order, each padded to 128 rows; -1 groups are all-padding blocks
        segments = draw(st.lists(st.tuples(st.integers(-1, g - 1), st.integers(1, 130)), max_size=3))
        ids: list[int] = []
        for group, rows in segments:
            ids += [group] * rows + [-1] * (ceil_div(rows, ALIGN) * ALIGN - rows)
        lead = (len(ids),)
        index = torch.tensor(ids, dtype=torch.int32)
    a = torch.zeros(*lead, k, dtype=FP8)
    sfa = sf((*lead, cols), dtype, draw(st.booleans()))
    out = torch.zeros(*lead, n, dtype=torch.bfloat16)
    return GroupedCase(masked, a, sfa, b, sfb, out, index, draw(st.integers(1, 4096)), recipe)


Mutation = Callable[[st.DataObject, GroupedCase], tuple[Call, str]]
FIELDS = {"a[0]": "a", "a[1]": "sfa", "b[0]": "b", "b[1]": "sfb", "out": "out"}


def not_a_pair_or_tensor(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from(["a", "b", *FIELDS, "index"]))
    value = data.draw(st.sampled_from([None, 1, "x", [0]]))
    if name == "a":
        return c.call().replace(0, value), name
    if name == "b":
        return c.call().replace(1, (c.b, c.sfb, c.sfb) if value is None else value), name
    if name == "index":
        return c.call(index=value), c.index_name
    return c.call(**{FIELDS[name]: value}), name


def wrong_dtype(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from([*FIELDS, "index"]))
    if name in ("a[0]", "b[0]"):
        dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float8_e5m2, torch.int8]))
        return c.call(**{FIELDS[name]: getattr(c, FIELDS[name]).view(torch.uint8).to(dtype)}), name
    if name == "index":
        return c.call(index=c.index.to(data.draw(st.sampled_from([torch.int64, torch.int16, torch.float32])))), \
            c.index_name
    if name == "out":
        return c.call(out=c.out.to(data.draw(st.sampled_from([torch.float32, torch.float16])))), name
    if name == "a[1]":  # SFB's format decides; SFA must follow it
        other = torch.float32 if c.sfa.dtype == torch.int32 else torch.int32
        return c.call(sfa=c.sfa.to(data.draw(st.sampled_from([other, torch.bfloat16])))), name
    return c.call(sfb=c.sfb.to(data.draw(st.sampled_from([torch.bfloat16, torch.float64])))), name


def wrong_shape(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    """One more element along one dimension of an SF, out or the index, or a wrong rank."""
    name = data.draw(st.sampled_from(["a[0]", "b[0]", "a[1]", "b[1]", "out", "index"]))
    t = c.index if name == "index" else getattr(c, FIELDS[name])
    if name in ("a[0]", "b[0]") or data.draw(st.booleans()):
        bad = t.unsqueeze(0) if data.draw(st.booleans()) else t.reshape(-1)
    else:
        dim = data.draw(st.integers(0, t.dim() - 1))
        shape = list(t.shape)
        shape[dim] += 1
        bad = torch.zeros(shape, dtype=t.dtype)
    if name == "index":
        if bad.dim() == 1 and bad.shape == c.index.shape:
            bad = torch.zeros(bad.numel() + 1, dtype=torch.int32)
        return c.call(index=bad), c.index_name
    return c.call(**{FIELDS[name]: bad}), name


def empty_dimension(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    options = [("b[0]", 0), ("b[0]", 1), ("a[0]", c.a.dim() - 1)]
    options += [("a[0]", 0), ("a[0]", 1)] if c.masked else []
    name, dim = data.draw(st.sampled_from(options))
    t = getattr(c, FIELDS[name])
    return c.call(**{FIELDS[name]: t.narrow(dim, 0, 0)}), name


def mismatched(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    """K of B differs from A's, or (masked) B has another number of groups than A."""
    g, n, k = (int(x) for x in c.b.shape)
    if c.masked and data.draw(st.booleans()):
        sfb = torch.cat([c.sfb.contiguous(), c.sfb[:1].contiguous()])
        return c.call(b=torch.zeros(g + 1, n, k, dtype=FP8), sfb=sfb), "b[0]"
    return c.call(b=torch.zeros(g, n, k + 1, dtype=FP8)), "b[0]"


def strided(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    options = [name for name in ("a[0]", "b[0]", "out") if getattr(c, FIELDS[name]).shape[-1] > 1
               and getattr(c, FIELDS[name]).numel() > 0]
    options += [n for n in ("a[1]", "b[1]") if min(getattr(c, FIELDS[n]).shape[-2:]) > 1]
    options += ["index"] if c.index.shape[0] > 1 else []
    if not options:
        return c.call(index=torch.zeros(c.index.shape[0] + 1, dtype=torch.int32)), c.index_name
    name = data.draw(st.sampled_from(options))
    if name == "index":
        return c.call(index=non_contiguous(c.index)), c.index_name
    return c.call(**{FIELDS[name]: strided_last_dim(getattr(c, FIELDS[name]).contiguous())}), name


def bad_recipe(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    bad = data.draw(st.sampled_from([(2, 128, 128), (1, 128, 64), (128, 128, 128), (1, 128), "1d1d", 1.0]
                                    + ([(1, 128, 128)] if c.sfb.dtype == torch.int32 else [])))
    return c.call(recipe=bad), "recipe"


def on_meta(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from(["a[1]", "b[0]", "b[1]", "out", "index", "all"]))
    if name == "all":
        moved = {f: getattr(c, f).to("meta") for f in ("a", "sfa", "b", "sfb", "out", "index")}
        return c.call(**moved), "a[0]"
    if name == "index":
        return c.call(index=c.index.to("meta")), c.index_name
    return c.call(**{FIELDS[name]: getattr(c, FIELDS[name]).to("meta")}), name


def huge_on_meta(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    """DeepSeek-V3's 256 experts on one device (B of 7.5e9 elements) and A/out of more than 2^31 elements,
    on the meta device: the shape checks accept them (64-bit sizes); refused only for holding no data."""
    g, n, k = data.draw(st.sampled_from([(256, 4096, 7168), (2, 2**31 + 1, 128), (1, 1, 2**31 + 1)]))
    meta: dict[str, Any] = {"device": "meta"}
    b = torch.empty(g, n, k, dtype=FP8, **meta)
    sfb = torch.empty(g, ceil_div(n, 128), ceil_div(k, 128), **meta)
    if c.masked:
        m_max = data.draw(st.sampled_from([1, 2**16, 2**20]))
        a = torch.empty(g, m_max, k, dtype=FP8, **meta)
        sfa = torch.empty(g, m_max, ceil_div(k, 128), **meta)
        out = torch.empty(g, m_max, n, dtype=torch.bfloat16, **meta)
        index = torch.empty(g, dtype=torch.int32, **meta)
        return Call(deepport.m_grouped_fp8_gemm_nt_masked, ((a, sfa), (b, sfb), out, index, 128),
                    note=f"meta masked g={g} m_max={m_max} n={n} k={k}"), "a[0]"
    m_sum = data.draw(st.sampled_from([128, 2**20] + ([2**31 + 128] if n < 2**20 else [])))  # out's bytes < 2^63
    a = torch.empty(m_sum, k, dtype=FP8, **meta)
    sfa = torch.empty(m_sum, ceil_div(k, 128), **meta)
    out = torch.empty(m_sum, n, dtype=torch.bfloat16, **meta)
    index = torch.empty(m_sum, dtype=torch.int32, **meta)
    return Call(deepport.m_grouped_fp8_gemm_nt_contiguous, ((a, sfa), (b, sfb), out, index),
                note=f"meta contiguous g={g} m_sum={m_sum} n={n} k={k}"), "a[0]"


def bad_index_value(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    """m_indices: a group id outside [-1, G), or a segment that does not start at a multiple of 128;
    masked_m: a count outside [0, M_max]."""
    index = c.index.clone()
    if c.masked:
        g = data.draw(st.integers(0, c.g - 1))
        index[g] = data.draw(st.integers(INT32_MIN, -1) | st.integers(c.rows + 1, INT32_MAX))
        return c.call(index=index), "masked_m"
    if c.rows == 0:
        return c.call(index=torch.zeros(1, dtype=torch.int32)), "m_indices"
    row = data.draw(st.integers(0, c.rows - 1))
    misaligned = [v for v in range(c.g) if v != int(index[row - 1])] if row % ALIGN else []
    if len(misaligned) > 0 and data.draw(st.booleans()):  # inside a block: a new group (or rows after padding)
        index[row] = data.draw(st.sampled_from(misaligned))
    else:
        index[row] = data.draw(st.integers(INT32_MIN, -2) | st.integers(c.g, INT32_MAX))
    return c.call(index=index), "m_indices"


def bad_expected_m(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    if not c.masked:
        return c.call(index=c.index.to(torch.int64)), "m_indices"
    return c.call(expected_m=data.draw(st.sampled_from([0, -1, 1.5, True, None, "64"]))), "expected_m"


def aliased_out(data: st.DataObject, c: GroupedCase) -> tuple[Call, str]:
    victims = [n for n in ("a[0]", "a[1]", "b[0]", "b[1]") if getattr(c, FIELDS[n]).numel() > 0]
    victims += ["index"] if c.index.numel() > 0 else []
    if c.out.numel() == 0 or not victims:
        return c.call(out=torch.zeros(c.rows + 1, int(c.b.shape[1]), dtype=torch.bfloat16)), "out"
    name = data.draw(st.sampled_from(victims))
    field = "index" if name == "index" else FIELDS[name]
    copy, out = sharing_memory(getattr(c, field), tuple(c.out.shape), torch.bfloat16, data.draw(st.integers(0, 4096)))
    return c.call(**{field: copy, "out": out}), "out"


MUTATIONS: tuple[Mutation, ...] = (not_a_pair_or_tensor, wrong_dtype, wrong_shape, empty_dimension, mismatched, strided,
                                   bad_recipe, on_meta, huge_on_meta, bad_index_value, bad_expected_m, aliased_out)


@fuzz_settings()
@given(case=grouped_cases(), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_every_invalid_call_is_refused_by_name_before_any_backend(case: GroupedCase, mutation: Mutation,
                                                                   data: st.DataObject) -> None:
    call, name = mutation(data, case)
    event(f"{'masked' if case.masked else 'contiguous'} {mutation.__name__} -> {name}")
    call.note = f"{mutation.__name__}: {call.note}"
    assert_refused(call, name)


@fuzz_settings(default=300)
@given(case=grouped_cases())
def test_every_valid_call_reaches_the_backend(case: GroupedCase) -> None:
    assert_reaches_backend(case.call())
