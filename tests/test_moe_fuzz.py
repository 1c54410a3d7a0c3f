"""Property-based fuzzing of the seven MoE ops' boundary checks (layout, dispatch (plain and cached),
combine, expanded dispatch/combine, low-latency dispatch/combine).

A valid call of one op is drawn (0 to 4 tokens, bf16 or FP8 payloads, top-k from 1 to 3 with -1 routes and
duplicates, int64 or int32 ids, 1 to 8 experts; handles come from a real dispatch on the torch backend),
then exactly one argument is made invalid; the op must refuse it by name before any backend runs and
change no input (see tests/fuzz_support.py). A caller's ``alloc`` is checked when a backend asks it for
memory, so its aliasing property runs the real backends (last test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from fuzz_support import (
    INT32_MAX,
    Call,
    assert_reaches_backend,
    assert_refused,
    assert_unchanged,
    fuzz_settings,
    non_contiguous,
    snapshot,
)
from hypothesis import event, given
from hypothesis import strategies as st

import deepport

pytestmark = pytest.mark.usefixtures("clean_env")

FP8 = torch.float8_e4m3fn
OPS = ("moe_layout", "moe_dispatch", "moe_dispatch_cached", "moe_combine", "moe_dispatch_expanded",
       "moe_combine_expanded", "moe_low_latency_dispatch", "moe_low_latency_combine")


@dataclass
class MoECase:
    op: str
    kwargs: dict[str, Any]
    num_experts: int
    t_max: int = 0

    def call(self, **changes: Any) -> Call:
        fn = getattr(deepport, self.op.removesuffix("_cached"))
        kwargs = {**self.kwargs, **changes}
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in kwargs.items()}
        return Call(fn, (), kwargs, note=f"{self.op} {shapes}")


def payload(tokens: int, hidden: int, fp8: bool) -> Any:
    x = torch.zeros(tokens, hidden, dtype=torch.bfloat16)
    return (x.to(FP8), torch.ones(tokens, hidden // 128)) if fp8 else x


@st.composite
def moe_cases(draw: st.DrawFn) -> MoECase:
    op = draw(st.sampled_from(OPS))
    t, k = draw(st.integers(0, 4)), draw(st.integers(1, 3))
    e = draw(st.sampled_from([1, 2, 4, 8]))
    fp8 = draw(st.booleans()) and op not in ("moe_layout", "moe_low_latency_dispatch", "moe_low_latency_combine")
    use_fp8 = draw(st.booleans())
    hidden = 128 * draw(st.integers(1, 2)) if fp8 or use_fp8 else draw(st.sampled_from([1, 3, 128]))
    ids = draw(st.lists(st.integers(-1, e - 1), min_size=t * k, max_size=t * k))
    idx = torch.tensor(ids, dtype=draw(st.sampled_from([torch.int64, torch.int32]))).view(t, k)
    weights = torch.ones(t, k)
    x = payload(t, hidden, fp8)
    if op == "moe_layout":
        ranks = draw(st.sampled_from([r for r in (1, 2, 4, 8) if e % r == 0]))
        return MoECase(op, {"topk_idx": idx, "num_experts": e, "num_ranks": ranks}, e)
    if op == "moe_dispatch":
        w = draw(st.sampled_from([weights, None]))
        return MoECase(op, {"x": x, "topk_idx": idx, "topk_weights": w, "num_experts": e,
                            "expert_alignment": draw(st.integers(1, 256))}, e)
    if op == "moe_dispatch_expanded":
        return MoECase(op, {"x": x, "topk_idx": idx, "topk_weights": weights, "num_experts": e,
                            "expert_alignment": draw(st.integers(1, 256))}, e)
    if op in ("moe_dispatch_cached", "moe_combine"):
        sent = deepport.moe_dispatch(x, idx, weights, e, backend="torch")
        if op == "moe_combine":
            rows = sent.handle.num_recv
            return MoECase(op, {"x": torch.zeros(rows, hidden, dtype=torch.bfloat16), "handle": sent.handle,
                                "topk_weights": draw(st.sampled_from([sent.recv_topk_weights, None]))}, e)
        return MoECase(op, {"x": payload(t, draw(st.sampled_from([128, 256])), fp8), "handle": sent.handle}, e)
    if op == "moe_combine_expanded":
        sent_x = deepport.moe_dispatch_expanded(x, idx, weights, e, expert_alignment=draw(st.integers(1, 8)),
                                                backend="torch")
        y = torch.zeros(sent_x.handle.num_expanded, hidden, dtype=torch.bfloat16)
        return MoECase(op, {"y": y, "handle": sent_x.handle}, e)
    t_max = t + draw(st.integers(0 if t else 1, 2))
    if op == "moe_low_latency_dispatch":
        return MoECase(op, {"x": x, "topk_idx": idx, "max_tokens_per_rank": t_max, "num_experts": e,
                            "use_fp8": use_fp8}, e, t_max)
    sent_ll = deepport.moe_low_latency_dispatch(x, idx, t_max, e, use_fp8=use_fp8, backend="torch")
    y = torch.zeros(e, t_max, hidden, dtype=torch.bfloat16)
    return MoECase(op, {"y": y, "topk_idx": idx, "topk_weights": weights, "handle": sent_ll.handle}, e, t_max)


# ---- bad values per argument: each returns (value, the argument the op must name) ----------------------------------

BadValue = Callable[[st.DataObject, MoECase, Any], tuple[Any, str]]


def bad_payload(data: st.DataObject, c: MoECase, x: Any) -> tuple[Any, str]:
    name = "y" if "y" in c.kwargs else "x"
    if isinstance(x, tuple):
        data_t, scales = x
        kind = data.draw(st.sampled_from(["length", "dtype", "hidden", "scales_shape", "scales_dtype",
                                          "scales_meta", "data_meta"] + (["strided"] if data_t.shape[0] > 1 else [])))
        if kind == "length":
            return (data_t, scales, scales), name
        if kind == "dtype":
            return (data_t.to(torch.bfloat16), scales), f"{name}[0]"
        if kind == "hidden":
            return (torch.zeros(data_t.shape[0], 100, dtype=FP8), scales), f"{name}[0]"
        if kind == "strided":
            return (non_contiguous(data_t), scales), f"{name}[0]"
        if kind == "scales_shape":
            return (data_t, torch.ones(data_t.shape[0], scales.shape[1] + 1)), f"{name}[1]"
        if kind == "scales_dtype":
            return (data_t, scales.to(torch.bfloat16)), f"{name}[1]"
        if kind == "scales_meta":
            return (data_t, scales.to("meta")), f"{name}[1]"
        if c.op == "moe_dispatch_cached":  # the handle's device is the anchor
            return (data_t.to("meta"), scales.to("meta")), "handle"
        return (data_t.to("meta"), scales.to("meta")), "topk_idx"  # x's device is the anchor of topk_idx
    kinds = ["dtype", "rank", "empty_hidden", "not_tensor"] + (["strided"] if x.shape[0] > 1 else [])
    kinds += ["rows"] if c.op in ("moe_combine", "moe_combine_expanded", "moe_dispatch_cached") else []
    kinds += ["fp8_tuple", "too_many_tokens"] if c.op == "moe_low_latency_dispatch" else []
    kinds += ["hidden_not_128"] if c.op == "moe_low_latency_dispatch" and c.kwargs["use_fp8"] else []
    kind = data.draw(st.sampled_from(kinds))
    if kind == "dtype":
        return x.to(data.draw(st.sampled_from([torch.float32, torch.float16, FP8]))), name
    if kind == "rank":
        return x.reshape(-1) if x.dim() == 2 else x[0], name
    if kind == "empty_hidden":
        return x[..., :0], name
    if kind == "not_tensor":
        return data.draw(st.sampled_from([None, 1.0, [[0.0]]])), name
    if kind == "strided":
        return non_contiguous(x), name
    if kind == "rows":
        return torch.zeros(x.shape[0] + 1, *x.shape[1:], dtype=x.dtype), name
    if kind == "fp8_tuple":
        return payload(int(x.shape[0]), 128, True), name
    if kind == "hidden_not_128":  # refused when casting to FP8
        return torch.zeros(x.shape[0], 64, dtype=torch.bfloat16), name
    return torch.zeros(c.t_max + 1, x.shape[1], dtype=torch.bfloat16), name


def bad_topk_idx(data: st.DataObject, c: MoECase, idx: torch.Tensor) -> tuple[Any, str]:
    t, k = (int(s) for s in idx.shape)
    kinds = ["dtype", "rank", "no_slots", "not_tensor", "meta"]
    kinds += ["tokens"] if c.op != "moe_layout" else []  # the layout has no x to count tokens against
    kinds += ["strided"] if t > 1 else []
    kinds += ["id"] if t > 0 else []
    kind = data.draw(st.sampled_from(kinds))
    if kind == "dtype":
        return idx.to(data.draw(st.sampled_from([torch.int16, torch.uint8, torch.float32]))), "topk_idx"
    if kind == "rank":
        return idx.reshape(-1), "topk_idx"
    if kind == "no_slots":
        return idx[:, :0], "topk_idx"
    if kind == "tokens":
        return torch.zeros(t + 1, k, dtype=idx.dtype), "topk_idx"
    if kind == "not_tensor":
        return data.draw(st.sampled_from([1, [[0]], 0.5])), "topk_idx"
    if kind == "meta":
        return idx.to("meta"), "topk_idx"
    if kind == "strided":
        return non_contiguous(idx), "topk_idx"
    low = -(2**63) if idx.dtype == torch.int64 else -(2**31)
    high = 2**63 - 1 if idx.dtype == torch.int64 else INT32_MAX
    bad = idx.clone()
    i, j = data.draw(st.integers(0, t - 1)), data.draw(st.integers(0, k - 1))
    if c.op == "moe_low_latency_combine" and data.draw(st.booleans()):  # in range, but not the dispatched routing
        bad[i, j] = (int(idx[i, j]) + 2) % (c.num_experts + 1) - 1
        return bad, "topk_idx"
    bad[i, j] = data.draw(st.integers(low, -2) | st.integers(c.num_experts, high))
    return bad, "topk_idx"


def bad_weights(data: st.DataObject, c: MoECase, w: torch.Tensor | None) -> tuple[Any, str]:
    if w is not None:
        ref = w
    elif c.op == "moe_combine":
        ref = torch.ones(c.kwargs["handle"].num_recv, c.kwargs["handle"].num_topk)
    else:
        ref = torch.ones(c.kwargs["topk_idx"].shape)
    kinds = ["dtype", "shape", "not_tensor", "meta"] + (["strided"] if ref.shape[0] > 1 else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "dtype":
        return ref.to(data.draw(st.sampled_from([torch.bfloat16, torch.float64]))), "topk_weights"
    if kind == "shape":
        return torch.ones(ref.shape[0], ref.shape[1] + 1), "topk_weights"
    if kind == "not_tensor":
        return data.draw(st.sampled_from([1.0, [[1.0]]])), "topk_weights"
    if kind == "meta":
        return ref.to("meta"), "topk_weights"
    return non_contiguous(ref), "topk_weights"


def bad_int(name: str, *extra: int) -> BadValue:
    def bad(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
        return data.draw(st.sampled_from([0, -1, 1.0, True, None, "8", *extra])), name
    return bad


def bad_num_experts(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
    ranks = c.kwargs.get("num_ranks", 1)
    odd = [value + 1] if ranks > 1 and (value + 1) % ranks else []
    return data.draw(st.sampled_from([0, -8, 2**31, 2**40, 8.0, True, None, "8", *odd])), "num_experts"


def bad_t_max(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
    t = int(c.kwargs["x"].shape[0])
    too_small = [t - 1] if t > 1 else []
    bad = data.draw(st.sampled_from([0, -1, 2**31, 2**62, 2.0, True, None, *too_small]))
    return bad, "x" if type(bad) is int and bad in too_small else "max_tokens_per_rank"


def bad_handle(data: st.DataObject, c: MoECase, handle: Any) -> tuple[Any, str]:
    wrong_kind = [handle.routes] if hasattr(handle, "routes") else []
    none = [] if c.op == "moe_dispatch_cached" else [None]  # no handle there is a plain dispatch
    return data.draw(st.sampled_from([*none, {}, "handle", *wrong_kind])), "handle"


def bad_group(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
    return data.draw(st.sampled_from(["world", 0, object()])), "group"


def bad_alloc(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
    return data.draw(st.sampled_from([42, "torch.empty", [torch.empty]])), "alloc"


def bad_bool(name: str) -> BadValue:
    def bad(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
        return data.draw(st.sampled_from([1, 0, "yes", None])), name
    return bad


def unexpected_for_cached(name: str) -> BadValue:
    """A cached dispatch takes its routes from the handle: passing new ones is refused."""
    def bad(data: st.DataObject, c: MoECase, value: Any) -> tuple[Any, str]:
        t = c.kwargs["handle"].num_tokens
        return {"topk_idx": torch.zeros(t, 1, dtype=torch.int64), "topk_weights": torch.ones(t, 1),
                "num_experts": c.num_experts}[name], name
    return bad


COMMON = {"group": bad_group, "alloc": bad_alloc}
BAD_ALIGNMENT = bad_int("expert_alignment", 2**31, 2**62)  # past int32
ARGUMENTS: dict[str, dict[str, BadValue]] = {
    "moe_layout": {"topk_idx": bad_topk_idx, "num_experts": bad_num_experts, "num_ranks": bad_int("num_ranks")},
    "moe_dispatch": {"x": bad_payload, "topk_idx": bad_topk_idx, "topk_weights": bad_weights,
                     "num_experts": bad_num_experts, "expert_alignment": BAD_ALIGNMENT, **COMMON},
    "moe_dispatch_cached": {"x": bad_payload, "handle": bad_handle, "group": bad_group, "alloc": bad_alloc,
                            **{n: unexpected_for_cached(n) for n in ("topk_idx", "topk_weights", "num_experts")}},
    "moe_combine": {"x": bad_payload, "handle": bad_handle, "topk_weights": bad_weights, "alloc": bad_alloc},
    "moe_dispatch_expanded": {"x": bad_payload, "topk_idx": bad_topk_idx, "topk_weights": bad_weights,
                              "num_experts": bad_num_experts, "expert_alignment": BAD_ALIGNMENT,
                              **COMMON},
    "moe_combine_expanded": {"y": bad_payload, "handle": bad_handle, "alloc": bad_alloc},
    "moe_low_latency_dispatch": {"x": bad_payload, "topk_idx": bad_topk_idx, "max_tokens_per_rank": bad_t_max,
                                 "num_experts": bad_num_experts, "use_fp8": bad_bool("use_fp8"), **COMMON},
    "moe_low_latency_combine": {"y": bad_payload, "topk_idx": bad_topk_idx, "topk_weights": bad_weights,
                                "handle": bad_handle, "alloc": bad_alloc},
}


def huge_on_meta(data: st.DataObject) -> tuple[Call, str]:
    """More than 2^31 tokens (meta tensors: nothing allocated): refused by the int32 limit on token counts,
    named, before anything needs data; and a low-latency capacity past int32."""
    op = data.draw(st.sampled_from(["moe_layout", "moe_dispatch", "moe_dispatch_expanded", "moe_low_latency"]))
    tokens = 2**31 + data.draw(st.integers(0, 2**20))
    idx = torch.empty(tokens, 8, dtype=torch.int64, device="meta")
    x = torch.empty(tokens, 7168, dtype=torch.bfloat16, device="meta")
    if op == "moe_layout":
        return Call(deepport.moe_layout, (idx, 256, 8), note=f"meta layout T={tokens}"), "topk_idx"
    if op == "moe_low_latency":
        t_max = data.draw(st.sampled_from([2**31, 2**40, 2**62]))
        return Call(deepport.moe_low_latency_dispatch, (x[:128], idx[:128], t_max, 256),
                    note=f"meta low latency T_max={t_max}"), "max_tokens_per_rank"
    w = torch.empty(tokens, 8, device="meta")
    return Call(getattr(deepport, op), (x, idx, w, 256), note=f"meta {op} T={tokens}"), "topk_idx"


@fuzz_settings()
@given(case=moe_cases(), data=st.data())
def test_every_invalid_call_is_refused_by_name_before_any_backend(case: MoECase, data: st.DataObject) -> None:
    if data.draw(st.integers(0, 19)) == 7:  # one call in 20 (hypothesis favours the bounds)
        call, name = huge_on_meta(data)
        event(f"huge_on_meta -> {name}")
    else:
        argument = data.draw(st.sampled_from(sorted(ARGUMENTS[case.op])))
        value, name = ARGUMENTS[case.op][argument](data, case, case.kwargs.get(argument))
        event(f"{case.op} {argument} -> {name}")
        call = case.call(**{argument: value})
        call.note = f"{argument}: {call.note}"
    assert_refused(call, name)


@fuzz_settings(default=300)
@given(case=moe_cases())
def test_every_valid_call_reaches_the_backend(case: MoECase) -> None:
    assert_reaches_backend(case.call())


# ---- a caller's allocator: checked when a backend asks for memory --------------------------------------------------

@fuzz_settings(default=100)
@given(case=moe_cases(), backend=st.sampled_from(["torch", "reference"]), data=st.data())
def test_an_allocator_that_hands_out_an_input_or_the_same_memory_twice_is_refused(
        case: MoECase, backend: str, data: st.DataObject) -> None:
    """The k-th tensor the allocator returns aliases an input (or an earlier output): refused as `alloc`,
    before the backend writes to it, so no input changes."""
    if case.op == "moe_layout":  # takes no allocator
        return
    calls = data.draw(st.integers(0, 1))
    handed: list[torch.Tensor] = []

    def aliasing(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)
        if len(handed) == calls and t.numel() > 0:
            source = handed[0] if len(handed) > 0 and data.draw(st.booleans()) else None
            if source is None:
                inputs = [x for x in snapshot(case.call()) if x[0].numel() > 0]
                source = inputs[0][0] if inputs else None
            if source is not None:
                nbytes = t.numel() * t.element_size()
                raw = torch.empty(0, dtype=torch.uint8).set_(source.untyped_storage())
                if raw.numel() >= nbytes:
                    t = raw[:nbytes].view(dtype).view(shape)
        handed.append(t)
        return t

    call = case.call(alloc=aliasing)
    before = snapshot(call)
    try:
        call.fn(*call.args, **{**call.kwargs, "backend": backend})
    except deepport.InvalidArgumentError as err:
        assert err.argument == "alloc" and "memory disjoint" in str(err), str(err)
        event("refused")
    else:
        event("no aliasing tensor was handed out (too few outputs or too little input memory)")
    assert_unchanged(before)
