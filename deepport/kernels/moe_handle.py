"""The routing record a dispatch returns and the matching combine consumes.

Handles are backend-neutral data: every field is canonical (defined by the op contracts), so a
handle made by one backend can drive another backend's combine or cached dispatch. Callers treat
them as opaque except for the documented fields.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class MoEHandle:
    """Routes of one normal dispatch on this rank.

    - ``topk_idx``: int64 ``[num_tokens, num_topk]``, a copy of the dispatched routing (global ids).
    - ``is_token_in_rank``: bool ``[num_tokens, world_size]``.
    - ``send_counts[r]``: tokens this rank sent to rank ``r``; ``recv_counts[r]``: tokens received
      from rank ``r`` (Python ints; received rows are grouped by source rank in this order).
    - ``recv_src_idx``: int64 ``[num_recv]``, each received row's token index on its source rank.
    - ``recv_topk_idx``: int64 ``[num_recv, num_topk]``, local expert ids or -1.
    - ``num_recv_tokens_per_expert``: per local expert, distinct received tokens (unaligned).
    """

    group: Any
    rank: int
    world_size: int
    num_experts: int
    hidden: int
    expert_alignment: int
    topk_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    recv_src_idx: torch.Tensor
    recv_topk_idx: torch.Tensor
    num_recv_tokens_per_expert: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.topk_idx.shape[0])

    @property
    def num_topk(self) -> int:
        return int(self.topk_idx.shape[1])

    @property
    def num_recv(self) -> int:
        return int(self.recv_src_idx.shape[0])

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def device(self) -> torch.device:
        return self.topk_idx.device

    def recv_rank_prefix(self) -> list[int]:
        """Boundaries of the source-rank blocks of the received rows: ``[0, c0, c0+c1, ..., num_recv]``."""
        out = [0]
        for c in self.recv_counts:
            out.append(out[-1] + c)
        return out


@dataclass(frozen=True, eq=False)
class MoEExpandedHandle:
    """Routes of one expanded dispatch: the normal routes plus the expansion.

    - ``expanded_src_row``: int64 ``[num_expanded]``, the received-token row each expanded row copies
      (-1 on alignment padding).
    - ``m_indices``: int32 ``[num_expanded]``, local expert of each row, -1 on padding.
    - ``weights``: float32 ``[num_expanded]``, per row the sum of the weights of the slots naming its
      expert (0 on padding).
    """

    routes: MoEHandle
    expanded_src_row: torch.Tensor
    m_indices: torch.Tensor
    weights: torch.Tensor

    @property
    def num_expanded(self) -> int:
        return int(self.m_indices.shape[0])


@dataclass(frozen=True, eq=False)
class OneProcessRoutes:
    """The routes of a dispatch in one process (``group=None``), described by its routing alone.

    Every field of :class:`MoEHandle` follows from ``topk_idx`` when one rank holds every expert, but
    the counts are host ints and the received rows have a data-dependent shape, so building them reads
    the routing on the host. A backend whose one-process low-latency dispatch never reads device values
    on the host (CUDA-graph capture) hands this record to :class:`MoELowLatencyHandle` instead of the
    built routes: :meth:`build` runs only when someone reads ``handle.routes``.

    - ``topk_idx``: int64 ``[num_tokens, num_topk]``, a copy of the dispatched routing (global ids).
    """

    topk_idx: torch.Tensor
    num_experts: int
    hidden: int
    expert_alignment: int = 1

    group: Any = None
    rank: int = 0
    world_size: int = 1

    def build(self) -> MoEHandle:
        """The :class:`MoEHandle` of these routes (one device-to-host copy of the counts)."""
        idx, experts = self.topk_idx, self.num_experts
        target = torch.where(idx >= 0, idx, experts)  # -1 goes to a dropped sentinel column
        selects = torch.zeros((idx.shape[0], experts + 1), dtype=torch.bool, device=idx.device)
        selects.scatter_(1, target, True)
        selects = selects[:, :experts]
        in_rank = selects.any(dim=1, keepdim=True)
        tokens = in_rank[:, 0].nonzero()[:, 0]
        num_recv = int(tokens.shape[0])
        per_expert = tuple(int(v) for v in selects.sum(dim=0).tolist())
        return MoEHandle(None, 0, 1, experts, self.hidden, self.expert_alignment, idx, in_rank, (num_recv,),
                         (num_recv,), tokens, idx[tokens], per_expert)


@dataclass(frozen=True, eq=False)
class MoELowLatencyHandle:
    """Routes of one low-latency dispatch: the normal routes plus the packed expert rows.

    - ``source``: the normal routes (:class:`MoEHandle`), or for a one-process dispatch possibly a
      :class:`OneProcessRoutes` that builds them when :attr:`routes` is first read. The static facts
      (``group``, ``world_size``, ``num_experts``, ``topk_idx`` ...) are read from it without
      building anything, so a combine that needs only them runs without a device-to-host copy.
    - ``max_tokens_per_rank``: ``T_max``, the per-rank token capacity (same on every rank).
    - ``recv_count``: int32 ``[num_local_experts]``, valid rows per expert.
    - ``packed_src_row``: int64 ``[num_local_experts, world_size * T_max]``, the received-token row
      each packed row holds (-1 past ``recv_count``).
    """

    source: MoEHandle | OneProcessRoutes
    max_tokens_per_rank: int
    recv_count: torch.Tensor
    packed_src_row: torch.Tensor

    @functools.cached_property
    def routes(self) -> MoEHandle:
        """The normal routes (built on first read from a :class:`OneProcessRoutes` source)."""
        source = self.source
        return source if isinstance(source, MoEHandle) else source.build()

    @property
    def group(self) -> Any:
        return self.source.group

    @property
    def world_size(self) -> int:
        return self.source.world_size

    @property
    def num_experts(self) -> int:
        return self.source.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def topk_idx(self) -> torch.Tensor:
        """int64 ``[num_tokens, num_topk]``, the dispatched routing of this rank."""
        return self.source.topk_idx

    @property
    def num_tokens(self) -> int:
        return int(self.topk_idx.shape[0])

    @property
    def num_topk(self) -> int:
        return int(self.topk_idx.shape[1])

    @property
    def device(self) -> torch.device:
        return self.topk_idx.device
