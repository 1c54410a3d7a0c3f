"""The 2-CTA cluster (TMA multicast) variant of the hopper FP8 GEMMs on an sm_90 GPU, forced per tile,
against float64 with outputs poisoned first, on the edges the multicast adds: an A slice wholly past M
(M = 1, M just past a tile), odd numbers of n blocks (the last pair's second CTA computes a tile past N
and must store nothing), K not a multiple of 128, many pairs per cluster (pipeline phases wrapping across
tiles), contiguous -1 rows (+0.0 whatever A holds), masked rows past ``masked_m`` untouched. The result
must also equal, bit for bit, the same tile run without a cluster (same arithmetic, only the loads
differ). Skipped elsewhere; run on the H200: ``python -m pytest -q -m gpu tests/test_hopper_multicast_gpu.py``
(scripts/gpu_hopper_gemm.py runs it as its own stage)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import deepport
from deepport.backends.hopper import configs
from deepport.backends.hopper import fp8_gemm as hopper
from deepport.bench.configs.fp8_gemm import dequantized_a, dequantized_b
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="needs an sm_90 GPU"),
]

RTOL, ATOL_RMS = 2.01 * 2.0**-8, 2.0**-8
DENSE_TILES = [(256, 128), (256, 96), (128, 160), (128, 144), (128, 128), (64, 16), (64, 128)]
DENSE_SHAPES = [
    (300, 712, 640),     # M and N edges inside a tile
    (1, 256, 128),       # the second A slice lies wholly past M
    (200, 328, 328),     # K = 328; odd n-block counts (3 of 128, 144 or 160, 21 of 16)
    (2048, 2112, 1024),  # 17 n blocks of 128: more pairs than clusters, phases wrap across tiles
    (129, 136, 7168),    # one row past a 128-row tile, 56 K blocks
]
Force = Callable[[int, int, int, int], configs.GemmConfig]


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    got = out.double()
    assert not bool(torch.isnan(got).any()), "unwritten (NaN) elements"
    rms = float(ref.pow(2).mean().sqrt())
    worst = float(((got - ref).abs() - RTOL * ref.abs()).max())
    assert worst <= ATOL_RMS * rms, f"max excess error {worst}, allowed {ATOL_RMS * rms}"


def _operands(m: int, n: int, k: int, seed: int, groups: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(torch.randn((m, k), generator=gen, device="cuda"))
    parts = [per_block_cast_to_fp8(torch.randn((n, k), generator=gen, device="cuda")) for _ in range(max(1, groups))]
    if not groups:
        return a, sfa, parts[0][0], parts[0][1]
    return a, sfa, torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> Force:
    def force(block_m: int, block_n: int, variant: int, cluster_n: int) -> configs.GemmConfig:
        config = configs.GemmConfig(block_m, block_n, configs.max_stages(block_m, block_n), variant,
                                    cluster_n=cluster_n)
        monkeypatch.setattr(hopper, "choose", lambda *args, **kwargs: config)
        return config
    return force


def _dense(forced: Force, block_m: int, block_n: int, cluster_n: int, operands: tuple[torch.Tensor, ...]
           ) -> torch.Tensor:
    a, sfa, b, sfb = operands
    forced(block_m, block_n, configs.VARIANT_DENSE, cluster_n)
    out = torch.full((a.shape[0], b.shape[0]), float("nan"), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="hopper")
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize(("block_m", "block_n"), DENSE_TILES)
@pytest.mark.parametrize(("m", "n", "k"), DENSE_SHAPES)
def test_dense_multicast_matches_float64_and_the_unclustered_tile(forced: Force, block_m: int, block_n: int,
                                                                  m: int, n: int, k: int) -> None:
    operands = _operands(m, n, k, seed=m + n + k)
    out = _dense(forced, block_m, block_n, 2, operands)
    a, sfa, b, sfb = operands
    _close(out, dequantized_a(a, sfa) @ dequantized_b(b, sfb).T)
    assert torch.equal(out, _dense(forced, block_m, block_n, 1, operands))


@pytest.mark.parametrize("block_n", [128, 144, 160])
@pytest.mark.parametrize(("rows", "n", "k"), [([200, 0, 37], 384, 640), ([512, 300, 0, 129], 640, 1024)])
def test_contiguous_multicast_writes_zero_padding_rows_and_matches_float64(forced: Force, block_n: int,
                                                                           rows: list[int], n: int, k: int) -> None:
    g = len(rows)
    sizes = [-(-r // 128) * 128 for r in rows]
    a, sfa, b, sfb = _operands(sum(sizes), n, k, seed=5 + n, groups=g)
    idx = torch.cat([torch.tensor([gi] * r + [-1] * (s - r), dtype=torch.int32)
                     for gi, (r, s) in enumerate(zip(rows, sizes, strict=True))]).cuda()
    pad = idx < 0
    clean_a = dequantized_a(a, sfa)
    a.view(torch.uint8)[pad] = 0x7F  # NaN
    sfa[pad] = float("nan")
    outs = []
    for cluster_n in (2, 1):
        forced(128, block_n, configs.VARIANT_CONTIGUOUS, cluster_n)
        out = torch.full((sum(sizes), n), float("nan"), dtype=torch.bfloat16, device="cuda")
        deepport.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, idx, backend="hopper")
        outs.append(out)
    out = outs[0]
    assert bool((out[pad] == 0).all()) and not bool(torch.signbit(out[pad].float()).any())
    for gi in range(g):
        sel = idx == gi
        if bool(sel.any()):
            _close(out[sel], clean_a[sel] @ dequantized_b(b[gi], sfb[gi]).T)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(("block_m", "block_n"), [(256, 128), (256, 96), (128, 128), (64, 128)])
def test_masked_multicast_leaves_rows_past_masked_m_untouched(forced: Force, block_m: int, block_n: int) -> None:
    g, m_max, n, k, masked = 4, 320, 328, 512, [100, 0, 320, 1]
    a, sfa, b, sfb = _operands(g * m_max, n, k, seed=6, groups=g)
    a, sfa = a.view(g, m_max, k), sfa.view(g, m_max, -1)
    sentinel = torch.randn((g, m_max, n), device="cuda").to(torch.bfloat16)
    mm = torch.tensor(masked, dtype=torch.int32, device="cuda")
    outs = []
    for cluster_n in (2, 1):
        forced(block_m, block_n, configs.VARIANT_MASKED, cluster_n)
        out = sentinel.clone()
        deepport.m_grouped_fp8_gemm_nt_masked((a, sfa), (b, sfb), out, mm, 64, backend="hopper")
        outs.append(out)
    out = outs[0]
    for gi, r in enumerate(masked):
        assert torch.equal(out[gi, r:], sentinel[gi, r:])
        if r:
            _close(out[gi, :r], dequantized_a(a[gi, :r], sfa[gi, :r]) @ dequantized_b(b[gi], sfb[gi]).T)
    assert torch.equal(outs[0], outs[1])


def test_a_cuda_graph_replays_the_multicast_kernel(forced: Force) -> None:
    a, sfa, b, sfb = _operands(4096, 2112, 1024, seed=7)
    forced(256, 128, configs.VARIANT_DENSE, 2)
    out = torch.empty((4096, 2112), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="hopper")
    first = out.clone()
    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        deepport.fp8_gemm_nt((a, sfa), (b, sfb), out, backend="hopper")
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)
