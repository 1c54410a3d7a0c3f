"""Verifying a certificate archive (:mod:`~deepport.conformance.certificate`) against the installed suite.

``deepport verify ARCHIVE [--replay N]`` checks, in order:

1. layout: a ``.tar.gz`` of regular files in one folder (or that folder), holding exactly
   ``certificate.json``, ``results.json``, ``junit.xml``, ``summary.md``, ``report.html`` and
   ``SHA256SUMS``; every file's sha256 is the one ``SHA256SUMS`` lists;
2. the manifest: schema, mode, and the suite it names is the installed one (``suite_version``,
   ``generator_version`` and the sha256 of the suite's source);
3. the run seed is the one the recorded nonce gives (the inputs were not picked);
4. the manifest agrees with ``results.json`` (run seed, tier, selection, backends, isolation in
   worker processes) and no waiver was applied anywhere;
5. ``results.json`` passes :func:`~deepport.conformance.verify.verify`: every case of the tier (the
   mustpass list) exactly once per backend, with its suite params, seed and tolerance; only ``pass``
   and ``not_supported`` (``fail``, ``error``, ``crash``, ``timeout`` and ``internal_error`` are not
   allowed); summary counts; inputs of the smallest cases regenerated and hashed;
6. profiles: the claims recomputed from the results and the declared capabilities equal the recorded
   ones, every claimed profile passed entirely, and each backend claims at least one;
7. the derived reports (``junit.xml``, ``summary.md``) equal those regenerated from ``results.json``
   (a warning otherwise: another deepport version may format them differently);
8. with ``--replay N``: N randomly chosen case records are run again on this machine
   (:mod:`~deepport.conformance.replay`) and must give the recorded verdict on the recorded inputs,
   each call under the per-call limit the certificate recorded (``timeout_s``; ``--timeout`` overrides
   it), so a case that took minutes on the certifying device is not cut short.

Verdicts: ``VALID CERTIFICATE`` (exit 0), ``INVALID`` (exit 1), ``NOT A CERTIFICATION RUN`` (exit 1: a
test archive, or a partial run), and ``VALID TEST ARCHIVE (NOT A CERTIFICATE)`` (exit 0) for a test
archive checked with ``DEEPPORT_TEST_CERTIFY_TIER`` set to its tier.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from deepport.conformance import report
from deepport.conformance.certificate import (
    CERTIFICATION,
    FILES,
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    SUMS,
    TEST,
    ArchiveContents,
    nonce_seed,
    read_archive,
    sha256sums,
    test_tier,
)
from deepport.conformance.identity import suite_source_sha256
from deepport.conformance.profiles import CERTIFIED, FAIL, SUITE_ERROR, ProfileVerdict, claimed_profiles, profile_table
from deepport.conformance.replay import Replayed, ReplayError, replay
from deepport.conformance.runner import SUITE_VERSION
from deepport.conformance.verify import DEFAULT_REGENERATE, INVALID, NOT_CERTIFICATION, VALID, VerifyReport, verify

VALID_TEST = "VALID TEST ARCHIVE (NOT A CERTIFICATE)"


@dataclass
class CertificateReport:
    """Everything found about one archive; :attr:`verdict` and :attr:`exit_code` derive from it."""

    path: str
    digest: str
    manifest: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    checks: VerifyReport = field(default_factory=VerifyReport)
    test_archive: bool = False
    test_accepted: bool = False
    profiles: dict[str, list[ProfileVerdict]] = field(default_factory=dict)
    replayed: list[Replayed] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.checks.errors:
            return INVALID
        if self.test_archive:
            return VALID_TEST if self.test_accepted else NOT_CERTIFICATION
        return VALID if self.checks.certification_run else NOT_CERTIFICATION

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict in (VALID, VALID_TEST) else 1


def is_certificate(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a certificate archive or its folder (not a bare ``results.json``)."""
    p = os.fspath(path)
    return p.endswith((".tar.gz", ".tgz")) or (os.path.isdir(p) and os.path.exists(os.path.join(p, MANIFEST)))


