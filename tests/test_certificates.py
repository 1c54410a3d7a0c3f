"""The committed certificates keep up with the suite: benchmarks/results/CERTIFICATES.md names, for the
installed suite version, either a full-tier certificate that ``deepport verify`` accepts or a pending note
with its reason; every committed run is listed with its suite version in benchmarks/results/README.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deepport.conformance.runner import SUITE_VERSION
from deepport.conformance.verify import VALID, verify_file

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ROW = re.compile(r"^\|\s*(?P<suite>\d{4}\.\d+\.\d+)\s*\|\s*(?P<backend>[\w-]+)\s*\|\s*(?P<certificate>[^|]*?)\s*\|"
                 r"\s*(?P<status>.*?)\s*\|\s*$")


def _rows() -> dict[str, dict[str, str]]:
    rows = {}
    for line in (RESULTS / "CERTIFICATES.md").read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            assert m["suite"] not in rows, f"two rows for suite {m['suite']}"
            rows[m["suite"]] = m.groupdict()
    return rows


def test_the_installed_suite_version_has_a_certificate_or_a_pending_note() -> None:
    row = _rows().get(SUITE_VERSION)
    assert row is not None, (f"suite {SUITE_VERSION} has no row in benchmarks/results/CERTIFICATES.md: add its "
                             f"certificate, or 'pending: <why>' until it is made")
    if row["certificate"] in ("", "-"):
        reason = row["status"].removeprefix("pending:").strip()
        assert row["status"].startswith("pending:") and len(reason) > 20, (
            f"suite {SUITE_VERSION}: no certificate, so the status must say 'pending: <why and what to run>'")
    else:
        assert row["status"] == "current", f"suite {SUITE_VERSION}'s certificate row must have status 'current'"


def test_every_named_certificate_is_a_full_tier_run_of_its_suite_version() -> None:
    for suite, row in _rows().items():
        if row["certificate"] in ("", "-"):
            continue
        results = RESULTS / row["certificate"] / "results.json"
        assert results.is_file(), f"{row['certificate']}: no results.json"
        data = json.loads(results.read_text(encoding="utf-8"))
        assert data["suite_version"] == suite and data["tier"] == "full", row
        assert data["selection"] == {"ops": None, "case_pattern": None}, f"{row['certificate']}: ops were selected"
        assert data["backends"].keys() == {row["backend"]}


def test_the_current_certificate_verifies() -> None:
    row = _rows().get(SUITE_VERSION)
    if row is None or row["certificate"] in ("", "-"):
        pytest.skip(f"suite {SUITE_VERSION}: certificate pending ({row['status'] if row else 'no row'})")
    rep = verify_file(RESULTS / row["certificate"] / "results.json", regenerate=2)
    assert rep.verdict == VALID, [f"{f.where()}: {f.message}" for f in rep.errors]


def test_every_committed_run_is_listed_with_its_suite_version() -> None:
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        line = next((ln for ln in index.splitlines() if f"`{folder.name}`" in ln), None)
        assert line is not None, f"benchmarks/results/README.md does not list {folder.name}"
        for results in sorted(folder.rglob("*results*.json")):  # every conformance run in the folder
            data = json.loads(results.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "suite_version" in data:
                suite = data["suite_version"]
                assert f"| {suite} |" in line, f"{folder.name}: README.md must give its suite version {suite}"
