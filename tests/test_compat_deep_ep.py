"""deepport.compat.deep_ep called as DeepEP's README and legacy tests call it, in one process and over gloo.

Single-process cases follow tests/legacy/test_intranode.py and test_low_latency.py at tiny sizes
(``group=None``); the two-rank case runs one job per rank through the suite's rank-process group and
checks every rank's results against expectations computed here from both ranks' inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import deepport
from deepport.compat import deep_ep
from deepport.compat.deep_ep import Buffer, Config, DispatchHandle, EventOverlap, LowLatencyHandle
from deepport.compat.deep_gemm import calc_diff
from deepport.conformance.rank_group import RankGroup, pack, unpack
from deepport.errors import ArgumentTypeError, InvalidArgumentError

pytestmark = pytest.mark.usefixtures("clean_env")

HIDDEN, EXPERTS, TOPK = 512, 4, 2
FP8 = torch.float8_e4m3fn


def routing(num_tokens: int, seed: int, *, masked: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepEP's test routing: top-k of random scores as ``topk_idx_t``, a -1 slot, random weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_tokens, HIDDEN), generator=g).to(torch.bfloat16)
    scores = torch.rand((num_tokens, EXPERTS), generator=g) + 1
    topk_idx = torch.topk(scores, TOPK, dim=-1, largest=True, sorted=False)[1].to(deep_ep.topk_idx_t)
    if masked and num_tokens > 1:
        topk_idx[1, 0] = -1
    return x, topk_idx, torch.rand((num_tokens, TOPK), generator=g)


def per_token_cast_back(data: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """DeepEP's test helper: FP8 rows times their 1x128 scales, as float32."""
    blocks = data.float().view(*data.shape[:-1], -1, 128)
    return (blocks * sf.float().unsqueeze(-1)).view(data.shape)


# ---- one process -----------------------------------------------------------------------------------------

def test_layout_matches_the_upstream_test_computation() -> None:
    _, topk_idx, _ = routing(6, 0)
    buffer = Buffer(None)
    num_tokens_per_rank, per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, EXPERTS)
    assert per_rdma_rank is None and isinstance(event, EventOverlap) and event.event is None
    assert torch.equal(num_tokens_per_expert, torch.stack([(topk_idx == i).sum() for i in range(EXPERTS)]).int())
    routed = (topk_idx >= 0).any(dim=1)
    assert torch.equal(is_token_in_rank, routed[:, None]) and num_tokens_per_rank.tolist() == [int(routed.sum())]
    assert num_tokens_per_rank.dtype == num_tokens_per_expert.dtype == torch.int32


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("with_topk", [False, True])
def test_dispatch_combine_as_the_upstream_intranode_test(fp8: bool, with_topk: bool) -> None:
    x, topk_idx, topk_weights = routing(6, 1)
    buffer = Buffer(None, num_nvl_bytes=Config().get_nvl_buffer_size_hint(HIDDEN * 2, 1))
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    current_x: Any = x
    if fp8:
        data, sf = deep_ep_fp8(x)
        current_x = (data, sf.T.contiguous().T)  # DeepEP's test passes column-major scales
    args: dict[str, Any] = {"x": current_x, "num_tokens_per_rank": num_tokens_per_rank,
                            "is_token_in_rank": is_token_in_rank, "num_tokens_per_expert": num_tokens_per_expert,
                            "config": Config(24, 8, 256), "async_finish": True, "previous_event": buffer.capture()}
    if with_topk:
        args.update(topk_idx=topk_idx, topk_weights=topk_weights)
    result = buffer.dispatch(**args)
    assert isinstance(result, tuple) and len(result) == 6
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = result
    event.current_stream_wait()
    routed = is_token_in_rank[:, 0]
    got = per_token_cast_back(*recv_x) if fp8 else recv_x.float()
    want = per_token_cast_back(*deep_ep_fp8(x)) if fp8 else x.float()
    assert torch.equal(got, want[routed])
    assert isinstance(handle, DispatchHandle) and isinstance(handle, tuple) and len(handle) == 6
    assert handle[0].tolist() == [[int(routed.sum())]] and handle[0].dtype == torch.int32
    assert torch.equal(handle[3], torch.nonzero(routed).flatten().int())
    assert counts == num_tokens_per_expert.tolist() and isinstance(counts, list)
    if with_topk:
        local_weights = torch.where(topk_idx >= 0, topk_weights, 0.0)  # 0 where the slot's expert is not local
        assert torch.equal(recv_topk_idx, topk_idx[routed]) and torch.equal(recv_topk_weights, local_weights[routed])
    else:
        assert recv_topk_idx is None and recv_topk_weights is None
    recv_plain = per_token_cast_back(*recv_x).to(torch.bfloat16) if fp8 else recv_x
    combined, combined_weights, event = buffer.combine(
        recv_plain, handle, topk_weights=recv_topk_weights if with_topk else None, async_finish=True)
    event.current_stream_wait()
    check_x = combined.float() / is_token_in_rank.sum(dim=1).clamp(min=1).unsqueeze(1)
    assert calc_diff(check_x, want.to(torch.bfloat16).float() * routed[:, None]) < 5e-6
    if with_topk:
        assert torch.equal(combined_weights, torch.where(routed[:, None] & (topk_idx >= 0), topk_weights, 0.0))
    # cached dispatch (no top-k arguments) resends along the same routes
    cached = buffer.dispatch(current_x, handle=handle)
    assert cached[1:5] == (None, None, None, None)
    assert torch.equal(per_token_cast_back(*cached[0]) if fp8 else cached[0], got)


