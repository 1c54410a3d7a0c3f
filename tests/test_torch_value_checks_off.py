"""The torch backend with ``DEEPPORT_CHECK_VALUES=0`` takes its paths that read no device value on the host
(what a CUDA-graph capture needs): they must give what the checked paths give, edges included."""

from __future__ import annotations

import pytest
import torch
from custom_op_inputs import mla
from fp8_grouped_inputs import masked_inputs
from same_computation import assert_same_up_to_rounding

import deepport

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch(clean_env: None) -> None:
    return None


def _poison_unused_pages(x: dict[str, torch.Tensor], page: int) -> None:
    """NaN in every cache block no request uses, and out-of-range ids in the table slots past each length."""
    used = set()
    for i, length in enumerate(x["cache_seqlens"].tolist()):
        pages = -(-int(length) // page)
        used |= {int(v) for v in x["block_table"][i, :pages]}
        x["block_table"][i, pages:] = 10**6
    for blk in range(int(x["k_cache"].shape[0])):
        if blk not in used:
            x["k_cache"][blk] = float("nan")


@pytest.mark.parametrize("plan", [False, True], ids=["table_capacity", "plan"])
def test_mla_decode_bounds_the_gather_without_reading_lengths(monkeypatch: pytest.MonkeyPatch, plan: bool) -> None:
    x = mla(CPU, lens=(0, 5, 33, 17), s_q=2, max_blocks=6, num_blocks=24)
    _poison_unused_pages(x, 16)
    args = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], x["head_dim_v"])
    md = deepport.get_mla_metadata(x["cache_seqlens"], 4, 2) if plan else None
    want_out, want_lse = deepport.mla_decode(*args, causal=True, metadata=md, backend="torch")
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    out, lse = deepport.mla_decode(*args, causal=True, metadata=md, backend="torch")
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    assert torch.isinf(lse[0]).all() and not out[0].any()  # the empty request


def test_masked_gemm_on_the_device_keeps_rows_past_masked_m(monkeypatch: pytest.MonkeyPatch) -> None:
    q, masked_m = masked_inputs(3, 8, [2, 0, 8], n=160, k=256)  # rows past masked_m hold NaN
    sentinel = torch.full((3, 8, 160), 7.0, dtype=torch.bfloat16)
    want = sentinel.clone()
    deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, want, masked_m, 4, backend="torch")
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    got = sentinel.clone()
    deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, got, masked_m, 4, backend="torch")
    assert_same_up_to_rounding(got, want)
    assert bool((got[0, 2:] == 7.0).all()) and bool((got[1] == 7.0).all())  # untouched, bit for bit
