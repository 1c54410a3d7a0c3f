"""The FlashMLA module path and names the compat audit added: ``flash_mla.flash_mla_interface``,
all-keyword calls as integrations write them, and the upstream names left out saying why."""

from __future__ import annotations

import pytest
import torch
from test_compat_flash_mla import assert_close_to_reference, reference_f64, upstream_inputs

from deepport.compat import flash_mla
from deepport.compat.flash_mla import flash_mla_interface
from deepport.errors import ArgumentTypeError

pytestmark = pytest.mark.usefixtures("clean_env")


def test_interface_module_path_runs_the_same_decode() -> None:
    from deepport.compat.flash_mla.flash_mla_interface import flash_mla_with_kvcache, get_mla_metadata

    assert flash_mla.flash_mla_interface is flash_mla_interface
    assert flash_mla_with_kvcache is flash_mla.flash_mla_with_kvcache and get_mla_metadata is flash_mla.get_mla_metadata
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    s_q, h_q, h_kv = q.shape[1], q.shape[2], blocked_k.shape[2]
    # the 2025-02 README's keyword spelling, then an all-keyword decode call as SGLang writes it
    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, num_heads_per_head_k=s_q * h_q // h_kv,
                                                           num_heads_k=h_kv)
    out, lse = flash_mla_with_kvcache(q=q, k_cache=blocked_k, block_table=block_table, cache_seqlens=cache_seqlens,
                                      head_dim_v=dv, tile_scheduler_metadata=tile_scheduler_metadata,
                                      num_splits=num_splits, softmax_scale=q.shape[-1] ** -0.5, causal=True)
    assert_close_to_reference(out, lse, reference_f64(q, blocked_k, block_table, cache_seqlens, dv, causal=True))
    sched_meta, none = flash_mla_interface.get_mla_metadata()
    again, again_lse = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, sched_meta, none,
                                              causal=True)
    assert isinstance(sched_meta, flash_mla_interface.FlashMLASchedMeta) and sched_meta.have_initialized
    assert torch.equal(again, out) and torch.equal(again_lse, lse)


@pytest.mark.parametrize("name", ["flash_mla_sparse_fwd", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
                                  "flash_attn_varlen_kvpacked_func"])
def test_upstream_names_left_out_say_why(name: str) -> None:
    for module in (flash_mla, flash_mla_interface):
        assert not hasattr(module, name)
        with pytest.raises(AttributeError, match="not provided by deepport"):
            getattr(module, name)


def test_the_current_readme_call() -> None:
    """FlashMLA's README (2026-04) plans with six positional arguments and decodes with
    ``(..., tile_scheduler_metadata, num_splits, is_causal, is_fp8_kvcache, indices)``: positionally that
    puts ``is_causal`` into ``softmax_scale`` (upstream would then scale by 1.0); deepport refuses the
    bool instead of computing something else, and the keyword spelling works."""
    q, blocked_k, block_table, cache_seqlens, dv = upstream_inputs()
    s_q, h_q, h_kv = q.shape[1], q.shape[2], blocked_k.shape[2]
    is_fp8, topk, is_causal = False, None, True
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, h_q,
                                                                     is_fp8, topk)
    with pytest.raises(ArgumentTypeError, match="softmax_scale"):
        flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tile_scheduler_metadata,
                                         num_splits, is_causal, is_fp8, None)
    out, lse = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, tile_scheduler_metadata,
                                                num_splits, causal=is_causal, is_fp8_kvcache=is_fp8, indices=None)
    assert_close_to_reference(out, lse, reference_f64(q, blocked_k, block_table, cache_seqlens, dv, causal=True))
