"""The Triton backend's FP8 GEMMs on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here on a machine
without a GPU): every kernel path the conformance smoke tier may not reach (split-K, pointer and descriptor
loads, 256-wide tiles with two SFB blocks, two-half tiles, grouped tiles of 64 rows), configuration choice
and logging, support records. On a GPU machine these are skipped: scripts/gpu_triton_gemm.py and
``deepport certify --backend triton --device cuda`` check the compiled kernels there."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be on before the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import deepport
from deepport.backends.triton import fp8_configs
from deepport.backends.triton import fp8_gemm as triton_dense
from deepport.backends.triton import fp8_grouped_gemm as triton_grouped
from deepport.backends.triton.fp8_configs import GemmConfig
from deepport.backends.triton.fp8_support import FP8_OPS, interpreting
from deepport.dispatch import registry
from deepport.dispatch.device import DeviceInfo
from deepport.kernels import fp8_gemm as op
from deepport.kernels import fp8_grouped_gemm as grouped
from deepport.kernels.f64.fp8_gemm import reference_f64
from deepport.kernels.f64.fp8_grouped_gemm import contiguous_f64, masked_rows_f64
from deepport.kernels.fp8_layout import (
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)
from tests.fp8_grouped_inputs import contiguous_inputs, masked_inputs

DEVICE = torch.device("cpu")
pytestmark = pytest.mark.skipif(not interpreting(), reason="runs on Triton's CPU interpreter (TRITON_INTERPRET=1 "
                                "before the kernels are decorated); GPU checks: scripts/gpu_triton_gemm.py")


def _dense(m: int, n: int, k: int, *, seed: int = 0, ue8m0: bool = False, per_row_b: bool = False,
           out_dtype: torch.dtype = torch.bfloat16, c: bool = False) -> tuple[op.FP8GemmCall, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    a, sfa = per_token_cast_to_fp8(x, use_ue8m0=ue8m0)
    b, sfb = per_token_cast_to_fp8(w, use_ue8m0=ue8m0) if per_row_b or ue8m0 else per_block_cast_to_fp8(w)
    if ue8m0:
        sfa, sfb = get_mn_major_tma_aligned_packed_ue8m0_tensor(sfa), get_mn_major_tma_aligned_packed_ue8m0_tensor(sfb)
    else:
        sfa = get_mn_major_tma_aligned_tensor(sfa)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    acc = torch.randn(m, n, generator=gen).to(DEVICE) * 8 if c else None
    tensors = [t.to(DEVICE) for t in (a, sfa, b, sfb)]
    recipe = (1, 1, 128) if per_row_b or ue8m0 else None
    call = op.bind("nt", (tensors[0], tensors[1]), (tensors[2], tensors[3]), out, c=acc, recipe=recipe)
    return call, out


def _close(got: torch.Tensor, ref: np.ndarray) -> None:
    """Within two roundings of bf16 (one of float32 with rms-scaled accumulation slack)."""
    g = got.detach().double().cpu().numpy()
    rel = 2.01 * 2.0**-8 if got.dtype == torch.bfloat16 else 2.0**-20
    rms = float(np.sqrt(np.mean(ref**2))) if ref.size else 0.0
    assert not np.isnan(g).any()
    assert np.all(np.abs(g - ref) <= rel * np.abs(ref) + 2.0**-12 * rms)


@pytest.mark.parametrize("config", [
    GemmConfig(64, 128, split_k=3), GemmConfig(64, 128, split_k=2, tma=False), GemmConfig(32, 256),
    GemmConfig(64, 64, tma=False, group_m=2), GemmConfig(64, 128, split_n=2), GemmConfig(32, 256, split_n=2, tma=False),
], ids=lambda c: c.label)
def test_dense_kernel_paths_match_the_reference(config: GemmConfig) -> None:
    call, out = _dense(70, 320, 896, seed=1)
    triton_dense.launch(call, out, config)
    _close(out, reference_f64(call))


@pytest.mark.parametrize("split", [1, 2])
def test_split_k_with_ue8m0_c_in_place_and_a_k_tail(split: int) -> None:
    call, out = _dense(9, 192, 700, seed=2, ue8m0=False, per_row_b=True, out_dtype=torch.float32)
    out.copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    call = op.bind("nt", (call.a, call.sfa), (call.b, call.sfb), out, c=out, recipe=(1, 1, 128))
    ref = reference_f64(call)  # reads c (= out) before the kernel overwrites it
    triton_dense.launch(call, out, GemmConfig(16, 64, split_k=split))
    _close(out, ref)
    call, out = _dense(5, 128, 1024, seed=4, ue8m0=True, out_dtype=torch.float32, c=True)
    triton_dense.launch(call, out, GemmConfig(16, 128, split_k=split))
    _close(out, reference_f64(call))


def test_every_layout_through_the_public_op() -> None:
    call, _ = _dense(12, 200, 384, seed=5)
    a, sfa, b, sfb = (t.contiguous() for t in (call.a, call.sfa, call.b, call.sfb))
    ref = reference_f64(call)
    for layout in op.LAYOUTS:
        xa, xsfa = (a.t().contiguous(), sfa.t().contiguous()) if layout[0] == "t" else (a, sfa)
        xb, xsfb = (b.t().contiguous(), sfb.t().contiguous()) if layout[1] == "n" else (b, sfb)
        out = torch.full((12, 200), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        getattr(deepport, f"fp8_gemm_{layout}")((xa, xsfa), (xb, xsfb), out, backend="triton")
        _close(out, ref)


@pytest.mark.parametrize("block_m", [64, 128])
def test_contiguous_tiles_of_padding_are_zero_and_rows_follow_their_group(block_m: int) -> None:
    q, m_indices = contiguous_inputs([70, 0, 130], n=192, k=256, seed=6)
    pair_a, pair_b = q.pair_a, q.pair_b
    out = torch.full((int(m_indices.numel()), 192), float("nan"), dtype=torch.bfloat16)
    call = grouped.bind_contiguous(pair_a, pair_b, out, m_indices)
    triton_grouped.launch_contiguous(call, out, GemmConfig(block_m, 64, tma=block_m == 64, split_n=128 // block_m))
    pad = m_indices < 0
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))  # +0.0, bit for bit
    assert not torch.signbit(out[pad]).any()
    _close(out[~pad], contiguous_f64(call, m_indices.numpy())[~pad.numpy()])


def test_contiguous_all_padding_writes_zeros() -> None:
    q, m_indices = contiguous_inputs([5], n=128, k=128, seed=7)
    m_indices.fill_(-1)
    out = torch.full((128, 128), float("nan"), dtype=torch.bfloat16)
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("config", [GemmConfig(64, 128, waves=1, split_n=2), GemmConfig(32, 64, tma=False, waves=3)],
                         ids=lambda c: c.label)
def test_masked_rows_past_masked_m_keep_their_bits(config: GemmConfig) -> None:
    q, masked_m = masked_inputs(3, 96, [0, 40, 96], n=160, k=384, seed=8)
    garbage = torch.randn(3, 96, 160, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16) * 1e3
    out = garbage.clone()
    call = grouped.bind_masked(q.pair_a, q.pair_b, out, masked_m, 64)
    triton_grouped.launch_masked(call, out, config)
    expected = masked_rows_f64(call, masked_m.numpy())
    for g, rows in enumerate(masked_m.tolist()):
        assert torch.equal(out[g, rows:].view(torch.int16), garbage[g, rows:].view(torch.int16))
        if rows:
            _close(out[g, :rows], expected[g])


def test_configs_are_data_with_a_default_and_the_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deepport.triton")
    first = fp8_configs.choose(fp8_configs.DENSE, "Imaginary GPU 9000", 132, 64, 2112, 7168)
    again = fp8_configs.choose(fp8_configs.DENSE, "Imaginary GPU 9000", 132, 60, 2112, 7168)
    assert first == again and first.split_k > 1  # 17 tiles of 64x128 leave most of 132 SMs idle: split K
    assert len([r for r in caplog.records if "Imaginary GPU 9000" in r.getMessage()]) == 1
    assert "default" in caplog.records[-1].getMessage()
    assert fp8_configs.choose(fp8_configs.DENSE, "Imaginary GPU 9000", 132, 4096, 2112, 7168).split_k == 1
    for device_tables in fp8_configs.TUNED.values():
        for table in device_tables.values():
            for (bucket, _, _), config in table.items():
                assert bucket in {name for _, name in fp8_configs.M_BUCKETS} | {fp8_configs.LARGE}
                assert config.block_n >= 16 and config.split_k >= 0
    contiguous = fp8_configs.TUNED.get("NVIDIA H200", {}).get(fp8_configs.CONTIGUOUS, {})
    assert all(128 % c.block_m == 0 for c in contiguous.values())
    tuned = fp8_configs.choose(fp8_configs.DENSE, "NVIDIA H200", 132, 4096, 4096, 7168)
    assert tuned == fp8_configs.TUNED["NVIDIA H200"][fp8_configs.DENSE][("large", 4096, 7168)]
    assert "tuned" in caplog.records[-1].getMessage() and tuned.label in caplog.records[-1].getMessage()


def test_support_records_say_why_not_and_name_real_entries() -> None:
    cpu = DeviceInfo("cpu", None, "cpu", "cpu", "x86_64", None, 2)
    old = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA A100", (8, 0), 108)
    sig = op.FP8GemmOp("nt").example_signature(old)
    (support,) = [s for s in FP8_OPS if s.op == "fp8_gemm_nt"]
    assert any("compute capability >= 8.9" in r for r in support.reasons(sig))
    assert support.reasons(op.FP8GemmOp("nt").example_signature(cpu)) == []  # the interpreter is on here
    for s in FP8_OPS:
        module, _, function = s.entry.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
    assert {s.op for s in FP8_OPS} <= {s.op for s in registry.get("triton").ops}


def _tile_rows_cols(pid: int, m: int, n: int, config: GemmConfig) -> tuple[slice, slice]:
    """The output elements of tile ``pid`` in the kernel's grouped order (``_tile_of``)."""
    num_m, width = -(-m // config.block_m), config.group_m * -(-n // config.block_n)
    first = pid // width * config.group_m
    size = min(num_m - first, config.group_m)
    pm, pn = first + pid % width % size, pid % width // size
    return (slice(pm * config.block_m, (pm + 1) * config.block_m),
            slice(pn * config.block_n, (pn + 1) * config.block_n))


@pytest.mark.parametrize(("shape", "config", "slots", "out_dtype", "c"), [
    # 9 tiles on 7 slots: 7 whole, 2 split over 3 of the 4 K blocks (descriptors, bf16)
    ((70, 320, 512), GemmConfig(32, 128, group_m=2, tail_split=3), 7, torch.bfloat16, False),
    # 7 tiles on 3 slots: 6 whole, 1 split in 2; pointers, a K tail (EVEN_K false), c, float32
    ((100, 64, 700), GemmConfig(16, 64, tma=False, tail_split=2), 3, torch.float32, True),
    # 12 tiles on 5 slots: 10 whole, 2 split over auto = 2 ranges (of s <= 12 // 4: one wave); two halves
    ((40, 256, 1536), GemmConfig(16, 128, split_n=2, group_m=4, tail_split=0), 5, torch.float32, False),
    # every tile in the tail (slots > tiles): 3 tiles split over all 4 K blocks (s capped from 6); rows of 500
    # bytes are not 16-byte aligned: pointers, a K tail, bf16
    ((20, 192, 500), GemmConfig(32, 64, tail_split=6), 4, torch.bfloat16, False),
], ids=["tma-bf16", "ptr-ktail-c-f32", "halves-auto-f32", "all-tail-ptr-ktail-bf16"])
def test_tail_split_matches_the_reference_and_keeps_whole_tiles_bit_identical(
        shape: tuple[int, int, int], config: GemmConfig, slots: int, out_dtype: torch.dtype, c: bool) -> None:
    m, n, k = shape
    call, out = _dense(m, n, k, seed=11, out_dtype=out_dtype, c=c)  # out: NaN, every element must be written
    full, tail, pieces = fp8_configs.tail_plan(m, n, k, config, slots)
    assert tail > 0 and pieces > 1
    triton_dense.launch(call, out, config, slots=slots)
    ref = reference_f64(call)
    _close(out, ref)
    again = torch.full_like(out, float("nan"))
    triton_dense.launch(call, again, config, slots=slots)
    assert torch.equal(out.view(torch.uint8), again.view(torch.uint8))  # deterministic: the same bits
    whole = torch.full_like(out, float("nan"))
    triton_dense.launch(call, whole, replace(config, tail_split=1), slots=slots)  # today's path, no split
    for pid in range(full + tail):
        rows, cols = _tile_rows_cols(pid, m, n, config)
        if pid < full:  # computed whole: the same bits as without the tail split
            assert torch.equal(out[rows, cols].view(torch.uint8), whole[rows, cols].view(torch.uint8)), pid
        else:  # other summation grouping: the last bits may differ
            torch.testing.assert_close(out[rows, cols], whole[rows, cols], rtol=2.0**-7, atol=2.0**-10)
    split = torch.full_like(out, float("nan"))  # and the split-K path agrees within the bound too
    triton_dense.launch(call, split, replace(config, split_k=2, tail_split=1))
    _close(split, ref)


def test_tail_split_with_c_in_place_and_ue8m0_scales() -> None:
    call, out = _dense(5, 384, 1024, seed=12, ue8m0=True, out_dtype=torch.float32)
    out.copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(13)))
    call = op.bind("nt", (call.a, call.sfa), (call.b, call.sfb), out, c=out, recipe=(1, 1, 128))
    ref = reference_f64(call)  # reads c (= out) before the kernel overwrites it
    triton_dense.launch(call, out, GemmConfig(16, 64, tail_split=4), slots=4)  # 6 tiles: 4 whole, 2 in 4 pieces
    _close(out, ref)


