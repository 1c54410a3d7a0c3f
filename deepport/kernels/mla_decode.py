"""MLA decode over a paged KV cache (FlashMLA's dense decode), the op every backend implements.

Public entry points: :func:`mla_decode` and :func:`get_mla_metadata`. Backends receive a validated
:class:`MLADecodeCall` and write into caller-visible outputs; they never see an unchecked input.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from deepport.dispatch import selection, settings
from deepport.dispatch.device import DeviceInfo, device_info
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import mla_schedule

OP = "mla_decode"
OP_VERSION = 1
INPUT_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MLADecodeSignature:
    """What dispatch sees of an MLA decode call (hashable; the batch size is left out on purpose,
    so a serving loop whose batch changes every step logs its automatic choice once)."""

    device: DeviceInfo
    dtype: torch.dtype
    s_q: int
    h_q: int
    h_kv: int
    d_qk: int
    d_v: int
    page_block_size: int
    causal: bool

    @property
    def num_q_tokens_per_head_k(self) -> int:
        return self.s_q * self.h_q // self.h_kv

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"{dt} s_q={self.s_q} h_q={self.h_q} h_kv={self.h_kv} d_qk={self.d_qk} d_v={self.d_v} "
                f"page={self.page_block_size} causal={self.causal}")


@dataclass(frozen=True)
class MLAMetadata:
    """The plan for one decode step (FlashMLA's ``get_mla_metadata``), reusable across layers.

    Valid only while the batch size, ``num_q_tokens_per_head_k``, ``num_heads_k`` and the *values*
    of ``cache_seqlens`` stay those it was planned for; :func:`mla_decode` checks this (the values
    too, unless ``DEEPPORT_CHECK_VALUES=0``). Backends may use the split-KV schedule or ignore it.

    - ``cache_seqlens``: int32 ``[b]``, host copy of the lengths planned for.
    - ``tile_scheduler_metadata``: int32 ``[num_sm_parts, 8]`` on the host (FlashMLA's record layout,
      see :func:`deepport.kernels.mla_schedule.plan_split_kv`).
    - ``num_splits``: int32 ``[b + 1]`` on the host, exclusive prefix sum of pieces per request.
    """

    batch: int
    num_q_tokens_per_head_k: int
    num_heads_k: int
    num_heads_q: int | None
    num_sm_parts: int
    cache_seqlens: torch.Tensor
    tile_scheduler_metadata: torch.Tensor
    num_splits: torch.Tensor


@dataclass(frozen=True)
class MLADecodeCall:
    """A validated MLA decode call, as handed to a backend's ``run(call, out, lse)``."""

    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    head_dim_v: int
    softmax_scale: float
    causal: bool
    metadata: MLAMetadata | None
    signature: MLADecodeSignature
    max_seqlen: int | None = None  # max(cache_seqlens), when the value checks read it (saves a backend a sync)

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def perf_shape(self) -> dict[str, int]:
        """The shape features automatic selection buckets this call by (:func:`perf_shape`)."""
        sig = self.signature
        return perf_shape({"b": self.batch, "s_q": sig.s_q, "h_q": sig.h_q, "h_kv": sig.h_kv})


def perf_shape(params: Mapping[str, Any]) -> dict[str, int]:
    """An MLA decode call's shape features for measured backend rankings (from a bound call, or from the
    ``params`` of a ``deepport bench`` config): ``q_rows`` (``s_q * h_q // h_kv``, query rows per KV head:
    memory-bound when small, compute-bound from about 128) and ``b``. KV lengths are left out: they live
    on the device, and reading them would cost a sync."""
    return {"q_rows": int(params["s_q"]) * int(params["h_q"]) // int(params["h_kv"]), "b": int(params["b"])}


class MLADecodeImpl(Protocol):
    """How a backend runs ``mla_decode``: ``run(call, out, lse) -> None`` (named by ``OpSupport.entry``).

    Write, in place, ``out`` ``[b, s_q, h_q, d_v]`` (``q``'s dtype) and ``lse`` ``[b, h_q, s_q]`` float32,
    both contiguous on ``q``'s device and poisoned (NaN) by the conformance suite before the call: every
    element must be written. Read only tokens ``t < cache_seqlens[i]`` through
    ``block_table[i, :ceil(L_i / page)]`` (the rest may hold NaN). Edges: a request with ``L = 0`` and a
    query that sees no token under ``causal`` get ``out = 0`` and ``lse = +inf``; ``h_q`` is a multiple of
    ``h_kv`` (query head ``h`` reads KV head ``h // (h_q // h_kv)``). Never modify an input. The call is
    validated (:class:`MLADecodeCall`); ``call.metadata`` may be ``None``.
    """

    def __call__(self, call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor, /) -> None: ...


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
) -> MLAMetadata:
    """Plan one decode step: call once per step, pass the result to every layer's :func:`mla_decode`.

    Args:
        cache_seqlens: int32 ``[b]``, KV length per request (on the device of the decode call).
        num_q_tokens_per_head_k: ``s_q * h_q // h_kv``, query rows served by each KV head.
        num_heads_k: ``h_kv``.
        num_heads_q: ``h_q`` (optional; recorded, checked against the call when given).
        is_fp8_kvcache, topk: FlashMLA's sparse FP8 decode; not part of this op (must stay defaults).

    Returns:
        :class:`MLAMetadata` holding FlashMLA's split-KV schedule for the device of ``cache_seqlens``.
    """
    seqlens = chk.expect_tensor("cache_seqlens", cache_seqlens)
    chk.expect_dtype("cache_seqlens", seqlens, (torch.int32,))
    chk.expect_ndim("cache_seqlens", seqlens, 1, "[batch]")
    chk.expect_data("cache_seqlens", seqlens)
    q_rows = chk.expect_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, minimum=1)
    h_kv = chk.expect_int("num_heads_k", num_heads_k, minimum=1)
    if num_heads_q is not None:
        chk.expect_int("num_heads_q", num_heads_q, minimum=1)
    if is_fp8_kvcache or topk is not None:
        raise InvalidArgumentError("is_fp8_kvcache", "sparse FP8 MLA decode is not part of mla_decode; "
                                   "expected is_fp8_kvcache=False and topk=None")
    host = seqlens.detach().to("cpu", copy=True)
    if bool((host < 0).any()):
        raise InvalidArgumentError("cache_seqlens", f"expected lengths >= 0, got min {int(host.min())}")
    parts = mla_schedule.num_sm_parts(device_info(seqlens.device).multiprocessors, h_kv, q_rows)
    records, splits = mla_schedule.plan_split_kv(host.numpy(), parts)
    plan = MLAMetadata(int(host.shape[0]), q_rows, h_kv, num_heads_q, parts, host,
                       torch.from_numpy(records), torch.from_numpy(splits))
    _plans[plan.tile_scheduler_metadata.data_ptr()] = plan
    return plan


