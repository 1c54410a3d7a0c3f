"""Tensors of more than 2^31 elements at the op layer, per op (the table in docs/VALIDATION.md).

Shapes are checked on 'meta' tensors (nothing allocated): an op either accepts the sizes (every shape
check passes and only the missing data is refused, naming the op's anchor tensor) or refuses them with an
error naming the int32 limit. Index arithmetic in the op layer is 64-bit (Python ints, int64 tensors)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import deepport
from deepport.errors import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("clean_env")

FP8 = torch.float8_e4m3fn
INT32_MAX = 2**31 - 1
META: dict[str, Any] = {"device": "meta"}


def refused(fn: Any, *args: Any, **kwargs: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        fn(*args, **kwargs)
    return info.value


def accepted_but_no_data(error: InvalidArgumentError, anchor: str) -> None:
    assert error.argument == anchor and "meta device" in str(error), str(error)


def test_mla_decode_accepts_a_cache_and_batch_beyond_2_31_elements() -> None:
    q = torch.empty(2**20, 2, 128, 576, dtype=torch.bfloat16, **META)  # 1.5e11 elements
    k_cache = torch.empty(2**26, 64, 1, 576, dtype=torch.bfloat16, **META)  # 2.5e12 elements
    table = torch.empty(2**20, 2**12, dtype=torch.int32, **META)
    lens = torch.empty(2**20, dtype=torch.int32, **META)
    accepted_but_no_data(refused(deepport.mla_decode, q, k_cache, table, lens, 512), "q")
    accepted_but_no_data(refused(deepport.get_mla_metadata, lens, 256, 1), "cache_seqlens")


def test_mla_decode_block_ids_of_a_cache_of_more_than_2_31_blocks_are_compared_in_64_bit() -> None:
    """num_blocks = 2^31 + 5 does not fit int32: every int32 id is in range (the check once compared in
    int32 and refused them all)."""
    page = torch.randn(1, 1, 1, 8).to(torch.bfloat16)
    k_cache = page.expand(2**31 + 5, 1, 1, 8)
    q = torch.randn(1, 1, 1, 8).to(torch.bfloat16)
    table = torch.tensor([[INT32_MAX, 0]], dtype=torch.int32)
    out, _ = deepport.mla_decode(q, k_cache, table, torch.tensor([2], dtype=torch.int32), 8, backend="torch")
    assert torch.equal(out[0, 0, 0], page[0, 0, 0])  # two identical tokens: softmax averages them to the token


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
def test_fp8_gemm_accepts_operands_and_out_beyond_2_31_elements(layout: str) -> None:
    m, n, k = 2**20, 129280, 7168  # a 1M-token prefill through DeepSeek-V3's vocabulary projection
    a = torch.empty((k, m) if layout[0] == "t" else (m, k), dtype=FP8, **META)
    sfa = torch.empty((56, m) if layout[0] == "t" else (m, 56), **META)
    b = torch.empty((k, n) if layout[1] == "n" else (n, k), dtype=FP8, **META)
    sfb = torch.empty((56, 1010) if layout[1] == "n" else (1010, 56), **META)
    out = torch.empty(m, n, dtype=torch.bfloat16, **META)
    accepted_but_no_data(refused(getattr(deepport, f"fp8_gemm_{layout}"), (a, sfa), (b, sfb), out), "a[0]")


def test_grouped_fp8_gemms_accept_256_experts_on_one_device() -> None:
    b = torch.empty(256, 4096, 7168, dtype=FP8, **META)  # 7.5e9 elements
    sfb = torch.empty(256, 32, 56, **META)
    m_sum = 2**31 + 128
    a, sfa = torch.empty(m_sum, 7168, dtype=FP8, **META), torch.empty(m_sum, 56, **META)
    out, index = torch.empty(m_sum, 4096, dtype=torch.bfloat16, **META), torch.empty(m_sum, dtype=torch.int32, **META)
    accepted_but_no_data(refused(deepport.m_grouped_fp8_gemm_nt_contiguous, (a, sfa), (b, sfb), out, index), "a[0]")
    a3, sfa3 = torch.empty(256, 4096, 7168, dtype=FP8, **META), torch.empty(256, 4096, 56, **META)
    out3 = torch.empty(256, 4096, 4096, dtype=torch.bfloat16, **META)
    masked_m = torch.empty(256, dtype=torch.int32, **META)
    accepted_but_no_data(refused(deepport.m_grouped_fp8_gemm_nt_masked, (a3, sfa3), (b, sfb), out3, masked_m, 128),
                         "a[0]")


@pytest.mark.parametrize("op", ["moe_layout", "moe_dispatch", "moe_dispatch_expanded"])
def test_moe_refuses_more_than_int32_max_tokens_by_name(op: str) -> None:
    t = 2**31
    idx = torch.empty(t, 8, dtype=torch.int64, **META)
    if op == "moe_layout":
        error = refused(deepport.moe_layout, idx, 256, 8)
    else:
        x = torch.empty(t, 7168, dtype=torch.bfloat16, **META)
        error = refused(getattr(deepport, op), x, idx, torch.empty(t, 8, **META), 256)
    assert error.argument == "topk_idx" and f"num_tokens <= {INT32_MAX}" in str(error), str(error)


def test_moe_accepts_payloads_beyond_2_31_elements_under_the_token_limit() -> None:
    t = 2**20  # 7.5e9 payload elements
    x = torch.empty(t, 7168, dtype=torch.bfloat16, **META)
    idx = torch.empty(t, 8, dtype=torch.int64, **META)
    accepted_but_no_data(refused(deepport.moe_dispatch, x, idx, None, 256), "topk_idx")


@pytest.mark.parametrize(("argument", "call"), [
    ("max_tokens_per_rank", lambda x, i: deepport.moe_low_latency_dispatch(x, i, 2**31, 8)),
    ("num_experts", lambda x, i: deepport.moe_dispatch(x, i, None, 2**31)),
    ("expert_alignment", lambda x, i: deepport.moe_dispatch(x, i, None, 8, expert_alignment=2**31)),
])
def test_moe_counts_held_in_int32_are_limited_by_name(argument: str, call: Any) -> None:
    x, idx = torch.zeros(2, 128, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.int64)
    error = refused(call, x, idx)
    assert error.argument == argument and str(INT32_MAX) in str(error), str(error)
