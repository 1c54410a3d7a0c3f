"""``deepport certify``: run the conformance suite on backends, show progress, write the reports.

Prints (stdout) a header naming the suite version, tier, device, run seed and backends; shows a
progress bar with the current case and every non-passing result as it happens (stderr, so CI logs
and redirected stdout stay clean); then prints (stdout) the op x backend table with verdicts, each
backend's core-profile verdict, and the paths of ``results.json``, ``junit.xml`` and ``summary.md``.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from deepport.conformance import certificate, profiles, report
from deepport.conformance.case import Case
from deepport.conformance.plugins import load_plugins
from deepport.conformance.results import CaseResult, Status, SuiteRun
from deepport.conformance.runner import SUITE_VERSION, default_device, run_suite, select_cases, usable_backends
from deepport.conformance.waivers import Waiver, WaiverFileError, apply_waivers, load_waivers
from deepport.dispatch import device_info, registry

_STATUS_STYLE = {Status.FAIL: "red", Status.ERROR: "red", Status.CRASH: "red", Status.TIMEOUT: "red",
                 Status.INTERNAL_ERROR: "magenta", Status.NOT_SUPPORTED: "yellow"}
_VERDICT_STYLE = {"PASS": "green", "PASS (core)": "green", "PASS (waived)": "yellow", "FAIL": "bold red",
                  "SUITE ERROR": "bold magenta", "CORE INCOMPLETE": "yellow", "NOT SUPPORTED": "yellow"}


class UsageError(Exception):
    """A request ``certify`` cannot run (unknown backend, no matching case ...): exit status 2."""


@dataclass(frozen=True)
class Plan:
    """What a certify run will do, checked before anything runs."""

    backends: list[str]
    tier: str
    device: torch.device
    seed: int
    ops: list[str] | None
    case_pattern: str | None
    cases: list[Case]
    out_dir: Path
    isolate: bool = False
    plugins: tuple[str, ...] = ()
    timeout_s: float = 600.0
    certify: bool = False  # certification mode (deepport.conformance.certificate): seed from the nonce, one archive
    nonce: str | None = None
    waivers: tuple[Waiver, ...] = ()
    waiver_file: Path | None = None

    def command(self) -> str:
        """The command line that reproduces this run (seed included; in certification mode, the nonce)."""
        if self.certify:
            args = ["deepport", "certify", "--certify", "--nonce", str(self.nonce), "--device", str(self.device)]
            args += ["--tier", self.tier] if self.tier != "full" else []
            return shlex.join([*args, *self._selection(), "--timeout", f"{self.timeout_s:g}"])
        args = ["deepport", "certify", "--tier", self.tier, "--seed", str(self.seed), "--device", str(self.device),
                *self._selection(), "--isolate" if self.isolate else "--no-isolate"]
        if self.waiver_file is not None:
            args += ["--waivers", str(self.waiver_file)]
        return shlex.join(args)

    def _selection(self) -> list[str]:
        args = []
        for name in self.backends:
            args += ["--backend", name]
        for op in self.ops or ():
            args += ["--op", op]
        if self.case_pattern:
            args += ["--case", self.case_pattern]
        for spec in self.plugins:
            args += ["--plugin", spec]
        return args


def _backend_specs(backends: Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """``--backend module:object`` (an out-of-tree Backend, or an iterable of them): load each such spec
    and put the names it provides in its place. Returns the backend names and the specs loaded."""
    if not backends:
        return None, []
    registered = {b.name for b in registry.all_backends()}
    names: list[str] = []
    specs: list[str] = []
    for item in backends:
        if item in registered or ":" not in item:
            names.append(item)
            continue
        try:
            names += load_plugins([item])
        except Exception as exc:
            raise UsageError(f"cannot load backend {item!r}: {type(exc).__name__}: {exc}") from None
        specs.append(item)
    return names, specs


def _certify_options(tier: str, ops: Sequence[str] | None, case_pattern: str | None, isolate: bool | None,
                     nonce: str | None, waivers: Path | None) -> str:
    """Check what certification mode allows; returns the nonce to use."""
    try:
        certificate.certification_mode(tier, ops, case_pattern)
        chosen = certificate.check_nonce(nonce) if nonce is not None else certificate.new_nonce()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if isolate is False:
        raise UsageError("--certify isolates every backend in its own process; --no-isolate cannot certify")
    if waivers is not None:
        raise UsageError("--certify never applies waivers (a certificate records what ran, as it ran); "
                         "drop --waivers")
    return chosen


def plan(backends: Sequence[str] | None, tier: str, device: str | None, seed: int | None,
         ops: Sequence[str] | None, case_pattern: str | None, out_dir: Path, *, isolate: bool | None = None,
         plugins: Sequence[str] = (), timeout_s: float = 600.0, certify: bool = False, nonce: str | None = None,
         waivers: Path | None = None) -> Plan:
    """Resolve defaults and check every argument; raises :class:`UsageError` with what is wrong.

    ``isolate`` defaults to on for the ``full`` tier (a certification runs each backend in its own
    process) and off for ``smoke`` (quick, in-process). ``plugins`` are loaded first, so the backends
    they provide can be named; a backend given as ``module:object`` is loaded the same way.
    ``certify``: certification mode (the whole ``full`` tier, isolated, seeded from ``nonce``, no
    waivers); ``waivers``: a file of expected failures (:mod:`deepport.conformance.waivers`).
    """
    try:
        load_plugins(plugins)
    except Exception as exc:
        raise UsageError(f"cannot load plugin: {type(exc).__name__}: {exc}") from None
    backends, specs = _backend_specs(backends)
    plugins = (*plugins, *(s for s in specs if s not in plugins))
    if certify:
        if seed is not None:
            raise UsageError("--certify derives the run seed from the nonce; give --nonce instead of --seed")
        nonce = _certify_options(tier, ops, case_pattern, isolate, nonce, waivers)
        isolate, seed = True, certificate.nonce_seed(nonce)
    elif nonce is not None:
        raise UsageError("--nonce is for certification mode (--certify); use --seed otherwise")
    try:
        loaded = tuple(load_waivers(waivers)) if waivers is not None else ()
    except WaiverFileError as exc:
        raise UsageError(str(exc)) from None
    if timeout_s <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {timeout_s:g}")
    known = {b.name: b for b in registry.all_backends()}
    names = list(dict.fromkeys(backends)) if backends else usable_backends()
    for name in names:
        if name not in known:
            raise UsageError(f"unknown backend {name!r}; registered backends: {', '.join(known)}")
        reason = known[name].unavailable_reason
        if reason is not None:
            raise UsageError(f"backend {name!r} cannot run in this process: {reason}")
    if not names:
        raise UsageError("no usable backend; `deepport info` says why each one is unavailable")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {str(out_dir)!r} exists and is not a folder")
    try:
        dev = default_device() if device is None else torch.device(device)
        torch.empty(1, device=dev)  # the device exists in this torch build and process
        device_info(dev)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise UsageError(f"cannot use device {device!r}: {exc}") from None
    try:
        cases = select_cases(tier, ops, case_pattern)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not cases:
        what = f"--case {case_pattern!r}" if case_pattern else "the selection"
        raise UsageError(f"no {tier}-tier case matches {what}"
                         + (f" for ops {', '.join(ops)}" if ops else "")
                         + "; case ids look like 'mla_decode/page_edges' (glob or substring)")
    for name in names:
        explicit = known[name].profiles
        unknown = profiles.unknown_profiles(explicit or ())
        if unknown:
            raise UsageError(f"backend {name!r} claims unknown profiles {unknown}; "
                             f"profiles: {', '.join(profiles.PROFILE_NAMES)}")
    return Plan(names, tier, dev, secrets.randbits(63) if seed is None else seed, list(ops) if ops else None,
                case_pattern, cases, out_dir, tier == "full" if isolate is None else isolate, tuple(plugins),
                timeout_s, certify, nonce, loaded, waivers)


def _header(p: Plan, out: Console) -> None:
    out.print(Text(f"deepport certify: suite {SUITE_VERSION}, tier {p.tier}, "
                   f"{len(p.cases)} case(s) x {len(p.backends)} backend(s)", style="bold"))
    out.print(Text(f"  device:   {device_info(p.device).describe()}"))
    out.print(Text(f"  run seed: {p.seed}  (reproduce with --seed {p.seed})"))
    out.print(Text(f"  backends: {', '.join(p.backends)}"))
    out.print(Text("  isolation: " + (f"each backend in its own process (timeout {p.timeout_s:g} s per call)"
                                      if p.isolate else "none (backends run in this process)")))
    if p.tier != "full":
        out.print(Text(f"  note: {p.tier}-tier results cannot certify a backend; only `--tier full` can.",
                       style="yellow"))


@contextlib.contextmanager
def progress_callbacks(p: Plan) -> Iterator[tuple[Callable[[int], None], Callable[[CaseResult], None]]]:
    """``(on_start, on_result)`` driving a progress bar on stderr that names the next case and prints
    every result that is not a pass."""
    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[current]}", markup=False))
    with Progress(*columns, console=err, transient=err.is_terminal) as progress:
        task = progress.add_task("certify", total=None, current="")
        done = 0

        def upcoming(index: int) -> str:
            # run_suite runs case by case, each case on every backend in order.
            if index >= len(p.cases) * len(p.backends):
                return ""
            return f"{p.cases[index // len(p.backends)].id} on {p.backends[index % len(p.backends)]}"

        def on_start(total: int) -> None:
            progress.update(task, total=total, current=upcoming(0))

        def on_result(r: CaseResult) -> None:
            nonlocal done
            done += 1
            progress.update(task, advance=1, current=upcoming(done))
            if r.status is not Status.PASS:
                line = Text.assemble((f"{r.status.value:<14}", _STATUS_STYLE.get(r.status, "")),
                                     f" {r.case_id} on {r.backend}: {r.message}")
                progress.console.print(line, soft_wrap=True)

        yield on_start, on_result


def _run_with_progress(p: Plan) -> SuiteRun:
    with progress_callbacks(p) as (on_start, on_result):
        return run_suite(p.backends, p.tier, device=p.device, run_seed=p.seed, ops=p.ops,
                         case_pattern=p.case_pattern, on_start=on_start, on_result=on_result, command=p.command(),
                         isolate=p.isolate, plugins=p.plugins, timeout_s=p.timeout_s)


def print_table(results: dict[str, object], out: Console) -> None:
    """The op x backend table with verdicts, then each backend's core-profile verdict."""
    table = Table(title="Conformance", title_justify="left")
    table.add_column("op")
    table.add_column("backend")
    for column in ("passed", "failed", "errors", "not supported"):
        table.add_column(column, justify="right")
    table.add_column("verdict")
    for r in report.table_rows(results):
        table.add_row(r.op, r.backend, str(r.passed), str(r.failed), str(r.errors), str(r.not_supported),
                      Text(r.verdict, style=_VERDICT_STYLE.get(r.verdict, "")))
    out.print(table)
    for backend, verdict in report.profile_verdicts(results).items():
        style = "green" if ": PASS" in verdict else "red"
        out.print(Text.assemble(f"{backend}: ", (verdict, style)))