_plans: weakref.WeakValueDictionary[int, MLAMetadata] = weakref.WeakValueDictionary()
"""Every live plan by the address of its ``tile_scheduler_metadata`` (a plan owns that tensor, so the
address is not reused while the entry exists)."""


def plan_of_tensors(tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor | None) -> MLAMetadata:
    """The live :class:`MLAMetadata` whose ``tile_scheduler_metadata`` (and ``num_splits``, when given) these
    tensors are, as ``torch.ops.deepport.mla_decode`` takes a plan (a custom op takes no Python object).

    Found by storage address (the plan's own tensors, a view, or the same tensor seen through
    ``torch.compile``: no copy, nothing read), else by value among the live plans (a copy, e.g. one made
    by ``torch.library.opcheck``; a copy on a GPU costs a device-to-host copy). Plans of other lengths
    can share tables, so a copy matching live plans that differ in anything raises instead of guessing.
    Returning the plan object itself keeps what backends cache per plan (device copies of the schedule)
    valid.
    """
    tsm = chk.expect_tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    splits = None if num_splits is None else chk.expect_tensor("num_splits", num_splits)
    plan = _plans.get(tsm.data_ptr())
    if plan is not None and _same_shapes(plan, tsm, splits) and (
            splits is None or splits.data_ptr() == plan.num_splits.data_ptr()):
        return plan
    host_tsm, host_splits = tsm.detach().cpu(), None if splits is None else splits.detach().cpu()
    found = [p for p in list(_plans.values()) if _same_shapes(p, tsm, splits)
             and torch.equal(p.tile_scheduler_metadata, host_tsm)
             and (host_splits is None or torch.equal(p.num_splits, host_splits))]
    if not found:
        raise InvalidArgumentError(
            "tile_scheduler_metadata", "expected the tensors of a live plan from deepport.get_mla_metadata "
            f"(md.tile_scheduler_metadata, md.num_splits), got {tsm.dtype} {tuple(tsm.shape)} on {tsm.device} "
            "matching no live plan (keep the MLAMetadata alive while its tensors are used)")
    if any(not _equivalent(found[0], p) for p in found[1:]):
        raise InvalidArgumentError(
            "tile_scheduler_metadata", f"a copy of a plan's tensors matches {len(found)} live plans made for "
            "different lengths or heads; pass the plan's own tensors (md.tile_scheduler_metadata, md.num_splits)")
    return found[0]


