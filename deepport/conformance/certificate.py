"""Certification: run the ``full`` tier from a nonce, every call isolated, and write one archive.

``deepport certify --certify`` (:func:`certify`) runs every case of the ``full`` tier on each backend
in its own worker process (a crash is recorded as ``crash``, a hang past the per-call limit as
``timeout``, and the run goes on), with the run seed derived from a nonce (:func:`nonce_seed`; pass
``--nonce`` to use one a third party chose, MLPerf-style, so the inputs cannot be known in advance).
No waiver is applied. The result is one file, ``certificate-<backends>-<UTC time>.tar.gz``, whose
single folder holds:

- ``certificate.json``: the manifest (schema ``deepport.certificate`` version 1): ``mode``
  (``certification``, or ``test`` for the CPU-sized runs of this repository's tests), nonce, run seed,
  tier and selection, suite version, generator version and :func:`~deepport.conformance.identity.suite_source_sha256`,
  per backend its declared capabilities (ops, dtypes, requirements, priorities, explicit profiles, its
  own ``identity()``), the profiles it claims and their verdicts, the device as torch and the OS report
  it, software versions, plugins loaded, isolation and per-call timeout, waivers (always empty);
- ``results.json`` (the run, :mod:`~deepport.conformance.results`), ``junit.xml``, ``summary.md`` and
  ``report.html`` (derived from it);
- ``SHA256SUMS``: ``<sha256>  <file>`` for every other file (``sha256sum -c`` format).

Why a ``.tar.gz``: one file to hand over, readable by the standard library and every OS's tools,
with a folder that ``tar xzf`` restores as-is; ``deepport verify`` reads either the archive or that
folder. The sums make corruption visible; they do not make the archive unforgeable: the
certificate's trust comes from ``deepport verify`` re-deriving everything it can (suite identity,
seeds, inputs) and ``--replay``, which re-runs sampled cases on the verifier's own machine.

Test mode: the ``full`` tier takes hours on a CPU. With ``DEEPPORT_TEST_CERTIFY_TIER=smoke`` in the
environment, ``--certify`` also accepts ``--tier smoke`` (and ``--op``/``--case``); the manifest then
says ``"mode": "test"`` and ``deepport verify`` reports NOT A CERTIFICATION RUN unless the verifier
sets the same variable, and even then only VALID TEST ARCHIVE: a test archive never verifies as a
certificate.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import secrets
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepport.conformance import html_report, report
from deepport.conformance.identity import declared_capabilities, device_identity, software_versions, suite_source_sha256
from deepport.conformance.profiles import claimed_profiles, profile_table
from deepport.conformance.results import CaseResult, SuiteRun
from deepport.conformance.runner import SUITE_VERSION, run_suite
from deepport.dispatch import registry

SCHEMA, SCHEMA_VERSION = "deepport.certificate", 1
TEST_TIER_ENV = "DEEPPORT_TEST_CERTIFY_TIER"
CERTIFICATION, TEST = "certification", "test"
MANIFEST, SUMS = "certificate.json", "SHA256SUMS"
HTML = "report.html"
FILES = (MANIFEST, report.RESULTS_JSON, report.JUNIT_XML, report.SUMMARY_MD, HTML)  # then SUMS
_NONCE = re.compile(r"[A-Za-z0-9._:-]{8,128}")


class CertificateFileError(ValueError):
    """A file or folder that is not a readable certificate archive."""


def test_tier() -> str | None:
    """The tier ``DEEPPORT_TEST_CERTIFY_TIER`` lets certification mode and ``verify`` accept (tests only)."""
    value = os.environ.get(TEST_TIER_ENV, "").strip()
    return value or None


def new_nonce() -> str:
    return secrets.token_hex(16)


def check_nonce(nonce: str) -> str:
    if not _NONCE.fullmatch(nonce):
        raise ValueError(f"a nonce is 8 to 128 characters of [A-Za-z0-9._:-], got {nonce!r}")
    return nonce


def nonce_seed(nonce: str) -> int:
    """The run seed a nonce gives: the first 63 bits of ``sha256("deepport-certify:" + nonce)``."""
    digest = hashlib.sha256(f"deepport-certify:{nonce}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def certification_mode(tier: str, ops: Sequence[str] | None, case_pattern: str | None) -> str:
    """``certification`` for the whole ``full`` tier; ``test`` for a selection the test variable allows.
    Raises ValueError for anything else."""
    if tier == "full" and not ops and not case_pattern:
        return CERTIFICATION
    if test_tier() == tier:
        return TEST
    what = f"tier {tier!r}" + (f", ops {list(ops)}" if ops else "")
    what += f", cases {case_pattern!r}" if case_pattern else ""
    raise ValueError(f"--certify runs the whole full tier; {what} cannot certify (only the repository's tests "
                     f"may set {TEST_TIER_ENV} to make CPU-sized test archives)")


def build_manifest(run: SuiteRun, *, nonce: str, mode: str, plugins: Sequence[str], timeout_s: float,
                   device: torch.device) -> dict[str, Any]:
    """The ``certificate.json`` of a finished run."""
    results = run.to_dict()
    sha, nfiles = suite_source_sha256()
    declared = {name: declared_capabilities(registry.get(name)) for name in run.backends}
    verdicts = profile_table(results, {n: d["profiles"] for n, d in declared.items()})
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "mode": mode,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "nonce": nonce, "run_seed": run.run_seed, "tier": run.tier, "selection": run.selection,
        "suite_version": SUITE_VERSION, "generator_version": run.generator_version,
        "suite_sha256": sha, "suite_files": nfiles,
        "isolation": run.isolation, "timeout_s": timeout_s, "plugins": list(plugins), "waivers": [],
        "command": run.command,
        "device": device_identity(device), "software": software_versions(),
        "backends": {name: {"declared": declared[name], "claimed_profiles": claimed_profiles(verdicts[name]),
                            "profiles": [v.to_dict() for v in verdicts[name]]} for name in run.backends},
    }


def archive_files(run: SuiteRun, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """Every file of the archive but ``SHA256SUMS``, by name."""
    results = run.to_dict()
    return {MANIFEST: (json.dumps(manifest, indent=2) + "\n").encode(),
            report.RESULTS_JSON: (json.dumps(results, indent=2) + "\n").encode(),
            report.JUNIT_XML: report.junit_xml(results).encode(),
            report.SUMMARY_MD: report.markdown_summary(results).encode(),
            HTML: html_report.render_html(results, declared=_declared_profiles(manifest)).encode()}


def _declared_profiles(manifest: Mapping[str, Any]) -> dict[str, Sequence[str] | None]:
    return {name: (b.get("declared") or {}).get("profiles") for name, b in (manifest.get("backends") or {}).items()}


def sha256sums(files: Mapping[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())).encode()


def write_archive(path: Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` plus their ``SHA256SUMS`` as ``path`` (a ``.tar.gz`` holding one folder named
    after it), atomically."""
    folder = path.name.removesuffix(".tar.gz")
    everything = {**files, SUMS: sha256sums(files)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name in [*(n for n in FILES if n in files), *sorted(set(files) - set(FILES)), SUMS]:
                data = everything[name]
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(_dt.datetime.now(_dt.UTC).timestamp())
                tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp, 0o644)  # a file to hand over (mkstemp made it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class ArchiveContents:
    """The files of an archive (or of the folder it unpacks to) and what is wrong with its layout."""

    files: dict[str, bytes]
    problems: list[str]
    digest: str  # sha256 of the archive file, or of SHA256SUMS for a folder


