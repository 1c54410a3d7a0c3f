"""Running a backend in its own process, so it cannot reach the harness's memory.

In-process, a backend shares the interpreter with the harness: it could look for the reference, the
pristine inputs or another backend's outputs through ``gc``, or patch the checker. With isolation
(``run_suite(..., isolate=True)``, ``deepport certify --isolate``, the default for the ``full``
tier) each backend runs in a spawned worker that only stages inputs and calls the op
(:func:`~deepport.conformance.call.call_backend`); the parent regenerates the pristine inputs,
computes the reference and judges. A worker that crashes or exceeds the per-call timeout is killed,
the case reported as ``error``, and a fresh worker started for the next case.

Backends the worker knows are the built-ins, the ``deepport.backends`` entry points (the spawned
worker gets this process's ``sys.path``), and the ``plugins`` (:mod:`~deepport.conformance.plugins`),
which it passes on to the rank processes of multi-rank cases it runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from deepport.conformance.call import CallOutcome, call_backend
from deepport.conformance.plugins import load_plugins
from deepport.conformance.results import Status

__all__ = ["BackendWorker", "load_plugins"]


def _worker_main(conn: Connection, plugins: Sequence[str]) -> None:
    from deepport.conformance.suites import SUITES

    load_plugins(plugins)
    cases = {c.id: c for suite in SUITES.values() for c in suite.cases()}
    while True:
        request = conn.recv()
        if request is None:
            return
        case_id, seed, backend, device, repro = request
        case = cases[case_id]
        outcome = call_backend(SUITES[case.op], case, seed, backend, torch.device(device), repro, to_host=True)
        conn.send(outcome)


class BackendWorker:
    """A spawned process running one backend's calls, one request at a time."""

    def __init__(self, plugins: Sequence[str] = (), timeout_s: float = 600.0) -> None:
        self.plugins = tuple(plugins)
        self.timeout_s = timeout_s
        self._process: Any = None
        self._conn: Connection | None = None
        self._pending: tuple[str, float] | None = None  # (repro, monotonic submit time) of the call in flight

    def _start(self) -> Connection:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=_worker_main, args=(child, self.plugins), daemon=True,
                                    name="deepport-backend-worker")
        self._process.start()
        child.close()
        self._conn = parent
        return parent

    def call(self, case_id: str, seed: int, backend: str, device: torch.device, repro: str) -> CallOutcome:
        """Run one call and wait for its outcome (:meth:`submit`, then :meth:`collect`)."""
        self.submit(case_id, seed, backend, device, repro)
        return self.collect()

    def submit(self, case_id: str, seed: int, backend: str, device: torch.device, repro: str) -> None:
        """Send one call to the worker without waiting: workers of several backends then run a case at the
        same time (each in its own process and CUDA context), while the parent computes the reference.
        :meth:`collect` returns its outcome; one call at a time per worker."""
        if self._pending is not None:
            raise RuntimeError(f"worker busy with {self._pending[0]!r}: collect() its outcome first")
        self._pending = (repro, time.monotonic())
        try:
            conn = self._conn if self._conn is not None else self._start()
            conn.send((case_id, seed, backend, str(device), repro))
        except OSError:
            self._pending = (repro, -1.0)  # collect() reports the crash

    def collect(self) -> CallOutcome:
        """The outcome of the submitted call: a timeout ``timeout_s`` after its submission (the worker is
        killed; the next call starts a fresh one), a crash if the worker died."""
        if self._pending is None:
            raise RuntimeError("collect() without a submitted call")
        (repro, submitted), self._pending = self._pending, None
        try:
            if submitted < 0 or self._conn is None:
                raise EOFError
            if self._conn.poll(max(0.0, submitted + self.timeout_s - time.monotonic())):
                outcome: CallOutcome = self._conn.recv()
                return outcome
            self._kill()
            return CallOutcome(Status.TIMEOUT, f"timed out after {self.timeout_s:g} s in the worker process {repro}",
                               self.timeout_s)
        except (EOFError, OSError):
            code = None
            if self._process is not None:
                self._process.join(timeout=5)
                code = self._process.exitcode
            self._kill()
            return CallOutcome(Status.CRASH, f"the worker process died (exit code {code}) {repro}", 0.0)

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn, self._pending = None, None, None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):  # a worker that already died cannot be told to stop
                self._conn.send(None)
            if self._process is not None:
                self._process.join(timeout=30)
        self._kill()

    def __enter__(self) -> BackendWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
