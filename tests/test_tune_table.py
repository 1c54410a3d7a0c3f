"""``deepport tune-table``: bench results become measured rankings per (device, op, shape bucket); only passing
results count, ties within 3% keep the priority order, the latest run wins, and the shipped sm90 table is
exactly what the committed H200 bench gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deepport.bench import tune_table
from deepport.cli import tune_table as cli_tune_table
from deepport.cli.main import main
from deepport.dispatch import perf_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
H200_RUNS = [RESULTS / "2026-12-02-h200-bench-b5c5311" / "bench.json"]
SHIPPED = perf_table.TABLE_DIR / "nvidia-sm90.json"
COMMIT = "1234567890abcdef1234567890abcdef12345678"


def result(config: str, backend: str, time_us: float | None, *, status: str = "ok", check_ok: bool = True,
           op: str = "fp8_gemm_nt") -> dict[str, Any]:
    m, n, k = (int(part[1:]) for part in config.split("_"))
    return {"op": op, "config": config, "backend": backend, "params": {"m": m, "n": n, "k": k}, "status": status,
            "time_us": time_us, "tflops": 2 * m * n * k / time_us / 1e6 if time_us else None, "gbps": None,
            "check": {"agreement": {"passed": True}, "reference_twin": {"passed": check_ok}}}


def bench_doc(results: list[dict[str, Any]], *, started: str = "2026-12-01T00:00:00+00:00",
              name: str = "NVIDIA H200", arch: str = "sm_90") -> dict[str, Any]:
    return {"schema": "deepport.bench", "schema_version": 1, "command": "deepport bench --device cuda",
            "started": started, "environment": {"deepport_git": "abc-dirty", "torch": "2.11.0",
                                                "device": {"type": "cuda", "kind": "cuda", "vendor": "nvidia",
                                                           "name": name, "arch": arch}},
            "results": results}


def write_run(tmp_path: Path, run_id: str, doc: dict[str, Any]) -> Path:
    folder = tmp_path / run_id
    folder.mkdir()
    (folder / "bench.json").write_text(json.dumps(doc))
    return folder / "bench.json"


PRIORITY = {"hopper": 30, "triton": 20, "torch": 10}


def build(*paths: Path) -> dict[str, Any]:
    return tune_table.build(list(paths), lambda b, kind: PRIORITY.get(b) if kind == "cuda" else None,
                            cli_tune_table.perf_shape)


def ranking(table: dict[str, Any], label: str, device: str = "NVIDIA H200") -> list[tuple[str, float]]:
    entry = table["devices"][device]["fp8_gemm_nt"][label]
    return [(f["backend"], f["time_us"]) for f in entry["ranking"]]


def test_rankings_per_bucket_from_passing_results_with_ties_in_priority_order(tmp_path: Path) -> None:
    path = write_run(tmp_path, "run-a", bench_doc([
        result("m1_n2112_k7168", "torch", 20.0), result("m1_n2112_k7168", "triton", 10.0),
        result("m1_n2112_k7168", "hopper", 10.2),  # within 3% of triton: priority first
        result("m64_n2112_k7168", "torch", 40.0), result("m64_n2112_k7168", "triton", 20.0),
        result("m64_n2112_k7168", "hopper", 30.0),
        result("m4096_n2112_k7168", "torch", 100.0), result("m4096_n2112_k7168", "hopper", 150.0),
        result("m4096_n2112_k7168", "triton", 50.0, check_ok=False),  # failed its check: never ranked
        result("m4096_n576_k7168", "torch", 80.0), result("m4096_n576_k7168", "hopper", 40.0),
        result("m4096_n576_k7168", "triton", None, status="error"),
    ]))
    table = build(path)
    assert table["family"] == "nvidia-sm90" and table["tie_tolerance"] == 0.03
    assert table["runs"]["run-a"]["commit"] == "abc-dirty" and table["runs"]["run-a"]["device"] == "NVIDIA H200"
    assert table["buckets"] == {"fp8_gemm_nt": {"ranges": {"m": [64, 128, 1024]}, "exact": ["n", "k"]}}
    # m=1 and m=64 share the m<=64 bucket: geometric means over both configs
    assert ranking(table, "m<=64 n=2112 k=7168") == [("triton", 14.14), ("hopper", 17.49), ("torch", 28.28)]
    assert table["devices"]["NVIDIA H200"]["fp8_gemm_nt"]["m<=64"]["configs"] == ["m1_n2112_k7168",
                                                                                   "m64_n2112_k7168"]
    assert ranking(table, "m>1024 n=2112 k=7168") == [("torch", 100.0), ("hopper", 150.0)]
    # the ranges-only bucket ranks the backends that passed on every config of it (triton failed one)
    assert ranking(table, "m>1024") == [("hopper", 77.46), ("torch", 89.44)]
    assert all(f["run"] == "run-a" for f in table["devices"]["NVIDIA H200"]["fp8_gemm_nt"]["m>1024"]["ranking"])
    tied = write_run(tmp_path, "run-b", bench_doc([result("m1_n2112_k7168", "triton", 10.0),
                                                   result("m1_n2112_k7168", "hopper", 10.2)]))
    assert ranking(build(tied), "m<=64 n=2112 k=7168") == [("hopper", 10.2), ("triton", 10.0)]


def test_the_latest_run_wins_and_commit_txt_names_the_commit(tmp_path: Path) -> None:
    old = write_run(tmp_path, "old", bench_doc([result("m64_n576_k7168", "torch", 10.0),
                                                result("m64_n576_k7168", "triton", 20.0)], started="2026-11-01T00:00"))
    new = write_run(tmp_path, "new", bench_doc([result("m64_n576_k7168", "triton", 5.0)], started="2026-12-01T00:00"))
    (tmp_path / "new" / "commit.txt").write_text(f"deepport commit: {COMMIT} (main)\n")
    table = build(new, old)
    assert ranking(table, "m<=64 n=576 k=7168") == [("triton", 5.0), ("torch", 10.0)]
    found = table["devices"]["NVIDIA H200"]["fp8_gemm_nt"]["m<=64 n=576 k=7168"]["ranking"]
    assert [f["run"] for f in found] == ["new", "old"]
    assert table["runs"]["new"]["commit"] == COMMIT and table["runs"]["new"]["recorded_git"] == "abc-dirty"
    assert table["runs"]["old"]["commit"] == "abc-dirty" and "recorded_git" not in table["runs"]["old"]


def test_files_of_several_families_or_foreign_files_are_refused(tmp_path: Path) -> None:
    h200 = write_run(tmp_path, "h200", bench_doc([result("m64_n576_k7168", "torch", 10.0)]))
    l40 = write_run(tmp_path, "l40", bench_doc([], name="NVIDIA L40S", arch="sm_89"))
    with pytest.raises(tune_table.TuneTableError, match="nvidia-sm89, nvidia-sm90"):
        build(h200, l40)
    other = tmp_path / "other.json"
    other.write_text('{"schema": "deepport.certify"}')
    with pytest.raises(tune_table.TuneTableError, match="not a deepport bench file"):
        build(other)


def test_the_command_writes_a_table_dispatch_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_run(tmp_path, "run-a", bench_doc([result("m64_n576_k7168", "torch", 10.0),
                                                   result("m64_n576_k7168", "triton", 5.0)]))
    out = tmp_path / "tables" / "nvidia-sm90.json"
    assert main(["tune-table", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp8_gemm_nt  m<=64 n=576 k=7168 [1]: triton 5.0 us > torch 10.0 us" in printed
    table = perf_table.load(out)
    assert table.family == "nvidia-sm90" and table.bucket("fp8_gemm_nt", {"m": 7, "n": 576, "k": 7168}) == (
        "m<=64 n=576 k=7168", "m<=64")
    measured = table.lookup("fp8_gemm_nt", ("m<=64 n=576 k=7168", "m<=64"), "NVIDIA H200")
    assert measured is not None and measured.backends == ("triton", "torch") and measured.runs == ("run-a",)
    assert main(["tune-table", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert main(["tune-table", str(path), "--out", str(out), "--tolerance", "2"]) == 2


def test_the_shipped_sm90_table_is_what_the_committed_h200_benches_give() -> None:
    shipped = json.loads(SHIPPED.read_text())
    rebuilt = tune_table.build(H200_RUNS, cli_tune_table.builtin_priority, cli_tune_table.perf_shape)
    assert rebuilt["devices"] == shipped["devices"] and rebuilt["buckets"] == shipped["buckets"]
    assert rebuilt["runs"] == shipped["runs"]
    # the commit the run's folder names (commit.txt), not the device copy's recorded git state
    assert shipped["runs"]["2026-12-02-h200-bench-b5c5311"]["commit"] == "b5c5311a96b7d479aba7242560223843f8f63b74"


def test_files_of_one_folder_get_distinct_run_ids(tmp_path: Path) -> None:
    folder = tmp_path / "2026-12-02-run"
    folder.mkdir()
    paths = []
    for name, backend in (("a.json", "torch"), ("b.json", "triton")):
        (folder / name).write_text(json.dumps(bench_doc([result("m64_n576_k7168", backend, 10.0)])))
        paths.append(folder / name)
    assert sorted(build(*paths)["runs"]) == ["2026-12-02-run/a.json", "2026-12-02-run/b.json"]
