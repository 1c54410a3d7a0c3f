"""The two small collectives the DeepEP shims need beyond deepport's ops (over the Buffer's group)."""

from __future__ import annotations

from typing import Any

import torch


def gather_counts(counts: tuple[int, ...], group: Any, device: torch.device) -> torch.Tensor:
    """int64 ``[R, R]``: row ``j`` = rank ``j``'s ``counts`` (one all-gather; ``group=None``: one row)."""
    mine = torch.tensor(counts, dtype=torch.int64, device=device)
    if group is None:
        return mine[None, :]
    import torch.distributed as dist

    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return torch.stack(rows)


def all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """A summed copy of ``t`` over the group (``group=None``: a copy)."""
    total = t.clone()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, group=group)
    return total
