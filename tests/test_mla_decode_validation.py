"""The op layer's boundary checks for mla_decode: every bad input is refused before any backend runs,
with an error naming the argument and saying expected versus got."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import deepport
from deepport.errors import ArgumentTypeError, InvalidArgumentError, UnknownBackendError

pytestmark = pytest.mark.usefixtures("clean_env")

POSITIONAL = ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v")


def _call(inputs: Any, **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """mla_decode on ``inputs`` with some arguments replaced, on the spy backend unless told otherwise."""
    args = [overrides.pop(name, value) for name, value in zip(POSITIONAL, inputs.args, strict=True)]
    overrides.setdefault("backend", "spy")
    return deepport.mla_decode(*args, **overrides)


def _rejected(spy: list[Any], error: type[Exception], argument: str, fragments: tuple[str, ...],
              inputs: Any, **overrides: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _call(inputs, **overrides)
    assert type(info.value) is error
    assert info.value.argument == argument
    message = str(info.value)
    assert message.startswith(f"`{argument}`: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    assert spy == [], "a backend ran on an input the op layer should have refused"


@pytest.fixture
def base(mla_inputs: Callable[..., Any]) -> Any:
    """b=2, s_q=2, h_q=4, h_kv=2, d_qk=64, d_v=32, page 16, 3 table slots, 8 blocks, lengths (5, 33)."""
    return mla_inputs()


def test_valid_call_reaches_the_chosen_backend_exactly_once(spy: list[Any], base: Any) -> None:
    out, lse = _call(base)
    assert [name for name, _ in spy] == ["spy"]
    assert out.shape == (2, 2, 4, 32) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 4, 2) and lse.dtype == torch.float32


# ---- dtypes -------------------------------------------------------------------------------------------------------

def test_q_float32_is_a_dtype_error(spy: list[Any], base: Any) -> None:
    _rejected(spy, ArgumentTypeError, "q", ("torch.bfloat16", "torch.float16", "got torch.float32"),
              base, q=base.q.float())


def test_k_cache_dtype_must_match_q(spy: list[Any], base: Any) -> None:
    _rejected(spy, ArgumentTypeError, "k_cache", ("expected dtype torch.bfloat16", "got torch.float16"),
              base, k_cache=base.k_cache.half())


def test_block_table_int64_is_a_dtype_error(spy: list[Any], base: Any) -> None:
    _rejected(spy, ArgumentTypeError, "block_table", ("torch.int32", "got torch.int64"),
              base, block_table=base.block_table.long())


def test_cache_seqlens_int64_is_a_dtype_error(spy: list[Any], base: Any) -> None:
    _rejected(spy, ArgumentTypeError, "cache_seqlens", ("torch.int32", "got torch.int64"),
              base, cache_seqlens=base.cache_seqlens.long())


# ---- shapes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argument", "reshape", "fragments"), [
    ("q", lambda t: t[0], ("expected 4 dimensions", "got 3")),
    ("k_cache", lambda t: t.flatten(0, 1), ("expected 4 dimensions", "got 3")),
    ("block_table", lambda t: t.flatten(), ("expected 2 dimensions", "got 1")),
    ("cache_seqlens", lambda t: t[:, None], ("expected 1 dimensions", "got 2")),
], ids=["q", "k_cache", "block_table", "cache_seqlens"])
def test_wrong_number_of_dimensions_is_refused(spy: list[Any], base: Any, argument: str,
                                               reshape: Callable[[torch.Tensor], torch.Tensor],
                                               fragments: tuple[str, ...]) -> None:
    _rejected(spy, InvalidArgumentError, argument, fragments, base,
              **{argument: reshape(getattr(base, argument))})


def test_k_cache_last_dim_must_equal_d_qk_of_q(spy: list[Any], base: Any) -> None:
    _rejected(spy, InvalidArgumentError, "k_cache", ("expected size 64", "(8, 16, 2, 48)"),
              base, k_cache=base.k_cache[..., :48].contiguous())


def test_h_q_must_be_a_multiple_of_h_kv(spy: list[Any], base: Any) -> None:
    _rejected(spy, InvalidArgumentError, "q", ("multiple of h_kv=2", "got h_q=3"), base, q=base.q[:, :, :3])


def test_block_table_batch_must_match_q(spy: list[Any], base: Any) -> None:
    table = torch.cat([base.block_table, base.block_table[:1]])
    _rejected(spy, InvalidArgumentError, "block_table", ("expected size 2", "got shape (3, 3)"),
              base, block_table=table)


def test_cache_seqlens_length_must_match_batch(spy: list[Any], base: Any) -> None:
    _rejected(spy, InvalidArgumentError, "cache_seqlens", ("expected size 2", "got shape (3,)"),
              base, cache_seqlens=torch.tensor([5, 33, 1], dtype=torch.int32))


# ---- layout -------------------------------------------------------------------------------------------------------

def _every_other_channel(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values as ``t`` but with stride 2 in the last dimension."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert view.stride(-1) == 2 and torch.equal(view, t)
    return view


@pytest.mark.parametrize("argument", ["q", "k_cache", "block_table"])
def test_strided_last_dimension_is_refused(spy: list[Any], base: Any, argument: str) -> None:
    strided = _every_other_channel(getattr(base, argument))
    _rejected(spy, InvalidArgumentError, argument, ("stride 1", f"got strides {strided.stride()}"),
              base, **{argument: strided})


def test_non_contiguous_cache_seqlens_is_refused(spy: list[Any], base: Any) -> None:
    lens = torch.tensor([5, 0, 33, 0], dtype=torch.int32)[::2]
    _rejected(spy, InvalidArgumentError, "cache_seqlens", ("contiguous", "strides (2,)"), base, cache_seqlens=lens)


def test_non_contiguous_q_with_contiguous_last_dim_is_accepted_and_gives_the_same_result(base: Any) -> None:
    q_bhsd = base.q.transpose(1, 2).contiguous()  # [b, h_q, s_q, d], as attention code often holds it
    q_view = q_bhsd.transpose(1, 2)  # [b, s_q, h_q, d] with free outer strides
    assert not q_view.is_contiguous() and torch.equal(q_view, base.q)
    for backend in ("torch", "reference"):
        want = _call(base, backend=backend)
        got = _call(base, q=q_view, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), backend


# ---- types and devices --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argument", "value", "got"), [
    ("q", np.zeros((2, 2, 4, 64), dtype=np.float16), "got ndarray"),
    ("k_cache", None, "got NoneType"),
    ("block_table", [[0, 1, 2], [3, 4, 5]], "got list"),
    ("cache_seqlens", (5, 33), "got tuple"),
])
def test_non_tensor_argument_is_a_type_error(spy: list[Any], base: Any, argument: str, value: Any,
                                             got: str) -> None:
    _rejected(spy, ArgumentTypeError, argument, ("expected a torch.Tensor", got), base, **{argument: value})


@pytest.mark.parametrize("argument", ["k_cache", "block_table", "cache_seqlens"])
def test_tensor_on_another_device_than_q_is_refused(spy: list[Any], base: Any, argument: str) -> None:
    _rejected(spy, InvalidArgumentError, argument, ("expected device cpu", "got meta"),
              base, **{argument: getattr(base, argument).to("meta")})


# ---- scalars ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "error", "fragments"), [
    (0, InvalidArgumentError, ("expected an int >= 1", "got 0")),
    (65, InvalidArgumentError, ("head_dim_v <= d_qk=64", "got 65")),
    (32.0, ArgumentTypeError, ("expected an int", "got float")),
    (True, ArgumentTypeError, ("expected an int", "got bool")),
    (np.int64(32), ArgumentTypeError, ("expected an int", "got int64")),
], ids=["zero", "above-d_qk", "float", "bool", "numpy-int"])
def test_bad_head_dim_v_is_refused(spy: list[Any], base: Any, value: Any, error: type[Exception],
                                   fragments: tuple[str, ...]) -> None:
    _rejected(spy, error, "head_dim_v", fragments, base, head_dim_v=value)


@pytest.mark.parametrize(("value", "error", "got"), [
    (math.nan, InvalidArgumentError, "got nan"),
    (math.inf, InvalidArgumentError, "got inf"),
    (-math.inf, InvalidArgumentError, "got -inf"),
    (10**400, InvalidArgumentError, "got 1000"),
    ("0.125", ArgumentTypeError, "got str"),
    (True, ArgumentTypeError, "got bool"),
], ids=["nan", "inf", "-inf", "huge-int", "str", "bool"])
def test_bad_softmax_scale_is_refused(spy: list[Any], base: Any, value: Any, error: type[Exception],
                                      got: str) -> None:
    expected = "expected a finite number" if error is InvalidArgumentError else "expected a float or None"
    _rejected(spy, error, "softmax_scale", (expected, got), base, softmax_scale=value)


@pytest.mark.parametrize(("value", "got"), [("yes", "got str"), (1, "got int"), (None, "got NoneType")])
def test_causal_must_be_a_bool(spy: list[Any], base: Any, value: Any, got: str) -> None:
    _rejected(spy, ArgumentTypeError, "causal", ("expected a bool", got), base, causal=value)


# ---- index values -------------------------------------------------------------------------------------------------

def test_negative_length_is_refused(spy: list[Any], base: Any) -> None:
    _rejected(spy, InvalidArgumentError, "cache_seqlens", (">= 0", "cache_seqlens[0] = -1"),
              base, cache_seqlens=torch.tensor([-1, 33], dtype=torch.int32))


def test_length_beyond_block_table_capacity_is_refused(spy: list[Any], base: Any) -> None:
    # 3 slots of 16 tokens hold 48 tokens; 48 is fine, 49 is not.
    _call(base, cache_seqlens=torch.tensor([5, 48], dtype=torch.int32))
    spy.clear()
    _rejected(spy, InvalidArgumentError, "cache_seqlens", ("3 * 16 = 48", "cache_seqlens[1] = 49"),
              base, cache_seqlens=torch.tensor([5, 49], dtype=torch.int32))


@pytest.mark.parametrize("bad_id", [-1, 8, 2147480000])
def test_block_id_out_of_range_in_a_used_page_is_refused(spy: list[Any], base: Any, bad_id: int) -> None:
    table = base.block_table.clone()
    table[1, 2] = bad_id  # request 1 has 33 tokens, so it uses all three of its pages
    _rejected(spy, InvalidArgumentError, "block_table", ("[0, 8)", f"block_table[1, 2] = {bad_id}", "uses 3 pages"),
              base, block_table=table)


def test_garbage_in_unused_block_table_slots_is_accepted_and_changes_nothing(base: Any) -> None:
    dirty = base.block_table.clone()
    dirty[0, 1:] = torch.tensor([2147480000, -1])  # request 0 has 5 tokens: only slot 0 is read
    lens = torch.tensor([5, 0], dtype=torch.int32)
    dirty[1, :] = torch.tensor([-1, -2147483648, 2147483647])  # request 1 is empty: no slot is read
    for backend in ("torch", "reference"):
        clean_out, clean_lse = _call(base, cache_seqlens=lens, backend=backend)
        out, lse = _call(base, cache_seqlens=lens, block_table=dirty, backend=backend)
        assert torch.equal(out, clean_out) and torch.equal(lse, clean_lse), backend


def test_value_checks_off_lets_an_out_of_range_id_through_to_the_backend(
        spy: list[Any], base: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    table = base.block_table.clone()
    table[1, 2] = 8
    with pytest.raises(InvalidArgumentError):
        _call(base, block_table=table)
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    _call(base, block_table=table)  # the spy backend does not read the table, so this is safe
    assert [name for name, _ in spy] == ["spy"]
    assert spy[0][1].block_table is table


# ---- outputs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argument", "make", "error", "fragments"), [
    ("out", lambda: torch.empty(2, 2, 4, 64, dtype=torch.bfloat16), InvalidArgumentError,
     ("expected shape (2, 2, 4, 32)", "got (2, 2, 4, 64)")),
    ("out", lambda: torch.empty(2, 2, 4, 32), ArgumentTypeError, ("torch.bfloat16", "got torch.float32")),
    ("out", lambda: torch.empty(2, 4, 2, 32, dtype=torch.bfloat16).transpose(1, 2), InvalidArgumentError,
     ("contiguous", "strides (256, 32, 64, 1)")),
    ("out", lambda: torch.empty(2, 2, 4, 32, dtype=torch.bfloat16, device="meta"), InvalidArgumentError,
     ("device cpu", "got meta")),
    ("lse", lambda: torch.empty(2, 2, 4), InvalidArgumentError, ("expected shape (2, 4, 2)", "got (2, 2, 4)")),
    ("lse", lambda: torch.empty(2, 4, 2, dtype=torch.bfloat16), ArgumentTypeError,
     ("torch.float32", "got torch.bfloat16")),
    ("lse", lambda: torch.empty(2, 2, 4).transpose(1, 2), InvalidArgumentError, ("contiguous", "strides (8, 1, 4)")),
], ids=["out-shape", "out-dtype", "out-strided", "out-device", "lse-shape", "lse-dtype", "lse-strided"])
def test_bad_preallocated_output_is_refused(spy: list[Any], base: Any, argument: str,
                                            make: Callable[[], torch.Tensor], error: type[Exception],
                                            fragments: tuple[str, ...]) -> None:
    _rejected(spy, error, argument, fragments, base, **{argument: make()})


def test_bad_output_is_reported_before_backend_selection(spy: list[Any], base: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _call(base, out=torch.empty(1), backend="no-such-backend")
    assert info.value.argument == "out"
    with pytest.raises(UnknownBackendError):
        _call(base, backend="no-such-backend")


# ---- metadata -----------------------------------------------------------------------------------------------------

def test_metadata_planned_for_another_batch_is_refused(spy: list[Any], base: Any) -> None:
    md = deepport.get_mla_metadata(torch.tensor([5, 33, 7], dtype=torch.int32), 4, 2)
    _rejected(spy, InvalidArgumentError, "metadata", ("(3, 4, 2)", "the call has (2, 4, 2)"), base, metadata=md)


def test_metadata_planned_for_another_h_kv_is_refused(spy: list[Any], base: Any) -> None:
    md = deepport.get_mla_metadata(base.cache_seqlens, 4, 1)
    _rejected(spy, InvalidArgumentError, "metadata", ("(2, 4, 1)", "the call has (2, 4, 2)"), base, metadata=md)


def test_metadata_planned_for_another_h_q_is_refused(spy: list[Any], base: Any) -> None:
    md = deepport.get_mla_metadata(base.cache_seqlens, 4, 2, num_heads_q=8)
    _rejected(spy, InvalidArgumentError, "metadata", ("h_q=4",), base, metadata=md)


def test_metadata_of_another_type_is_a_type_error(spy: list[Any], base: Any) -> None:
    _rejected(spy, ArgumentTypeError, "metadata", ("MLAMetadata", "got dict"), base, metadata={"batch": 2})


def test_matching_metadata_is_accepted_and_handed_to_the_backend(spy: list[Any], base: Any) -> None:
    md = deepport.get_mla_metadata(base.cache_seqlens, 2 * 4 // 2, 2, num_heads_q=4)
    _call(base, metadata=md)
    assert spy[0][1].metadata is md


def test_stale_metadata_is_refused(spy: list[Any], base: Any) -> None:
    lens = base.cache_seqlens.clone()
    md = deepport.get_mla_metadata(lens, 4, 2)
    lens[0] += 1  # the next step's lengths, written in place into the planned tensor
    _rejected(spy, InvalidArgumentError, "metadata", ("other cache_seqlens values", "get_mla_metadata again"),
              base, cache_seqlens=lens, metadata=md)


def test_get_mla_metadata_refuses_sparse_fp8_options() -> None:
    lens = torch.tensor([5, 33], dtype=torch.int32)
    for kwargs in ({"is_fp8_kvcache": True}, {"topk": 2048}):
        with pytest.raises(InvalidArgumentError) as info:
            deepport.get_mla_metadata(lens, 4, 2, **kwargs)
        assert info.value.argument == "is_fp8_kvcache"
        assert "is_fp8_kvcache=False and topk=None" in str(info.value)


def test_get_mla_metadata_refuses_int64_and_negative_lengths() -> None:
    with pytest.raises(ArgumentTypeError, match=r"torch\.int32.*got torch\.int64"):
        deepport.get_mla_metadata(torch.tensor([5, 33]), 4, 2)
    with pytest.raises(InvalidArgumentError, match="got min -3"):
        deepport.get_mla_metadata(torch.tensor([5, -3], dtype=torch.int32), 4, 2)


# ---- empty batch, explain -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "reference", None])
def test_empty_batch_returns_empty_outputs_of_the_right_shapes(mla_inputs: Callable[..., Any],
                                                               backend: str | None) -> None:
    empty = mla_inputs(lens=())
    out, lse = _call(empty, backend=backend)
    assert out.shape == (0, 2, 4, 32) and out.dtype == torch.bfloat16
    assert lse.shape == (0, 4, 2) and lse.dtype == torch.float32


def test_explain_validates_like_the_op_outputs_included(base: Any) -> None:
    with pytest.raises(ArgumentTypeError) as info:
        deepport.explain("mla_decode", base.q.float(), *base.args[1:])
    assert info.value.argument == "q"
    with pytest.raises(InvalidArgumentError) as bad_out:
        deepport.explain("mla_decode", *base.args, out=torch.empty(3))
    assert bad_out.value.argument == "out"
    good = deepport.explain("mla_decode", *base.args, out=torch.empty(2, 2, 4, 32, dtype=torch.bfloat16))
    assert good.chosen == "torch"



def test_out_sharing_memory_with_an_input_is_rejected(spy: list[Any], base: Any) -> None:
    buffer = torch.empty(2 * 2 * 4 * 64, dtype=torch.bfloat16)
    q = buffer.view(2, 2, 4, 64).copy_(base.q)
    _rejected(spy, InvalidArgumentError, "out", ("memory disjoint from `q`",), base, q=q,
              out=buffer[: 2 * 2 * 4 * 32].view(2, 2, 4, 32))  # q's own bytes: read while written


def test_lse_sharing_memory_with_out_is_rejected_but_disjoint_slices_of_one_buffer_are_fine(
        spy: list[Any], base: Any) -> None:
    workspace = torch.empty(2 * 2 * 4 * 32 + 2 * 4 * 2, dtype=torch.float32)
    out = torch.empty(2, 2, 4, 32, dtype=torch.bfloat16)
    overlapping = out.view(torch.float32).view(-1)[: 2 * 4 * 2].view(2, 4, 2)
    _rejected(spy, InvalidArgumentError, "lse", ("memory disjoint from `out`",), base, out=out, lse=overlapping)
    lse = workspace[2 * 2 * 4 * 32:].view(2, 4, 2)  # same storage as other data, but disjoint bytes
    _call(base, lse=lse)
    assert [name for name, _ in spy] == ["spy"]
