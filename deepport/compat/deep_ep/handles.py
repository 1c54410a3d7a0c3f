"""DeepEP's communication handles as tuples, each carrying deepport's routing record.

DeepEP callers keep handles opaque except for a few documented entries (its tests read
``handle[0]`` of a dispatch, and ``handle[0]``/``handle[1]`` of a low-latency dispatch). These tuples
hold those entries with DeepEP's meaning and dtypes; entries that describe DeepEP's channel schedule
(which deepport does not have) are ``None``. Each tuple also carries deepport's record (``routes``),
which is what combine and cached dispatch use: a tuple made by the real DeepEP is rejected.
"""

from __future__ import annotations

import torch

from deepport import MoEHandle, MoELowLatencyHandle
from deepport.errors import ArgumentTypeError


class DispatchHandle(tuple):  # type: ignore[type-arg]
    """The handle of a normal dispatch: DeepEP's intranode 6-tuple ``(rank_prefix_matrix, None, None,
    recv_src_idx, is_token_in_rank, None)``.

    - ``rank_prefix_matrix``: int32 ``[R, R]``, entry ``[i][j]`` = tokens rank ``j`` received from ranks
      ``0..i`` (so column ``rank`` bounds this rank's received rows by source rank).
    - ``recv_src_idx``: int32 ``[num_recv]``, each received row's token index on its source rank.
    - ``is_token_in_rank``: bool ``[num_tokens, R]``, where this rank's tokens went.

    ``routes`` is deepport's :class:`deepport.MoEHandle`; ``num_worst_tokens`` the padding the dispatch
    returned its outputs with (0: none).
    """

    routes: MoEHandle
    num_worst_tokens: int

    def __new__(cls, routes: MoEHandle, rank_prefix_matrix: torch.Tensor, num_worst_tokens: int) -> DispatchHandle:
        entries = (rank_prefix_matrix, None, None, routes.recv_src_idx.to(torch.int32), routes.is_token_in_rank, None)
        handle = super().__new__(cls, entries)
        handle.routes, handle.num_worst_tokens = routes, num_worst_tokens
        return handle


class LowLatencyHandle(tuple):  # type: ignore[type-arg]
    """The handle of a low-latency dispatch: DeepEP's ``(src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)``.

    - ``src_info``: int32 ``[L, R * T_max]``, each packed row's token index on its source rank (-1
      past ``recv_count``).
    - ``layout_range``: int64 ``[L, R]``, ``(begin << 32) | count``: expert ``e``'s rows from rank ``r``
      are rows ``begin .. begin + count - 1`` (deepport orders them by source rank, then token).

    ``ll`` is deepport's :class:`deepport.MoELowLatencyHandle`.
    """

    ll: MoELowLatencyHandle

    def __new__(cls, ll: MoELowLatencyHandle, hidden: int) -> LowLatencyHandle:
        routes = ll.routes
        packed = ll.packed_src_row
        valid = packed >= 0
        safe = packed.clamp(min=0)
        if routes.num_recv > 0:
            src_info = torch.where(valid, routes.recv_src_idx.to(packed.device)[safe], -1)
            rank_of_row = torch.repeat_interleave(torch.arange(routes.world_size, device=packed.device),
                                                  torch.tensor(routes.recv_counts, device=packed.device))
            src_rank = torch.where(valid, rank_of_row[safe], routes.world_size)
        else:
            src_info = torch.full_like(packed, -1)
            src_rank = torch.full_like(packed, routes.world_size)
        counts = torch.zeros((packed.shape[0], routes.world_size + 1), dtype=torch.int64, device=packed.device)
        counts.scatter_add_(1, src_rank, torch.ones_like(src_rank))
        counts = counts[:, : routes.world_size]
        begin = torch.cumsum(counts, dim=1) - counts
        layout_range = (begin << 32) | counts
        entries = (src_info.to(torch.int32), layout_range, ll.max_tokens_per_rank, hidden, routes.num_experts)
        handle = super().__new__(cls, entries)
        handle.ll = ll
        return handle


def routes_of(handle: object) -> DispatchHandle:
    if not isinstance(handle, DispatchHandle):
        raise ArgumentTypeError("handle", "expected the handle returned by this module's Buffer.dispatch, got "
                                f"{type(handle).__name__} (a handle from DeepEP itself cannot be used)")
    return handle


def low_latency_of(handle: object) -> LowLatencyHandle:
    if not isinstance(handle, LowLatencyHandle):
        raise ArgumentTypeError("handle", "expected the handle returned by this module's Buffer.low_latency_dispatch, "
                                f"got {type(handle).__name__} (a handle from DeepEP itself cannot be used)")
    return handle
