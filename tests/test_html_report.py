"""The HTML report: one self-contained file (no script, no external resource) rendered from results.json:
profiles, the op x profile x backend matrix, failures with their worst element and reproducer, and the
bench chart when bench results are present (``deepport report DIR --html``)."""

from __future__ import annotations

import json
import shutil
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from deepport.cli.main import main
from deepport.conformance import run_suite
from deepport.conformance.exploits import CONTROL, exploit
from deepport.conformance.html_report import case_command, render_html, worst_elements
from deepport.dispatch import registered

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "2026-11-28-h200-bench" / "bench.json"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs


@cache
def _results() -> dict[str, Any]:
    zeros = exploit("zeros")
    with registered(CONTROL), registered(zeros):
        run = run_suite([CONTROL.name, zeros.name], "smoke", device="cpu", ops=["mla_decode", "fp8_gemm_nt"],
                        case_pattern="page_edges", run_seed=42)
    return run.to_dict()


def _parse(text: str) -> _Tags:
    tags = _Tags()
    tags.feed(text)
    return tags


def test_the_report_is_one_self_contained_file() -> None:
    text = render_html(_results(), bench=json.loads(BENCH.read_text()))
    tags = _parse(text)
    assert text.startswith("<!DOCTYPE html>") and "svg" in tags.tags
    assert not {"script", "link", "img", "iframe", "object"} & set(tags.tags)
    assert not any(name in ("src", "href") or (value or "").startswith(("http:", "https:", "javascript:"))
                   for name, value in tags.attrs)


def test_profiles_matrix_and_failures_with_worst_elements_and_reproducers() -> None:
    results = _results()
    text = render_html(results)
    assert "<th>mla_decode/core" in text and "<td>mla_decode</td><td>mla_decode/core</td>" in text
    assert "CERTIFIED" in text and "FAIL" in text
    (fail,) = [c for c in results["cases"] if c["status"] == "fail"]
    worst = worst_elements(fail)
    assert worst and worst[0]["output"] == "out" and worst[0]["index"].startswith("[")
    assert f"worst at <code>{worst[0]['index']}</code>" in text
    command = case_command(results, fail)
    assert command == ("deepport certify --backend exploit_zeros --tier smoke --device cpu "
                       "--case mla_decode/page_edges --seed 42")
    assert command in text
    loaded = {**results, "command": "deepport certify --plugin 'acme port:BACKEND' --backend exploit_zeros --seed 42"}
    assert case_command(loaded, fail) == ("deepport certify --plugin 'acme port:BACKEND' --backend exploit_zeros "
                                          "--tier smoke --device cpu --case mla_decode/page_edges --seed 42")
    assert "max err / bound" in text  # each output's figures next to its tolerance
    assert "<svg" not in text  # no bench results given: no chart


def test_report_dir_html_writes_the_report_with_the_bench_chart(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    shutil.copy(BENCH, tmp_path / "bench.json")
    assert main(["report", str(tmp_path), "--html"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Bench</h2>" in html and "<svg" in html and "% of" in html
    assert (tmp_path / "junit.xml").exists() and (tmp_path / "summary.md").exists()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["report", str(tmp_path / "results.json"), "--html", "--bench", str(tmp_path / "bad.json")]) == 2
    assert "not a bench.json" in " ".join(capsys.readouterr().err.split())
