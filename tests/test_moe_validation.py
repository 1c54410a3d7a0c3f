"""The MoE op layer rejects bad arguments before any backend runs, naming the argument."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import deepport
from deepport.errors import ArgumentTypeError, InvalidArgumentError

T, H, E, K = 6, 256, 8, 2


def _inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(T, H, generator=g).to(torch.bfloat16),
            "topk_idx": torch.randint(0, E, (T, K), generator=g),
            "topk_weights": torch.rand(T, K, generator=g)}


def _dispatch(**changes: Any) -> Any:
    a = {**_inputs(), **changes}
    return deepport.moe_dispatch(a["x"], a["topk_idx"], a["topk_weights"], a.get("num_experts", E),
                                 expert_alignment=a.get("expert_alignment", 1))


@pytest.mark.parametrize("changes, argument, words", [
    ({"x": torch.zeros(T, H)}, "x", "bfloat16"),
    ({"x": torch.zeros(T, H, dtype=torch.bfloat16)[:, ::2]}, "x", "contiguous"),
    ({"x": torch.zeros(T, H, 1, dtype=torch.bfloat16)}, "x", "2 dimensions"),
    ({"topk_idx": torch.zeros(T, K, dtype=torch.int16)}, "topk_idx", "int64"),
    ({"topk_idx": torch.zeros(T + 1, K, dtype=torch.int64)}, "topk_idx", "num_tokens"),
    ({"topk_idx": torch.full((T, K), E, dtype=torch.int64)}, "topk_idx", f"[-1, {E})"),
    ({"topk_idx": torch.full((T, K), -2, dtype=torch.int64)}, "topk_idx", "got topk_idx[0, 0] = -2"),
    ({"topk_weights": torch.zeros(T, K, dtype=torch.bfloat16)}, "topk_weights", "float32"),
    ({"topk_weights": torch.zeros(T, K + 1)}, "topk_weights", "shape"),
    ({"num_experts": 0}, "num_experts", ">= 1"),
    ({"expert_alignment": 0}, "expert_alignment", ">= 1"),
    ({"x": (torch.zeros(T, 100, dtype=torch.float8_e4m3fn), torch.zeros(T, 1))}, "x[0]", "multiple of 128"),
    ({"x": (torch.zeros(T, H, dtype=torch.float8_e4m3fn), torch.zeros(T, 3))}, "x[1]", "hidden / 128"),
    ({"x": (torch.zeros(T, H, dtype=torch.float8_e4m3fn), torch.zeros(T, 2, dtype=torch.bfloat16))}, "x[1]",
     "float32"),
    ({"x": (torch.zeros(T, H, dtype=torch.float8_e4m3fn),)}, "x", "2-tuple"),
])
def test_dispatch_rejects_bad_arguments(changes: dict[str, Any], argument: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        _dispatch(**changes)
    assert err.value.argument == argument and words in str(err.value), str(err.value)


def test_dispatch_without_routes_or_handle_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="topk_idx"):
        deepport.moe_dispatch(_inputs()["x"])


def test_cached_dispatch_rejects_new_routes_and_other_token_counts() -> None:
    a = _inputs()
    r = deepport.moe_dispatch(a["x"], a["topk_idx"], a["topk_weights"], E)
    with pytest.raises(InvalidArgumentError, match="cached dispatch"):
        deepport.moe_dispatch(a["x"], a["topk_idx"], handle=r.handle)
    with pytest.raises(InvalidArgumentError, match="rows"):
        deepport.moe_dispatch(a["x"][:2], handle=r.handle)
    with pytest.raises(ArgumentTypeError, match="MoEHandle"):
        deepport.moe_dispatch(a["x"], handle=object())  # type: ignore[arg-type]


def test_combine_checks_rows_against_the_handle() -> None:
    a = _inputs()
    r = deepport.moe_dispatch(a["x"], a["topk_idx"], a["topk_weights"], E)
    assert isinstance(r.recv_x, torch.Tensor)
    with pytest.raises(InvalidArgumentError, match="num_recv"):
        deepport.moe_combine(r.recv_x[1:], r.handle)
    with pytest.raises(ArgumentTypeError, match="bfloat16"):
        deepport.moe_combine(r.recv_x.float(), r.handle)
    with pytest.raises(InvalidArgumentError, match="topk_weights"):
        deepport.moe_combine(r.recv_x, r.handle, torch.zeros(r.handle.num_recv, K + 1))


def test_expanded_combine_needs_its_own_handle() -> None:
    a = _inputs()
    r = deepport.moe_dispatch(a["x"], a["topk_idx"], a["topk_weights"], E)
    assert isinstance(r.recv_x, torch.Tensor)
    with pytest.raises(ArgumentTypeError, match="MoEExpandedHandle"):
        deepport.moe_combine_expanded(r.recv_x, r.handle)  # type: ignore[arg-type]


def test_low_latency_dispatch_limits() -> None:
    a = _inputs()
    with pytest.raises(InvalidArgumentError, match="max_tokens_per_rank"):
        deepport.moe_low_latency_dispatch(a["x"], a["topk_idx"], T - 1, E)
    with pytest.raises(InvalidArgumentError, match="bf16 tensor"):
        deepport.moe_low_latency_dispatch((a["x"].to(torch.float8_e4m3fn), torch.ones(T, 2)), a["topk_idx"], T, E)
    with pytest.raises(InvalidArgumentError, match="multiple of 128"):
        deepport.moe_low_latency_dispatch(a["x"][:, :100].contiguous(), a["topk_idx"], T, E, use_fp8=True)


def test_low_latency_combine_needs_the_dispatched_routing() -> None:
    a = _inputs()
    r = deepport.moe_low_latency_dispatch(a["x"], a["topk_idx"], T, E, use_fp8=False)
    assert isinstance(r.recv_x, torch.Tensor)
    other = (a["topk_idx"] + 1) % E
    with pytest.raises(InvalidArgumentError, match="routing the handle"):
        deepport.moe_low_latency_combine(r.recv_x, other, a["topk_weights"], r.handle)


def test_layout_rejects_experts_not_divisible_by_ranks() -> None:
    with pytest.raises(InvalidArgumentError, match="multiple of"):
        deepport.moe_layout(_inputs()["topk_idx"], E, 3)


def test_a_group_needs_initialised_torch_distributed() -> None:
    with pytest.raises((InvalidArgumentError, ArgumentTypeError), match="group"):
        _dispatch_group(object())


def _dispatch_group(group: object) -> None:
    a = _inputs()
    deepport.moe_dispatch(a["x"], a["topk_idx"], a["topk_weights"], E, group=group)


def test_a_caller_allocator_is_checked() -> None:
    a = _inputs()

    def wrong(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32)

    with pytest.raises(InvalidArgumentError, match="alloc"):
        deepport.moe_dispatch(a["x"], a["topk_idx"], a["topk_weights"], E, alloc=wrong)
