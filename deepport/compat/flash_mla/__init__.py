"""FlashMLA's decode API (``flash_mla``) on deepport: ``get_mla_metadata`` and ``flash_mla_with_kvcache``.

Drop-in for the dense MLA decode of every FlashMLA generation callers use::

    from deepport.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache

    # 2025-02 .. 2025-09 (positional plan, two int32 tensors):
    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    # 2026-01 onwards (no arguments: an object planned lazily by the first call, and None):
    tile_scheduler_metadata, num_splits = get_mla_metadata()

    for layer in range(num_layers):
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv,
                                          tile_scheduler_metadata, num_splits, causal=True)

Every call runs :func:`deepport.mla_decode` (validation, then the backend deepport selects) with
deepport's plan; see :mod:`deepport.compat.flash_mla._schedule` for how the scheduling tensors map to
it. Differences from FlashMLA:

- The scheduling tensors are deepport's own encoding (same shapes and dtypes, marked); tensors made
  by the real FlashMLA are rejected with an error, never misread.
- The legacy form with arguments returns tensors (as FlashMLA did until 2025-09), the form without
  arguments a :class:`FlashMLASchedMeta` (as since 2026-01; FlashMLA 2026 also ignores arguments).
  Both results work with :func:`flash_mla_with_kvcache`.
- Reusing a plan across calls is checked: a call whose ``cache_seqlens`` values, batch or heads differ
  from the planned ones raises (FlashMLA re-checks only shapes and gives wrong results).
- deepport accepts more than FlashMLA's kernels (any page size, ``d_qk``/``d_v`` any backend supports,
  CPU and non-NVIDIA devices); FlashMLA's sparse FP8 decode (``indices``, ``is_fp8_kvcache``,
  ``attn_sink``, ``extra_*``, ``topk_length``), ``flash_mla_sparse_fwd`` and the SM100 prefill
  ``flash_attn_varlen_*`` are not part of deepport: the sparse arguments raise, the functions are absent
  (asking for one raises ``AttributeError`` with the reason).
- ``flash_mla.flash_mla_interface`` exists too (:mod:`deepport.compat.flash_mla.flash_mla_interface`),
  for callers that import from that module path. docs/COMPAT.md has the full table.
"""

from __future__ import annotations

import dataclasses
from typing import overload

import torch

import deepport
from deepport.compat._absent import module_getattr
from deepport.compat.flash_mla._absent import REASONS as _REASONS
from deepport.compat.flash_mla._schedule import plan_of, to_tensors
from deepport.errors import ArgumentTypeError, InvalidArgumentError

