"""The reports of a conformance run: ``results.json`` (the artifact) and what derives from it.

``junit.xml`` (for CI test-report viewers) and ``summary.md`` (for people) are pure functions of the
results dict (:func:`junit_xml`, :func:`markdown_summary`), so ``deepport report results.json``
regenerates them from a saved run. Every file is written atomically (temp file, then rename).

Verdicts, shared by the Markdown summary and ``deepport certify``'s table:

- per (op, backend): ``FAIL`` (a case failed, or the backend errored, crashed or timed out, and no
  waiver expects it; or a waived case passed), ``SUITE ERROR`` (the suite
  itself was at fault), ``PASS`` (every case passed), ``PASS (core)`` (every core case passed, some
  extension case is not supported), ``CORE INCOMPLETE`` (some core case is not supported), or
  ``NOT SUPPORTED`` (no case ran);
- per backend, the core profile: ``PASS`` only if every case with ``profile == "core"`` passed
  (``INCOMPLETE``: the others declared unsupported; ``FAIL``: one failed);
- per backend and named profile (``mla_decode/core`` ...): :mod:`deepport.conformance.profiles`.

Waived cases (a vendor's expected failures, :mod:`deepport.conformance.waivers`) keep their status;
the reports mark them, and a waived case that passed is an unexpected pass (a failure).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepport.conformance.profiles import profile_table
from deepport.conformance.results import SCHEMA, SCHEMA_VERSION, Status, SuiteRun

RESULTS_JSON, JUNIT_XML, SUMMARY_MD = "results.json", "junit.xml", "summary.md"

# Characters XML 1.0 cannot carry at all (control characters but tab/newline/CR); a backend's error
# message may contain them (ANSI colour codes, raw bytes), and the JUnit file must stay well-formed.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class ResultsFileError(ValueError):
    """A file is not a ``results.json`` this version of deepport can read."""


@dataclass(frozen=True)
class Row:
    """One (op, backend) line of the summary table."""

    op: str
    backend: str
    passed: int
    failed: int
    errors: int  # the backend's errors, crashes and timeouts plus the suite's internal errors
    not_supported: int
    verdict: str


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json``; raise :class:`ResultsFileError` unless it has this schema and version."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsFileError(f"{p}: cannot read conformance results: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ResultsFileError(f"{p}: expected a results file with schema {SCHEMA!r}, got {got!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsFileError(f"{p}: expected schema_version {SCHEMA_VERSION}, got {data.get('schema_version')!r} "
                               f"(written by another deepport version)")
    if not isinstance(data.get("cases"), list) or not isinstance(data.get("backends"), dict):
        raise ResultsFileError(f"{p}: expected `cases` (a list) and `backends` (an object)")
    return data


def write_reports(run: SuiteRun, out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``junit.xml`` and ``summary.md`` into ``out_dir`` (created if needed).

    Returns ``{"results": path, "junit": path, "summary": path}``.
    """
    results = run.to_dict()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": _write_atomic(out_dir / RESULTS_JSON, json.dumps(results, indent=2) + "\n")}
    paths.update(write_derived_reports(results, out_dir))
    return paths


def write_derived_reports(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``junit.xml`` and ``summary.md`` for a results dict; returns ``{"junit": .., "summary": ..}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"junit": _write_atomic(out_dir / JUNIT_XML, junit_xml(results)),
            "summary": _write_atomic(out_dir / SUMMARY_MD, markdown_summary(results))}


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file, then rename), creating the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------
# Verdicts and the table, from the results dict