def test_tail_plan_fills_one_wave_and_is_off_unless_measured() -> None:
    big = GemmConfig(128, 128, 8, 4)
    assert fp8_configs.resident_programs(big) == 1
    assert fp8_configs.resident_programs(GemmConfig(128, 128, 8, 3, split_n=2, maxnreg=128)) == 2
    assert fp8_configs.resident_programs(GemmConfig(128, 64, 4, 3, maxnreg=168)) == 3
    # M = 4096, N x K = 2112 x 7168 on 132 SMs: 544 tiles = 4 waves + 16, split 8 ways (7 K blocks each)
    assert fp8_configs.tail_plan(4096, 2112, 7168, replace(big, tail_split=0), 132) == (528, 16, 8)
    assert fp8_configs.tail_plan(4096, 2112, 7168, big, 132) == (544, 0, 1)  # tail_split 1: off
    assert fp8_configs.tail_plan(4096, 2112, 7168, replace(big, tail_split=99), 132) == (528, 16, 56)  # K blocks
    assert fp8_configs.tail_plan(4096, 4224, 7168, replace(big, tail_split=4), 132) == (1056, 0, 1)  # no tail
    # 1024 tiles = 7 x 132 + 100: 5 ways take 4 waves of a fifth (4 ways: 4 of a quarter, no gain)
    assert fp8_configs.tail_plan(4096, 4096, 7168, replace(big, tail_split=0), 132) == (924, 100, 5)
    halves = GemmConfig(128, 128, 8, 3, split_n=2, maxnreg=128, tail_split=0)  # 264 slots: 1024 = 3 x 264 + 232
    assert fp8_configs.tail_plan(4096, 4096, 7168, halves, 264) == (1024, 0, 1)  # no s <= 8 finishes sooner
    tuned = fp8_configs.resolved(replace(big, tail_split=0), 4096, 2112, 7168, 132)
    assert tuned.tail_split == 8 and tuned.label.endswith("t8") and big.label == "m128n128w8s4g8k1tma"
    assert replace(big, tail_split=0).label.endswith("tauto")
    assert fp8_configs.resolved(GemmConfig(64, 64, split_k=0, tail_split=4), 64, 2112, 7168, 132).tail_split == 1
    # tuned entries split the tail only where an H200 sweep measured it faster (benchmarks/results/
    # 2026-12-01-h200-tune, 2026-12-02-h200-tune): a fixed s per shape, never "auto"
    split = {(kind, key): c.tail_split for kind, table in fp8_configs.TUNED["NVIDIA H200"].items()
             for key, c in table.items() if c.tail_split != 1}
    assert split == {(fp8_configs.DENSE, ("large", 2112, 7168)): 8, (fp8_configs.DENSE, ("large", 576, 7168)): 4}
    for name, device_tables in fp8_configs.TUNED.items():
        assert name == "NVIDIA H200" or all(c.tail_split == 1 for t in device_tables.values() for c in t.values())


