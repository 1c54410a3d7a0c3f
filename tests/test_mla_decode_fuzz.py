"""Property-based fuzzing of mla_decode and get_mla_metadata's boundary checks.

A valid call is drawn (any batch from 0, GQA group, head sizes, page size, table width, lengths up to
the table's capacity, garbage in unused table slots, optional out/lse/metadata), then exactly one thing is
made invalid; the op must refuse it by name before any backend runs and change no input (see
tests/fuzz_support.py). Valid calls, including a KV cache of more than 2^31 logical elements (a
zero-stride view), must reach the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
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

pytestmark = pytest.mark.usefixtures("clean_env")

INT32_MIN = -(2**31)
DTYPES = (torch.bfloat16, torch.float16)
Q, K_CACHE, BLOCK_TABLE, CACHE_SEQLENS, HEAD_DIM_V = range(5)
TENSORS = {"q": Q, "k_cache": K_CACHE, "block_table": BLOCK_TABLE, "cache_seqlens": CACHE_SEQLENS}


@dataclass
class MLACase:
    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    lens: list[int]
    d_v: int
    h_kv: int
    page: int
    num_blocks: int
    kwargs: dict[str, Any]

    @property
    def b(self) -> int:
        return len(self.lens)

    @property
    def out_shape(self) -> tuple[int, ...]:
        b, s_q, h_q, _ = self.q.shape
        return b, s_q, h_q, self.d_v

    @property
    def lse_shape(self) -> tuple[int, ...]:
        b, s_q, h_q, _ = self.q.shape
        return b, h_q, s_q

    def tensor(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        """``fn`` of input ``name``; a zero-stride (huge) k_cache is changed through its one real block, so a
        mutation never materialises 2^31 elements."""
        t = self.call().args[TENSORS[name]]
        if name == "k_cache" and t.stride(0) == 0:
            one = fn(t[:1].contiguous())
            return one.expand(t.shape[0], *one.shape[1:])
        return fn(t)

    def seqlens(self, lens: list[int] | None = None) -> torch.Tensor:
        return torch.tensor(self.lens if lens is None else lens, dtype=torch.int32)

    def call(self) -> Call:
        args = (self.q, self.k_cache, self.block_table, self.seqlens(), self.d_v)
        return Call(deepport.mla_decode, args, dict(self.kwargs), runs=self.b > 0,
                    note=f"b={self.b} q={tuple(self.q.shape)} k_cache={tuple(self.k_cache.shape)} "
                         f"table={tuple(self.block_table.shape)} lens={self.lens} kwargs={sorted(self.kwargs)}")


@st.composite
def mla_cases(draw: st.DrawFn) -> MLACase:
    b, s_q = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    h_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d_qk = draw(st.sampled_from([1, 2, 3, 8, 16, 64]))
    d_v = draw(st.integers(1, d_qk))
    page, width = draw(st.sampled_from([1, 2, 3, 16])), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    huge = draw(st.booleans())  # a zero-stride cache of more than 2^31 logical elements
    if huge:
        num_blocks = INT32_MAX // (page * h_kv * d_qk) + 1
        k_cache = torch.zeros(1, page, h_kv, d_qk, dtype=dtype).expand(num_blocks, page, h_kv, d_qk)
    else:
        num_blocks = draw(st.integers(1, 6))
        k_cache = torch.zeros(num_blocks, page, h_kv, d_qk, dtype=dtype)
    lens = draw(st.lists(st.integers(0, width * page), min_size=b, max_size=b))
    rows = []
    for length in lens:
        used = -(-length // page)
        ids = draw(st.lists(st.integers(0, num_blocks - 1), min_size=used, max_size=used))
        garbage = draw(st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=width - used, max_size=width - used))
        rows.append(ids + garbage)
    table = torch.tensor(rows, dtype=torch.int32) if b else torch.zeros(0, width, dtype=torch.int32)
    q = torch.zeros(b, s_q, h_kv * group, d_qk, dtype=dtype)
    case = MLACase(q, k_cache, table, lens, d_v, h_kv, page, num_blocks, {})
    case.kwargs["causal"] = draw(st.booleans())
    scale = draw(st.none() | st.floats(-8, 8, allow_nan=False))
    if scale is not None:
        case.kwargs["softmax_scale"] = scale
    if draw(st.booleans()):
        case.kwargs["out"] = torch.zeros(case.out_shape, dtype=dtype)
    if draw(st.booleans()):
        case.kwargs["lse"] = torch.zeros(case.lse_shape, dtype=torch.float32)
    if draw(st.booleans()):
        case.kwargs["metadata"] = deepport.get_mla_metadata(case.seqlens(), s_q * group, h_kv)
    return case


# ---- mutations: each returns (invalid call, the argument it must be refused for) ------------------------------------

Mutation = Callable[[st.DataObject, MLACase], tuple[Call, str]]


def wrong_dtype(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    other = DTYPES[1] if c.q.dtype == DTYPES[0] else DTYPES[0]
    choices = {"q": [torch.float32, torch.float64, torch.int32, torch.float8_e4m3fn],
               "k_cache": [other, torch.float32, torch.float8_e4m3fn],
               "block_table": [torch.int64, torch.int16, torch.uint8, torch.float32],
               "cache_seqlens": [torch.int64, torch.int16, torch.float32, torch.bool]}
    name = data.draw(st.sampled_from(sorted(choices)))
    dtype = data.draw(st.sampled_from(choices[name]))
    return c.call().replace(TENSORS[name], c.tensor(name, lambda t: t.to(dtype))), name


def wrong_rank(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from(sorted(TENSORS)))
    t = c.call().args[TENSORS[name]]
    bad = t.unsqueeze(0) if data.draw(st.booleans()) or t.shape[0] == 0 else t[0]
    return c.call().replace(TENSORS[name], bad), name


def empty_dimension(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """s_q, h_q or d_qk of q, or page size or h_kv of k_cache, made 0."""
    name, dim = data.draw(st.sampled_from([("q", 1), ("q", 2), ("q", 3), ("k_cache", 1), ("k_cache", 2)]))
    t = c.call().args[TENSORS[name]]
    return c.call().replace(TENSORS[name], t.narrow(dim, 0, 0)), name


def mismatched_size(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """k_cache's d_qk, h_q not a multiple of h_kv, or a batch that disagrees with q's."""
    kinds = ["d_qk", "table_batch", "lens_batch"] + (["h_q"] if c.h_kv == 2 else [])
    kind = data.draw(st.sampled_from(kinds))
    call = c.call()
    if kind == "d_qk":
        n, page, h_kv, d = c.k_cache.shape
        return call.replace(K_CACHE, torch.zeros(n if n < 64 else 1, page, h_kv, d + 1, dtype=c.q.dtype)), "k_cache"
    if kind == "h_q":
        return call.replace(Q, c.q[:, :, : c.q.shape[2] - 1]), "q"
    if kind == "table_batch":
        extra = torch.zeros(1, c.block_table.shape[1], dtype=torch.int32)
        return call.replace(BLOCK_TABLE, torch.cat([c.block_table, extra])), "block_table"
    return call.replace(CACHE_SEQLENS, c.seqlens([*c.lens, 0])), "cache_seqlens"


def on_meta(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """One tensor on the 'meta' device (q's device is the anchor), or every input there (no data to run on)."""
    names = ["k_cache", "block_table", "cache_seqlens", "all"] + [n for n in ("out", "lse") if n in c.kwargs]
    name = data.draw(st.sampled_from(names))
    call = c.call()
    if name == "all":
        for n, position in TENSORS.items():
            call = call.replace(position, c.tensor(n, lambda t: t.to("meta")))
        for n in ("out", "lse"):
            if n in c.kwargs:
                call = call.replace(n, c.kwargs[n].to("meta"))
        return call.replace("metadata", None), "q"
    if name in c.kwargs:
        return call.replace(name, c.kwargs[name].to("meta")), name
    return call.replace(TENSORS[name], c.tensor(name, lambda t: t.to("meta"))), name


def huge_on_meta(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """More than 2^31 elements in q and k_cache (meta tensors: nothing allocated). The shape checks accept
    them (no size limit, 64-bit sizes); the call is refused only because meta tensors hold no data."""
    b = data.draw(st.sampled_from([1, 2**16, 2**20]))
    blocks = data.draw(st.sampled_from([2**20, 2**26, 2**31 + 1]))
    q = torch.empty(b, 2, 128, 576, dtype=torch.bfloat16, device="meta")
    k_cache = torch.empty(blocks, 64, 1, 576, dtype=torch.bfloat16, device="meta")
    table = torch.empty(b, 2**17, dtype=torch.int32, device="meta")
    lens = torch.empty(b, dtype=torch.int32, device="meta")
    return Call(deepport.mla_decode, (q, k_cache, table, lens, 512), note=f"meta b={b} blocks={blocks}"), "q"


def bad_stride(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    options: list[str] = ["block_table_expanded"]
    if c.q.shape[3] > 1:
        options += ["q", "k_cache"]
    if c.block_table.shape[1] > 1 and c.b > 0:
        options += ["block_table"]
    if c.b > 1:
        options += ["cache_seqlens"] + (["block_table_transposed"] if c.block_table.shape[1] > 1 else [])
    options += [n for n in ("out", "lse") if n in c.kwargs and c.kwargs[n].shape[0] > 1]
    name = data.draw(st.sampled_from(options))
    call = c.call()
    if name == "block_table_expanded":  # a zero-stride last dimension: one id repeated (2^31 + 1 slots)
        width = data.draw(st.sampled_from([2, 2**31 + 1]))
        return call.replace(BLOCK_TABLE, torch.zeros(c.b, 1, dtype=torch.int32).expand(c.b, width)), "block_table"
    if name == "block_table_transposed":
        return call.replace(BLOCK_TABLE, c.block_table.t().contiguous().t()), "block_table"
    if name in ("q", "k_cache", "block_table"):
        return call.replace(TENSORS[name], c.tensor(name, strided_last_dim)), name
    if name == "cache_seqlens":
        return call.replace(CACHE_SEQLENS, non_contiguous(c.seqlens())), name
    return call.replace(name, non_contiguous(c.kwargs[name])), name


def not_a_tensor(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from([*sorted(TENSORS), "out", "lse"]))
    value = data.draw(st.sampled_from([3, 1.5, "tensor", [0, 1], np.zeros(2, dtype=np.int32)]
                                      + ([None] if name in TENSORS else [])))
    if name in TENSORS:
        return c.call().replace(TENSORS[name], value), name
    return c.call().replace(name, value), name


def bad_scalar(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    d_qk = int(c.q.shape[3])
    name = data.draw(st.sampled_from(["head_dim_v", "softmax_scale", "causal"]))
    if name == "head_dim_v":
        value: Any = data.draw(st.sampled_from([0, -1, d_qk + 1, 2**70, float(c.d_v), True, np.int64(c.d_v), None]))
        return c.call().replace(HEAD_DIM_V, value), name
    if name == "softmax_scale":
        value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 10**400, "0.1", True, [0.1]]))
        return c.call().replace(name, value), name
    return c.call().replace(name, data.draw(st.sampled_from([1, 0, "yes", None, np.bool_(True)]))), name


def bad_length(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """A negative length, or one beyond the table's capacity (up to INT32_MAX)."""
    if c.b == 0:
        return c.call().replace(CACHE_SEQLENS, torch.tensor([], dtype=torch.int64)), "cache_seqlens"
    i = data.draw(st.integers(0, c.b - 1))
    capacity = int(c.block_table.shape[1]) * c.page
    lens = list(c.lens)
    lens[i] = data.draw(st.integers(INT32_MIN, -1) | st.integers(capacity + 1, INT32_MAX))
    return c.call().replace(CACHE_SEQLENS, c.seqlens(lens)).replace("metadata", None), "cache_seqlens"


def bad_block_id(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """A block id outside [0, num_blocks) in a page that a request uses."""
    used = [(i, j) for i, length in enumerate(c.lens) for j in range(-(-length // c.page))]
    if not used:
        table = c.block_table.to(torch.int64)
        return c.call().replace(BLOCK_TABLE, table), "block_table"
    i, j = data.draw(st.sampled_from(used))
    table = c.block_table.clone()
    too_big = st.integers(c.num_blocks, INT32_MAX) if c.num_blocks <= INT32_MAX else st.nothing()
    table[i, j] = data.draw(st.integers(INT32_MIN, -1) | too_big)
    return c.call().replace(BLOCK_TABLE, table), "block_table"


def bad_metadata(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    s_q, h_q = int(c.q.shape[1]), int(c.q.shape[2])
    rows = s_q * h_q // c.h_kv
    kinds = ["type", "batch", "h_kv", "rows", "h_q"] + (["stale"] if c.b else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "type":
        md: Any = data.draw(st.sampled_from([{"batch": c.b}, (), 0]))
    elif kind == "batch":
        md = deepport.get_mla_metadata(c.seqlens([*c.lens, 0]), rows, c.h_kv)
    elif kind == "h_kv":
        md = deepport.get_mla_metadata(c.seqlens(), rows, c.h_kv + 1)
    elif kind == "rows":
        md = deepport.get_mla_metadata(c.seqlens(), rows + 1, c.h_kv)
    elif kind == "h_q":
        md = deepport.get_mla_metadata(c.seqlens(), rows, c.h_kv, num_heads_q=h_q + 1)
    else:  # planned for other lengths (all valid)
        lens = list(c.lens)
        i = data.draw(st.integers(0, c.b - 1))
        lens[i] = lens[i] - 1 if lens[i] > 0 else 1
        md = deepport.get_mla_metadata(c.seqlens(lens), rows, c.h_kv)
    return c.call().replace("metadata", md), "metadata"


def bad_output(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    name = data.draw(st.sampled_from(["out", "lse"]))
    shape, dtype = (c.out_shape, c.q.dtype) if name == "out" else (c.lse_shape, torch.float32)
    kind = data.draw(st.sampled_from(["shape", "dtype", "extra_dim"]))
    if kind == "shape":
        dim = data.draw(st.integers(0, len(shape) - 1))
        bad = torch.zeros(*shape[:dim], shape[dim] + 1, *shape[dim + 1:], dtype=dtype)
    elif kind == "dtype":
        bad = torch.zeros(shape, dtype=torch.float64 if name == "out" else c.q.dtype)
    else:
        bad = torch.zeros(1, *shape, dtype=dtype)
    return c.call().replace(name, bad), name


def aliased_output(data: st.DataObject, c: MLACase) -> tuple[Call, str]:
    """out or lse sharing bytes with an input, or lse with out (read while written)."""
    if c.b == 0:  # empty outputs share no bytes with anything: make the shape wrong instead
        return c.call().replace("out", torch.zeros(1, dtype=c.q.dtype)), "out"
    name = data.draw(st.sampled_from(["out", "lse"]))
    victims = ["q", "block_table", "cache_seqlens"] + (["k_cache"] if c.k_cache.stride(0) else [])
    victims += ["out"] if name == "lse" else []
    victim = data.draw(st.sampled_from(victims))
    shape, dtype = (c.out_shape, c.q.dtype) if name == "out" else (c.lse_shape, torch.float32)
    shift = data.draw(st.integers(0, 1 << 12))
    call = c.call()
    if victim == "out":
        out, alias = sharing_memory(torch.zeros(c.out_shape, dtype=c.q.dtype), shape, dtype, shift)
        return call.replace("out", out).replace("lse", alias), name
    copy, alias = sharing_memory(call.args[TENSORS[victim]], shape, dtype, shift)
    return call.replace(TENSORS[victim], copy).replace(name, alias), name


MUTATIONS: tuple[Mutation, ...] = (wrong_dtype, wrong_rank, empty_dimension, mismatched_size, on_meta, huge_on_meta,
                                   bad_stride, not_a_tensor, bad_scalar, bad_length, bad_block_id, bad_metadata,
                                   bad_output, aliased_output)


@fuzz_settings()
@given(case=mla_cases(), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_every_invalid_call_is_refused_by_name_before_any_backend(case: MLACase, mutation: Mutation,
                                                                   data: st.DataObject) -> None:
    call, name = mutation(data, case)
    event(f"{mutation.__name__} -> {name}")
    call.note = f"{mutation.__name__}: {call.note}"
    assert_refused(call, name)


@fuzz_settings(default=300)
@given(case=mla_cases())
def test_every_valid_call_reaches_the_backend(case: MLACase) -> None:
    assert_reaches_backend(case.call())


# ---- get_mla_metadata ----------------------------------------------------------------------------------------------

@fuzz_settings(default=300)
@given(data=st.data(), lens=st.lists(st.integers(0, 4096), max_size=4), rows=st.integers(1, 256),
       h_kv=st.integers(1, 4))
def test_get_mla_metadata_refuses_each_bad_argument_by_name(data: st.DataObject, lens: list[int], rows: int,
                                                            h_kv: int) -> None:
    seqlens = torch.tensor(lens, dtype=torch.int32)
    args: dict[str, Any] = {"cache_seqlens": seqlens, "num_q_tokens_per_head_k": rows, "num_heads_k": h_kv}
    name = data.draw(st.sampled_from(["cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q",
                                      "is_fp8_kvcache", "topk"]))
    if name == "cache_seqlens":
        bad: Any = data.draw(st.sampled_from(["int64", "2d", "meta", "list", "negative"]))
        if bad == "negative" and not lens:
            bad = "2d"
        makers: dict[str, Callable[[], Any]] = {
            "int64": lambda: seqlens.long(), "2d": lambda: seqlens[None], "list": lambda: lens,
            "meta": lambda: seqlens.to("meta"),
            "negative": lambda: torch.tensor([*lens[:-1], data.draw(st.integers(INT32_MIN, -1))], dtype=torch.int32),
        }
        args[name] = makers[bad]()
    elif name in ("num_q_tokens_per_head_k", "num_heads_k", "num_heads_q"):
        args[name] = data.draw(st.sampled_from([0, -3, 1.0, True, "2"]))
    elif name == "is_fp8_kvcache":
        args[name] = True
    else:
        args[name] = data.draw(st.integers(1, 2048))
        name = "is_fp8_kvcache"  # sparse FP8 options are refused together, under that name
    assert_refused(Call(deepport.get_mla_metadata, (), args, note=f"get_mla_metadata {name}"), name)
