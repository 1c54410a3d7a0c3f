"""GPU tests of the triton backend (skipped without a CUDA device; run on the device machine).

Automatic choice prefers it on CUDA; its MLA decode agrees with the torch backend on DeepSeek shapes
(split-KV plans with cut requests, causal multi-token queries); a call with metadata is CUDA-graph
capturable once its plan is on the device.
"""

from __future__ import annotations

import pytest
import torch

import deepport
from deepport.dispatch import registry
from deepport.kernels import mla_decode as mla

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _call(b: int, s_q: int, h_q: int, lens: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    pages = [-(-n // 64) for n in lens]
    q = torch.randn(b, s_q, h_q, 576, generator=g).div(10).to("cuda", torch.bfloat16)
    k = torch.randn(sum(pages) + 1, 64, 1, 576, generator=g).div(10).to("cuda", torch.bfloat16)
    table = torch.full((b, max(pages) + 1), -1, dtype=torch.int32)
    perm = torch.randperm(sum(pages), generator=g).to(torch.int32)
    at = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[at: at + n]
        at += n
    return q, k, table.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")


def test_triton_is_chosen_automatically_on_cuda_unless_hopper_can_run_the_call() -> None:
    if registry.get("triton").unavailable_reason is not None:
        pytest.skip(f"triton unavailable: {registry.get('triton').unavailable_reason}")
    q, k, table, lens = _call(2, 1, 16, [100, 7])
    signature = mla.bind(q, k, table, lens, 512).signature
    # measured on the H200 (deepport/dispatch/perf_tables/nvidia-sm90.json) and by priority: hopper > triton > torch
    expected = "hopper" if not registry.get("hopper").reasons("mla_decode", signature) else "triton"
    found = deepport.explain("mla_decode", q, k, table, lens, 512)
    assert found.chosen == expected, found.reason


@pytest.mark.parametrize(("s_q", "h_q", "causal"), [(1, 16, False), (1, 128, False), (2, 128, True), (2, 16, True)])
def test_mla_decode_matches_torch_backend(s_q: int, h_q: int, causal: bool) -> None:
    lens = [4096, 1, 0, 3000, 777, 8191, 64, 2]
    q, k, table, seqlens = _call(len(lens), s_q, h_q, lens)
    md = deepport.get_mla_metadata(seqlens, s_q * h_q, 1)
    out, lse = deepport.mla_decode(q, k, table, seqlens, 512, causal=causal, metadata=md, backend="triton")
    ref, ref_lse = deepport.mla_decode(q, k, table, seqlens, 512, causal=causal, metadata=md, backend="torch")
    rms = ref.float().pow(2).mean().sqrt()
    assert torch.all((out.float() - ref.float()).abs() <= 2.01 / 128 * (ref.float().abs() + rms))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-6)


def test_call_with_metadata_replays_in_a_cuda_graph() -> None:
    q, k, table, seqlens = _call(4, 1, 128, [300, 5000, 64, 1])
    md = deepport.get_mla_metadata(seqlens, 128, 1)
    out = torch.empty(4, 1, 128, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(4, 128, 1, device="cuda")
    call = mla.bind(q, k, table, seqlens, 512, metadata=md, out=out, lse=lse)
    impl = registry.get("triton").implementation("mla_decode")
    impl(call, out, lse)  # puts the plan on the device
    expected = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl(call, out, lse)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("rows", ["gather", "scatter"])
def test_moe_expanded_dispatch_is_bit_exact_with_torch_on_cuda(rows: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepport.backends.triton import moe_expanded_dispatch

    monkeypatch.setattr(moe_expanded_dispatch, "_ROWS", rows)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 64, (512, 8), generator=g).cuda()
    weights = torch.rand(512, 8, generator=g).cuda()
    x = torch.randn(512, 1024, generator=g).to("cuda", torch.bfloat16)
    got = deepport.moe_dispatch_expanded(x, idx, weights, 64, backend="triton")
    want = deepport.moe_dispatch_expanded(x, idx, weights, 64, backend="torch")
    assert torch.equal(got.recv_x.view(torch.int16), want.recv_x.view(torch.int16))
    assert torch.equal(got.m_indices, want.m_indices)
    y = torch.randn(got.recv_x.shape, generator=g).to("cuda", torch.bfloat16)
    out = deepport.moe_combine_expanded(y, got.handle, backend="triton")
    ref = deepport.moe_combine_expanded(y, want.handle, backend="torch")
    # Both sum float32 partials in their own order and round once to bf16: one bf16 step apart at most,
    # relative to the row's scale (a cancelling sum near 0 may differ by more than 2**-8 of itself).
    scale = ref.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-6)
    assert bool(((out.float() - ref.float()).abs() <= 2**-7 * scale).all())


def test_moe_fp8_cast_is_bit_exact_with_torch_on_cuda() -> None:
    from deepport.backends.torch import moe_local
    from deepport.backends.triton import moe_permute

    x = (torch.randn(256, 7168, generator=torch.Generator().manual_seed(1)) * 5).to("cuda", torch.bfloat16)
    data, scales = moe_permute.cast_fp8(x)
    ref_data, ref_scales = moe_local.cast_fp8(x)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))
