"""What mla_decode computes, checked on the reference and torch backends with small hand-checkable cases,
a brute-force float64 loop written here, and torch against reference on random varlen inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from same_computation import assert_same_up_to_rounding

import deepport

pytestmark = pytest.mark.usefixtures("clean_env")

BACKENDS = ["reference", "torch"]


def brute_force(inp: Any, *, causal: bool = False, softmax_scale: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """out [b, s_q, h_q, d_v], lse [b, h_q, s_q] in float64, one query row and one token at a time."""
    q, k_cache, table, lens, d_v = inp.args
    b, s_q, h_q, d_qk = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    scale = d_qk ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        length = int(lens[i])
        for j in range(s_q):
            visible = [t for t in range(length) if not causal or t <= length - s_q + j]
            for h in range(h_q):
                kv_head = h // (h_q // h_kv)
                rows = [k_cache[int(table[i, t // page]), t % page, kv_head].double() for t in visible]
                if not rows:
                    continue
                keys = torch.stack(rows)
                logits = scale * (keys @ q[i, j, h].double())
                weights = torch.exp(logits - logits.max())
                out[i, j, h] = (weights[:, None] * keys[:, :d_v]).sum(0) / weights.sum()
                lse[i, h, j] = logits.max() + torch.log(weights.sum())
    return out, lse


def assert_matches(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor],
                   dtype: torch.dtype) -> None:
    """out within two roundings of its dtype (plus float32 noise), lse to float32 precision."""
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=2 * eps, atol=2 * eps)
    torch.testing.assert_close(got[1].double(), want[1].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence_gives_zero_output_and_infinite_lse(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(0, 17))
    out, lse = deepport.mla_decode(*inp.args, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.all(lse[0] == math.inf)
    assert torch.all(torch.isfinite(lse[1])) and out[1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_empty_batch_gives_zero_output_and_infinite_lse(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(0, 0))
    out, lse = deepport.mla_decode(*inp.args, backend=backend, out=torch.full((2, 2, 4, 32), 7.0, dtype=torch.bfloat16))
    assert torch.equal(out, torch.zeros_like(out)) and torch.all(lse == math.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_mask_is_bottom_right_aligned(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(7, 20, 3), s_q=3)
    got = deepport.mla_decode(*inp.args, causal=True, backend=backend)
    assert_matches(got, brute_force(inp, causal=True), torch.bfloat16)
    # and the mask matters: without it the first two query rows change, the last one does not
    full = deepport.mla_decode(*inp.args, causal=False, backend=backend)
    assert not torch.equal(got[0][:, 0], full[0][:, 0]) and not torch.equal(got[0][:, 1], full[0][:, 1])
    assert torch.equal(got[0][:, 2], full[0][:, 2]) and torch.equal(got[1][:, :, 2], full[1][:, :, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_query_that_sees_no_token_gives_zero_and_infinite_lse(mla_inputs: Callable[..., Any],
                                                                     backend: str) -> None:
    # L = 2 and s_q = 4: query j sees t <= 2 - 4 + j, so queries 0 and 1 see nothing, 2 sees t=0, 3 sees t<=1
    inp = mla_inputs(lens=(2, 9), s_q=4)
    out, lse = deepport.mla_decode(*inp.args, causal=True, backend=backend)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.all(lse[0, :, :2] == math.inf)
    assert torch.all(torch.isfinite(lse[0, :, 2:]))
    # query 2 sees exactly one token, so its output is that token's V and its lse its single logit
    q, k_cache, table, _, d_v = inp.args
    token0 = k_cache[int(table[0, 0]), 0]  # [h_kv, d_qk]
    kv_of_head = token0.repeat_interleave(2, dim=0)  # h_q=4, h_kv=2
    assert torch.equal(out[0, 2], kv_of_head[:, :d_v])
    logit = (q[0, 2].double() * kv_of_head.double()).sum(-1) * 64 ** -0.5
    torch.testing.assert_close(lse[0, :, 2].double(), logit, rtol=1e-5, atol=1e-5)
    assert_matches((out, lse), brute_force(inp, causal=True), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_has_no_effect_when_s_q_is_one(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(1, 30), s_q=1)
    a = deepport.mla_decode(*inp.args, causal=True, backend=backend)
    b = deepport.mla_decode(*inp.args, causal=False, backend=backend)
    assert_same_up_to_rounding(a[0], b[0])
    assert_same_up_to_rounding(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_softmax_scale_is_inverse_sqrt_of_d_qk(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(9, 40), d_qk=64, d_v=32)
    default = deepport.mla_decode(*inp.args, backend=backend)
    explicit = deepport.mla_decode(*inp.args, softmax_scale=0.125, backend=backend)
    other = deepport.mla_decode(*inp.args, softmax_scale=0.3, backend=backend)
    assert_same_up_to_rounding(default[0], explicit[0])
    assert_same_up_to_rounding(default[1], explicit[1])
    assert not torch.equal(default[1], other[1])
    assert_matches(other, brute_force(inp, softmax_scale=0.3), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_head_h_reads_kv_head_h_div_group(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(6, 11), s_q=1, h_q=6, h_kv=3, d_qk=16, d_v=8)
    k_cache = inp.k_cache.clone()
    for kv_head in range(3):  # V of KV head k is about 100 * (k + 1), far apart from the others
        k_cache[:, :, kv_head, :8] = (100.0 * (kv_head + 1) + k_cache[:, :, kv_head, :8]).to(k_cache.dtype)
    inp = inp.replace(k_cache=k_cache, q=inp.q * 0.01)
    out, _ = deepport.mla_decode(*inp.args, backend=backend)
    for h in range(6):
        centre = 100.0 * (h // 2 + 1)
        assert torch.all((out[:, 0, h].float() - centre).abs() < 5), (h, out[:, 0, h].float().mean())
    assert_matches(deepport.mla_decode(*inp.args, backend=backend), brute_force(inp), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_v_is_the_first_head_dim_v_channels_of_the_cache(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(1, 1), s_q=1, h_q=2, h_kv=1, d_qk=16, d_v=5)
    out, _ = deepport.mla_decode(*inp.args, backend=backend)  # one token: out is exactly its V
    for i in range(2):
        assert torch.equal(out[i, 0, 0], inp.k_cache[int(inp.block_table[i, 0]), 0, 0, :5])
        assert torch.equal(out[i, 0, 1], out[i, 0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_past_the_sequence_and_in_unused_pages_never_reaches_the_outputs(
        mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs(lens=(5, 20, 0), page=16, max_blocks=3, num_blocks=12)
    k_cache = inp.k_cache.clone()
    used: set[tuple[int, int]] = set()
    for i, length in enumerate((5, 20, 0)):
        used |= {(int(inp.block_table[i, t // 16]), t % 16) for t in range(length)}
    for block in range(12):
        for slot in range(16):
            if (block, slot) not in used:
                k_cache[block, slot] = math.nan
    poisoned = inp.replace(k_cache=k_cache)
    out, lse = deepport.mla_decode(*poisoned.args, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_matches((out, lse), brute_force(inp), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_written_in_place_and_returned(mla_inputs: Callable[..., Any], backend: str) -> None:
    inp = mla_inputs()
    out = torch.full((2, 2, 4, 32), math.nan, dtype=torch.bfloat16)
    lse = torch.full((2, 4, 2), math.nan)
    got_out, got_lse = deepport.mla_decode(*inp.args, backend=backend, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    assert not out.isnan().any() and not lse.isnan().any()
    fresh = deepport.mla_decode(*inp.args, backend=backend)
    assert_same_up_to_rounding(out, fresh[0])
    assert_same_up_to_rounding(lse, fresh[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize(("d_qk", "d_v"), [(576, 512), (64, 32)], ids=["576-512", "64-32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_agrees_with_reference_on_random_varlen_inputs(mla_inputs: Callable[..., Any], dtype: torch.dtype,
                                                             page: int, d_qk: int, d_v: int, causal: bool) -> None:
    seed = page + d_qk + int(causal)
    g = torch.Generator().manual_seed(seed)
    lens = [0 if seed % 2 else 1, *torch.randint(1, 3 * page + 1, (3,), generator=g).tolist()]
    max_blocks = -(-max(lens) // page) + 1  # one spare slot per row, never read
    inp = mla_inputs(lens=tuple(lens), s_q=2, h_q=4, h_kv=1, d_qk=d_qk, d_v=d_v, page=page, max_blocks=max_blocks,
                     num_blocks=4 * max_blocks, dtype=dtype, seed=seed)
    ref = deepport.mla_decode(*inp.args, causal=causal, backend="reference")
    got = deepport.mla_decode(*inp.args, causal=causal, backend="torch")
    assert_matches(got, ref, dtype)


def test_reference_agrees_with_the_brute_force_loop_with_gqa_and_paging(mla_inputs: Callable[..., Any]) -> None:
    inp = mla_inputs(lens=(1, 16, 17, 47), s_q=3, h_q=4, h_kv=2, d_qk=24, d_v=20, page=16, max_blocks=3,
                     num_blocks=14, dtype=torch.float16)
    for causal in (False, True):
        got = deepport.mla_decode(*inp.args, causal=causal, softmax_scale=0.2, backend="reference")
        assert_matches(got, brute_force(inp, causal=causal, softmax_scale=0.2), torch.float16)
