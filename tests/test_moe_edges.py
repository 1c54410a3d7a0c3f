"""The MoE ops at the edges of routing, on the torch and reference backends: every token routed nowhere
(all slots -1) and a single token, through all seven ops (0 tokens: tests/test_moe_backends.py).
Expert outputs given to the combines are NaN wherever the op promises not to read them."""

from __future__ import annotations

import pytest
import torch

import deepport

pytestmark = pytest.mark.usefixtures("clean_env")

BACKENDS = ("torch", "reference")
E, H = 4, 128


def nowhere(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    return x, torch.full((tokens, 2), -1, dtype=torch.int64), torch.rand(tokens, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_routed_nowhere_reach_no_rank_and_combine_to_zero(backend: str) -> None:
    x, idx, w = nowhere(3)
    layout = deepport.moe_layout(idx, E, 2, backend=backend)
    assert layout.num_tokens_per_rank.tolist() == [0, 0] and layout.num_tokens_per_expert.tolist() == [0] * E
    assert not layout.is_token_in_rank.any()

    sent = deepport.moe_dispatch(x, idx, w, E, expert_alignment=128, backend=backend)
    assert isinstance(sent.recv_x, torch.Tensor)
    assert sent.recv_x.shape == (0, H) and sent.num_recv_tokens_per_expert == [0] * E
    combined, weights = deepport.moe_combine(sent.recv_x, sent.handle, sent.recv_topk_weights, backend=backend)
    assert torch.equal(combined, torch.zeros(3, H, dtype=torch.bfloat16))
    assert weights is not None and torch.equal(weights, torch.zeros(3, 2))

    expanded = deepport.moe_dispatch_expanded(x, idx, w, E, backend=backend)
    assert expanded.m_indices.shape == (0,) and expanded.num_recv_tokens_per_expert == [0] * E
    out = deepport.moe_combine_expanded(torch.zeros(0, H, dtype=torch.bfloat16), expanded.handle, backend=backend)
    assert torch.equal(out, torch.zeros(3, H, dtype=torch.bfloat16))

    low = deepport.moe_low_latency_dispatch(x, idx, 3, E, backend=backend)
    assert low.recv_count.tolist() == [0] * E
    y = torch.full((E, 3, H), float("nan"), dtype=torch.bfloat16)  # no row is valid: none may be read
    out = deepport.moe_low_latency_combine(y, idx, w, low.handle, backend=backend)
    assert torch.equal(out, torch.zeros(3, H, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expert", [0, E - 1])
def test_a_single_token_goes_to_its_expert_and_comes_back_weighted(backend: str, expert: int) -> None:
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(expert)).to(torch.bfloat16)
    idx = torch.tensor([[expert, -1]])
    w = torch.tensor([[0.5, 0.25]])
    sent = deepport.moe_dispatch(x, idx, w, E, backend=backend)
    assert isinstance(sent.recv_x, torch.Tensor)
    assert torch.equal(sent.recv_x, x) and sent.num_recv_tokens_per_expert == [int(e == expert) for e in range(E)]
    combined, _ = deepport.moe_combine(sent.recv_x, sent.handle, backend=backend)
    assert torch.equal(combined, x)

    expanded = deepport.moe_dispatch_expanded(x, idx, w, E, backend=backend)
    assert expanded.m_indices.tolist() == [expert] + [-1] * 127
    y = torch.full((128, H), float("nan"), dtype=torch.bfloat16)  # padding rows are never read
    y[0] = x[0]
    out = deepport.moe_combine_expanded(y, expanded.handle, backend=backend)
    assert torch.equal(out, (0.5 * x.float()).to(torch.bfloat16))

    low = deepport.moe_low_latency_dispatch(x, idx, 1, E, use_fp8=False, backend=backend)
    assert low.recv_count.tolist() == [int(e == expert) for e in range(E)]
    assert isinstance(low.recv_x, torch.Tensor) and torch.equal(low.recv_x[expert, 0], x[0])
    y = torch.full((E, 1, H), float("nan"), dtype=torch.bfloat16)
    y[expert, 0] = x[0]
    out = deepport.moe_low_latency_combine(y, idx, w, low.handle, backend=backend)
    assert torch.equal(out, (0.5 * x.float()).to(torch.bfloat16))
