"""Waivers (a vendor's expected failures): parsed strictly, applied strictly (an unexpected pass fails and asks
for the entry's removal), shown in every report, and never applied by certification."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deepport.cli.main import main
from deepport.conformance import report
from deepport.conformance.results import CaseResult, Status, SuiteRun
from deepport.conformance.waivers import CATEGORIES, WaiverFileError, apply_waivers, load_waivers, parse_waivers

TOML = '''
[[waiver]]
case = "mla_decode/page_*"
backend = "acme*"
category = "known-bug"
reason = "reads past the last page (ACME-1)"

[[waiver]]
case = "fp8_gemm_nt/m40_n256_k512"
category = "precision"
reason = "accumulates in bf16 (ACME-2)"

[[waiver]]
case = "moe_layout/*"
category = "unsupported-feature"
reason = "no MoE yet"
'''


def _result(case_id: str, backend: str, status: Status) -> CaseResult:
    op = case_id.split("/")[0]
    return CaseResult(case_id, op, backend, "smoke", "core", (), {}, 1, status, 0.0, message=f"{status.value} msg")


def _run(*results: CaseResult) -> SuiteRun:
    return SuiteRun("v", 1, "smoke", 1, "", "", "", 0.0, {}, {r.backend: {} for r in results}, list(results))


def test_toml_and_json_files_give_the_same_entries(tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text(TOML)
    entries = load_waivers(tmp_path / "w.toml")
    (tmp_path / "w.json").write_text(json.dumps({"waiver": [w.to_dict() for w in entries]}))
    assert load_waivers(tmp_path / "w.json") == entries
    assert [w.category for w in entries] == ["known-bug", "precision", "unsupported-feature"]
    assert entries[0].matches("mla_decode/page_edges", "acme_port") and not entries[0].matches(
        "mla_decode/page_edges", "torch")
    assert entries[1].matches("fp8_gemm_nt/m40_n256_k512", "anything")


@pytest.mark.parametrize(("entry", "says"), [
    ({"case": "x", "category": "known-bug"}, "`reason` must be a non-empty string"),
    ({"case": "x", "category": "oops", "reason": "r"}, "category 'oops' is not one of"),
    ({"case": "x", "category": "known-bug", "reason": "r", "expires": 1}, "unknown keys ['expires']"),
    ({"case": "", "category": "known-bug", "reason": "r"}, "`case` must be a non-empty string"),
    ({"case": "x", "category": "known-bug", "reason": "r", "backend": 3}, "`backend` must be a string"),
])
def test_malformed_entries_say_what_is_wrong(entry: dict[str, object], says: str) -> None:
    with pytest.raises(WaiverFileError, match=r".*" + says.replace("[", r"\[").replace("]", r"\]")):
        parse_waivers({"waiver": [entry]})
    assert set(CATEGORIES) >= {"known-bug", "precision"}


def test_waived_failures_pass_the_run_and_an_unexpected_pass_fails_it() -> None:
    entries = parse_waivers(json.loads(json.dumps({"waiver": [
        {"case": "mla_decode/page_*", "category": "known-bug", "reason": "r1"},
        {"case": "fp8_gemm_nt/*", "category": "precision", "reason": "r2"},
        {"case": "moe_layout/*", "category": "known-bug", "reason": "r3"}]})))
    crashed = _result("mla_decode/page_edges", "acme", Status.CRASH)
    passed = _result("mla_decode/all_empty_b3", "acme", Status.PASS)
    run = _run(crashed, passed)
    outcome = apply_waivers(run, entries)
    assert run.passed() and outcome.waived == [crashed] and not outcome.unexpected_passes
    assert [w.case for w in outcome.unused] == ["fp8_gemm_nt/*", "moe_layout/*"]

    fixed = _result("fp8_gemm_nt/m40_n256_k512", "acme", Status.PASS)
    run = _run(crashed, fixed)
    outcome = apply_waivers(run, entries)
    assert not run.passed() and outcome.unexpected_passes == [fixed]
    assert any("remove the waiver entry 'fp8_gemm_nt/*'" in line for line in outcome.lines())
    results = run.to_dict()
    assert [w["case"] for w in results["waivers"]] == ["mla_decode/page_*", "fp8_gemm_nt/*", "moe_layout/*"]
    verdicts = {r.op: r.verdict for r in report.table_rows(results)}
    assert verdicts == {"mla_decode": "PASS (waived)", "fp8_gemm_nt": "FAIL"}
    junit = ET.fromstring(report.junit_xml(results))
    cases = {c.get("name"): c for c in junit.iter("testcase")}
    assert cases["mla_decode/page_edges"].find("skipped") is not None
    assert "waived (known-bug): r1" in str(cases["mla_decode/page_edges"].find("skipped").get("message"))
    failure = cases["fp8_gemm_nt/m40_n256_k512"].find("failure")
    assert failure is not None and failure.get("type") == "unexpected_pass"
    summary = report.markdown_summary(results)
    assert "(waived, known-bug: r1)" in summary and "unexpected pass: remove the waiver entry" in summary


def test_certify_applies_a_waiver_file_strictly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reference backend passes the case a waiver expects to fail: exit 1, and the report says why."""
    waivers = tmp_path / "waivers.toml"
    waivers.write_text('[[waiver]]\ncase = "mla_decode/all_empty_b3"\ncategory = "known-bug"\nreason = "stale"\n')
    code = main(["certify", "--backend", "reference", "--op", "mla_decode", "--case", "all_empty_b3", "--device",
                 "cpu", "--out", str(tmp_path / "out"), "--waivers", str(waivers), "--seed", "5"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "unexpected pass mla_decode/all_empty_b3 on reference: remove the waiver entry" in " ".join(out.split())
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (record,) = results["cases"]
    assert record["status"] == "pass" and record["waiver"]["reason"] == "stale"
    assert "--waivers" in results["command"]


def test_certification_never_applies_waivers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    waivers = tmp_path / "waivers.toml"
    waivers.write_text(TOML)
    assert main(["certify", "--certify", "--backend", "reference", "--waivers", str(waivers)]) == 2
    assert "--certify never applies waivers" in capsys.readouterr().err.replace("\n", " ")


def test_an_unreadable_waiver_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "w.toml"
    bad.write_text("[[waiver]]\ncase = 'x'\n")
    assert main(["certify", "--backend", "reference", "--waivers", str(bad)]) == 2
    assert "must be a non-empty string" in capsys.readouterr().err.replace("\n", " ")
