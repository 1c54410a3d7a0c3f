"""``deepport determinism``: run each case N times with identical inputs; bitwise-identical or the spread.

``deepport determinism [--backend NAME ...] [--op OP ...] [--case PATTERN] [--device DEV] [--tier T]
[--repeat N] [--seed N] [--out DIR] [--plugin MODULE[:ATTR]]`` runs
:mod:`deepport.conformance.determinism` and prints, per backend and op, the cases that were identical in
every run, those that differed (with the largest absolute and relative spread), those not supported, the
backend's claim on this device, and every failure (a claimed-bitwise case that differed, an error). With
``--out`` it writes ``determinism.jsonl`` (one line per result as it comes) and ``determinism.json``.
``--claims`` prints every backend's declared claims as a Markdown table (no run). Exit status: 0, 1 when a
case failed, 2 for a usage error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from deepport.conformance.determinism import (
    DIFFERS,
    ERROR,
    IDENTICAL,
    NOT_SUPPORTED,
    DeterminismResult,
    claims_table,
    run_determinism,
    summary,
)
from deepport.conformance.plugins import load_plugins
from deepport.conformance.runner import default_device, select_cases, usable_backends
from deepport.dispatch import registry
from deepport.errors import UnknownBackendError


class UsageError(Exception):
    """A request the command cannot run: exit status 2."""


def claims_markdown(backends: Sequence[str] | None = None) -> str:
    """The declared claims as a Markdown table, one row per backend and distinct claim (the ops that share
    it listed together); ``docs/VALIDATION.md`` carries it."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for r in claims_table(backends):
        grouped.setdefault((r["backend"], r["bitwise_on"], r["reason"]), []).append(f"`{r['op']}`")
    lines = ["| backend | ops | bitwise reproducible on | why |", "| --- | --- | --- | --- |"]
    lines += [f"| `{backend}` | {', '.join(ops)} | {where} | {why} |" for (backend, where, why), ops in grouped.items()]
    return "\n".join(lines)


_ROW = "{:<10} {:<33} {:<11} {:>5} {:>6} {:>4} {:>5} {:>10} {:>10}  {}"


def _spread(value: float) -> str:
    return "-" if value == 0 else ("inf" if math.isinf(value) else f"{value:.3g}")


def _claim(claimed: bool | None) -> str:
    return {None: "undeclared", True: "bitwise", False: "not claimed"}[claimed]


def determinism(backends: Sequence[str] | None, ops: Sequence[str] | None, case_pattern: str | None,
                device: str | None, tier: str, repeats: int, seed: int | None, out_dir: Path | None,
                plugins: Sequence[str], console: Console) -> int:
    """Run the check and print the tables; returns the exit status (raises :class:`UsageError`)."""
    if repeats < 2:
        raise UsageError(f"--repeat must be at least 2, got {repeats}")
    try:
        load_plugins(plugins)
        names = list(backends) if backends else [b for b in usable_backends() if b != "reference"]
        for name in names:
            registry.get(name)
            if registry.get(name).unavailable_reason is not None:
                raise UsageError(f"backend {name!r} is unavailable here: {registry.get(name).unavailable_reason}")
        if not select_cases(tier, ops, case_pattern):
            raise UsageError(f"no {tier} case matches --op {ops} --case {case_pattern!r}")
    except (UnknownBackendError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    dev = default_device() if device is None else device
    console.print(Text(f"deepport determinism: {', '.join(names)} on {dev}, tier {tier}, {repeats} runs per case"))

    progress = None
    if out_dir is not None:  # one JSON line per result as it comes: a run cut short keeps what it did
        out_dir.mkdir(parents=True, exist_ok=True)
        progress = out_dir / "determinism.jsonl"
        progress.write_text("", encoding="utf-8")

    def show(r: DeterminismResult) -> None:
        if progress is not None:
            with progress.open("a", encoding="utf-8") as f:
                f.write(json.dumps(r.to_dict()) + "\n")
        if r.failed or r.status == DIFFERS:
            style = "red" if r.failed else "yellow"
            detail = "; ".join(f"{s.name}: {s.differing}/{s.elements} elements, max |diff| {_spread(s.max_abs)}"
                               for s in r.spreads if s.differing) or r.message
            console.print(Text(f"  {r.backend} {r.case_id}: {r.status} ({_claim(r.claimed)}) {detail}", style=style),
                          soft_wrap=True)

    run = run_determinism(names, tier, device=dev, repeats=repeats, run_seed=seed, ops=ops,
                          case_pattern=case_pattern, on_result=show)
    console.print(Text(f"run to run over {repeats} runs, seed {run.run_seed}, {run.environment['device']['name']}:"))
    console.print(Text(_ROW.format("backend", "op", "claim", "same", "differ", "n/a", "error", "max|diff|", "max rel",
                                   "verdict")), soft_wrap=True)
    for (backend, op), row in summary(run.results).items():
        verdict = "FAIL" if row["failed"] else ("n/a" if row[IDENTICAL] + row[DIFFERS] == 0 else "ok")
        line = _ROW.format(backend, op, _claim(row["claimed"]), row[IDENTICAL], row[DIFFERS], row[NOT_SUPPORTED],
                           row[ERROR], _spread(row["max_abs"]), _spread(row["max_rel"]), verdict)
        console.print(Text(line, style={"FAIL": "bold red"}.get(verdict, "")), soft_wrap=True)
    if out_dir is not None:
        path = out_dir / "determinism.json"
        path.write_text(json.dumps(run.to_dict(), indent=2) + "\n", encoding="utf-8")
        console.print(Text(f"written: {path}"), soft_wrap=True)
    failed = run.failed
    console.print(Text(f"{len(run.results)} case runs, {len(failed)} failed", style="red" if failed else "green"))
    return 1 if failed else 0