def test_tail_split_launches_one_gemm_of_full_plus_pieces_and_a_reduce_only_with_a_tail() -> None:
    from deepport.backends.triton import aot
    from deepport.backends.triton.fp8_gemm_kernels import fp8_gemm_nt_kernel, splitk_reduce_kernel, tail_reduce_kernel

    call, out = _dense(70, 320, 512, seed=14)  # 9 tiles of 32 x 128, 4 K blocks
    config = GemmConfig(32, 128, tail_split=3)
    cases = [(9, [(9, 1)], None), (3, [(9, 1)], None),  # whole waves only: today's launch, no workspace
             (7, [(7 + 2 * 3, 1), (2, 1)], (3, 2, 32, 128)), (12, [(9 * 3, 1), (9, 1)], (3, 9, 32, 128))]
    for slots, grids, workspace in cases:
        with aot.recorded_launches([fp8_gemm_nt_kernel, tail_reduce_kernel, splitk_reduce_kernel]) as launches:
            triton_dense.launch(call, out, config, slots=slots)
        assert [launch.grid for launch in launches] == grids, slots
        assert launches[0].kwargs["TAIL_SPLIT"] == (3 if workspace else 1)
        ws = launches[0].args[6]  # the kernel's ``ws``: the output itself when nothing is split
        assert (tuple(ws.shape) == workspace) if workspace else ws is launches[0].args[5]
    with aot.recorded_launches([fp8_gemm_nt_kernel, tail_reduce_kernel, splitk_reduce_kernel]) as launches:
        triton_dense.launch(call, out, replace(config, split_k=2), slots=7)  # split-K: no tail split
    assert [(launch.name, launch.grid) for launch in launches] == [("fp8_gemm_nt_kernel", (9, 2)),
                                                                    ("splitk_reduce_kernel", (3, 3))]
