"""Entry point of one rank process of a :class:`deepport.conformance.rank_group.RankGroup`.

Run as ``python -m deepport.conformance.rank_worker CONFIG`` (``CONFIG``: JSON with ``host``, ``port``,
``key``, ``rank``, ``world``, ``device_type``, ``store``, ``collective_timeout_s``). It connects back to
the parent, joins the process group (NCCL on CUDA device ``rank``, communicators created eagerly;
else gloo) through the file store, makes the subgroups of the first ``w`` ranks for every smaller
``w``, runs one warm-up ``all_reduce`` on every group it belongs to, then runs the parent's jobs
(each on the group of its world size) until told to stop or the parent goes away.

Messages to the parent (tuples): ``("hello", rank)``, ``("phase", text)`` whenever it enters a phase
(each start step; each job; every ``torch.distributed`` collective a job issues, numbered),
``("ready", rank)``, and per job ``("ok", result)``, ``("not_supported", (op, backend, reasons))`` when the
backend declares it cannot run the call (:class:`~deepport.errors.BackendNotSupportedError`: a verdict,
not a failure), or ``("error", text)``. Every collective has the
process group's timeout (``collective_timeout_s``); on ``SIGUSR1`` the process writes every thread's
Python stack to its stderr (the parent's per-rank log), which the parent quotes when a rank stalls.
The process exits by itself when its parent dies, and within a few seconds of being told to stop.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Client, Connection
from typing import Any

import torch

from deepport.errors import BackendNotSupportedError

# the collectives a job may issue: each one reports a numbered phase before it runs
TRACED_COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_gather_object",
                      "all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
                      "broadcast_object_list", "barrier", "gather", "scatter", "send", "recv", "isend", "irecv",
                      "batch_isend_irecv")
SHUTDOWN_GRACE_S = 5.0  # destroy_process_group may block on a broken NCCL communicator: exit anyway


class Reporter:
    """Sends this rank's phases to the parent; counts the collectives of the current job."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.job, self.collectives = conn, "", 0

    def phase(self, text: str) -> None:
        with contextlib.suppress(OSError):  # a parent that went away is noticed by the job loop
            self.conn.send(("phase", text))

    def start_job(self, label: str) -> None:
        self.job, self.collectives = label, 0
        self.phase(f"job {label}: running")

    def collective(self, name: str) -> None:
        self.collectives += 1
        self.phase(f"job {self.job}: {name} #{self.collectives} issued")


def trace_collectives(dist: Any, reporter: Reporter) -> None:
    """Wrap ``torch.distributed``'s collectives so each reports a phase (looked up at call time by every
    ``dist.<collective>(...)``, so backends need no change)."""
    for name in TRACED_COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def traced(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kwargs: Any) -> Any:
            reporter.collective(_name)
            return _fn(*args, **kwargs)

        setattr(dist, name, functools.wraps(fn)(traced))


def _exit_when_orphaned(parent_pid: int) -> None:
    """A rank never outlives the process that started it (it would hold a GPU and the log's file)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="deepport-rank-parent-watch").start()


def _exit_after(seconds: float) -> None:
    timer = threading.Timer(seconds, lambda: os._exit(0))
    timer.daemon = True
    timer.start()


def _job_error(exc: BaseException, reporter: Reporter) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    at = f" (at {where.filename}:{where.lineno})" if where else ""
    collective = f", after {reporter.collectives} collective(s)" if reporter.collectives else ""
    return f"{type(exc).__name__}: {exc}{at} [job {reporter.job}{collective}]"


def rank_main(config: dict[str, Any]) -> None:
    rank, world, device_type = int(config["rank"]), int(config["world"]), str(config["device_type"])
    _exit_when_orphaned(os.getppid())
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    conn = Client((config["host"], int(config["port"])), authkey=bytes.fromhex(config["key"]))
    conn.send(("hello", rank))
    reporter = Reporter(conn)
    reporter.phase("importing torch.distributed")
    import torch.distributed as dist

    trace_collectives(dist, reporter)
    extra: dict[str, Any] = {}
    reporter.phase(f"selecting the {device_type} device")
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        extra["device_id"] = device  # NCCL communicators are created now, inside the start's timeout
    else:
        device = torch.device(device_type)
    comm = "nccl" if device_type == "cuda" else "gloo"
    reporter.phase(f"joining the {comm} process group of {world} ranks (init_process_group)")
    dist.init_process_group(comm, init_method=f"file://{config['store']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=float(config["collective_timeout_s"])), **extra)
    reporter.phase("creating the subgroups of the first w ranks")
    groups = {w: dist.new_group(list(range(w))) for w in range(2, world)}
    groups[world] = dist.group.WORLD
    reporter.job = "warm-up"
    for w, group in sorted(groups.items()):
        if rank < w:
            probe = torch.ones(1, device=device)
            dist.all_reduce(probe, group=group)
            if int(probe.item()) != w:
                raise RuntimeError(f"warm-up all_reduce on the group of {w} ranks gave {probe.item()}, expected {w}")
    conn.send(("ready", rank))
    try:
        _serve(conn, reporter, rank, groups, device)
    finally:
        reporter.phase("shutting down (destroy_process_group)")
        _exit_after(SHUTDOWN_GRACE_S)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _serve(conn: Connection, reporter: Reporter, rank: int, groups: dict[int, Any], device: torch.device) -> None:
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        target, job_world, kwargs, label = job
        reporter.start_job(label)
        module_name, _, attr = target.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
            group = groups.get(job_world) if job_world > 1 else None
            value = fn(rank=rank, group=group, device=device, **kwargs)
        except BackendNotSupportedError as exc:  # the backend's declaration excludes the call: a verdict
            conn.send(("not_supported", (exc.op, exc.backend, exc.reasons)))
            continue
        except Exception as exc:  # reported to the parent, which fails the job
            conn.send(("error", _job_error(exc, reporter)))
            continue
        reporter.phase(f"job {label}: sending the result")
        conn.send(("ok", value))


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
