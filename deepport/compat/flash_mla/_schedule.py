"""FlashMLA's scheduling tensors in deepport's encoding, and back to deepport's plan.

FlashMLA's legacy ``get_mla_metadata`` returns two int32 tensors, ``tile_scheduler_metadata``
``[num_sm_parts, 8]`` and ``num_splits`` ``[b + 1]``, that callers treat as opaque and pass to every
layer (often through persistent CUDA-graph buffers they copy into). deepport's plan
(:class:`deepport.MLAMetadata`) holds the same two tables: FlashMLA's record layout and greedy
schedule, with deepport's own field encoding (``begin_split_idx`` absolute, blocks not tokens; see
:func:`deepport.kernels.mla_schedule.plan_split_kv`). The compat layer hands out deepport's tables
with the same shapes and dtypes, and writes :data:`MARK` into field 7 of every record (FlashMLA's
unused pad field) so that tables from elsewhere are recognised and rejected instead of misread.

Back from tensors to a plan:

- the very tensor objects this module returned carry their plan (an attribute): used as is;
- a copy (e.g. a CUDA-graph buffer the caller copied into) is checked: every record must carry the
  mark, and the tables must equal the plan deepport makes for the call's own ``cache_seqlens`` and
  heads (one device-to-host copy of each table). A table planned for other lengths is rejected with
  the same message as a stale :class:`deepport.MLAMetadata`.
"""

from __future__ import annotations

import torch

import deepport
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk

MARK = 0x44504D31
"""Written into field 7 (FlashMLA's pad) of each record: ASCII ``DPM1``, "deepport MLA schedule v1"."""
RECORD_SIZE = 8
_PLAN_ATTR = "_deepport_mla_plan"


def to_tensors(plan: deepport.MLAMetadata, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])`` on ``device``,
    marked, each carrying ``plan``."""
    records = plan.tile_scheduler_metadata.clone()
    records[:, RECORD_SIZE - 1] = MARK
    tile_scheduler_metadata = records.to(device)
    num_splits = plan.num_splits.to(device, copy=True)
    setattr(tile_scheduler_metadata, _PLAN_ATTR, plan)
    setattr(num_splits, _PLAN_ATTR, plan)
    return tile_scheduler_metadata, num_splits


def plan_of(tile_scheduler_metadata: object, num_splits: object, cache_seqlens: torch.Tensor,
            num_q_tokens_per_head_k: int, num_heads_k: int, num_heads_q: int) -> deepport.MLAMetadata:
    """deepport's plan for a call given FlashMLA-style scheduling tensors (see the module docstring)."""
    tsm = chk.expect_tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    plan: deepport.MLAMetadata | None = getattr(tsm, _PLAN_ATTR, None)
    if plan is not None and (num_splits is None or getattr(num_splits, _PLAN_ATTR, None) is plan):
        return plan
    chk.expect_dtype("tile_scheduler_metadata", tsm, (torch.int32,))
    chk.expect_ndim("tile_scheduler_metadata", tsm, 2, "[num_sm_parts, 8]")
    chk.expect_dim("tile_scheduler_metadata", tsm, 1, RECORD_SIZE, "fields per record")
    records = tsm.detach().to("cpu")
    if records.shape[0] == 0 or not bool((records[:, RECORD_SIZE - 1] == MARK).all()):
        raise InvalidArgumentError(
            "tile_scheduler_metadata", "expected the schedule returned by deepport.compat.flash_mla.get_mla_metadata "
            f"(each record carries deepport's mark {MARK:#x} in field 7), got an int32 {tuple(tsm.shape)} table "
            "without it. FlashMLA's own schedule is opaque and is never read by deepport: call "
            "deepport.compat.flash_mla.get_mla_metadata (or pass the object of the no-argument form)")
    planned = deepport.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q)
    same = tuple(records.shape) == tuple(planned.tile_scheduler_metadata.shape) and torch.equal(
        records[:, : RECORD_SIZE - 1], planned.tile_scheduler_metadata[:, : RECORD_SIZE - 1])
    if num_splits is not None:
        splits = chk.expect_tensor("num_splits", num_splits)
        chk.expect_dtype("num_splits", splits, (torch.int32,))
        chk.expect_ndim("num_splits", splits, 1, "[batch + 1]")
        host = splits.detach().to("cpu")
        same = same and tuple(host.shape) == tuple(planned.num_splits.shape) and torch.equal(host, planned.num_splits)
    if not same:
        raise InvalidArgumentError(
            "tile_scheduler_metadata", "planned for other cache_seqlens values, batch or heads than this call's "
            f"(batch={int(cache_seqlens.shape[0])}, num_q_tokens_per_head_k={num_q_tokens_per_head_k}, "
            f"num_heads_k={num_heads_k}); call get_mla_metadata again for this step")
    return planned
