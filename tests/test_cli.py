"""The ``deepport`` command line: info, certify's exit codes and reports, report regeneration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepport.cli.main import main
from deepport.dispatch import Backend, OpSupport, registered
from deepport.kernels.mla_decode import MLADecodeCall


def write_zeros(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """A wrong MLA decode: every output zero."""
    out.zero_()
    lse.zero_()


ZEROS = Backend(
    name="zeros", summary="writes zeros (deliberately wrong)", version="0",
    ops=(OpSupport(op="mla_decode", entry=f"{__name__}:write_zeros",
                   dtypes=frozenset({torch.bfloat16, torch.float16})),),
    priority={},  # never chosen automatically, so other tests are unaffected
)


def test_info_lists_builtin_backends_and_the_automatic_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "torch" in text
    assert "mla_decode on cpu -> torch" in text
    assert "dtypes: bfloat16, float16" in text


def test_info_json_is_valid_json_with_the_same_content(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in data["backends"]} >= {"reference", "torch"}
    cpu = [s for s in data["selection"] if s["device"] == "cpu" and s["op"] == "mla_decode"]
    assert cpu[0]["chosen"] == "torch" and cpu[0]["source"] == "automatic"
    assert data["devices"][0]["type"] == "cpu"


def test_info_shows_why_an_unavailable_backend_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    gone = Backend("gone", "needs a driver", "1", ZEROS.ops, {"*": 99}, probe=lambda: "driver missing")
    with registered(gone):
        assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "unavailable: driver missing" in text
    assert "mla_decode on cpu -> torch" in text  # higher priority, but it cannot run here


def test_certify_one_case_writes_three_reports_with_the_seed(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    assert main(["certify", "--backend", "torch", "--case", "page_edges", "--out", str(out), "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "run seed: 7" in printed and "PASS" in printed and "cannot certify" in printed
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["run_seed"] == 7 and results["tier"] == "smoke"
    assert [c["case_id"] for c in results["cases"]] == ["mla_decode/page_edges"]
    assert "--seed 7" in results["command"]
    assert "run seed: `7`" in (out / "summary.md").read_text()


def test_certify_unknown_backend_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "--backend", "nosuch", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'nosuch'" in err and "reference" in err and "torch" in err
    assert not list(tmp_path.iterdir())


def test_certify_case_matching_nothing_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "--backend", "torch", "--case", "no_such_case", "--out", str(tmp_path)]) == 2
    assert "no smoke-tier case matches --case 'no_such_case'" in capsys.readouterr().err


def test_certify_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "--tier", "huge"]) == 2
    assert main(["certify", "--seed", "-1"]) == 2
    assert main(["certify", "--device", "nosuchdevice"]) == 2


def test_certify_a_wrong_backend_exits_1_and_the_summary_lists_the_failure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with registered(ZEROS):
        status = main(["certify", "--backend", "zeros", "--case", "page_edges", "--out", str(tmp_path), "--seed", "3"])
    assert status == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "mla_decode/page_edges on zeros" in captured.err  # reported as it happens
    summary = (tmp_path / "summary.md").read_text()
    assert "**fail** `mla_decode/page_edges` on `zeros`" in summary
    assert "core profile: FAIL (0/1 core cases passed)" in summary


def test_report_regenerates_from_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "--backend", "torch", "--case", "page_edges", "--out", str(tmp_path), "--seed", "5"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    (tmp_path / "summary.md").unlink()
    (tmp_path / "junit.xml").unlink()
    assert main(["report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "summary.md").read_text() == summary
    assert (tmp_path / "junit.xml").exists()


def test_report_rejects_a_results_file_of_another_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema": "deepport.conformance.results", "schema_version": 99}))
    assert main(["report", str(path)]) == 2
    assert "expected schema_version 1, got 99" in capsys.readouterr().err


def test_import_deepport_does_not_import_rich() -> None:
    code = "import sys, deepport; sys.exit('rich' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_certify_isolated_with_a_plugin_backend_records_isolation_and_fails_a_cheat(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepport.conformance.exploits import EXPLOITS
    from deepport.dispatch import registry

    try:
        status = main(["certify", "--backend", "exploit_zeros", "--plugin", "deepport.conformance.exploits:EXPLOITS",
                       "--case", "page_edges", "--isolate", "--seed", "3", "--out", str(tmp_path)])
    finally:
        for b in EXPLOITS:
            if b.name in {x.name for x in registry.all_backends()}:
                registry.unregister(b.name)
    assert status == 1
    out = capsys.readouterr().out
    assert "isolation: each backend in its own process" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["isolation"] == "process"
    assert "--plugin deepport.conformance.exploits:EXPLOITS" in results["command"] and "--isolate" in results["command"]
    assert [c["status"] for c in results["cases"]] == ["fail"]


def test_certify_with_a_plugin_that_does_not_import_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["certify", "--plugin", "no_such_module_for_deepport", "--out", str(tmp_path)]) == 2