def deep_ep_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's test ``per_token_cast_to_fp8`` (hidden a multiple of 128)."""
    view = x.float().view(x.shape[0], -1, 128)
    amax = view.abs().amax(dim=2).clamp(1e-4)
    return (view * (448.0 / amax.unsqueeze(2))).to(FP8).view(x.shape), amax / 448.0


def test_worst_token_padding_keeps_the_prefix_and_pads_indices_with_minus_one() -> None:
    x, topk_idx, topk_weights = routing(6, 2)
    buffer = Buffer(None)
    layout = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    args = {"num_tokens_per_rank": layout[0], "is_token_in_rank": layout[3], "num_tokens_per_expert": layout[2],
            "topk_idx": topk_idx, "topk_weights": topk_weights}
    recv_x, recv_idx, recv_w, _, _, _ = buffer.dispatch(x, **args)
    worst_x, worst_idx, worst_w, empty, handle, _ = buffer.dispatch(x, num_worst_tokens=9, **args)
    assert empty == [] and worst_x.shape[0] == worst_idx.shape[0] == worst_w.shape[0] == 9
    n = recv_x.shape[0]
    assert torch.equal(worst_x[:n], recv_x) and torch.equal(worst_idx[:n], recv_idx)
    assert torch.equal(worst_w[:n], recv_w) and bool((worst_idx[n:] == -1).all())
    combined, _, _ = buffer.combine(worst_x, handle)
    assert torch.equal(combined, torch.where(layout[3], x, torch.zeros_like(x)))
    with pytest.raises(InvalidArgumentError, match="num_worst_tokens"):
        buffer.dispatch(x, num_worst_tokens=n - 1, **args)


def test_bias_is_added_once_and_inconsistent_layouts_or_foreign_handles_are_rejected() -> None:
    x, topk_idx, topk_weights = routing(4, 3, masked=False)
    buffer = Buffer(None)
    layout = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                 num_tokens_per_expert=layout[2])
    bias = torch.full_like(x, 0.5)
    combined, _, _ = buffer.combine(recv_x, handle, bias=(bias, bias))
    assert torch.equal(combined, (x.float() + 1.0).to(torch.bfloat16))
    wrong = ~layout[3]
    with pytest.raises(InvalidArgumentError, match="is_token_in_rank"):
        buffer.dispatch(x, topk_idx=topk_idx, num_tokens_per_expert=layout[2], is_token_in_rank=wrong)
    with pytest.raises(ArgumentTypeError, match="handle"):
        buffer.combine(recv_x, tuple(handle))
    with pytest.raises(InvalidArgumentError, match="enable_shrink"):
        Buffer(None, enable_shrink=True)


