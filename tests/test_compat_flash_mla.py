"""deepport.compat.flash_mla called as FlashMLA's READMEs and tests call it, checked against float64.

The inputs follow FlashMLA's tests at tiny sizes: varlen ``cache_seqlens`` (one request empty), an
``arange`` block table over pages of 64, every cache slot past a sequence's end set to NaN, and the
schedule from ``get_mla_metadata`` passed to every call.
"""

from __future__ import annotations

import math

import pytest
import torch
from same_computation import assert_same_up_to_rounding

import deepport
from deepport.compat import flash_mla
from deepport.compat.flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from deepport.errors import ArgumentTypeError, InvalidArgumentError, UnknownBackendError

pytestmark = pytest.mark.usefixtures("clean_env")

PAGE = 64


def upstream_inputs(*, b: int = 3, s_q: int = 2, h_q: int = 4, h_kv: int = 2, d: int = 48, dv: int = 32,
                    lens: tuple[int, ...] = (70, 0, 129), dtype: torch.dtype = torch.bfloat16, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """FlashMLA's test layout: request i owns blocks [i * P, (i + 1) * P), NaN past its length."""
    g = torch.Generator().manual_seed(seed)
    cache_seqlens = torch.tensor(lens[:b], dtype=torch.int32)
    pages = -(-max(max(lens[:b]), 1) // 256) * 256 // PAGE
    block_table = torch.arange(b * pages, dtype=torch.int32).view(b, pages)
    blocked_k = torch.randn(b * pages, PAGE, h_kv, d, generator=g).to(dtype)
    for i in range(b):
        blocked_k.view(b, pages * PAGE, h_kv, d)[i, int(cache_seqlens[i]):] = float("nan")
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    return q, blocked_k, block_table, cache_seqlens, dv


def reference_f64(q: torch.Tensor, blocked_k: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  dv: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's test reference (SDPA per request, bottom-right causal, GQA by repeat) in float64."""
    b, s_q, h_q, d = q.shape
    h_kv = blocked_k.shape[2]
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(cache_seqlens[i])
        if n == 0:
            continue
        rows = blocked_k[block_table[i].long()].reshape(-1, h_kv, d)[:n].double()
        keys = rows.repeat_interleave(h_q // h_kv, dim=1).transpose(0, 1)  # [h_q, n, d]
        logits = q[i].double().transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(d)  # [h_q, s_q, n]
        if causal:
            visible = torch.ones(s_q, n, dtype=torch.bool).tril(diagonal=n - s_q)
            logits = logits.masked_fill(~visible, -math.inf)
        lse[i] = torch.logsumexp(logits, dim=-1)
        out[i] = (torch.softmax(logits, dim=-1) @ keys[:, :, :dv]).transpose(0, 1)
    return out, lse


def assert_close_to_reference(out: torch.Tensor, lse: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    """FlashMLA's comparator: same inf positions, then abs 8e-4 or rel 2.01/128 (out), 1e-6 or 8.01/65536 (lse)."""
    ref_out, ref_lse = ref
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    err = (out.double() - ref_out).abs()
    assert bool((err <= 8e-4 + 2.01 / 128 * ref_out.abs()).all()), float(err.max())
    finite = torch.isfinite(ref_lse)
    lse_err = (lse.double() - ref_lse)[finite].abs()
    assert bool((lse_err <= 1e-6 + 8.01 / 65536 * ref_lse[finite].abs()).all()), float(lse_err.max())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_legacy_positional_call_matches_the_float64_reference(causal: bool, dtype: torch.dtype) -> None:
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs(dtype=dtype)
    s_q, h_q, h_kv = q.shape[1], q.shape[2], blocked_k.shape[2]
    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv,
                                      tile_scheduler_metadata, num_splits, causal=causal)
    assert out.dtype == dtype and out.shape == (3, s_q, h_q, dv)
    assert lse.dtype == torch.float32 and lse.shape == (3, h_q, s_q)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == math.inf).all())  # empty request
    assert_close_to_reference(out, lse, reference_f64(q, blocked_k, block_table, cache_seqlens, dv, causal))


def test_metadata_has_flashmla_shapes_and_dtypes_in_every_legacy_spelling() -> None:
    _q, _blocked_k, _, cache_seqlens, _ = upstream_inputs()
    tsm, splits = get_mla_metadata(cache_seqlens, 4, 2)  # 2025-02 positional
    assert tsm.dtype == torch.int32 and tsm.dim() == 2 and tsm.shape[1] == 8 and tsm.shape[0] >= 1
    assert splits.dtype == torch.int32 and splits.shape == (4,) and int(splits[0]) == 0
    assert tsm.device == cache_seqlens.device and splits.device == cache_seqlens.device
    for other in (get_mla_metadata(cache_seqlens, num_heads_per_head_k=4, num_heads_k=2),  # 2025-02 keywords
                  get_mla_metadata(cache_seqlens, 4, 2, 4, False, None)):  # 2025-09 README form
        assert torch.equal(other[0], tsm) and torch.equal(other[1], splits)


def test_no_argument_form_plans_on_first_call_and_reuse_across_layers_is_checked() -> None:
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    sched_meta, none = get_mla_metadata()
    assert isinstance(sched_meta, FlashMLASchedMeta) and none is None and not sched_meta.have_initialized
    first = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, sched_meta, None, causal=True)
    assert sched_meta.have_initialized and sched_meta.config == FlashMLASchedMeta.Config(
        3, 2, 4, PAGE, 2, True, False, None, None, None)
    assert sched_meta.tile_scheduler_metadata is not None and sched_meta.tile_scheduler_metadata.shape[1] == 8
    second = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, sched_meta, causal=True)
    tsm, splits = get_mla_metadata(cache_seqlens, 4, 2)
    legacy = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm, splits, causal=True)
    for got in (second, legacy):
        assert_same_up_to_rounding(got[0], first[0])
        assert_same_up_to_rounding(got[1], first[1])
    with pytest.raises(InvalidArgumentError, match="causal=True"):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, sched_meta, causal=False)
    with pytest.raises(InvalidArgumentError, match="s_q=2"):
        flash_mla_with_kvcache(q[:, :1].contiguous(), blocked_k, block_table, cache_seqlens, dv, sched_meta,
                               causal=True)