__all__ = ["FlashMLASchedMeta", "flash_mla_with_kvcache", "get_mla_metadata"]
__getattr__ = module_getattr(__name__, _REASONS)
__version__ = "1.0.0"  # the FlashMLA API generation emulated (flash_mla.__version__ of 2026-04)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The plan object of FlashMLA's no-argument ``get_mla_metadata()`` (2026-01 onwards).

    Empty until the first :func:`flash_mla_with_kvcache` call with it, which freezes ``config`` and
    plans from that call's ``cache_seqlens``; later calls must match ``config`` (checked, with the
    field that differs named). Reuse it for every layer of one decode step, and make a new one when
    the lengths change (deepport checks the values too). ``tile_scheduler_metadata`` (int32
    ``[num_sm_parts, 8]``) and ``num_splits`` (int32 ``[b + 1]``) are set by the first call, in
    deepport's encoding, for inspection only.
    """

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None
    plan: deepport.MLAMetadata | None = dataclasses.field(default=None, repr=False)


@overload
def get_mla_metadata() -> tuple[FlashMLASchedMeta, None]: ...


@overload
def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int | None = None,
                     num_heads_k: int | None = None, num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None, *, num_heads_per_head_k: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]: ...


def get_mla_metadata(cache_seqlens: torch.Tensor | None = None, num_q_tokens_per_head_k: int | None = None,
                     num_heads_k: int | None = None, num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None, *, num_heads_per_head_k: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | tuple[FlashMLASchedMeta, None]:
    """Plan one decode step; pass the result to every layer's :func:`flash_mla_with_kvcache`.

    Forms:

    - ``get_mla_metadata()`` -> ``(FlashMLASchedMeta(), None)``: planned by the first decode call.
    - ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
      is_fp8_kvcache=False, topk=None)`` -> ``(tile_scheduler_metadata, num_splits)``: planned now, with
      ``cache_seqlens`` int32 ``[b]``, ``num_q_tokens_per_head_k = s_q * h_q // h_kv`` (2025-02 keyword
      name: ``num_heads_per_head_k``), ``num_heads_k = h_kv``. Returns int32 ``[num_sm_parts, 8]``
      and int32 ``[b + 1]`` on ``cache_seqlens``' device (deepport's encoding, see the module
      docstring). ``is_fp8_kvcache``/``topk`` (sparse FP8 decode) raise: deepport has no sparse decode.
    """
    if num_heads_per_head_k is not None:
        if num_q_tokens_per_head_k is not None:
            raise InvalidArgumentError("num_heads_per_head_k", "expected either num_q_tokens_per_head_k or its "
                                       "2025-02 name num_heads_per_head_k, got both")
        num_q_tokens_per_head_k = num_heads_per_head_k
    if cache_seqlens is None:
        given = {"num_q_tokens_per_head_k": num_q_tokens_per_head_k, "num_heads_k": num_heads_k,
                 "num_heads_q": num_heads_q, "topk": topk}
        extra = [name for name, value in given.items() if value is not None] + (["is_fp8_kvcache"] * is_fp8_kvcache)
        if extra:
            raise InvalidArgumentError("cache_seqlens", f"expected a tensor when {', '.join(extra)} is given (the "
                                       "positional form), or no argument at all, got None")
        return FlashMLASchedMeta(), None
    for name, value in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if value is None:
            raise InvalidArgumentError(name, "expected an int with cache_seqlens (get_mla_metadata(cache_seqlens, "
                                       "s_q * h_q // h_kv, h_kv)), got None")
    assert num_q_tokens_per_head_k is not None and num_heads_k is not None
    plan = deepport.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                     is_fp8_kvcache=is_fp8_kvcache, topk=topk)
    return to_tensors(plan, cache_seqlens.device)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | FlashMLASchedMeta | None,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense MLA decode over a paged KV cache (FlashMLA's ``flash_mla_with_kvcache``), via :func:`deepport.mla_decode`.

    Args:
        q: ``[b, s_q, h_q, d_qk]`` bf16/fp16, last dimension contiguous.
        k_cache: ``[num_blocks, page_block_size, h_kv, d_qk]``, q's dtype; K = all channels, V = the
            first ``head_dim_v``.
        block_table: int32 ``[b, max_num_blocks_per_seq]``; cache_seqlens: int32 ``[b]`` (0 allowed).
        head_dim_v: ``d_v`` (512 for DeepSeek).
        tile_scheduler_metadata, num_splits: what :func:`get_mla_metadata` returned: the two tensors
            (``num_splits`` may also be ``None``), or the :class:`FlashMLASchedMeta` with ``None``.
            ``tile_scheduler_metadata=None`` (a deepport extension) decodes without a plan.
        softmax_scale: default ``d_qk ** -0.5``. causal: bottom-right aligned, no effect when ``s_q == 1``.
        is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
            extra_topk_length: FlashMLA's sparse FP8 decode, not in deepport: must stay False/None.
        backend: deepport backend to run on (explicit: raises if it cannot run the call).

    Returns:
        ``(out [b, s_q, h_q, d_v] in q's dtype, lse [b, h_q, s_q] float32)``: natural-log LSE of the
        scaled logits; a query with nothing to attend gives ``out = 0``, ``lse = +inf``.
    """
    sparse = {"indices": indices, "attn_sink": attn_sink, "extra_k_cache": extra_k_cache,
              "extra_indices_in_kvcache": extra_indices_in_kvcache, "topk_length": topk_length,
              "extra_topk_length": extra_topk_length}
    for name, value in sparse.items():
        if value is not None:
            raise InvalidArgumentError(name, "FlashMLA's sparse FP8 decode is not part of deepport (only the dense "
                                       f"bf16/fp16 decode is); expected None, got {type(value).__name__}")
    if is_fp8_kvcache:
        raise InvalidArgumentError("is_fp8_kvcache", "FlashMLA's FP8 KV cache (sparse decode) is not part of "
                                   "deepport; expected False, got True")
    if block_table is None or cache_seqlens is None:
        raise InvalidArgumentError("block_table" if block_table is None else "cache_seqlens",
                                   "expected a tensor for the dense decode, got None")
    plan = _plan(q, k_cache, cache_seqlens, causal, tile_scheduler_metadata, num_splits)
    out, lse = deepport.mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=softmax_scale,
                                   causal=causal, metadata=plan, backend=backend)
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta) and not tile_scheduler_metadata.have_initialized:
        _freeze(tile_scheduler_metadata, plan, q, k_cache, causal)  # only once a call with it succeeded
    return out, lse


