"""Entry point of one rank process of a :class:`deepport.conformance.rank_group.RankGroup`.

Run as ``python -m deepport.conformance.rank_worker HOST PORT KEY RANK WORLD DEVICE_TYPE STORE TIMEOUT``:
connects back to the parent, joins the process group (NCCL on CUDA device ``RANK``, else gloo) through
the file store, makes the subgroups of the first ``w`` ranks for every smaller ``w``, then runs the
parent's jobs (each on the group of its world size) until told to stop or the parent goes away.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import torch


def rank_main(argv: list[str]) -> None:
    host, port, key, rank_s, world_s, device_type, store, timeout_s = argv
    rank, world = int(rank_s), int(world_s)
    conn = Client((host, int(port)), authkey=bytes.fromhex(key))
    conn.send(rank)
    import torch.distributed as dist

    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device(device_type)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=float(timeout_s)))
    # the group of the first w ranks, for every w: jobs of a smaller world run on a prefix of the ranks
    groups = {w: dist.new_group(list(range(w))) for w in range(2, world)}
    groups[world] = dist.group.WORLD
    conn.send(("ready", rank))
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:
                return
            if job is None:
                return
            target, job_world, kwargs = job
            module_name, _, attr = target.partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), attr)
                group = groups.get(job_world) if job_world > 1 else None
                conn.send(("ok", fn(rank=rank, group=group, device=device, **kwargs)))
            except Exception as exc:  # reported to the parent, which fails the case
                where = traceback.extract_tb(exc.__traceback__)[-1]
                conn.send(("error", f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1:])
