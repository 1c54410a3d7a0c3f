"""The triton backend's MLA decode on the CPU (TRITON_INTERPRET=1, set by conftest.py without a GPU):
against the float64 reference, with plans that cut requests into many pieces (so the combine kernel
runs), every tile shape the configs use, causal multi-token queries, GQA and empty requests.

The conformance suite (``deepport certify --backend triton``) covers the op's edges; these tests pin
the backend's own machinery: piece expansion, re-planning for another part count, the plan cache.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import deepport
from deepport.kernels import mla_schedule
from deepport.kernels.f64.mla_decode import mla_decode_f64
from deepport.kernels.mla_decode import bind

triton = pytest.importorskip("triton")

from deepport.backends import mla_plan  # noqa: E402
from deepport.backends.triton import _runtime, configs  # noqa: E402
from deepport.backends.triton import mla_decode as triton_mla  # noqa: E402

pytestmark = pytest.mark.skipif(not _runtime.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cpu" if _runtime.interpreting() else "cuda"


def _inputs(lens: list[int], *, s_q: int = 1, h_q: int = 4, h_kv: int = 1, d_qk: int = 64, d_v: int = 32,
            page: int = 16, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs whose unused cache rows and table slots are poison (NaN rows, out-of-range ids)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    pages = [-(-n // page) for n in lens]
    num_blocks = sum(pages) + 2
    width = max(max(pages), 1) + 1
    order = torch.randperm(num_blocks, generator=g)
    table = torch.full((b, width), -7, dtype=torch.int32)
    k_cache = (torch.randn(num_blocks, page, h_kv, d_qk, generator=g) / 4).to(dtype)
    used = torch.zeros(num_blocks, page, dtype=torch.bool)
    at = 0
    for i, n in enumerate(pages):
        table[i, :n] = order[at: at + n].to(torch.int32)
        for j in range(n):
            used[order[at + j], : min(page, lens[i] - j * page)] = True
        at += n
    k_cache[~used] = float("nan")
    q = (torch.randn(b, s_q, h_q, d_qk, generator=g) / 4).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k_cache, table, seqlens))


def _check(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, d_v: int, causal: bool,
           config: configs.MLAConfig, scale: float | None = None, metadata: object = None) -> None:
    call = bind(q, k, table, lens, d_v, causal=causal, softmax_scale=scale, metadata=metadata)  # type: ignore[arg-type]
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], d_v), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device=q.device)
    triton_mla.run(call, out, lse, config=config)
    ref_out, ref_lse = mla_decode_f64(q, k, table, lens, d_v, call.softmax_scale, causal)
    got = out.cpu().double().numpy()
    ulp = 2.0**-7 if q.dtype == torch.bfloat16 else 2.0**-10
    rms = float(np.sqrt(np.mean(ref_out**2))) if ref_out.size else 0.0
    assert np.all(np.abs(got - ref_out) <= 2.01 * ulp * (np.abs(ref_out) + rms)), np.abs(got - ref_out).max()
    got_lse = lse.cpu().double().numpy()
    assert np.array_equal(np.isinf(got_lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.allclose(got_lse[finite], ref_lse[finite], rtol=1.3e-4, atol=1e-6)


def _cfg(block_h: int = 16, block_n: int = 32, programs_per_sm: int = 8, v_split: int = 1,
         k_tma: bool = False) -> configs.MLAConfig:
    return configs.MLAConfig(block_h=block_h, block_n=block_n, num_warps=4, num_stages=2,
                             programs_per_sm=programs_per_sm, v_split=v_split, k_tma=k_tma)


@pytest.mark.parametrize(("block_h", "block_n"), [(16, 16), (16, 64), (32, 32), (64, 16)])
def test_tile_shapes_match_reference_with_many_cut_requests(block_h: int, block_n: int) -> None:
    q, k, table, lens = _inputs([70, 1, 0, 129, 33], h_q=8)
    _check(q, k, table, lens, 32, False, _cfg(block_h, block_n, programs_per_sm=8))


@pytest.mark.parametrize(("v_split", "k_tma"), [(2, False), (1, True), (2, True)])
def test_split_v_and_bulk_copied_k_tiles_match_reference(v_split: int, k_tma: bool) -> None:
    """Two programs per row tile (each owning half of V), K tiles by tensor descriptors: the unused cache
    rows are NaN, so a bulk copy past a piece's last token would show."""
    q, k, table, lens = _inputs([70, 1, 0, 129, 33], s_q=2, h_q=8, page=32)
    call = bind(q, k, table, lens, 32, causal=True)
    cfg = _cfg(16, 16, programs_per_sm=8, v_split=v_split, k_tma=k_tma)
    assert (triton_mla.k_descriptors(call, cfg) is not None) == k_tma
    _check(q, k, table, lens, 32, True, cfg)