def _plan(q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, causal: bool,
          tile_scheduler_metadata: object, num_splits: object) -> deepport.MLAMetadata | None:
    """deepport's plan for the call from whichever scheduling object the caller passed."""
    for t in (q, k_cache):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return None  # mla_decode's own checks report it
    _, s_q, h_q = (int(x) for x in q.shape[:3])
    h_kv = int(k_cache.shape[2])
    if tile_scheduler_metadata is None:
        if num_splits is not None:
            raise InvalidArgumentError("num_splits", "expected None without tile_scheduler_metadata, got a tensor")
        return None
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise InvalidArgumentError("num_splits", "expected None with a FlashMLASchedMeta (get_mla_metadata() "
                                       f"returns (FlashMLASchedMeta, None)), got {type(num_splits).__name__}")
        return _lazy_plan(tile_scheduler_metadata, q, k_cache, cache_seqlens, causal)
    if not isinstance(tile_scheduler_metadata, torch.Tensor):
        raise ArgumentTypeError("tile_scheduler_metadata", "expected what get_mla_metadata returned (a tensor or a "
                                f"FlashMLASchedMeta) or None, got {type(tile_scheduler_metadata).__name__}")
    if h_kv <= 0 or h_q % h_kv != 0:
        return None  # mla_decode reports the head mismatch
    return plan_of(tile_scheduler_metadata, num_splits, cache_seqlens, s_q * h_q // h_kv, h_kv, h_q)


def _config(q: torch.Tensor, k_cache: torch.Tensor, causal: bool) -> FlashMLASchedMeta.Config:
    b, s_q, h_q = (int(x) for x in q.shape[:3])
    return FlashMLASchedMeta.Config(b, s_q, h_q, int(k_cache.shape[1]), int(k_cache.shape[2]), bool(causal), False,
                                    None, None, None)


def _lazy_plan(meta: FlashMLASchedMeta, q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               causal: bool) -> deepport.MLAMetadata | None:
    """The plan of a :class:`FlashMLASchedMeta`: made from this call when it is still empty (stored by
    :func:`_freeze` after the decode succeeded), else checked against the frozen config."""
    _, s_q, h_q = (int(x) for x in q.shape[:3])
    h_kv = int(k_cache.shape[2])
    if not meta.have_initialized or meta.config is None:
        if h_kv <= 0 or h_q % h_kv != 0:
            return None  # mla_decode reports the head mismatch
        return deepport.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, h_q)
    config = _config(q, k_cache, causal)
    for field in dataclasses.fields(FlashMLASchedMeta.Config):
        planned, got = getattr(meta.config, field.name), getattr(config, field.name)
        if planned != got:
            raise InvalidArgumentError(
                "tile_scheduler_metadata", f"this FlashMLASchedMeta was initialised with {field.name}={planned!r}, "
                f"the call has {field.name}={got!r}; use one FlashMLASchedMeta per decode step and configuration")
    return meta.plan


def _freeze(meta: FlashMLASchedMeta, plan: deepport.MLAMetadata | None, q: torch.Tensor, k_cache: torch.Tensor,
            causal: bool) -> None:
    assert plan is not None
    meta.tile_scheduler_metadata, meta.num_splits = to_tensors(plan, q.device)
    meta.config, meta.plan, meta.have_initialized = _config(q, k_cache, causal), plan, True


# Upstream's package imports its interface module, so ``flash_mla.flash_mla_interface`` resolves after
# ``import flash_mla``; the same here (last, as that module imports this one's names).
from deepport.compat.flash_mla import flash_mla_interface  # noqa: E402, F401