def test_routing_goes_through_deepport_dispatch() -> None:
    x, topk_idx, topk_weights = routing(5, 4)
    layout = Buffer(None).get_dispatch_layout(topk_idx, EXPERTS)
    shim = Buffer(None, backend="reference").dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                      num_tokens_per_expert=layout[2])
    direct = deepport.moe_dispatch(x, topk_idx, topk_weights, EXPERTS, backend="reference")
    assert torch.equal(shim[0], direct.recv_x) and torch.equal(shim[1], direct.recv_topk_idx)
    with deepport.use_backend("reference"):
        ll = Buffer(None).low_latency_dispatch(x, topk_idx, 5, EXPERTS)
    ll_direct = deepport.moe_low_latency_dispatch(x, topk_idx, 5, EXPERTS, backend="reference")
    assert torch.equal(ll[1], ll_direct.recv_count)
    for e in range(EXPERTS):
        rows = int(ll[1][e])
        assert torch.equal(ll[0][0][e, :rows].view(torch.uint8), ll_direct.recv_x[0][e, :rows].view(torch.uint8))


def low_latency_input(num_tokens: int, rank: int) -> torch.Tensor:
    """DeepEP's LL test input: every channel ``rank - 128`` except the last 128, which hold the token index."""
    x = torch.ones((num_tokens, HIDDEN), dtype=torch.bfloat16) * (rank - 128)
    x[:, -128:] = torch.arange(num_tokens).to(torch.bfloat16).view(-1, 1)
    return x


@pytest.mark.parametrize(("use_fp8", "round_scale", "use_ue8m0"),
                         [(False, False, False), (True, False, False), (True, True, False), (True, True, True)])
