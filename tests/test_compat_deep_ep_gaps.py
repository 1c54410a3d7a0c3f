"""The DeepEP names the compat audit added, called as DeepEP's legacy tests and integrations call them.

The ``deep_ep.utils.math`` helpers are checked against deepport's reference backend where DeepEP's
own kernels define the answer (the low-latency FP8 cast) and against their upstream formulas
elsewhere; the Buffer methods against what they promise in one process (``group=None``).
"""

from __future__ import annotations

import pytest
import torch

import deepport
from deepport.compat import deep_ep
from deepport.compat.deep_ep import Buffer
from deepport.compat.deep_ep.utils.math import (
    calc_diff,
    count_bytes,
    create_grouped_scores,
    hash_tensor,
    hash_tensors,
    inplace_unique,
    per_token_cast_back,
    per_token_cast_to_fp8,
    safe_div,
)
from deepport.errors import InvalidArgumentError
from deepport.kernels.fp8_layout import amax_scales

pytestmark = pytest.mark.usefixtures("clean_env")

HIDDEN, EXPERTS, TOPK = 512, 4, 2


def routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_tokens, HIDDEN), generator=g).to(torch.bfloat16)
    scores = torch.rand((num_tokens, EXPERTS), generator=g) + 1
    return x, torch.topk(scores, TOPK, dim=-1, sorted=False)[1].to(deep_ep.topk_idx_t)


def test_per_token_cast_to_fp8_is_the_low_latency_dispatch_cast_bit_for_bit() -> None:
    """test_low_latency.py compares dispatched FP8 rows with its host cast; here the reference backend's."""
    x, topk_idx = routing(6, 1)
    recv_x, recv_count, handle, _, _ = Buffer(None, backend="reference").low_latency_dispatch(
        x, topk_idx, 8, EXPERTS, use_fp8=True)
    data, sf = per_token_cast_to_fp8(x)
    assert data.dtype == torch.float8_e4m3fn and sf.shape == (6, HIDDEN // 128)
    assert torch.equal(sf, amax_scales(x.float().view(6, -1, 128).abs().amax(dim=2))[0])
    for e in range(EXPERTS):
        rows = handle[0][e, : int(recv_count[e])].long()
        assert torch.equal(recv_x[0][e, : len(rows)].view(torch.uint8), data[rows].view(torch.uint8))
        assert torch.equal(recv_x[1][e, : len(rows)], sf[rows])
    back = per_token_cast_back(data, sf)
    assert back.dtype == torch.bfloat16 and calc_diff(back, x) < 1e-3


def test_per_token_cast_back_reads_packed_ue8m0_scales() -> None:
    x, topk_idx = routing(5, 2)
    buffer = Buffer(None)
    (d32, sf32), count, _, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, EXPERTS, round_scale=True)
    (d8, sf8), _, _, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, EXPERTS, round_scale=True, use_ue8m0=True)
    for e in range(EXPERTS):
        n = int(count[e])
        assert torch.equal(per_token_cast_back(d8[e, :n], sf8[e, :n]), per_token_cast_back(d32[e, :n], sf32[e, :n]))
    ragged = torch.randn((3, 200)).bfloat16()  # hidden not a multiple of 128: the tail is its own block
    assert calc_diff(per_token_cast_back(*per_token_cast_to_fp8(ragged)), ragged) < 1e-3
    assert per_token_cast_back(torch.empty((0, 128), dtype=torch.float8_e4m3fn), torch.empty((0, 1))).shape == (0, 128)


def test_calc_diff_is_deepeps_shifted_form() -> None:
    x = torch.randn((4, 8))
    assert calc_diff(x, x) == 0.0 and calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    y = x + 0.1
    xs, ys = x.double() + 1, y.double() + 1
    assert calc_diff(x, y) == pytest.approx(float(1 - 2 * (xs * ys).sum() / (xs**2 + ys**2).sum()), rel=1e-12)
    assert isinstance(calc_diff(x, y), float)


def test_routing_helpers_follow_the_upstream_formulas() -> None:
    ranks = torch.tensor([[3, 1, 3, -1], [0, 0, 2, 1], [-1, -1, -1, -1]])
    inplace_unique(ranks, 4)
    assert ranks.tolist() == [[3, 1, -1, -1], [2, 1, 0, -1], [-1, -1, -1, -1]]
    narrow = torch.tensor([[0, 1, 2, 3]])
    inplace_unique(narrow[:, :2], 4)  # fewer columns than distinct values: the largest are kept
    assert narrow.tolist() == [[1, 0, 2, 3]]
    scores = torch.arange(1.0, 9.0).view(1, 8)
    assert create_grouped_scores(scores, torch.tensor([[2]]), 4).tolist() == [[0, 0, 0, 0, 5, 6, 0, 0]]
    t = torch.arange(4, dtype=torch.int32)
    assert hash_tensor(t) == 6 and hash_tensors(t, [t, t, None]) == 6 ^ 6 ^ 6
    assert count_bytes(t, (t, None)) == 32 and safe_div(0, 0) == 0 and safe_div(3, 2) == 1.5
    with pytest.raises(ZeroDivisionError):
        safe_div(1, 0)


