"""mla_decode at the edges of its sizes, on the torch and reference backends, against a dense float64
recomputation that never pages (the sequence is built first, then scattered into the cache):
batch 1 with one token on a single page, block tables used to their last slot (up to 4096 one-token
pages), and a cache of more than 2^31 logical elements (a zero-stride view, so nothing big is allocated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepport

pytestmark = pytest.mark.usefixtures("clean_env")

BACKENDS = ("torch", "reference")
INT32_MAX = 2**31 - 1


def dense_f64(q: torch.Tensor, tokens: torch.Tensor, d_v: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One request: ``q [s_q, h_q, d]`` over ``tokens [L, h_kv, d]`` (no paging, no causal mask), float64."""
    s_q, h_q, d = q.shape
    h_kv = tokens.shape[1]
    qf = q.double().numpy().reshape(s_q, h_kv, h_q // h_kv, d)
    kf = tokens.double().numpy()  # [L, h_kv, d]
    logits = scale * np.einsum("shgd,lhd->shgl", qf, kf)
    peak = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - peak)
    total = weights.sum(axis=-1, keepdims=True)
    out = np.einsum("shgl,lhd->shgd", weights / total, kf[..., :d_v]).reshape(s_q, h_q, d_v)
    lse = (peak + np.log(total))[..., 0].reshape(s_q, h_q).T  # [h_q, s_q]
    return out, lse


def paged(tokens: torch.Tensor, page: int, width: int, num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter ``tokens [L, h_kv, d]`` into a NaN-filled cache of ``num_blocks`` pages through a random
    permutation; table slots past the last page hold INT32_MAX (never read)."""
    length, h_kv, d = tokens.shape
    pages = -(-length // page)
    cache = torch.full((num_blocks, page, h_kv, d), float("nan"), dtype=tokens.dtype)
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:pages]
    for p in range(pages):
        chunk = tokens[p * page:(p + 1) * page]
        cache[ids[p], : chunk.shape[0]] = chunk
    table = torch.full((1, width), INT32_MAX, dtype=torch.int32)
    table[0, :pages] = ids.to(torch.int32)
    return cache, table


def assert_matches(out: torch.Tensor, lse: torch.Tensor, want: tuple[np.ndarray, np.ndarray]) -> None:
    w_out, w_lse = (torch.from_numpy(x) for x in want)
    torch.testing.assert_close(out[0].double(), w_out, rtol=2**-7, atol=1e-3)  # bf16: one rounding of out
    torch.testing.assert_close(lse[0].double(), w_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_one_with_one_token_on_a_single_page_returns_that_tokens_value(backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 4, 64, generator=g).to(torch.bfloat16)
    token = torch.randn(1, 2, 64, generator=g).to(torch.bfloat16)
    cache, table = paged(token, page=16, width=1, num_blocks=1, seed=0)  # tokens 1..15 of the page are NaN
    out, lse = deepport.mla_decode(q, cache, table, torch.tensor([1], dtype=torch.int32), 32, backend=backend)
    for h in range(4):  # softmax over one token is exactly 1: out is that token's V, bit for bit
        assert torch.equal(out[0, 0, h], token[0, h // 2, :32])
    assert_matches(out, lse, dense_f64(q[0], token, 32, 64**-0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("page", "width", "short"), [(1, 4096, 0), (1, 4096, 1), (64, 3, 0), (64, 3, 63),
                                                      (16, 1, 0), (16, 1, 15)])
def test_lengths_at_the_edge_of_a_full_block_table(backend: str, page: int, width: int, short: int) -> None:
    """L = width * page - short: every table slot in use (short = 0), or the last page nearly empty."""
    g = torch.Generator().manual_seed(page + width + short)
    length = width * page - short
    q = torch.randn(1, 2, 2, 16, generator=g).to(torch.bfloat16)
    tokens = torch.randn(length, 1, 16, generator=g).to(torch.bfloat16)
    cache, table = paged(tokens, page, width, num_blocks=width + 2, seed=short)
    lens = torch.tensor([length], dtype=torch.int32)
    out, lse = deepport.mla_decode(q, cache, table, lens, 8, backend=backend)
    assert_matches(out, lse, dense_f64(q[0], tokens, 8, 16**-0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_of_more_than_2_31_logical_elements_reads_the_named_blocks(backend: str) -> None:
    """More than 2^31 logical elements in 4 MiB: block ``i`` starts one element after block ``i - 1``
    (``stride(0) == 1``, legal: only the last dimension must be contiguous), so every block differs and a
    block id that is truncated or wraps reads the wrong values. (Byte offsets stay small here; offsets past
    2^31 bytes need a cache that big, on a GPU.)"""
    g = torch.Generator().manual_seed(3)
    page, h_kv, d = 16, 1, 64
    num_blocks = INT32_MAX // (page * h_kv * d) + 2
    storage = torch.randn(num_blocks - 1 + page * h_kv * d, generator=g).to(torch.bfloat16)
    cache = storage.as_strided((num_blocks, page, h_kv, d), (1, h_kv * d, d, 1))
    assert cache.numel() > 2**31
    ids = [num_blocks - 1, 0, num_blocks // 2 + 1]
    table = torch.tensor([ids], dtype=torch.int32)
    q = torch.randn(1, 1, 2, d, generator=g).to(torch.bfloat16)
    length = 3 * page - 5
    out, lse = deepport.mla_decode(q, cache, table, torch.tensor([length], dtype=torch.int32), 32, backend=backend)
    tokens = torch.cat([cache[i] for i in ids])[:length]
    assert_matches(out, lse, dense_f64(q[0], tokens, 32, d**-0.5))