def test_low_latency_dispatch_as_the_upstream_test(use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> None:
    num_tokens, t_max = 6, 8
    x = low_latency_input(num_tokens, 0)
    _, topk_idx, _topk_weights = routing(num_tokens, 5)
    buffer = Buffer(None, 0, Buffer.get_low_latency_rdma_size_hint(t_max, HIDDEN, 1, EXPERTS), low_latency_mode=True,
                    num_qps_per_rank=EXPERTS)
    stats = torch.zeros((EXPERTS,), dtype=torch.int)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, t_max, EXPERTS, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
        cumulative_local_expert_recv_stats=stats, async_finish=False, return_recv_hook=True)
    assert hook is not None and event.event is None
    hook()
    assert isinstance(handle, LowLatencyHandle) and len(handle) == 5 and handle[2:] == (t_max, HIDDEN, EXPERTS)
    assert recv_count.dtype == torch.int32 and torch.equal(stats, recv_count)
    if use_fp8:
        data, sf = recv_x
        assert data.shape == (EXPERTS, t_max, HIDDEN) and data.dtype == FP8
        assert sf.shape == (EXPERTS, t_max, HIDDEN // (512 if use_ue8m0 else 128))
        assert sf.dtype == (torch.int32 if use_ue8m0 else torch.float32) and sf.stride(1) == 1  # column-major
        scales = deepport.unpack_ue8m0(sf.contiguous(), HIDDEN // 128) if use_ue8m0 else sf
        values = per_token_cast_back(data, scales)
    else:
        assert recv_x.shape == (EXPERTS, t_max, HIDDEN) and recv_x.dtype == torch.bfloat16
        values = recv_x.float()
    for e in range(EXPERTS):
        count = int(recv_count[e])
        assert count == int((topk_idx == e).sum())
        src_info, layout_range = handle[0][e, :count], handle[1][e]
        assert count == int((layout_range & (2**32 - 1)).sum()) and int(layout_range[0] >> 32) == 0
        rows = values[e, :count]
        assert torch.equal(src_info.long(), torch.nonzero((topk_idx == e).any(dim=1)).flatten())
        if count and not round_scale:  # exact in bf16; FP8 keeps 4 significant bits (amax / 448 scales)
            rtol = 2.0**-4 if use_fp8 else 0.0
            torch.testing.assert_close(rows[:, -128:], src_info.float().view(-1, 1).expand(-1, 128), rtol=0,
                                       atol=rtol * (num_tokens - 1))
            torch.testing.assert_close(rows[:, :-128], torch.full_like(rows[:, :-128], -128.0), rtol=rtol, atol=0)
        if count and round_scale:
            block_sf = scales[e, :count]
            assert bool((torch.frexp(block_sf).mantissa == 0.5).all())  # powers of two
            exact = x[src_info.long()].float().view(count, -1, 128)
            assert bool((exact.abs().amax(-1).clamp(min=1e-4) / 448 <= block_sf).all())
            assert torch.equal(data[e, :count].view(torch.uint8),
                               (exact / block_sf[..., None]).to(FP8).view(count, HIDDEN).view(torch.uint8))


@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_combine_weights_each_expert_output(use_fp8: bool) -> None:
    num_tokens, t_max = 6, 8
    x, topk_idx, topk_weights = routing(num_tokens, 6)
    buffer = Buffer(None, low_latency_mode=True)
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, t_max, EXPERTS, use_fp8=use_fp8)
    simulated_gemm_x = per_token_cast_back(*recv_x).to(torch.bfloat16) if use_fp8 else recv_x.clone()
    want = (torch.where(topk_idx >= 0, topk_weights, 0.0).sum(dim=1, keepdim=True) * x.float())
    out = torch.empty((num_tokens, HIDDEN), dtype=torch.bfloat16)
    combined, event, hook = buffer.low_latency_combine(simulated_gemm_x, topk_idx, topk_weights, handle,
                                                       async_finish=True, out=out)
    event.current_stream_wait()
    assert combined is out and hook is None and not combined.isnan().any()
    assert calc_diff(combined, want) < (9e-4 if use_fp8 else 1e-5)
    buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
    zero_copy, _, _ = buffer.low_latency_combine(simulated_gemm_x, topk_idx, topk_weights, handle, zero_copy=True,
                                                 use_logfmt=True)
    assert torch.equal(zero_copy, combined)
    with pytest.raises(RuntimeError, match="no event"):
        buffer.low_latency_combine(simulated_gemm_x, topk_idx, topk_weights, handle)[1].current_stream_wait()
    with pytest.raises(InvalidArgumentError, match="return_recv_hook"):
        buffer.low_latency_dispatch(x, topk_idx, t_max, EXPERTS, async_finish=True, return_recv_hook=True)


def test_configs_size_hints_and_events_follow_deepep() -> None:
    assert Config().get_nvl_buffer_size_hint(7168 * 2, 8) == 335709824  # DeepEP's formula, by hand
    assert Config().get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert Config(24, 6, 256, 6, 128).get_rdma_buffer_size_hint(7168 * 2, 16) % 128 == 0
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1908410496
    config = Buffer.get_dispatch_config(8)
    assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens) == \
        (Buffer.num_sms, 6, 256)
    assert Buffer.get_combine_config(2).num_max_nvl_chunked_send_tokens == 10
    with pytest.raises(InvalidArgumentError):
        Config(20, 256, 256)
    with pytest.raises(InvalidArgumentError, match="even"):
        Buffer.set_num_sms(23)
    calls: list[int] = []
    event = Buffer.capture()
    event.register_hook_after_wait(lambda: calls.append(1))
    with event:
        pass
    assert calls == [1] and Buffer.is_sm90_compiled()


# ---- two processes over gloo ----------------------------------------------------------------------------

TOKENS = (5, 3)  # uneven token counts per rank
T_MAX = 5


def rank_job(rank: int, group: Any, device: torch.device) -> dict[str, Any]:
    """One rank of the two-rank case: every Buffer method collectively, results packed for the parent."""
    x, topk_idx, topk_weights = routing(TOKENS[rank], 10 + rank)
    buffer = Buffer(group, num_nvl_bytes=1 << 20)
    assert (buffer.rank, buffer.group_size) == (rank, 2)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, EXPERTS)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights)
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    data_only = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                num_tokens_per_expert=per_expert)
    ll_x, ll_count, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, T_MAX, EXPERTS, use_fp8=False)
    ll_combined, _, _ = buffer.low_latency_combine(ll_x, topk_idx, topk_weights, ll_handle)
    return {"recv_x": pack(recv_x), "recv_idx": pack(recv_idx), "recv_w": pack(recv_w), "counts": counts,
            "prefix": pack(handle[0]), "src_idx": pack(handle[3]), "combined": pack(combined),
            "combined_w": pack(combined_w), "data_only_x": pack(data_only[0]), "data_only_counts": data_only[3],
            "ll_x": pack(ll_x), "ll_count": pack(ll_count), "ll_src_info": pack(ll_handle[0]),
            "ll_range": pack(ll_handle[1]), "ll_combined": pack(ll_combined)}


