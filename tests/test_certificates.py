"""The committed certificates keep up with the suite: benchmarks/results/CERTIFICATES.md names, for the
installed suite version, each backend CI runs on a CPU and each other certificate, either a full-tier
certificate that ``deepport verify`` accepts now or a note saying why there is none; every committed run
is listed with its suite version in benchmarks/results/README.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from deepport.conformance.certificate import MANIFEST, read_archive
from deepport.conformance.certificate_verify import verify_certificate
from deepport.conformance.runner import SUITE_VERSION
from deepport.conformance.verify import VALID, verify_file

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ROW = re.compile(r"^\|\s*(?P<suite>\d{4}\.\d+\.\d+)\s*\|\s*(?P<backend>[\w-]+)\s*\|\s*(?P<device>[\w-]+)\s*\|"
                 r"\s*(?P<certificate>[^|]*?)\s*\|\s*(?P<status>.*?)\s*\|\s*$")
CI_BACKENDS = ("reference", "torch", "opencl", "triton")  # what CI runs on a CPU (README command 2: .ci/run)
NO_CERTIFICATE = ("pending:", "not produced:")


def _rows() -> dict[tuple[str, str, str], dict[str, str]]:
    rows = {}
    for line in (RESULTS / "CERTIFICATES.md").read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            key = (m["suite"], m["backend"], m["device"])
            assert key not in rows, f"two rows for suite {key[0]}, backend {key[1]}, device {key[2]}"
            rows[key] = m.groupdict()
    return rows


def _installed() -> list[dict[str, str]]:
    return [row for (suite, _, _), row in _rows().items() if suite == SUITE_VERSION]


def _certificate_file(folder: str) -> Path:
    """The one certificate a folder holds: a ``certificate-*.tar.gz`` archive, else a ``results.json``."""
    archives = sorted((RESULTS / folder).glob("certificate-*.tar.gz"))
    assert len(archives) <= 1, f"{folder}: several archives {[a.name for a in archives]}; keep one per folder"
    if archives:
        return archives[0]
    results = RESULTS / folder / "results.json"
    assert results.is_file(), f"{folder}: neither a certificate-*.tar.gz nor a results.json"
    return results


def _named(row: dict[str, str]) -> bool:
    return row["certificate"] not in ("", "-")


def test_each_ci_backend_and_each_certificate_of_the_installed_suite_has_a_row_that_says_where_it_stands() -> None:
    rows = _installed()
    cpu = {row["backend"] for row in rows if row["device"] == "cpu"}
    missing = [b for b in CI_BACKENDS if b not in cpu]
    assert not missing, (f"suite {SUITE_VERSION}: benchmarks/results/CERTIFICATES.md has no cpu row for {missing}: "
                         "add its certificate, or 'pending: <why and what to run>' / 'not produced: <why>'")
    for row in rows:
        if _named(row):
            assert row["status"] == "current", f"{row}: a certificate of the installed suite must be 'current'"
            continue
        prefix = next((p for p in NO_CERTIFICATE if row["status"].startswith(p)), None)
        assert prefix is not None and len(row["status"].removeprefix(prefix).strip()) > 20, (
            f"{row}: without a certificate, the status must say 'pending: <why and what to run>' or "
            "'not produced: <why>'")


def _archive_manifest(path: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(read_archive(path).files[MANIFEST])
    return manifest


def test_every_named_certificate_is_a_full_tier_run_of_its_suite_backend_and_device() -> None:
    for (suite, backend, device), row in _rows().items():
        if not _named(row):
            continue
        path = _certificate_file(row["certificate"])
        if path.name.endswith(".tar.gz"):
            manifest = _archive_manifest(path)
            assert manifest["mode"] == "certification", f"{path.name}: a test archive is never a certificate"
            data = json.loads(read_archive(path).files["results.json"])
            recorded_device = manifest["device"]["type"]
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            recorded_device = data["environment"]["device"]["type"]
        assert data["suite_version"] == suite and data["tier"] == "full", row
        assert data["selection"] == {"ops": None, "case_pattern": None}, f"{row['certificate']}: ops were selected"
        assert backend in data["backends"], row  # one run may certify several backends
        assert recorded_device == device, f"{row['certificate']}: made on {recorded_device}, the row says {device}"


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r['backend']}-{r['device']}") for r in _installed()
                                 if _named(r)] or [pytest.param(None, id="none")])
def test_the_current_certificates_verify(row: dict[str, str] | None) -> None:
    if row is None:
        pytest.skip(f"suite {SUITE_VERSION}: no certificate yet (CERTIFICATES.md says why for each backend)")
    path = _certificate_file(row["certificate"])
    if path.name.endswith(".tar.gz"):
        rep = verify_certificate(path, regenerate=2)
        errors = [f"{f.where()}: {f.message}" for f in rep.checks.errors]
        assert rep.verdict == VALID, (
            f"{path.name}: {rep.verdict}: {errors}. If the suite source changed since it was made, run its command "
            "again (scripts/cpu_certify.sh for a cpu row) or mark the row 'pending: <why and what to run>'")
    else:
        rep = verify_file(path, regenerate=2)
        assert rep.verdict == VALID, [f"{f.where()}: {f.message}" for f in rep.errors]


def test_every_committed_run_is_listed_with_its_suite_version() -> None:
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        line = next((ln for ln in index.splitlines() if f"`{folder.name}`" in ln), None)
        assert line is not None, f"benchmarks/results/README.md does not list {folder.name}"
        suites = set()
        for results in sorted(folder.rglob("*results*.json")):  # every conformance run in the folder
            data = json.loads(results.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "suite_version" in data:
                suites.add(data["suite_version"])
        for archive in sorted(folder.rglob("certificate-*.tar.gz")):  # and every certificate archive
            suites.add(_archive_manifest(archive)["suite_version"])
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        listed = {v.strip() for v in cells[2].split(",")} if len(cells) > 2 else set()  # the suite version column
        for suite in sorted(suites):
            assert suite in listed, (f"{folder.name}: README.md must give its suite version {suite} (several: "
                                     f"'2026.12.1, 2026.12.2'), got {cells[2] if len(cells) > 2 else line!r}")
