"""The reports derived from a run: JUnit XML, the Markdown summary, and reading results.json back."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from deepport.conformance import report
from deepport.conformance.results import CaseResult, Status, SuiteRun


def _result(name: str, status: Status, message: str = "", profile: str = "core",
            backend: str = "torch") -> CaseResult:
    return CaseResult(f"mla_decode/{name}", "mla_decode", backend, "smoke", profile, ("bfloat16",),
                      MappingProxyType({"b": 2, "lengths": [1, 2]}), 1234, status, 0.25,
                      message=message)


def _run(cases: list[CaseResult]) -> SuiteRun:
    env = {"python": "3.11", "deepport": "0.1.0", "torch": "2.x", "platform": "test",
           "device": {"type": "cpu", "index": None, "kind": "cpu", "name": "x86_64", "arch": "cpu",
                      "multiprocessors": 4}}
    backends = {name: {"version": "1", "summary": f"{name} backend", "available": True, "unavailable_reason": None}
                for name in dict.fromkeys(c.backend for c in cases)}
    return SuiteRun("2026.11.1", 1, "smoke", 77, "deepport certify --seed 77", "2026-01-01T00:00:00+00:00",
                    "2026-01-01T00:00:01+00:00", 1.0, env, backends, cases)


ONE_OF_EACH = [
    _result("passes", Status.PASS),
    _result("fails", Status.FAIL, "`out`: 3 mismatches <max_abs_err 0.5> & more (seed 1234)"),
    _result("errors", Status.ERROR, "RuntimeError: boom\x1b[31m"),
    _result("suite_fault", Status.INTERNAL_ERROR, "case failed calibration"),
    _result("ext_page1", Status.NOT_SUPPORTED, "needs page_block_size in {64}, got 1", profile="extension"),
]


@pytest.fixture
def results() -> dict[str, Any]:
    return _run(ONE_OF_EACH).to_dict()


def test_junit_xml_parses_and_counts_each_status(results: dict[str, Any]) -> None:
    root = ET.fromstring(report.junit_xml(results))
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "deepport.torch"
    for element in (suite, root):
        counts = [element.get(k) for k in ("tests", "failures", "errors", "skipped")]
        assert counts == ["5", "1", "2", "1"]
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert all(c.get("classname") == "deepport.torch.mla_decode" for c in cases.values())
    assert cases["mla_decode/passes"].find("*") is None
    failure = cases["mla_decode/fails"].find("failure")
    assert failure is not None and "<max_abs_err 0.5> & more" in (failure.get("message") or "")
    assert [e.get("type") for e in suite.iter("error")] == ["error", "internal_error"]
    skipped = cases["mla_decode/ext_page1"].find("skipped")
    assert skipped is not None and skipped.get("message") == "needs page_block_size in {64}, got 1"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["suite_version"] == "2026.11.1" and props["run_seed"] == "77" and props["tier"] == "smoke"
    assert (props["device"] or "").startswith("cpu")


def test_junit_xml_stays_well_formed_with_control_characters_in_messages(results: dict[str, Any]) -> None:
    text = report.junit_xml(results)
    assert "\x1b" not in text
    ET.fromstring(text)


def test_markdown_lists_every_non_passing_case_and_the_core_verdict(results: dict[str, Any]) -> None:
    md = report.markdown_summary(results)
    for name in ("fails", "errors", "suite_fault", "ext_page1"):
        assert f"`mla_decode/{name}`" in md
    assert "`mla_decode/passes`" not in md
    assert "3 mismatches" in md
    assert "core profile: FAIL (1/4 core cases passed)" in md
    assert "| mla_decode | torch | 1 | 1 | 2 | 1 | **FAIL** |" in md
    assert "run seed: `77`" in md and "cannot certify" in md
    assert "deepport certify --seed 77" in md  # the recorded command reproduces the run


def test_core_profile_passes_when_only_extension_cases_are_unsupported() -> None:
    run = _run([_result("a", Status.PASS), _result("ext", Status.NOT_SUPPORTED, "no", profile="extension")])
    results = run.to_dict()
    assert report.profile_verdicts(results) == {"torch": "core profile: PASS (1/1 core cases passed)"}
    assert [r.verdict for r in report.table_rows(results)] == ["PASS (core)"]


def test_core_case_not_supported_is_not_a_core_pass() -> None:
    results = _run([_result("a", Status.PASS), _result("b", Status.NOT_SUPPORTED, "no")]).to_dict()
    assert report.profile_verdicts(results)["torch"].startswith("core profile: INCOMPLETE")
    assert [r.verdict for r in report.table_rows(results)] == ["CORE INCOMPLETE"]


def test_results_json_round_trips_through_load_results(tmp_path: Path) -> None:
    run = _run(ONE_OF_EACH)
    paths = report.write_reports(run, tmp_path / "out")
    assert set(paths) == {"results", "junit", "summary"} and all(p.exists() for p in paths.values())
    assert report.load_results(paths["results"]) == json.loads(json.dumps(run.to_dict()))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_reports_regenerate_identically_from_saved_results(tmp_path: Path) -> None:
    paths = report.write_reports(_run(ONE_OF_EACH), tmp_path)
    loaded = report.load_results(paths["results"])
    assert report.junit_xml(loaded) == paths["junit"].read_text()
    assert report.markdown_summary(loaded) == paths["summary"].read_text()


@pytest.mark.parametrize("change, expected", [
    ({"schema_version": 2}, "expected schema_version 1, got 2"),
    ({"schema": "something.else"}, "expected a results file with schema"),
])
def test_load_results_rejects_another_schema(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**_run(ONE_OF_EACH).to_dict(), **change}))
    with pytest.raises(report.ResultsFileError, match=expected):
        report.load_results(path)


def test_load_results_rejects_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("<html>")
    with pytest.raises(report.ResultsFileError, match="cannot read"):
        report.load_results(path)