def _by_backend(results: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Cases grouped per backend, backends in the run's order (those without cases included)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {name: [] for name in results.get("backends", {})}
    for case in results["cases"]:
        grouped.setdefault(case["backend"], []).append(case)
    return grouped


def _counts(cases: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = {s.value: 0 for s in Status}
    for case in cases:
        counts[case["status"]] = counts.get(case["status"], 0) + 1
    return counts


_FAILING = (Status.FAIL.value, Status.ERROR.value, Status.CRASH.value, Status.TIMEOUT.value)


def waived(case: Mapping[str, Any]) -> bool:
    """A case a waiver expected not to pass, and which did not pass."""
    return bool(case.get("waiver")) and case["status"] != Status.PASS.value


def unexpected_pass(case: Mapping[str, Any]) -> bool:
    """A case a waiver expected to fail, which passed (strict waivers: the entry must be removed)."""
    return bool(case.get("waiver")) and case["status"] == Status.PASS.value


def op_verdict(cases: list[Mapping[str, Any]]) -> str:
    """The verdict of one backend on one op's cases (see the module docstring)."""
    if any(unexpected_pass(c) for c in cases):
        return "FAIL"
    live = [c for c in cases if not waived(c)]
    if len(live) < len(cases) and all(c["status"] in (Status.PASS.value, Status.NOT_SUPPORTED.value) for c in live):
        return "PASS (waived)"
    counts = _counts(cases)
    if any(counts[s] for s in _FAILING):
        return "FAIL"
    if counts[Status.INTERNAL_ERROR.value]:
        return "SUITE ERROR"
    if counts[Status.PASS.value] == len(cases) and cases:
        return "PASS"
    if not counts[Status.PASS.value]:
        return "NOT SUPPORTED"
    core_unsupported = any(c["status"] == Status.NOT_SUPPORTED.value and c["profile"] == "core" for c in cases)
    return "CORE INCOMPLETE" if core_unsupported else "PASS (core)"


def core_profile_verdict(cases: list[Mapping[str, Any]]) -> str:
    """``"core profile: PASS (n/n core cases passed)"`` only if every core case passed; ``INCOMPLETE`` when
    the others were declared unsupported (an op or shape the backend does not implement), else ``FAIL``."""
    core = [c for c in cases if c["profile"] == "core"]
    passed = sum(c["status"] == Status.PASS.value for c in core)
    declined = sum(c["status"] == Status.NOT_SUPPORTED.value for c in core)
    if not core:
        return "core profile: NOT RUN (no core case in this run)"
    word = "PASS" if passed == len(core) else "INCOMPLETE" if passed + declined == len(core) else "FAIL"
    return f"core profile: {word} ({passed}/{len(core)} core cases passed)"


def table_rows(results: Mapping[str, Any]) -> list[Row]:
    """One :class:`Row` per (op, backend), ops in the order they ran, then backends in run order."""
    grouped = _by_backend(results)
    ops = list(dict.fromkeys(c["op"] for c in results["cases"]))
    rows = []
    for op in ops:
        for backend, cases in grouped.items():
            mine = [c for c in cases if c["op"] == op]
            if not mine:
                continue
            n = _counts(mine)
            rows.append(Row(op, backend, n[Status.PASS.value], n[Status.FAIL.value], _errors(n),
                            n[Status.NOT_SUPPORTED.value], op_verdict(mine)))
    return rows


def _errors(counts: Mapping[str, int]) -> int:
    return sum(counts[s.value] for s in (Status.ERROR, Status.INTERNAL_ERROR, Status.CRASH, Status.TIMEOUT))


def profile_verdicts(results: Mapping[str, Any]) -> dict[str, str]:
    """``{backend: core-profile verdict}`` in run order."""
    return {backend: core_profile_verdict(cases) for backend, cases in _by_backend(results).items()}


def device_label(results: Mapping[str, Any]) -> str:
    """``"cuda:0 (NVIDIA H200, sm_90, 132 units)"`` from the recorded environment."""
    dev = results.get("environment", {}).get("device", {})
    where = dev.get("type", "?") if dev.get("index") is None else f"{dev.get('type')}:{dev.get('index')}"
    details = [str(dev["name"])] if dev.get("name") else []
    if dev.get("arch") and dev.get("arch") != dev.get("kind"):
        details.append(str(dev["arch"]))
    if dev.get("multiprocessors"):
        details.append(f"{dev['multiprocessors']} units")
    return f"{where} ({', '.join(details)})" if details else where


def reproduce_command(results: Mapping[str, Any]) -> str:
    """The command that reruns this run: the recorded one, else one rebuilt from the results."""
    if results.get("command"):
        return str(results["command"])
    dev = results.get("environment", {}).get("device", {})
    device = dev.get("type", "cpu") if dev.get("index") is None else f"{dev.get('type')}:{dev.get('index')}"
    args = ["deepport", "certify", "--tier", str(results["tier"]), "--seed", str(results["run_seed"]),
            "--device", str(device)]
    for backend in results.get("backends", {}):
        args += ["--backend", backend]
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------------
# JUnit XML


def _xml_text(value: object) -> str:
    return _XML_ILLEGAL.sub("\ufffd", str(value))


def junit_xml(results: Mapping[str, Any]) -> str:
    """JUnit XML: one ``<testsuite>`` per backend, one ``<testcase>`` per result.

    ``classname`` is ``deepport.<backend>.<op>``, ``name`` the case id; ``fail`` becomes
    ``<failure>``, ``error`` and ``internal_error`` ``<error>`` (``type`` says which), and
    ``not_supported`` ``<skipped>`` with the backend's reasons.
    """
    properties = {"suite_version": results.get("suite_version"), "run_seed": results.get("run_seed"),
                  "tier": results.get("tier"), "device": device_label(results),
                  "generator_version": results.get("generator_version")}
    root = ET.Element("testsuites", name="deepport conformance")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    total_time = 0.0
    for backend, cases in _by_backend(results).items():
        n = _counts(cases)
        counts = {"tests": len(cases), "failures": n[Status.FAIL.value],
                  "errors": _errors(n),
                  "skipped": n[Status.NOT_SUPPORTED.value]}
        seconds = sum(float(c.get("duration_s", 0.0)) for c in cases)
        attrib = {"name": f"deepport.{backend}", "time": f"{seconds:.3f}",
                  "timestamp": str(results.get("started", "")), **{k: str(v) for k, v in counts.items()}}
        suite = ET.SubElement(root, "testsuite", attrib)
        props = ET.SubElement(suite, "properties")
        info = results.get("backends", {}).get(backend, {})
        for name, value in {**properties, "backend_version": info.get("version")}.items():
            ET.SubElement(props, "property", name=name, value=_xml_text(value))
        for case in cases:
            _testcase(suite, backend, case)
        for k, v in counts.items():
            totals[k] += v
        total_time += seconds
    root.set("time", f"{total_time:.3f}")
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _testcase(suite: ET.Element, backend: str, case: Mapping[str, Any]) -> None:
    element = ET.SubElement(suite, "testcase", classname=f"deepport.{backend}.{case['op']}",
                            name=_xml_text(case["case_id"]), time=f"{float(case.get('duration_s', 0.0)):.3f}")
    status, message = case["status"], _xml_text(case.get("message", ""))
    if waived(case):
        w = case["waiver"]
        ET.SubElement(element, "skipped", message=_xml_text(f"waived ({w.get('category')}): {w.get('reason')}; "
                                                             f"{status}: {case.get('message', '')}"))
    elif unexpected_pass(case):
        ET.SubElement(element, "failure", type="unexpected_pass",
                      message=_xml_text(f"unexpected pass: remove the waiver entry {case['waiver'].get('case')!r} "
                                        f"({case['waiver'].get('reason')})"))
    elif status == Status.FAIL.value:
        failure = ET.SubElement(element, "failure", message=message, type="fail")
        failure.text = _xml_text(_details(case))
    elif status in (Status.ERROR.value, Status.INTERNAL_ERROR.value, Status.CRASH.value, Status.TIMEOUT.value):
        error = ET.SubElement(element, "error", message=message, type=status)
        error.text = _xml_text(_details(case))
    elif status == Status.NOT_SUPPORTED.value:
        ET.SubElement(element, "skipped", message=message)


def _details(case: Mapping[str, Any]) -> str:
    lines = [str(case.get("message", "")), f"case seed: {case.get('seed')}",
             f"params: {json.dumps(case.get('params', {}), sort_keys=True)}"]
    for output, metrics in case.get("metrics", {}).items():
        lines.append(f"{output}: {json.dumps(metrics, sort_keys=True)} "
                     f"tolerance {json.dumps(case.get('tolerance', {}).get(output, {}), sort_keys=True)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Markdown


def _md_cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_summary(results: Mapping[str, Any]) -> str:
    """The Markdown summary: identity of the run, the op x backend table with verdicts, each backend's
    core-profile verdict, every non-passing case with its message, and the command that reproduces it."""
    env = results.get("environment", {})
    tier = results.get("tier")
    out = ["# deepport conformance results", ""]
    out += [f"- suite version: `{results.get('suite_version')}` (generator {results.get('generator_version')})",
            f"- tier: `{tier}`" + ("" if tier == "full" else " (smoke results cannot certify; only the full tier can)"),
            f"- run seed: `{results.get('run_seed')}`",
            f"- device: {_md_cell(device_label(results))}",
            f"- started: {results.get('started')}, took {float(results.get('duration_s', 0.0)):.1f} s"]
    labels = {"deepport": "deepport", "deepport_git": "git", "python": "python", "numpy": "numpy",
              "torch": "torch", "torch_cuda": "CUDA", "torch_hip": "HIP"}
    versions = [f"{label} {env[k]}" for k, label in labels.items() if env.get(k)]
    out.append(f"- software: {', '.join(versions)}; {env.get('platform', '')}")
    for name, info in results.get("backends", {}).items():
        state = "available" if info.get("available") else f"unavailable: {info.get('unavailable_reason')}"
        out.append(f"- backend `{name}` v{info.get('version')}: {_md_cell(info.get('summary', ''))} ({state})")
    out += ["", "## Results", "", "| op | backend | passed | failed | errors | not supported | verdict |",
            "|---|---|---:|---:|---:|---:|---|"]
    for r in table_rows(results):
        out.append(f"| {r.op} | {r.backend} | {r.passed} | {r.failed} | {r.errors} | {r.not_supported} | "
                   f"**{r.verdict}** |")
    out += ["", "## Profiles", ""]
    out += [f"- `{backend}`: {verdict}" for backend, verdict in profile_verdicts(results).items()]
    for backend, verdicts in profile_table(results).items():
        out += [f"  - `{backend}` {v.line()}" for v in verdicts]
    out += ["", "## Cases that did not pass", ""]
    bad = [c for c in results["cases"] if c["status"] != Status.PASS.value or c.get("waiver")]
    order = [s.value for s in (Status.FAIL, Status.CRASH, Status.TIMEOUT, Status.ERROR, Status.INTERNAL_ERROR,
                               Status.NOT_SUPPORTED)]
    bad.sort(key=lambda c: order.index(c["status"]) if c["status"] in order else len(order))
    if not bad:
        out.append("None: every case passed.")
    for c in bad:
        note = ""
        if waived(c):
            note = f" (waived, {c['waiver'].get('category')}: {_md_cell(c['waiver'].get('reason', ''))})"
        elif unexpected_pass(c):
            note = f" **unexpected pass: remove the waiver entry `{c['waiver'].get('case')}`**"
        out.append(f"- **{c['status']}** `{c['case_id']}` on `{c['backend']}` ({c['profile']}, seed {c['seed']})"
                   f"{note}: {_md_cell(c.get('message', '')) or '(no message)'}")
    out += ["", "## Reproduce", "", "```sh", reproduce_command(results), "```", ""]
    return "\n".join(out)