def certify(p: Plan, out: Console) -> int:
    """Run the plan, print the table, write the reports; 0 when every case passed or is not supported
    (or, with waivers, failed as a waiver expects). Certification mode: :mod:`deepport.cli.certification`."""
    if p.certify:
        from deepport.cli.certification import certify_archive

        return certify_archive(p, out)
    _header(p, out)
    run = _run_with_progress(p)
    if p.waiver_file is not None:
        outcome = apply_waivers(run, p.waivers)
        out.print(Text(f"waivers from {p.waiver_file}: {len(outcome.waived)} case(s) waived, "
                       f"{len(outcome.unexpected_passes)} unexpected pass(es), {len(outcome.unused)} unused entr(ies)"),
                  soft_wrap=True)
        for line in outcome.lines():
            style = "red" if line.startswith("unexpected") else "yellow"
            out.print(Text(f"  {line}", style=style), soft_wrap=True)
    results = run.to_dict()
    out.print()
    print_table(results, out)
    if p.tier != "full":
        out.print(Text(f"note: {p.tier}-tier results cannot certify; only --tier full can.", style="yellow"))
    paths = report.write_reports(run, p.out_dir)
    out.print(Text(f"run seed {run.run_seed}; reports written:"))
    for path in paths.values():
        out.print(Text(f"  {path}"), soft_wrap=True)
    return 0 if run.passed() else 1
