"""A group of rank processes joined by ``torch.distributed``, for multi-rank conformance cases.

``world_size`` plain Python processes (``subprocess``, not ``multiprocessing``: the harness may itself
run inside a daemonic isolation worker, which may not have ``multiprocessing`` children) join one
process group (gloo for CPU, NCCL for CUDA with GPU ``rank`` per rank) through a file store, then run
jobs: the parent sends every rank the same job (a ``"module:function"`` and keyword arguments), each
rank returns a picklable result. Tensors cross the process boundary only as ``(dtype, shape, bytes)``
(:func:`pack` / :func:`unpack`). One group per device type is started on first use and reused for
every case (a job of a smaller world runs on the first ranks, in their subgroup).

Nothing here can hang. Every multi-rank path has a deadline and fails with a
:class:`RankGroupError` (a :class:`TimeoutError` when a deadline passed) that names each rank, the
phase it was in (ranks report every start step, every job and every collective a job issues:
:mod:`~deepport.conformance.rank_worker`), for a stalled rank its Python stack, and the tail of its
log:

- start (spawn, connect, join the process group, warm-up collective on every group):
  ``start_timeout_s``; a rank that exits during the start fails it at once;
- a job: ``timeout_s`` for every rank to answer; a rank that raises or dies fails it at once (a rank
  whose backend declares it cannot run the call ends it too, with that
  :class:`~deepport.errors.BackendNotSupportedError` raised here: a ``not_supported`` verdict, as in one
  process);
- each collective: the process group's timeout, ``COLLECTIVE_TIMEOUT_FRACTION`` of ``timeout_s``, so
  a rank blocked on a peer that never joins reports its own error before the job's deadline;
- shutdown: ``SHUTDOWN_TIMEOUT_S``, then the rank is killed (with a warning naming it).

A failed job kills the group (the other ranks may be blocked in a collective the failed one never
joined); the next job starts a fresh one. Rank processes run in their own session with their output
in per-rank log files (never the parent's stdout/stderr: a pipe a rank inherits would keep a shell
pipeline such as ``pytest | tee`` open as long as the rank lives), get the parent's ``sys.path`` (so
they import what the parent imports, entry-point backends and test modules included) and exit by
themselves when the parent dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from multiprocessing.connection import Connection, Listener, wait
from typing import Any, NoReturn

import torch

from deepport.errors import BackendNotSupportedError

START_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 120.0
COLLECTIVE_TIMEOUT_FRACTION = 0.75
SHUTDOWN_TIMEOUT_S = 15.0
STACK_DUMP_WAIT_S = 1.0
LOG_TAIL_LINES = 12
Packed = tuple[str, tuple[int, ...], bytes]


class RankGroupError(RuntimeError):
    """A multi-rank phase (start, job, collective, shutdown) failed; the message names the ranks and phases."""


class RankGroupTimeout(RankGroupError, TimeoutError):
    """A multi-rank phase did not finish within its deadline."""


def pack(t: torch.Tensor) -> Packed:
    """A tensor as ``(dtype name, shape, raw bytes)`` (bit-exact, any dtype, no shared memory)."""
    t = t.detach().to("cpu").contiguous()
    shape = tuple(int(d) for d in t.shape)
    if t.numel() == 0:  # an empty tensor may keep a stride of 0, which a dtype view refuses
        return str(t.dtype).removeprefix("torch."), shape, b""
    return str(t.dtype).removeprefix("torch."), shape, t.view(torch.uint8).numpy().tobytes()


def unpack(p: Packed) -> torch.Tensor:
    dtype_name, shape, raw = p
    dtype = getattr(torch, dtype_name)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _receive(conn: Connection) -> tuple[str, Any]:
    message: tuple[str, Any] = conn.recv()
    return message


def child_environment() -> dict[str, str]:
    """This process's environment (NCCL settings included) with ``PYTHONPATH`` = this process's
    ``sys.path``, so a rank imports exactly what this process can."""
    env = dict(os.environ)
    paths = list(dict.fromkeys(os.path.abspath(p) if p else os.getcwd() for p in sys.path))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONFAULTHANDLER"] = "1"  # a fatal signal (segfault, abort) leaves a Python stack in the rank's log
    return env


class RankGroup:
    """``world_size`` rank processes in one torch.distributed group on ``device_type``."""

    def __init__(self, world_size: int, device_type: str, timeout_s: float = JOB_TIMEOUT_S,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.world_size, self.device_type, self.timeout_s = world_size, device_type, timeout_s
        key = os.urandom(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self._listener.address
        self._dir = tempfile.mkdtemp(prefix="deepport-ranks-")
        self._logs = [os.path.join(self._dir, f"rank{r}.log") for r in range(world_size)]
        self._conns: list[Connection | None] = [None] * world_size
        self._phase = ["starting the Python interpreter"] * world_size
        self._since = [time.monotonic()] * world_size
        self._procs: list[subprocess.Popen[bytes]] = []
        env = child_environment()
        for rank in range(world_size):
            config = {"host": host, "port": port, "key": key.hex(), "rank": rank, "world": world_size,
                      "device_type": device_type, "store": os.path.join(self._dir, "store"),
                      "collective_timeout_s": COLLECTIVE_TIMEOUT_FRACTION * timeout_s}
            with open(self._logs[rank], "wb") as log:
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "deepport.conformance.rank_worker", json.dumps(config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True))
        try:
            self._start(time.monotonic() + start_timeout_s, start_timeout_s)
        except BaseException:
            self.kill()
            raise

    # --- start -------------------------------------------------------------------------------------

    def _start(self, deadline: float, budget: float) -> None:
        what = f"starting {self.world_size} {self.device_type} rank processes"
        accepting = threading.Thread(target=self._accept_all, daemon=True, name="deepport-rank-accept")
        accepting.start()
        while any(c is None for c in self._conns):
            accepting.join(0.2)
            self._fail_if_exited(range(self.world_size), what)
            if time.monotonic() > deadline:
                self._timeout(what, budget, [r for r, c in enumerate(self._conns) if c is None])
        self._await(list(range(self.world_size)), deadline, budget, what, final="ready")

    def _accept_all(self) -> None:
        with contextlib.suppress(OSError, EOFError):  # the listener is closed when the start fails
            for _ in range(self.world_size):
                conn = self._listener.accept()
                _, rank = conn.recv()  # ("hello", rank)
                self._conns[int(rank)] = conn
                self._set_phase(int(rank), "connected")

    # --- messages -----------------------------------------------------------------------------------

    def _set_phase(self, rank: int, text: str) -> None:
        self._phase[rank], self._since[rank] = text, time.monotonic()

    def _await(self, ranks: list[int], deadline: float, budget: float, what: str, final: str) -> dict[int, Any]:
        """Read the ranks' messages until each sent ``final`` (``"ready"``, or ``"ok"`` for a job), keeping
        their phases; fail at once on an error or a death, and at ``deadline`` on silence."""
        answers: dict[int, Any] = {}
        while len(answers) < len(ranks):
            pending: dict[Connection, int] = {}
            for r in ranks:
                conn = self._conns[r]
                if r in answers:
                    continue
                if conn is None:
                    self._fail(what, r, "is not connected")
                pending[conn] = r
            for ready in wait(list(pending), min(0.5, max(0.0, deadline - time.monotonic()))):
                rank = pending[ready]  # type: ignore[index]
                try:
                    kind, value = _receive(ready)  # type: ignore[arg-type]
                except (EOFError, OSError):
                    self._fail(what, rank, f"died ({self._exit_status(rank)})")
                if kind == "phase":
                    self._set_phase(rank, value)
                elif kind == final:
                    answers[rank] = value
                    self._set_phase(rank, f"done: {what}")
                elif kind == "not_supported":
                    self._not_supported(what, rank, value)
                else:
                    self._fail(what, rank, f"failed: {value}")
            self._fail_if_exited([r for r in ranks if r not in answers], what)
            if len(answers) < len(ranks) and time.monotonic() > deadline:
                self._timeout(what, budget, [r for r in ranks if r not in answers])
        return answers

    def _exit_status(self, rank: int) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a closed connection: the process is exiting
            self._procs[rank].wait(timeout=2.0)
        code = self._procs[rank].poll()
        if code is None:
            return "connection lost, process still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _fail_if_exited(self, ranks: Iterable[int], what: str) -> None:
        for rank in ranks:
            if self._procs[rank].poll() is not None:
                self._fail(what, rank, f"exited ({self._exit_status(rank)})")

    # --- failures ------------------------------------------------------------------------------------

    def describe(self, rank: int) -> str:
        """``rank r of n (phase '...', 3.1 s ago)``."""
        age = time.monotonic() - self._since[rank]
        return f"rank {rank} of {self.world_size} (phase '{self._phase[rank]}', {age:.1f} s ago)"

    def _log_text(self, rank: int) -> str:
        try:
            with open(self._logs[rank], "rb") as f:
                return f.read()[-65536:].decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, rank: int, lines: int = LOG_TAIL_LINES) -> str:
        tail = [line for line in self._log_text(rank).splitlines() if line.strip()][-lines:]
        return " | ".join(s.strip() for s in tail)

    def _main_thread_stack(self, rank: int) -> str:
        """The stack of the thread that runs the jobs, from the rank's last faulthandler dump (else its log)."""
        text = self._log_text(rank)
        at = text.rfind("Current thread")
        if at < 0:
            return self._log_tail(rank)
        frames = [line.strip() for line in text[at:].splitlines()[1:] if line.strip().startswith("File")]
        return " | ".join(frames[:LOG_TAIL_LINES])

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        """Ask the ``ranks`` for their Python stacks (SIGUSR1: faulthandler writes them to the rank's log)."""
        if not hasattr(signal, "SIGUSR1"):
            return {}
        asked = [r for r in ranks if self._procs[r].poll() is None]
        for r in asked:
            with contextlib.suppress(OSError):
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        if asked:
            time.sleep(STACK_DUMP_WAIT_S)
        return {r: self._main_thread_stack(r) for r in asked}

    def _others(self, failed: list[int]) -> str:
        return "; ".join(self.describe(r) for r in range(self.world_size) if r not in failed)

    def _fail(self, what: str, rank: int, how: str) -> NoReturn:
        message = f"{what}: {self.describe(rank)} {how}"
        log = self._log_tail(rank)
        if log:
            message += f"; its log ends: {log}"
        stalled = [r for r in range(self.world_size) if r != rank and self._procs[r].poll() is None]
        stacks = self._stacks(stalled) if stalled else {}
        if self.world_size > 1:
            message += f". The other ranks: {self._others([rank])}"
        for r, stack in stacks.items():
            message += f". rank {r}'s stack (most recent call first): {stack}"
        self.kill()
        raise RankGroupError(message)

    def _not_supported(self, what: str, rank: int, value: tuple[str, str, list[str]]) -> NoReturn:
        """A rank's backend declined the call: end the job (the other ranks may wait in a collective the
        declining rank never joins) and raise the backend's reasons, as the call raised them in one process."""
        op, backend, reasons = value
        self.kill()
        raise BackendNotSupportedError(op, backend, f"the backend= argument ({what}, rank {rank})", reasons)

    def _timeout(self, what: str, budget: float, silent: list[int]) -> NoReturn:
        stacks = self._stacks(silent)
        parts = [f"{what}: no answer within {budget:g} s from " + "; ".join(self.describe(r) for r in silent)]
        if len(silent) < self.world_size:
            parts.append(f"answered: {self._others(silent)}")
        parts += [f"rank {r}'s stack (most recent call first): {stack}" for r, stack in stacks.items()]
        self.kill()
        raise RankGroupTimeout(". ".join(parts))

    # --- jobs -------------------------------------------------------------------------------------------

    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs) and all(
            c is not None for c in self._conns)

    def run(self, target: str, world: int | None = None, label: str | None = None, **kwargs: Any) -> list[Any]:
        """Run ``target(rank=, group=, device=, **kwargs)`` on the first ``world`` ranks (default all), with
        ``group`` their process group; results indexed by rank. ``label`` names the job in phases and errors.

        A rank that raises, dies or stays silent past the timeout fails the job (:class:`RankGroupError`,
        :class:`RankGroupTimeout`) and kills the group; the next :func:`rank_group` call restarts it."""
        world = self.world_size if world is None else world
        label = label or target
        what = f"job {label} on {world} of {self.world_size} {self.device_type} ranks"
        for rank in range(world):
            conn = self._conns[rank]
            if conn is None:
                self._fail(what, rank, "is not connected")
            try:
                conn.send((target, world, kwargs, label))
            except OSError as exc:
                self._fail(what, rank, f"could not be sent the job: {exc!r}")
            self._set_phase(rank, f"job {label}: sent")
        answers = self._await(list(range(world)), time.monotonic() + self.timeout_s, self.timeout_s, what, final="ok")
        return [answers[r] for r in range(world)]

    # --- shutdown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Ask every rank to stop and wait up to ``SHUTDOWN_TIMEOUT_S``; kill (with a warning naming the rank
        and its phase) any that is still running then."""
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(None)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while any(p.poll() is None for p in self._procs) and time.monotonic() < deadline:
            for conn in [c for c in self._conns if c is not None]:
                with contextlib.suppress(EOFError, OSError):
                    while conn.poll(0):  # phases of the shutdown
                        kind, value = conn.recv()
                        if kind == "phase":
                            self._set_phase(self._conns.index(conn), value)
            time.sleep(0.05)
        late = [r for r, p in enumerate(self._procs) if p.poll() is None]
        if late:
            warnings.warn(f"shutting down the {self.device_type} rank group: " + "; ".join(
                self.describe(r) for r in late) + f" did not exit within {SHUTDOWN_TIMEOUT_S:g} s; killed",
                RuntimeWarning, stacklevel=2)
        self.kill()

    def kill(self) -> None:
        """Kill every rank process (and anything it started) at once and free the group's resources."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._conns = [None] * self.world_size
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


_groups: dict[str, RankGroup] = {}
MAX_WORLD = 4  # the largest world of the suites: one group of this size serves every smaller world too


def rank_group(world_size: int, device_type: str) -> RankGroup:
    """A started group on ``device_type`` with at least ``world_size`` ranks (run jobs with
    ``world=world_size``). One group per device type, as large as the suites need and the machine
    allows (one GPU per rank on CUDA), started on first use and restarted when it died."""
    group = _groups.get(device_type)
    if group is not None and group.alive() and group.world_size >= world_size:
        return group
    if group is not None:
        group.kill()
        del _groups[device_type]
    available = torch.cuda.device_count() if device_type == "cuda" else MAX_WORLD
    group = _groups[device_type] = RankGroup(max(world_size, min(MAX_WORLD, available)), device_type)
    return group


@atexit.register
def close_all() -> None:
    while _groups:
        _, group = _groups.popitem()
        group.close()