def _load_json(contents: ArchiveContents, name: str, rep: VerifyReport) -> dict[str, Any]:
    try:
        data = json.loads(contents.files[name].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        rep.error(f"{name}: cannot read it: {exc!r}")
        return {}
    if not isinstance(data, dict):
        rep.error(f"{name}: expected a JSON object")
        return {}
    return data


def _check_layout(contents: ArchiveContents, rep: VerifyReport) -> None:
    """Check 1: the file set and SHA256SUMS."""
    for problem in contents.problems:
        rep.error(problem)
    expected = {*FILES, SUMS}
    for name in sorted(expected - contents.files.keys()):
        rep.error(f"missing file {name}")
    for name in sorted(contents.files.keys() - expected):
        rep.error(f"unexpected file {name} (a certificate holds only {', '.join(sorted(expected))})")
    sums = contents.files.get(SUMS, b"").decode("utf-8", "replace")
    listed: dict[str, str] = {}
    for line in sums.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or name in listed:
            rep.error(f"{SUMS}: malformed or repeated line {line!r}")
            continue
        listed[name] = digest
    others = {n: d for n, d in contents.files.items() if n != SUMS}
    for name in sorted(others.keys() - listed.keys()):
        rep.error(f"{name} is not listed in {SUMS}")
    for name in sorted(listed.keys() - others.keys()):
        rep.error(f"{SUMS} lists {name}, which the archive does not hold")
    actual = sha256sums({n: others[n] for n in listed.keys() & others.keys()}).decode().splitlines()
    recorded = {f"{d}  {n}" for n, d in listed.items()}
    for line in actual:
        if line not in recorded:
            rep.error(f"sha256 of {line.partition('  ')[2]} differs from {SUMS}: the file was changed")


def _check_manifest(m: Mapping[str, Any], rep: VerifyReport) -> None:
    """Checks 2 and 3: schema, mode, suite identity and the nonce's seed."""
    if m.get("schema") != SCHEMA or m.get("schema_version") != SCHEMA_VERSION:
        rep.error(f"{MANIFEST}: schema {m.get('schema')!r} version {m.get('schema_version')!r}; expected {SCHEMA!r} "
                  f"version {SCHEMA_VERSION}")
    if m.get("mode") not in (CERTIFICATION, TEST):
        rep.error(f"mode {m.get('mode')!r}; expected {CERTIFICATION!r} or {TEST!r}")
    if m.get("suite_version") != SUITE_VERSION:
        rep.error(f"suite_version {m.get('suite_version')!r} is not the installed suite's {SUITE_VERSION!r}")
    sha, nfiles = suite_source_sha256()
    if m.get("suite_sha256") != sha:
        rep.error(f"suite_sha256 {m.get('suite_sha256')!r} is not the installed suite source's {sha} ({nfiles} "
                  "files): the certificate was made with other suite code")
    nonce = m.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        rep.error("no nonce recorded: the run seed cannot be checked")
    elif m.get("run_seed") != nonce_seed(nonce):
        rep.error(f"run_seed {m.get('run_seed')!r} is not the one the nonce gives ({nonce_seed(nonce)})")
    if m.get("waivers"):
        rep.error(f"waivers were applied ({len(m['waivers'])}): certification never applies waivers")


def _check_agreement(m: Mapping[str, Any], results: Mapping[str, Any], rep: VerifyReport) -> None:
    """Check 4: the manifest and results.json describe the same run; nothing waived; isolated."""
    for key in ("run_seed", "tier", "selection", "suite_version", "generator_version"):
        if json.dumps(m.get(key), sort_keys=True) != json.dumps(results.get(key), sort_keys=True):
            rep.error(f"{MANIFEST} says {key} {m.get(key)!r}, results.json {results.get(key)!r}")
    if list(m.get("backends") or {}) != list(results.get("backends") or {}):
        rep.error(f"{MANIFEST} lists backends {list(m.get('backends') or {})}, results.json "
                  f"{list(results.get('backends') or {})}")
    if results.get("isolation") != "process" or m.get("isolation") != "process":
        rep.error(f"isolation {results.get('isolation')!r}: certification runs every backend in worker processes")
    if results.get("waivers") or any(isinstance(c, Mapping) and c.get("waiver") for c in results.get("cases", [])):
        rep.error("results.json holds waivers: certification never applies them")
    if m.get("mode") == CERTIFICATION:
        selection = m.get("selection") or {}
        if m.get("tier") != "full" or selection.get("ops") or selection.get("case_pattern"):
            rep.error(f"mode {CERTIFICATION!r} but tier {m.get('tier')!r} and selection {selection!r}: only the whole "
                      "full tier certifies")


def _check_profiles(m: Mapping[str, Any], results: Mapping[str, Any], rep: CertificateReport) -> None:
    """Check 6: recomputed claims equal the recorded ones; claimed profiles all passed."""
    found = m.get("backends")
    backends: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    declared = {n: ((b.get("declared") or {}).get("profiles") if isinstance(b, Mapping) else None)
                for n, b in backends.items()}
    rep.profiles = profile_table(results, declared)
    for name, verdicts in rep.profiles.items():
        recorded = (backends.get(name) or {}).get("claimed_profiles")
        claims = claimed_profiles(verdicts)
        if recorded != claims:
            rep.checks.error(f"recorded claimed profiles {recorded!r}, but the results give {claims!r}", backend=name)
        for v in verdicts:
            if v.verdict in (FAIL, SUITE_ERROR):
                rep.checks.error(f"profile {v.line()}; not passing: {', '.join(v.not_passing[:5])}", backend=name)
        if not any(v.verdict == CERTIFIED for v in verdicts):
            rep.checks.error("claims no profile that passed: the certificate would certify nothing", backend=name)


def _check_derived(contents: ArchiveContents, results: Mapping[str, Any], rep: VerifyReport) -> None:
    """Check 7: junit.xml and summary.md are those of results.json."""
    derived = {report.JUNIT_XML: report.junit_xml(results), report.SUMMARY_MD: report.markdown_summary(results)}
    for name, text in derived.items():
        if name in contents.files and contents.files[name] != text.encode():
            rep.warning(f"{name} differs from the one regenerated from results.json (edited, or written by another "
                        "deepport version); results.json is what counts")


def recorded_timeout(manifest: Mapping[str, Any], default: float = 600.0) -> float:
    """The per-call limit the certification ran under (``timeout_s`` of the manifest), else ``default``."""
    value = manifest.get("timeout_s")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else default


def verify_certificate(path: str | os.PathLike[str], *, regenerate: int | Literal["all"] = DEFAULT_REGENERATE,
                       replay_count: int = 0, plugins: Sequence[str] = (), device: str | None = None,
                       timeout_s: float | None = None) -> CertificateReport:
    """Check a certificate archive or folder; see the module docstring. Raises
    :class:`~deepport.conformance.certificate.CertificateFileError` if ``path`` is neither."""
    contents = read_archive(path)
    rep = CertificateReport(os.fspath(path), contents.digest)
    _check_layout(contents, rep.checks)
    rep.manifest = _load_json(contents, MANIFEST, rep.checks)
    rep.results = _load_json(contents, report.RESULTS_JSON, rep.checks)
    if not rep.manifest or not rep.results:
        return rep
    _check_manifest(rep.manifest, rep.checks)
    rep.test_archive = rep.manifest.get("mode") == TEST
    rep.test_accepted = rep.test_archive and test_tier() == rep.manifest.get("tier")
    tier = str(rep.manifest.get("tier")) if rep.test_accepted else "full"
    checks = verify(rep.results, regenerate=regenerate, certification_tier=tier, check_profiles=False)
    checks.findings[:0] = rep.checks.findings
    rep.checks = checks
    _check_agreement(rep.manifest, rep.results, rep.checks)
    _check_profiles(rep.manifest, rep.results, rep)
    _check_derived(contents, rep.results, rep.checks)
    if replay_count > 0:
        try:
            rep.replayed = replay(rep.results, replay_count, plugins=[*rep.manifest.get("plugins", []), *plugins],
                                  device=device, timeout_s=timeout_s or recorded_timeout(rep.manifest))
        except ReplayError as exc:
            rep.checks.error(f"replay: {exc}")
        for r in rep.replayed:
            if not r.matches:
                rep.checks.error(f"replay differs: {r.line()}", r.case_id, r.backend)
    return rep