@pytest.fixture(scope="module")
def two_ranks() -> Iterator[RankGroup]:
    """Two gloo rank processes that can import this module (its folder joins their PYTHONPATH)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), saved) if p)
    try:
        group = RankGroup(2, "cpu")
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    yield group
    group.close()


def test_two_rank_gloo_group_dispatches_combines_and_packs_like_deepep(two_ranks: RankGroup) -> None:
    results = two_ranks.run(f"{Path(__file__).stem}:rank_job")
    inputs = [routing(TOKENS[r], 10 + r) for r in range(2)]
    local = EXPERTS // 2

    def experts_of(src: int, t: int) -> set[int]:
        return {int(e) for e in inputs[src][1][t] if e >= 0}

    def received(dst: int) -> list[tuple[int, int]]:
        """(source rank, token) pairs rank ``dst`` receives, in DeepEP's order."""
        return [(s, t) for s in range(2) for t in range(TOKENS[s]) if any(e // local == dst for e in experts_of(s, t))]

    for rank, got in enumerate(results):
        mine = received(rank)
        assert torch.equal(unpack(got["recv_x"]), torch.stack([inputs[s][0][t] for s, t in mine]))
        assert unpack(got["src_idx"]).tolist() == [t for _, t in mine]
        from_rank = [[sum(1 for s, _ in received(dst) if s == src) for dst in range(2)] for src in range(2)]
        assert unpack(got["prefix"]).tolist() == [[sum(from_rank[i][j] for i in range(k + 1)) for j in range(2)]
                                                  for k in range(2)]
        ids = torch.stack([inputs[s][1][t] for s, t in mine])
        own = (ids // local == rank) & (ids >= 0)
        assert torch.equal(unpack(got["recv_idx"]), torch.where(own, ids - rank * local, -1))
        assert torch.equal(unpack(got["recv_w"]), torch.where(own, torch.stack([inputs[s][2][t] for s, t in mine]), 0))
        assert got["counts"] == [sum(1 for s, t in mine if rank * local + e in experts_of(s, t)) for e in range(local)]
        x, topk_idx, topk_weights = inputs[rank]
        reached = torch.tensor([len({e // local for e in experts_of(rank, t)}) for t in range(TOKENS[rank])])
        assert torch.equal(unpack(got["combined"]), (x.float() * reached[:, None]).to(torch.bfloat16))
        assert torch.equal(unpack(got["combined_w"]), torch.where(topk_idx >= 0, topk_weights, 0.0))
        assert torch.equal(unpack(got["data_only_x"]), unpack(got["recv_x"]))
        all_ids = torch.cat([inputs[s][1] for s in range(2)])
        assert got["data_only_counts"] == [int((all_ids == rank * local + e).sum()) for e in range(local)]
        ll_count, ll_x = unpack(got["ll_count"]), unpack(got["ll_x"])
        src_info, layout_range = unpack(got["ll_src_info"]), unpack(got["ll_range"])
        for e in range(local):
            rows = [(s, t) for s, t in mine if rank * local + e in experts_of(s, t)]
            assert int(ll_count[e]) == len(rows) and src_info[e, : len(rows)].tolist() == [t for _, t in rows]
            assert torch.equal(ll_x[e, : len(rows)], torch.stack([inputs[s][0][t] for s, t in rows]))
            per_src = [sum(1 for s, _ in rows if s == r) for r in range(2)]
            assert [int(v) & (2**32 - 1) for v in layout_range[e]] == per_src
            assert [int(v) >> 32 for v in layout_range[e]] == [0, per_src[0]]
        want = torch.where(topk_idx >= 0, topk_weights, 0.0).sum(1, keepdim=True).double() * x.double()
        ll_combined = unpack(got["ll_combined"])
        assert not ll_combined.isnan().any() and calc_diff(ll_combined, want) < 1e-5
        assert bool(((ll_combined.double() - want).abs() <= 2.0**-7 * want.abs() + 1e-6).all())