def test_comm_stream_local_buffer_and_mask_methods() -> None:
    buffer = Buffer(None, explicitly_destroy=True)
    stream = buffer.get_comm_stream()
    assert stream == (torch.cuda.current_stream() if torch.cuda.is_initialized() else torch.cpu.current_stream())
    with pytest.raises(NotImplementedError, match="no registered communication buffer"):
        buffer.get_local_buffer_tensor(torch.bfloat16)
    status = torch.full((1,), 7, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0]
    buffer.low_latency_update_mask_buffer(0, mask=False)
    buffer.low_latency_clean_mask_buffer()
    with pytest.raises(NotImplementedError, match="shrink mode"):
        buffer.low_latency_update_mask_buffer(0, mask=True)
    with pytest.raises(InvalidArgumentError, match="<= 0"):
        buffer.low_latency_update_mask_buffer(1)
    x, topk_idx = routing(4, 3)  # the mask methods leave the ops as they were
    _, recv_count, _, _, _ = buffer.low_latency_dispatch(x, topk_idx, 8, EXPERTS)
    assert torch.equal(recv_count, deepport.moe_layout(topk_idx, EXPERTS, 1).num_tokens_per_expert)
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.get_comm_stream()


@pytest.mark.parametrize("name", ["ElasticBuffer", "EPHandle", "get_physical_domain_size"])
def test_v2_names_are_absent_with_the_reason(name: str) -> None:
    assert not hasattr(deep_ep, name)
    with pytest.raises(AttributeError, match="V2"):
        getattr(deep_ep, name)
    assert deep_ep.utils.EventOverlap is deep_ep.EventOverlap


def test_normal_dispatch_moves_packed_ue8m0_scales_bit_for_bit() -> None:
    """test_intranode.py dispatches FP8 with int32 UE8M0 scales on SM100 builds; the words must arrive as sent."""
    x, topk_idx = routing(6, 4)
    topk_idx[2] = -1  # a token routed nowhere
    data, sf = per_token_cast_to_fp8(x)
    words = deepport.pack_ue8m0(deepport.ceil_to_ue8m0(sf))
    buffer = Buffer(None)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    layout = {"num_tokens_per_rank": num_tokens_per_rank, "is_token_in_rank": is_token_in_rank,
              "num_tokens_per_expert": num_tokens_per_expert}
    (recv_data, recv_words), _, _, _, handle, _ = buffer.dispatch((data, words), topk_idx=topk_idx,
                                                                  topk_weights=torch.rand(6, TOPK), **layout)
    routed = [0, 1, 3, 4, 5]
    assert recv_words.dtype == torch.int32 and torch.equal(recv_words, words[routed])
    assert torch.equal(recv_data.view(torch.uint8), data[routed].view(torch.uint8))
    cached = buffer.dispatch((data, words), handle=handle)[0]
    assert torch.equal(cached[1], words[routed])
    padded = buffer.dispatch((data, words), topk_idx=topk_idx, topk_weights=torch.rand(6, TOPK), num_worst_tokens=8,
                             **layout)[0]
    assert padded[1].shape == (8, 1) and torch.equal(padded[1][:5], words[routed]) and not padded[1][5:].any()
    with pytest.raises(InvalidArgumentError, match="multiple of 512"):
        buffer.dispatch((data[:, :384], words), topk_idx=topk_idx, topk_weights=torch.rand(6, TOPK), **layout)


def readme_flow(backend: str | None) -> tuple[torch.Tensor, ...]:
    """DeepEP's README, normal kernels: get_buffer / dispatch_forward / dispatch_backward / combine_forward /
    combine_backward, written as the README writes them (one process: group size 1)."""
    x, topk_idx = routing(6, 8)
    topk_weights = torch.rand((6, TOPK), generator=torch.Generator().manual_seed(8))
    Buffer.set_num_sms(24)
    try:
        hidden_bytes = x.size(1) * max(x.element_size(), 2)
        num_nvl_bytes, num_rdma_bytes = 0, 0
        for config in (Buffer.get_dispatch_config(1), Buffer.get_combine_config(1)):
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, 1), num_nvl_bytes)
            num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, 1), num_rdma_bytes)
        buffer = Buffer(None, num_nvl_bytes, num_rdma_bytes, backend=backend)
    finally:
        Buffer.set_num_sms(20)
    previous_event = Buffer.capture()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_idx, EXPERTS, previous_event=previous_event, async_finish=True,
                                   allocate_on_comm_stream=previous_event is not None)
    recv_x, _recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=True)
    event.current_stream_wait()
    expert_out = (recv_x.float() * 2).bfloat16()  # a stand-in expert layer
    combined_x, _, event = buffer.combine(expert_out, handle, async_finish=True, previous_event=event,
                                          allocate_on_comm_stream=True)  # combine_forward
    grad_recv_x, _, _, _, _, event = buffer.dispatch(combined_x, handle=handle, async_finish=True,
                                                     previous_event=event, allocate_on_comm_stream=True)
    combined_grad_x, combined_grad_topk_weights, event = buffer.combine(  # dispatch_backward
        grad_recv_x, handle, topk_weights=recv_topk_weights, async_finish=True, previous_event=event,
        allocate_on_comm_stream=True)
    event.current_stream_wait()
    assert num_recv_tokens_per_expert_list == num_tokens_per_expert.tolist()
    return x, topk_idx, topk_weights, combined_x, grad_recv_x, combined_grad_x, combined_grad_topk_weights


def test_readme_normal_kernel_flow_matches_the_reference_backend() -> None:
    got, ref = readme_flow(None), readme_flow("reference")
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    x, topk_idx, topk_weights, combined_x, grad_recv_x, combined_grad_x, combined_grad_topk_weights = got
    routed = (topk_idx >= 0).any(dim=1)
    assert torch.equal(combined_x, (x.float() * 2).bfloat16() * routed[:, None])  # one rank: each token once
    assert torch.equal(grad_recv_x, combined_x[routed]) and torch.equal(combined_grad_x, combined_x)
    assert torch.equal(combined_grad_topk_weights, torch.where(topk_idx >= 0, topk_weights, 0.0))
    assert Buffer.num_sms == 20
