"""``deepport verify PATH [--regenerate N|all] [--replay N]``: is a ``results.json``, or a certificate
archive of ``deepport certify --certify`` (:mod:`deepport.conformance.certificate_verify`), valid?

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
from deepport.conformance.certificate_verify import VALID_TEST, CertificateReport, verify_certificate
from deepport.conformance.profiles import CERTIFIED, FAIL, UNCLAIMED_PASS
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
        core_style = "green" if ": PASS" in lines[0] else "yellow" if "INCOMPLETE" in lines[0] else "red"
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


def render_certificate(rep: CertificateReport, out: Console) -> None:
    """Print what a certificate archive claims, its findings, each backend's profiles, replays, the verdict."""
    m, results = rep.manifest, rep.results
    out.print(Text(f"certificate {rep.path} (sha256 {rep.digest})", style="bold"), soft_wrap=True)
    if m:
        out.print(Text(f"  mode {m.get('mode')}, suite {m.get('suite_version')} (source sha256 "
                       f"{str(m.get('suite_sha256'))[:16]}...), tier {m.get('tier')}, nonce {m.get('nonce')}, "
                       f"run seed {m.get('run_seed')}"), soft_wrap=True)
        dev = m.get("device") or {}
        out.print(Text(f"  device:   {dev.get('name')} ({dev.get('device')}; driver {dev.get('driver') or 'n/a'})"),
                  soft_wrap=True)
        for name, b in (m.get("backends") or {}).items():
            declared = b.get("declared") or {}
            identity = ", ".join(f"{k} {v}" for k, v in (declared.get("identity") or {}).items()) or "none reported"
            out.print(Text(f"  backend {name} v{declared.get('version')}: {len(declared.get('ops') or [])} op(s) "
                           f"declared; identity: {identity}"), soft_wrap=True)
    if results:
        out.print(Text(f"  inputs regenerated and hashed for {len(rep.checks.regenerated)} case(s)"))
    findings = rep.checks.errors + rep.checks.warnings
    if findings:
        out.print(Text(f"findings: {len(rep.checks.errors)} error(s), {len(rep.checks.warnings)} warning(s)"))
    for f in findings[:200]:
        style = "red" if f.severity == "error" else "yellow"
        out.print(Text.assemble((f"  {f.severity:<8}", style), f"{f.where()}: {f.message}"), soft_wrap=True)
    if len(findings) > 200:
        out.print(Text(f"  ... and {len(findings) - 200} more"))
    for backend, verdicts in rep.profiles.items():
        out.print(Text(f"{backend}: certified profiles: "
                       + (", ".join(v.profile for v in verdicts if v.verdict == CERTIFIED) or "none")), soft_wrap=True)
        for v in verdicts:
            style = {CERTIFIED: "green", FAIL: "red", UNCLAIMED_PASS: "cyan"}.get(v.verdict, "yellow")
            out.print(Text.assemble("  ", (v.line(), style)), soft_wrap=True)
    if rep.replayed:
        same = sum(r.matches for r in rep.replayed)
        out.print(Text(f"replayed {len(rep.replayed)} case(s) here: {same} as recorded"))
        for r in rep.replayed:
            out.print(Text(f"  {r.line()}", style="green" if r.matches else "red"), soft_wrap=True)
    reasons = "; ".join(rep.checks.not_certification_reasons)
    if rep.test_archive:
        reasons = "a test archive (mode 'test')" + (f": {reasons}" if reasons else "")
    style = {VALID: "bold green", VALID_TEST: "bold yellow", INVALID: "bold red"}.get(rep.verdict, "bold yellow")
    suffix = f" ({reasons})" if reasons and rep.verdict != VALID else ""
    out.print(Text.assemble("verdict: ", (rep.verdict, style), suffix), soft_wrap=True)


def run_certificate(path: str, regenerate: int | Literal["all"], replay: int, plugins: list[str], device: str | None,
                    out: Console, *, timeout_s: float | None = None) -> int:
    """Verify a certificate archive (or its folder), print the report; returns the exit status."""
    rep = verify_certificate(path, regenerate=regenerate, replay_count=replay, plugins=plugins, device=device,
                             timeout_s=timeout_s)
    render_certificate(rep, out)
    return rep.exit_code