def test_a_failed_first_call_leaves_the_no_argument_plan_empty() -> None:
    q, blocked_k, block_table, cache_seqlens, _dv = upstream_inputs()
    sched_meta, _ = get_mla_metadata()
    with pytest.raises(InvalidArgumentError):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, q.shape[-1] + 1, sched_meta)
    assert not sched_meta.have_initialized and sched_meta.config is None


def test_metadata_copied_into_graph_buffers_is_accepted_and_stale_metadata_rejected() -> None:
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    tsm, splits = get_mla_metadata(cache_seqlens, 4, 2)
    direct = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm, splits)
    # vLLM's CUDA-graph pattern: persistent buffers sized for the worst case, sliced to this step
    tsm_buf = torch.zeros(64, 8, dtype=torch.int32)
    splits_buf = torch.zeros(17, dtype=torch.int32)
    tsm_buf[: tsm.shape[0]].copy_(tsm)
    splits_buf[: splits.shape[0]].copy_(splits)
    copied = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm_buf[: tsm.shape[0]],
                                    splits_buf[: splits.shape[0]])
    no_splits = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm_buf[: tsm.shape[0]], None)
    for got in (copied, no_splits):
        assert_same_up_to_rounding(got[0], direct[0])
        assert_same_up_to_rounding(got[1], direct[1])
    longer = cache_seqlens + 64  # other page counts: another schedule
    for stale in ((tsm, splits), (tsm_buf[: tsm.shape[0]], splits_buf[: splits.shape[0]])):
        with pytest.raises(InvalidArgumentError, match="get_mla_metadata again"):
            flash_mla_with_kvcache(q, blocked_k, torch.cat([block_table, block_table], 1), longer, dv, *stale)


def test_scheduling_tensors_from_elsewhere_are_rejected_not_misread() -> None:
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    tsm, splits = get_mla_metadata(cache_seqlens, 4, 2)
    foreign = torch.zeros_like(tsm)  # e.g. FlashMLA's own int32 [num_sm_parts, 8] records
    foreign[:, :7] = tsm[:, :7]
    with pytest.raises(InvalidArgumentError, match="opaque"):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, foreign, splits)
    with pytest.raises(ArgumentTypeError, match="tile_scheduler_metadata"):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, [1, 2], None)
    with pytest.raises(InvalidArgumentError, match="num_splits"):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, get_mla_metadata()[0], splits)


@pytest.mark.parametrize("argument", ["indices", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache",
                                      "topk_length", "extra_topk_length", "is_fp8_kvcache"])
def test_sparse_fp8_decode_arguments_are_rejected(argument: str) -> None:
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    value = True if argument == "is_fp8_kvcache" else torch.zeros(3, 2, 4, dtype=torch.int32)
    with pytest.raises(InvalidArgumentError, match="not part of deepport"):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, None, **{argument: value})
    with pytest.raises(InvalidArgumentError, match="sparse"):
        get_mla_metadata(cache_seqlens, 4, 2, 4, True, 64)


def test_calls_route_through_deepport_dispatch(spy: list[tuple[str, object]]) -> None:
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    tsm, splits = get_mla_metadata(cache_seqlens, 4, 2)
    flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm, splits, backend="spy")
    assert [name for name, _ in spy] == ["spy"]
    with deepport.use_backend("reference"):
        via_context = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm, splits)
    direct = deepport.mla_decode(q, blocked_k, block_table, cache_seqlens, dv, backend="reference")
    assert torch.equal(via_context[0], direct[0]) and torch.equal(via_context[1], direct[1])
    with pytest.raises(UnknownBackendError):
        flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tsm, splits, backend="no-such-backend")


def test_module_exposes_upstream_names() -> None:
    assert set(flash_mla.__all__) >= {"get_mla_metadata", "flash_mla_with_kvcache", "FlashMLASchedMeta"}
