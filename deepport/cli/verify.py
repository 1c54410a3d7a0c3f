"""``deepport verify RESULTS_JSON [--regenerate N|all]``: is a ``results.json`` a valid certificate?

Prints (stdout) what the file claims (suite, tier, run seed, device, backends), how many cases had their
inputs regenerated, every finding (errors, then warnings, each naming its case and backend), each
backend's profile lines, and the verdict. The checks are :mod:`deepport.conformance.verify`'s.
Exit status: 0 valid certificate, 1 invalid or not a certification run (2, an unreadable file, is
the caller's: :func:`deepport.cli.main.main`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, Literal

from rich.console import Console
from rich.text import Text

from deepport.conformance import report
from deepport.conformance.verify import INVALID, VALID, VerifyReport, verify

_VERDICT_STYLE = {VALID: "bold green", INVALID: "bold red"}


def regenerate_count(text: str) -> int | Literal["all"]:
    """``--regenerate``: a non-negative number of cases, or ``all``."""
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of cases or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of cases, got {value}")
    return value


def render(results: Mapping[str, Any], rep: VerifyReport, out: Console) -> None:
    """Print the claim, the findings, the profile lines and the verdict."""
    backends = ", ".join(results.get("backends", {})) or "(none)"
    out.print(Text(f"suite {results.get('suite_version')} (generator {results.get('generator_version')}), "
                   f"tier {results.get('tier')}, run seed {results.get('run_seed')}", style="bold"), soft_wrap=True)
    out.print(Text(f"  device:   {report.device_label(results)}"), soft_wrap=True)
    out.print(Text(f"  backends: {backends}"), soft_wrap=True)
    out.print(Text(f"  inputs regenerated and hashed for {len(rep.regenerated)} case(s)"))
    findings = rep.errors + rep.warnings
    if findings:
        out.print(Text(f"findings: {len(rep.errors)} error(s), {len(rep.warnings)} warning(s)"))
    for f in findings:
        style = "red" if f.severity == "error" else "yellow"
        out.print(Text.assemble((f"  {f.severity:<8}", style), f"{f.where()}: {f.message}"), soft_wrap=True)
    for backend, lines in rep.profiles.items():
        core_style = "green" if ": PASS" in lines[0] else "red"
        out.print(Text.assemble(f"{backend}: ", (lines[0], core_style), *(f"; {line}" for line in lines[1:])))
    reasons = "; ".join(rep.not_certification_reasons)
    if reasons:
        reasons = f" ({'also not a certification run: ' if rep.verdict == INVALID else ''}{reasons})"
    out.print(Text.assemble("verdict: ", (rep.verdict, _VERDICT_STYLE.get(rep.verdict, "bold yellow")), reasons),
              soft_wrap=True)


def run(results: Mapping[str, Any], regenerate: int | Literal["all"], out: Console) -> int:
    """Verify a loaded results dict, print the report; returns the exit status (0 valid, else 1)."""
    rep = verify(results, regenerate=regenerate)
    render(results, rep, out)
    return rep.exit_code
