"""Jobs for tests/test_rank_group.py, run in rank processes (which import this module by its name: a rank
gets the parent's ``sys.path``). Each takes ``rank``, ``group`` (the process group of the job's world)
and ``device``, like every rank job."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist


def all_reduce_unless_stalled(rank: int, group: Any, device: torch.device, stalled: int) -> float:
    """Rank ``stalled`` never joins the collective the others wait in."""
    if rank == stalled:
        time.sleep(3600)
    t = torch.ones(1, device=device)
    dist.all_reduce(t, group=group)
    return float(t.item())


def sleep_forever(rank: int, group: Any, device: torch.device) -> None:
    time.sleep(3600)


def die_on(rank: int, group: Any, device: torch.device, dying: int) -> int:
    if rank == dying:
        os._exit(7)
    return rank


def exchange_rows(rank: int, group: Any, device: torch.device, rows_from: list[int]) -> list[list[float]]:
    """The torch MoE backend's transport: rank ``r`` sends ``rows_from[r]`` rows to every rank (0 rows: it
    sends nothing, and receives what the others send)."""
    from deepport.backends.torch.moe_comm import all_to_all_rows, exchange_counts
    from deepport.kernels.moe_args import MoEGroup

    world = dist.get_world_size(group)
    grp = MoEGroup(group, rank, world, str(dist.get_backend(group)))
    mine = rows_from[rank]
    send = torch.full((mine * world, 3), float(rank), device=device)
    recv_counts = exchange_counts(torch.full((world,), mine, dtype=torch.int64, device=device), grp)
    got = all_to_all_rows(send, [mine] * world, recv_counts, grp)
    rows: list[list[float]] = got.cpu().tolist()
    return rows


def registered_backends(rank: int, group: Any, device: torch.device) -> list[str]:
    from deepport.dispatch import registry

    return [b.name for b in registry.all_backends()]