def read_archive(path: str | os.PathLike[str]) -> ArchiveContents:
    """Read a certificate ``.tar.gz`` without extracting it (only regular files under one folder, no
    links, no absolute or ``..`` paths), or the folder it unpacks to. Raises
    :class:`CertificateFileError` if ``path`` is neither."""
    p = Path(path)
    files: dict[str, bytes] = {}
    problems: list[str] = []
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                files[f.name] = f.read_bytes()
            else:
                problems.append(f"unexpected entry {f.name!r} in the folder")
        return ArchiveContents(files, problems, hashlib.sha256(files.get(SUMS, b"")).hexdigest())
    try:
        raw = p.read_bytes()
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise CertificateFileError(f"{p}: not a certificate archive (.tar.gz) or folder: {exc}") from exc
    folders: set[str] = set()
    with tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.name.startswith("/") or ".." in parts or len(parts) != 2 or not member.isfile():
                problems.append(f"unexpected archive member {member.name!r} (type {member.type!r}): only regular "
                                "files in one folder are allowed")
                continue
            folders.add(parts[0])
            if parts[1] in files:
                problems.append(f"{parts[1]} appears more than once in the archive")
                continue
            extracted = tar.extractfile(member)
            files[parts[1]] = extracted.read() if extracted is not None else b""
    if len(folders) > 1:
        problems.append(f"the archive holds several folders {sorted(folders)}; expected one")
    return ArchiveContents(files, problems, hashlib.sha256(raw).hexdigest())


def archive_name(backends: Sequence[str], when: _dt.datetime | None = None) -> str:
    stamp = (when or _dt.datetime.now(_dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    names = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", b) for b in backends)[:80]
    return f"certificate-{names}-{stamp}.tar.gz"


def certify(backends: Sequence[str], out_dir: Path, *, device: torch.device, nonce: str | None = None,
            tier: str = "full", ops: Sequence[str] | None = None, case_pattern: str | None = None,
            plugins: Sequence[str] = (), timeout_s: float = 600.0, command: str = "",
            on_start: Callable[[int], None] | None = None,
            on_result: Callable[[CaseResult], None] | None = None) -> tuple[Path, SuiteRun, dict[str, Any]]:
    """Run a certification and write its archive into ``out_dir``; returns ``(archive, run, manifest)``.

    Raises ValueError when the tier or selection cannot certify (see :func:`certification_mode`).
    """
    mode = certification_mode(tier, ops, case_pattern)
    nonce = check_nonce(nonce) if nonce is not None else new_nonce()
    run = run_suite(backends, tier, device=device, run_seed=nonce_seed(nonce), ops=ops, case_pattern=case_pattern,
                    on_start=on_start, on_result=on_result, command=command, isolate=True, plugins=plugins,
                    timeout_s=timeout_s)
    manifest = build_manifest(run, nonce=nonce, mode=mode, plugins=plugins, timeout_s=timeout_s, device=device)
    path = write_archive(Path(out_dir) / archive_name(backends), archive_files(run, manifest))
    return path, run, manifest
