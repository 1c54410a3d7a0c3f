"""The 2-CTA cluster variant of the hopper FP8 GEMM on the host, without a GPU: the config field (off by
default, validated, compiled in only when asked), the launch grid (a multiple of the cluster size, one
cluster per pair of tiles up to half the SMs, odd tile counts included), the A tensor map's half-tile box,
and a Python mirror of the kernel's persistent schedule showing that the clusters cover every tile once,
that both CTAs of a cluster always take the same m block and group (the multicast A tile), and that the
only extra tiles are the missing halves of the last pairs past N (computed, never stored).
The driver calls are replaced by recorders as in tests/test_hopper_host.py."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import torch

from deepport.backends.hopper import configs
from deepport.backends.hopper import fp8_gemm as hopper
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import fp8_grouped_gemm
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8
from tests.test_hopper_host import _dense_call

H200 = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA H200", (9, 0), 132)


def _config(block_m: int, block_n: int, variant: int = configs.VARIANT_DENSE, cluster_n: int = 2,
            group_m: int = configs.GROUP_M) -> configs.GemmConfig:
    return configs.GemmConfig(block_m, block_n, configs.max_stages(block_m, block_n), variant, group_m, cluster_n)


# ---- the config --------------------------------------------------------------------------------------

def test_cluster_is_off_by_default_and_compiled_in_only_when_asked() -> None:
    plain = configs.GemmConfig(256, 128, 4, configs.VARIANT_DENSE)
    assert plain.cluster_n == 1 and plain.a_box_rows == 256
    assert not any("CLUSTER_N" in d for d in plain.defines()) and str(plain) == "dense 256x128 4 stages"
    clustered = configs.GemmConfig(256, 128, 4, configs.VARIANT_DENSE, cluster_n=2)
    assert clustered.defines() == (*plain.defines(), "-DCLUSTER_N=2")
    assert clustered.a_box_rows == 128 and str(clustered) == "dense 256x128 4 stages cluster 2"
    assert clustered.smem_bytes == plain.smem_bytes and clustered.threads == plain.threads
    with pytest.raises(ValueError, match="cluster_n"):
        configs.GemmConfig(128, 128, 4, configs.VARIANT_DENSE, cluster_n=4)


def test_the_choice_never_clusters_unless_a_measured_entry_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for variant, m, n, k, g, sms in configs.TUNED:
        assert configs.choose(m, n, k, variant, sms, g).cluster_n == 1
    assert configs.choose(4096, 5000, 3000, configs.VARIANT_DENSE, 132).cluster_n == 1  # the model
    key = (configs.VARIANT_DENSE, 4096, 7168, 2048, 1, 132)
    monkeypatch.setitem(configs.TUNED, key, (256, 128, 8, 2))
    configs.choose.cache_clear()
    try:
        assert configs.choose(4096, 7168, 2048, configs.VARIANT_DENSE, 132) == _config(256, 128, group_m=8)
    finally:
        monkeypatch.undo()
        configs.choose.cache_clear()


@pytest.mark.parametrize(("m_blocks", "n_blocks", "sms", "grid"), [
    (16, 56, 132, 132),   # M=4096 N=7168 at 256x128: 448 pairs, 66 clusters
    (3, 5, 132, 18),      # odd n blocks: 3 pairs per m block
    (1, 1, 132, 2),       # a single tile still gets a whole cluster
    (1, 3, 132, 4),
    (40, 40, 131, 130),   # an odd SM count: 65 clusters
    (5, 7, 1, 2),
])
def test_grid_is_a_multiple_of_the_cluster_with_one_cluster_per_pair(m_blocks: int, n_blocks: int, sms: int,
                                                                    grid: int) -> None:
    assert _config(128, 128).grid(m_blocks, n_blocks, sms) == grid
    plain = _config(128, 128, cluster_n=1)
    assert plain.grid(m_blocks, n_blocks, sms) == max(1, min(m_blocks * n_blocks, sms))  # as before


# ---- launches with recorders -------------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    rec: dict[str, list[Any]] = {"maps": [], "launches": []}

    def tile_map(address: int, k: int, rows: int, groups: int, row_stride: int, group_stride: int,
                 box_rows: int) -> bytes:
        rec["maps"].append((address, k, rows, groups, row_stride, group_stride, box_rows))
        return bytes(128)

    def launch(function: Any, grid: int, threads: int, smem: int, packed: bytes, device: torch.device) -> None:
        rec["launches"].append({"config": function, "grid": grid, "threads": threads, "smem": smem})

    monkeypatch.setattr(hopper.tma, "fp8_tile_map", tile_map)
    monkeypatch.setattr(hopper, "kernel_function", lambda config, device: config)
    monkeypatch.setattr(hopper.launch, "launch", launch)
    return rec


def _force(monkeypatch: pytest.MonkeyPatch, config: configs.GemmConfig) -> None:
    monkeypatch.setattr(hopper, "choose", lambda *args, **kwargs: config)


def _on_h200(call: Any) -> Any:
    """The bound grouped call with an H200 (132 SMs) as its device."""
    return dataclasses.replace(call, signature=dataclasses.replace(call.signature, device=H200))


@pytest.mark.parametrize(("m", "n", "block_m", "block_n", "grid"), [
    (300, 712, 128, 96, 24),   # 3 m blocks x 8 n blocks: 12 pairs
    (300, 600, 128, 128, 18),  # 5 n blocks (odd): 3 pairs per m block, 9 pairs
    (1, 256, 64, 16, 16),      # 16 n blocks: 8 pairs of one m block
    (200, 328, 256, 128, 4),   # 3 n blocks: 2 pairs
    (4096, 2112, 256, 128, 132),  # 16 x 17 n blocks: 144 pairs, capped at 66 clusters
])
def test_dense_cluster_launch(recorded: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch, m: int, n: int,
                              block_m: int, block_n: int, grid: int) -> None:
    config = _config(block_m, block_n)
    _force(monkeypatch, config)
    call, out = _dense_call(m, n, 256)
    hopper.run(call, out)
    (launch,) = recorded["launches"]
    assert launch["config"] is config and launch["grid"] == grid and grid % 2 == 0
    assert launch["threads"] == config.threads and launch["smem"] == config.smem_bytes
    a_map, b_map = recorded["maps"]
    assert a_map[-1] == block_m // 2 and b_map[-1] == block_n  # A in half-tile boxes, B whole


def test_contiguous_cluster_launch(recorded: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    g, n, k = 3, 384, 256  # 3 n blocks of 128 (odd)
    _force(monkeypatch, _config(128, 128, configs.VARIANT_CONTIGUOUS))
    idx = torch.tensor([0] * 100 + [-1] * 28 + [2] * 128, dtype=torch.int32)
    a, sfa = per_token_cast_to_fp8(torch.randn(256, k))
    parts = [per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(g)]
    b, sfb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    out = torch.empty(256, n, dtype=torch.bfloat16)
    hopper.run_contiguous(_on_h200(fp8_grouped_gemm.bind_contiguous((a, sfa), (b, sfb), out, idx)), out)
    assert recorded["launches"][0]["grid"] == 2 * 2 * 2  # 2 m blocks x 2 pairs
    assert recorded["maps"][0][-1] == 64 and recorded["maps"][1][-1] == 128


def test_masked_cluster_launch(recorded: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    g, m_max, n, k = 2, 192, 160, 256  # 2 n blocks of 96: one pair
    _force(monkeypatch, _config(256, 96, configs.VARIANT_MASKED))
    a, sfa = per_token_cast_to_fp8(torch.randn(g * m_max, k))
    parts = [per_block_cast_to_fp8(torch.randn(n, k)) for _ in range(g)]
    b, sfb = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    out = torch.empty(g, m_max, n, dtype=torch.bfloat16)
    masked_m = torch.tensor([100, 0], dtype=torch.int32)
    call = fp8_grouped_gemm.bind_masked((a.view(g, m_max, k), sfa.view(g, m_max, -1)), (b, sfb), out, masked_m, 64)
    hopper.run_masked(_on_h200(call), out)
    assert recorded["launches"][0]["grid"] == 2 * 2  # an upper bound: 2 groups x 1 m block x 1 pair
    assert recorded["maps"][0][-1] == 128


# ---- the kernel's schedule, mirrored -----------------------------------------------------------------

def _raster(t: int, m_blocks: int, n_units: int, group_m: int) -> tuple[int, int]:
    per_group = group_m * n_units
    first_m = (t // per_group) * group_m
    in_group = t % per_group
    count = min(group_m, m_blocks - first_m)
    return first_m + in_group % count, in_group // count


def _schedule(config: configs.GemmConfig, n: int, m_blocks_per_group: list[int], grid: int) -> list[list[tuple]]:
    """Per CTA, the tiles ``(group, m block, n block)`` that ``Scheduler::next`` of the kernel hands out
    (masked order: groups one after the other; dense and contiguous: one group)."""
    n_blocks = configs.ceil_div(n, config.block_n)
    n_units = configs.ceil_div(n_blocks, config.cluster_n)
    clusters = grid // config.cluster_n
    out: list[list[tuple]] = []
    for cta in range(grid):
        cluster, rank = divmod(cta, config.cluster_n)
        tiles = []
        t = cluster
        while True:
            before, group = 0, 0
            while group < len(m_blocks_per_group) and t >= before + m_blocks_per_group[group] * n_units:
                before += m_blocks_per_group[group] * n_units
                group += 1
            if group == len(m_blocks_per_group):
                break
            mb, unit = _raster(t - before, m_blocks_per_group[group], n_units, config.group_m)
            tiles.append((group, mb, unit * config.cluster_n + rank))
            t += clusters
        out.append(tiles)
    return out


@pytest.mark.parametrize(("block_m", "block_n", "n", "m_blocks", "sms", "group_m"), [
    (256, 128, 2112, [16], 132, 8),     # 17 n blocks: one missing half per m block
    (128, 128, 7168, [32], 132, 16),
    (64, 16, 576, [1], 132, 16),        # 36 n blocks, 18 pairs: fewer pairs than clusters
    (128, 160, 600, [7], 20, 16),       # 4 n blocks, 10 clusters over 14 pairs
    (128, 96, 500, [3, 0, 5, 1], 132, 16),  # masked groups, one empty; 6 n blocks
    (256, 96, 300, [2, 1, 2], 7, 16),   # 4 n blocks; an odd SM count
])
def test_clusters_cover_every_tile_once_and_share_the_m_block(block_m: int, block_n: int, n: int,
                                                              m_blocks: list[int], sms: int, group_m: int) -> None:
    config = _config(block_m, block_n, group_m=group_m)
    n_blocks = configs.ceil_div(n, block_n)
    grid = config.grid(sum(m_blocks), n_blocks, sms)
    per_cta = _schedule(config, n, m_blocks, grid)
    for c in range(0, grid, 2):
        first, second = per_cta[c], per_cta[c + 1]
        assert len(first) == len(second)  # both CTAs run the same number of mainloops (the multicast needs both)
        assert [(g, mb) for g, mb, _ in first] == [(g, mb) for g, mb, _ in second]
        assert all(nb0 % 2 == 0 and nb1 == nb0 + 1 for (_, _, nb0), (_, _, nb1) in zip(first, second, strict=True))
    done = Counter(tile for tiles in per_cta for tile in tiles)
    real = {(g, mb, nb) for g, count in enumerate(m_blocks) for mb in range(count) for nb in range(n_blocks)}
    assert {t for t in done if t[2] < n_blocks} == real and all(done[t] == 1 for t in done)
    extra = [t for t in done if t[2] >= n_blocks]
    assert all(t[2] == n_blocks for t in extra)  # only the missing half of a last pair, past N: never stored
    assert len(extra) == (sum(m_blocks) if n_blocks % 2 else 0)
