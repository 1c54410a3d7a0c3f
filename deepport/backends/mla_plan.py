"""The split-KV plan of ``get_mla_metadata`` turned into what the MLA decode kernels read, on the device.

Shared by the ``triton`` and ``hopper`` backends (both run one persistent program per part and walk
the same piece list).

FlashMLA's records (one per part: first/last request, first/end 64-token block, first split row)
are expanded on the host into a flat list of *pieces*, one per (part, request it touches), and put
on the device once per plan object (cached while the :class:`MLAMetadata` lives, so a serving loop
that reuses one plan across layers, or a CUDA graph replaying calls, copies nothing per call).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from deepport.kernels import mla_schedule
from deepport.kernels.mla_decode import MLADecodeCall, MLAMetadata

PIECE_FIELDS = 5  # int32 fields per piece: request, first token, end token (exclusive), split row, direct


@dataclass(frozen=True)
class DevicePlan:
    """A plan as the kernels read it (int32 tensors on the call's device).

    - ``pieces``: ``[num_pieces, 5]``: request, first token, end token (``<= cache_seqlens``), split
      row, ``direct`` (1 when the request is not cut: the piece writes ``out``/``lse`` itself).
    - ``part_ptr``: ``[num_parts + 1]``: part ``p`` runs pieces ``part_ptr[p] : part_ptr[p + 1]``.
    - ``num_splits``: ``[b + 1]``: request ``i``'s split rows are ``num_splits[i] : num_splits[i + 1]``.
    - ``cut``: ``[num_cut]``: the requests cut into several pieces (the combine kernel's work).
    """

    num_parts: int
    split_rows: int
    pieces: torch.Tensor
    part_ptr: torch.Tensor
    num_splits: torch.Tensor
    cut: torch.Tensor

    @property
    def num_cut(self) -> int:
        return int(self.cut.shape[0])


def expand_pieces(records: np.ndarray, num_splits: np.ndarray,
                  seqlens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pieces [n, 5], part_ptr [parts + 1])`` from FlashMLA-style records (see
    :func:`deepport.kernels.mla_schedule.plan_split_kv`); token ranges are clipped to the lengths."""
    b = int(seqlens.shape[0])
    block = mla_schedule.BLOCK_N
    blocks = -(-seqlens.astype(np.int64) // block)
    pieces: list[tuple[int, int, int, int, int]] = []
    part_ptr = [0]
    for rec in records:
        begin_req, end_req, begin_blk, end_blk, begin_split = (int(x) for x in rec[:5])
        if begin_req < b:
            for req in range(begin_req, end_req + 1):
                lo_blk = begin_blk if req == begin_req else 0
                hi_blk = end_blk if req == end_req else int(blocks[req])
                split_row = begin_split if req == begin_req else int(num_splits[req])
                direct = int(num_splits[req + 1] - num_splits[req] == 1)
                length = int(seqlens[req])
                pieces.append((req, min(lo_blk * block, length), min(hi_blk * block, length), split_row, direct))
        part_ptr.append(len(pieces))
    out = np.asarray(pieces, dtype=np.int32).reshape(len(pieces), PIECE_FIELDS)
    return out, np.asarray(part_ptr, dtype=np.int32)


def _build(records: np.ndarray, splits: np.ndarray, seqlens: np.ndarray, device: torch.device) -> DevicePlan:
    pieces, part_ptr = expand_pieces(records, splits, seqlens)
    cut = np.nonzero(np.diff(splits) > 1)[0].astype(np.int32)

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return DevicePlan(int(records.shape[0]), int(splits[-1]), put(pieces), put(part_ptr), put(splits), put(cut))


def _plan(seqlens: np.ndarray, md: MLAMetadata | None, parts: int, device: torch.device) -> DevicePlan:
    if md is not None and md.num_sm_parts == parts:
        return _build(md.tile_scheduler_metadata.numpy(), md.num_splits.numpy(), seqlens, device)
    records, splits = mla_schedule.plan_split_kv(seqlens, parts)
    return _build(records, splits, seqlens, device)


_cache: dict[tuple[int, str, int], DevicePlan] = {}
_lock = threading.Lock()


def _forget(key: tuple[int, str, int]) -> None:
    with _lock:
        _cache.pop(key, None)


def num_parts(call: MLADecodeCall, block_h: int, programs_per_sm: int, v_split: int = 1) -> int:
    """Parts of the batch for ``programs_per_sm`` programs per SM, each serving ``block_h`` query rows
    of one KV head and ``1 / v_split`` of the output channels (FlashMLA's ``num_sm_parts`` when
    ``block_h = 64``, one program per SM and ``v_split = 1``)."""
    sig = call.signature
    row_tiles = -(-sig.num_q_tokens_per_head_k // block_h)
    return max(sig.device.multiprocessors * programs_per_sm // (sig.h_kv * row_tiles * v_split), 1)


def device_plan(call: MLADecodeCall, parts: int) -> DevicePlan:
    """The call's split-KV plan over ``parts`` parts, on its device.

    With ``metadata``: its schedule when it was planned for ``parts`` parts, else the same greedy
    schedule (:func:`deepport.kernels.mla_schedule.plan_split_kv`) re-dealt to ``parts`` from the
    lengths it recorded; cached per (plan object, device, parts) for as long as the plan lives.
    Without: planned from ``cache_seqlens`` read on the host (a device-to-host copy per call).
    """
    device = call.q.device
    md = call.metadata
    if md is None:
        return _plan(call.cache_seqlens.cpu().numpy(), None, parts, device)
    key = (id(md), str(device), parts)
    with _lock:
        plan = _cache.get(key)
    if plan is None:
        plan = _plan(md.cache_seqlens.numpy(), md, parts, device)
        with _lock:
            _cache[key] = plan
        weakref.finalize(md, _forget, key)
    return plan
