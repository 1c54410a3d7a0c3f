"""``torch.ops.deepport.mla_decode`` and ``mla_decode_out``: :func:`deepport.mla_decode` as torch custom ops.

Schemas (shapes and semantics: :func:`deepport.mla_decode`)::

    mla_decode(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v,
               float? softmax_scale=None, bool causal=False, Tensor? tile_scheduler_metadata=None,
               Tensor? num_splits=None) -> (Tensor out, Tensor lse)
    mla_decode_out(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v,
                   Tensor(a!) out, Tensor(b!) lse, float? softmax_scale=None, bool causal=False,
                   Tensor? tile_scheduler_metadata=None, Tensor? num_splits=None) -> ()

``out`` is ``[b, s_q, h_q, head_dim_v]`` in ``q``'s dtype, ``lse`` float32 ``[b, h_q, s_q]``. The plan is
passed as the tensors of a live :class:`deepport.MLAMetadata` (``md.tile_scheduler_metadata``,
``md.num_splits``; found again by :func:`deepport.kernels.mla_decode.plan_of_tensors`), or ``None``:
with a plan, a call under ``DEEPPORT_CHECK_VALUES=0`` reads nothing on the host (CUDA-graph capture).
"""

from __future__ import annotations

import torch

from deepport.errors import InvalidArgumentError
from deepport.kernels import mla_decode as op

_ARGS = "Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v"
_OPTIONS = "float? softmax_scale=None, bool causal=False, Tensor? tile_scheduler_metadata=None, Tensor? num_splits=None"


def _plan(tile_scheduler_metadata: torch.Tensor | None, num_splits: torch.Tensor | None) -> op.MLAMetadata | None:
    if tile_scheduler_metadata is None:
        if num_splits is not None:
            raise InvalidArgumentError("num_splits", "expected None without tile_scheduler_metadata, got a tensor")
        return None
    return op.plan_of_tensors(tile_scheduler_metadata, num_splits)


@torch.library.custom_op("deepport::mla_decode", mutates_args=(), schema=f"({_ARGS}, {_OPTIONS}) -> (Tensor, Tensor)")
def mla_decode(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float | None = None, causal: bool = False,
               tile_scheduler_metadata: torch.Tensor | None = None,
               num_splits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return op.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=softmax_scale,
                         causal=causal, metadata=_plan(tile_scheduler_metadata, num_splits))


@mla_decode.register_fake
def _mla_decode_fake(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                     head_dim_v: int, softmax_scale: float | None = None, causal: bool = False,
                     tile_scheduler_metadata: torch.Tensor | None = None,
                     num_splits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, s_q, h_q = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((b, s_q, h_q, head_dim_v)), q.new_empty((b, h_q, s_q), dtype=torch.float32)


@torch.library.custom_op("deepport::mla_decode_out", mutates_args=("out", "lse"),
                         schema=f"({_ARGS}, Tensor(a!) out, Tensor(b!) lse, {_OPTIONS}) -> ()")
def mla_decode_out(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                   head_dim_v: int, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float | None = None,
                   causal: bool = False, tile_scheduler_metadata: torch.Tensor | None = None,
                   num_splits: torch.Tensor | None = None) -> None:
    op.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=softmax_scale, causal=causal,
                  metadata=_plan(tile_scheduler_metadata, num_splits), out=out, lse=lse)


@mla_decode_out.register_fake
def _mla_decode_out_fake(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, head_dim_v: int, out: torch.Tensor, lse: torch.Tensor,
                         softmax_scale: float | None = None, causal: bool = False,
                         tile_scheduler_metadata: torch.Tensor | None = None,
                         num_splits: torch.Tensor | None = None) -> None:
    return None