def test_causal_multi_token_gqa_with_cut_requests() -> None:
    q, k, table, lens = _inputs([3, 0, 90, 2, 47], s_q=3, h_q=6, h_kv=2, page=32)
    _check(q, k, table, lens, 32, True, _cfg(16, 16, programs_per_sm=6))
    _check(q, k, table, lens, 32, True, _cfg(16, 16, programs_per_sm=6, v_split=2, k_tma=True))  # no TMA: 2 KV heads


def test_core_head_dims_float16_with_scale() -> None:
    q, k, table, lens = _inputs([65, 130], s_q=2, h_q=3, d_qk=576, d_v=512, page=64, dtype=torch.float16)
    _check(q, k, table, lens, 512, True, _cfg(16, 64, programs_per_sm=4), scale=0.3)
    _check(q, k, table, lens, 512, True, _cfg(64, 32, programs_per_sm=4, v_split=2, k_tma=True), scale=0.3)


def test_metadata_plan_with_other_part_count_is_redealt() -> None:
    q, k, table, lens = _inputs([200, 5, 77], h_q=4)
    md = deepport.get_mla_metadata(lens, 4, 1)
    _check(q, k, table, lens, 32, False, _cfg(16, 32, programs_per_sm=5), metadata=md)
    _check(q, k, table, lens, 32, False, _cfg(16, 32, programs_per_sm=1), metadata=md)


def test_pieces_cover_every_token_once() -> None:
    lens = np.array([0, 1, 64, 65, 1000, 3, 0, 4097], dtype=np.int64)
    for parts in (1, 3, 7, 32):
        records, splits = mla_schedule.plan_split_kv(lens, parts)
        pieces, part_ptr = mla_plan.expand_pieces(records, splits, lens)
        assert part_ptr[0] == 0 and part_ptr[-1] == len(pieces) and np.all(np.diff(part_ptr) >= 0)
        covered = [np.zeros(int(n), dtype=int) for n in lens]
        rows: set[int] = set()
        for req, lo, hi, row, direct in pieces:
            covered[req][lo:hi] += 1
            assert row not in rows and splits[req] <= row < splits[req + 1]
            rows.add(int(row))
            assert direct == int(splits[req + 1] - splits[req] == 1)
        assert all(np.all(c == 1) for c in covered)
        assert rows == set(range(int(splits[-1])))


def test_plan_cache_follows_the_metadata_object() -> None:
    q, k, table, lens = _inputs([40, 9], h_q=4)
    md = deepport.get_mla_metadata(lens, 4, 1)
    call = bind(q, k, table, lens, 32, metadata=md)
    first = mla_plan.device_plan(call, 3)
    assert mla_plan.device_plan(call, 3) is first
    before = len(mla_plan._cache)
    del call, md, first
    gc.collect()
    assert len(mla_plan._cache) == before - 1


def test_the_backend_reports_triton_and_how_it_runs_for_certificates() -> None:
    from deepport.dispatch import registry

    ident = registry.get("triton").identity()  # type: ignore[misc]
    assert ident["triton"] == triton.__version__
    assert ident["mode"] == ("interpreter (TRITON_INTERPRET=1)" if _runtime.interpreting() else "compiled")
