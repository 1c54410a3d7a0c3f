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
        conn = self._conn if self._conn is not None else self._start()
        try:
            conn.send((case_id, seed, backend, str(device), repro))
            if conn.poll(self.timeout_s):
                outcome: CallOutcome = conn.recv()
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
        self._process, self._conn = None, None

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
