"""The hopper backend's MLA decode on an sm_90 GPU against float64, outputs poisoned first, NaN in every
cache slot past the lengths. Skipped elsewhere; run on the H200:
``python -m pytest -q -m gpu tests/test_hopper_mla_gpu.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import deepport
from deepport.dispatch import registry
from deepport.kernels import mla_decode as mla
from deepport.kernels.f64.mla_decode import mla_decode_f64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="needs an sm_90 GPU"),
]

D_QK, D_V = 576, 512


def _inputs(lens: list[int], s_q: int, h_q: int, h_kv: int, page: int, dtype: torch.dtype,
            seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lens)
    width = max(-(-max(n, 1) // page) for n in lens)
    q = (torch.randn((b, s_q, h_q, D_QK), generator=gen, device="cuda") / 4).to(dtype)
    cache = torch.full((b * width + 2, page, h_kv, D_QK), float("nan"), dtype=dtype, device="cuda")
    table = torch.randperm(b * width + 2, generator=gen, device="cuda")[: b * width].to(torch.int32).view(b, width)
    for i, n in enumerate(lens):
        for t in range(0, n, page):
            rows = min(page, n - t)
            values = torch.randn((rows, h_kv, D_QK), generator=gen, device="cuda") / 4
            cache[table[i, t // page], :rows] = values.to(dtype)
    return q, cache, table, torch.tensor(lens, dtype=torch.int32, device="cuda")


def _decode(q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor, causal: bool,
            h_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q, _ = q.shape
    out = torch.full((b, s_q, h_q, D_V), float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full((b, h_q, s_q), float("nan"), dtype=torch.float32, device="cuda")
    md = deepport.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    deepport.mla_decode(q, cache, table, seqlens, D_V, causal=causal, metadata=md, backend="hopper", out=out, lse=lse)
    torch.cuda.synchronize()
    return out, lse


@pytest.mark.parametrize(("lens", "s_q", "h_q", "h_kv", "page", "dtype", "causal"), [
    ([1, 64, 100, 300], 1, 16, 1, 64, torch.bfloat16, False),
    ([0, 77, 200], 2, 128, 1, 64, torch.bfloat16, True),
    ([33, 250], 1, 64, 2, 16, torch.float16, False),
    ([40, 97], 2, 32, 2, 32, torch.bfloat16, True),
    ([9000, 50], 1, 16, 1, 256, torch.bfloat16, False),  # the long request is cut by the plan: combine kernel
])
def test_matches_float64(lens: list[int], s_q: int, h_q: int, h_kv: int, page: int, dtype: torch.dtype,
                         causal: bool) -> None:
    q, cache, table, seqlens = _inputs(lens, s_q, h_q, h_kv, page, dtype, seed=sum(lens))
    out, lse = _decode(q, cache, table, seqlens, causal, h_kv)
    ref, ref_lse = mla_decode_f64(q, cache, table, seqlens, D_V, 1 / math.sqrt(D_QK), causal)
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any() and not torch.isnan(lse).any(), "unwritten (NaN) elements"
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()
    got_lse = lse.double().cpu().numpy()
    assert np.array_equal(np.isinf(got_lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.abs(got_lse[finite] - ref_lse[finite]).max() <= 1e-4


def test_a_cuda_graph_replays_the_same_result() -> None:
    q, cache, table, seqlens = _inputs([300, 5000, 1], 1, 128, 1, 64, torch.bfloat16, seed=3)
    md = deepport.get_mla_metadata(seqlens, 128, 1)
    out = torch.empty((3, 1, 128, D_V), dtype=torch.bfloat16, device="cuda")
    lse = torch.empty((3, 128, 1), dtype=torch.float32, device="cuda")

    call = mla.bind(q, cache, table, seqlens, D_V, metadata=md, out=out, lse=lse)  # validated once, as a server does
    impl = registry.get("hopper").implementation("mla_decode")

    def step() -> None:
        impl(call, out, lse)

    step()  # puts the plan on the device and compiles
    first, first_lse = out.clone(), lse.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first) and torch.equal(lse, first_lse)