def _equivalent(a: MLAMetadata, b: MLAMetadata) -> bool:
    same = (a.batch, a.num_q_tokens_per_head_k, a.num_heads_k, a.num_heads_q, a.num_sm_parts) == (
        b.batch, b.num_q_tokens_per_head_k, b.num_heads_k, b.num_heads_q, b.num_sm_parts)
    return same and torch.equal(a.cache_seqlens, b.cache_seqlens)


def _same_shapes(plan: MLAMetadata, tsm: torch.Tensor, splits: torch.Tensor | None) -> bool:
    return tuple(tsm.shape) == tuple(plan.tile_scheduler_metadata.shape) and tsm.dtype == torch.int32 and (
        splits is None or (tuple(splits.shape) == tuple(plan.num_splits.shape) and splits.dtype == torch.int32))


def mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    metadata: MLAMetadata | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention decode over a paged KV cache (FlashMLA dense decode semantics).

    Args:
        q: ``[b, s_q, h_q, d_qk]``, bfloat16 or float16; last dimension contiguous, other strides free.
            ``s_q`` is the number of new query tokens per request (1, or more with MTP/speculation).
        k_cache: ``[num_blocks, page_block_size, h_kv, d_qk]``, same dtype and device as ``q``; last
            dimension contiguous. K and V share it: K is all ``d_qk`` channels, V the first
            ``head_dim_v``. Logical token ``t`` of request ``i`` lives at
            ``k_cache[block_table[i, t // page_block_size], t % page_block_size]``. Any page size
            (64 is the core profile); any ``d_qk``/``d_v`` a backend supports (576/512 is the core).
        block_table: int32 ``[b, max_num_blocks_per_seq]``, last dimension contiguous. Only the first
            ``ceil(cache_seqlens[i] / page_block_size)`` entries of row ``i`` are read and must lie in
            ``[0, num_blocks)``; the rest may hold anything.
        cache_seqlens: int32 ``[b]``, contiguous; KV length per request, ``0 <= L <= max_num_blocks_per_seq
            * page_block_size``. Tokens past ``L`` (the rest of the last page, unused pages) are never
            read, so they may hold NaN.
        head_dim_v: ``d_v``, ``1 <= d_v <= d_qk`` (512 in DeepSeek's MLA).
        softmax_scale: scale of the logits; default ``d_qk ** -0.5``.
        causal: bottom-right aligned causal mask across the ``s_q`` new tokens: query ``j`` sees tokens
            ``t <= L - s_q + j``. No effect when ``s_q == 1``.
        metadata: the plan from :func:`get_mla_metadata` for this step, or ``None``.
        backend: run on this backend (explicit: raises if it cannot, never falls back).
        out, lse: optional preallocated outputs (shapes and dtypes below, contiguous, on ``q``'s device,
            sharing no memory with the inputs or each other); written in place and returned.

    Returns:
        ``(out, lse)``: ``out [b, s_q, h_q, d_v]`` in ``q``'s dtype,
        ``out[i, j, h] = softmax(S) @ V`` with ``S = softmax_scale * q[i, j, h] @ K^T`` over the
        visible tokens of request ``i`` and KV head ``h // (h_q // h_kv)``; ``lse [b, h_q, s_q]``
        float32, the natural log of ``sum(exp(S))``. A query with no visible token (``L == 0``, or
        ``L < s_q - j`` under ``causal``) gives ``out = 0`` and ``lse = +inf``. ``b == 0`` returns
        empty tensors.

    Raises:
        deepport.errors.InvalidArgumentError: an argument breaks this contract (checked before any
            backend runs, values included unless ``DEEPPORT_CHECK_VALUES=0``).
        deepport.errors.BackendNotSupportedError / NoBackendError: no backend can run the call.
    """
    call = bind(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=softmax_scale,
                causal=causal, metadata=metadata, out=out, lse=lse)
    chosen, _ = selection.choose(OP, call.signature, backend, call.perf_shape)
    out, lse = _allocate_outputs(call, out, lse)
    if call.batch > 0:
        run: MLADecodeImpl = chosen.implementation(OP)
        run(call, out, lse)
    return out, lse


def bind(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    metadata: MLAMetadata | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> MLADecodeCall:
    """Validate the arguments of :func:`mla_decode` (all but ``backend=``, the outputs included) and
    build the call a backend receives."""
    q = chk.expect_tensor("q", q)
    chk.expect_dtype("q", q, INPUT_DTYPES)
    chk.expect_ndim("q", q, 4, "[batch, s_q, h_q, d_qk]")
    for dim, what in ((1, "s_q"), (2, "h_q"), (3, "d_qk")):
        chk.expect_positive("q", q, dim, what)
    chk.expect_last_dim_contiguous("q", q)
    b, s_q, h_q, d_qk = (int(x) for x in q.shape)

    k_cache = chk.expect_tensor("k_cache", k_cache)
    chk.expect_dtype("k_cache", k_cache, (q.dtype,))
    chk.expect_ndim("k_cache", k_cache, 4, "[num_blocks, page_block_size, h_kv, d_qk]")
    chk.expect_same_device("k_cache", k_cache, q.device, "q")
    chk.expect_positive("k_cache", k_cache, 1, "page_block_size")
    chk.expect_positive("k_cache", k_cache, 2, "h_kv")
    chk.expect_dim("k_cache", k_cache, 3, d_qk, "d_qk, the last dimension of `q`")
    chk.expect_last_dim_contiguous("k_cache", k_cache)
    num_blocks, page, h_kv = int(k_cache.shape[0]), int(k_cache.shape[1]), int(k_cache.shape[2])
    if h_q % h_kv != 0:
        raise InvalidArgumentError("q", f"expected h_q to be a multiple of h_kv={h_kv} (k_cache dimension 2), "
                                   f"got h_q={h_q}")

    block_table = chk.expect_tensor("block_table", block_table)
    chk.expect_dtype("block_table", block_table, (torch.int32,))
    chk.expect_ndim("block_table", block_table, 2, "[batch, max_num_blocks_per_seq]")
    chk.expect_same_device("block_table", block_table, q.device, "q")
    chk.expect_dim("block_table", block_table, 0, b, "batch, the first dimension of `q`")
    chk.expect_last_dim_contiguous("block_table", block_table)

    cache_seqlens = chk.expect_tensor("cache_seqlens", cache_seqlens)
    chk.expect_dtype("cache_seqlens", cache_seqlens, (torch.int32,))
    chk.expect_ndim("cache_seqlens", cache_seqlens, 1, "[batch]")
    chk.expect_same_device("cache_seqlens", cache_seqlens, q.device, "q")
    chk.expect_dim("cache_seqlens", cache_seqlens, 0, b, "batch, the first dimension of `q`")
    chk.expect_contiguous("cache_seqlens", cache_seqlens)

    d_v = chk.expect_int("head_dim_v", head_dim_v, minimum=1)
    if d_v > d_qk:
        raise InvalidArgumentError("head_dim_v", f"expected 1 <= head_dim_v <= d_qk={d_qk}, got {d_v}")
    scale = _softmax_scale(softmax_scale, d_qk)
    causal = chk.expect_bool("causal", causal)
    if metadata is not None:
        _check_metadata_shape(metadata, b, s_q * h_q // h_kv, h_kv, h_q)

    chk.expect_data("q", q)  # every other tensor is on q's device
    max_seqlen = None
    if settings.check_values() and b > 0:
        max_seqlen = _check_index_values(block_table, cache_seqlens, page, num_blocks, metadata)

    signature = MLADecodeSignature(device_info(q.device), q.dtype, s_q, h_q, h_kv, d_qk, d_v, page, causal)
    inputs = {"q": q, "k_cache": k_cache, "block_table": block_table, "cache_seqlens": cache_seqlens}
    if out is not None:
        _check_output("out", out, (b, s_q, h_q, d_v), q.dtype, q.device, "[batch, s_q, h_q, d_v]")
        chk.expect_no_overlap("out", out, inputs)
    if lse is not None:
        _check_output("lse", lse, (b, h_q, s_q), torch.float32, q.device, "[batch, h_q, s_q]")
        chk.expect_no_overlap("lse", lse, inputs if out is None else {**inputs, "out": out})
    return MLADecodeCall(q, k_cache, block_table, cache_seqlens, d_v, scale, causal, metadata, signature,
                         max_seqlen)


def _softmax_scale(softmax_scale: float | None, d_qk: int) -> float:
    if softmax_scale is None:
        default: float = float(d_qk) ** -0.5
        return default
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ArgumentTypeError("softmax_scale", f"expected a float or None, got {type(softmax_scale).__name__}")
    try:
        scale = float(softmax_scale)
    except OverflowError:  # an int beyond float range
        scale = math.inf
    if not math.isfinite(scale):
        raise InvalidArgumentError("softmax_scale", f"expected a finite number, got {softmax_scale}")
    return scale


def _check_metadata_shape(md: MLAMetadata, b: int, q_rows: int, h_kv: int, h_q: int) -> None:
    if not isinstance(md, MLAMetadata):
        raise ArgumentTypeError("metadata", f"expected MLAMetadata from get_mla_metadata, got {type(md).__name__}")
    planned = (md.batch, md.num_q_tokens_per_head_k, md.num_heads_k)
    if planned != (b, q_rows, h_kv) or (md.num_heads_q is not None and md.num_heads_q != h_q):
        raise InvalidArgumentError(
            "metadata", f"planned for (batch, num_q_tokens_per_head_k, num_heads_k) = {planned}, "
            f"the call has {(b, q_rows, h_kv)}{'' if md.num_heads_q is None else f', h_q={h_q}'}; "
            "call get_mla_metadata again for this step")


def _check_index_values(block_table: torch.Tensor, cache_seqlens: torch.Tensor, page: int,
                        num_blocks: int, metadata: MLAMetadata | None) -> int:
    """Lengths within the table, and block ids in range for every page a request uses; returns the
    longest length.

    Runs on the tensors' own device and synchronises once (three flags and the maximum length in one
    transfer); details are gathered on the host only when something is wrong.
    """
    lens = cache_seqlens.to(torch.int64)
    max_blocks = int(block_table.shape[1])
    capacity = max_blocks * page
    used = torch.arange(max_blocks, device=lens.device)[None, :] < ((lens.clamp(min=0) + page - 1) // page)[:, None]
    out_of_range = block_table < 0
    if num_blocks <= chk.INT32_MAX:  # a larger bound overflows the int32 comparison; every int32 id is below it
        out_of_range |= block_table >= num_blocks
    bad_ids = used & out_of_range
    flags = torch.stack([(lens < 0).any(), (lens > capacity).any(), bad_ids.any(), lens.max()]).cpu()
    if bool(flags[0]):
        i = int(torch.nonzero(lens < 0)[0, 0])
        raise InvalidArgumentError("cache_seqlens", f"expected lengths >= 0, got cache_seqlens[{i}] = {int(lens[i])}")
    if bool(flags[1]):
        i = int(torch.nonzero(lens > capacity)[0, 0])
        raise InvalidArgumentError(
            "cache_seqlens", f"expected lengths <= max_num_blocks_per_seq * page_block_size = {max_blocks} * "
            f"{page} = {capacity} (the capacity of `block_table`), got cache_seqlens[{i}] = {int(lens[i])}")
    if bool(flags[2]):
        i, j = (int(x) for x in torch.nonzero(bad_ids)[0])
        raise InvalidArgumentError(
            "block_table", f"expected block ids in [0, {num_blocks}) (k_cache has {num_blocks} blocks) for the "
            f"pages in use, got block_table[{i}, {j}] = {int(block_table[i, j])} (request {i} has length "
            f"{int(lens[i])}, so it uses {-(-int(lens[i]) // page)} pages)")
    if metadata is not None and not torch.equal(metadata.cache_seqlens, cache_seqlens.detach().cpu()):
        raise InvalidArgumentError("metadata", "planned for other cache_seqlens values than this call's; "
                                   "call get_mla_metadata again for this step")
    return int(flags[3])


def _allocate_outputs(call: MLADecodeCall, out: torch.Tensor | None,
                      lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The caller's outputs (already checked by :func:`bind`), or new ones where none were given."""
    sig, q = call.signature, call.q
    if out is None:
        out = torch.empty((call.batch, sig.s_q, sig.h_q, sig.d_v), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((call.batch, sig.h_q, sig.s_q), dtype=torch.float32, device=q.device)
    return out, lse


def _check_output(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device, layout: str) -> None:
    chk.expect_tensor(name, t)
    chk.expect_dtype(name, t, (dtype,))
    chk.expect_shape(name, t, shape, layout)
    chk.expect_same_device(name, t, device, "q")
    chk.expect_contiguous(name, t)


def example_signature(device: DeviceInfo) -> MLADecodeSignature:
    """The core-profile call (DeepSeek-V3 decode: bf16, 576/512, page 64, one KV head, 128 query heads)."""
    return MLADecodeSignature(device, torch.bfloat16, 1, 128, 1, 576, 512, 64, False)

