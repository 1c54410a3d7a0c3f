"""Certificate archives end to end, on an out-of-tree backend: a package made by ``deepport new-backend``
(the template, mla_decode filled with the oracle), registered through a ``deepport.backends`` entry point
that a ``.dist-info`` folder on PYTHONPATH declares (importlib.metadata reads it; nothing is installed), is
certified in test mode (``DEEPPORT_TEST_CERTIFY_TIER=smoke``), verified and replayed by the ``deepport``
command in fresh processes. Then every kind of tampering with the archive is caught, a test archive never
verifies as a certificate, crashes are recorded as such, and certification mode refuses what cannot certify.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deepport.cli import scaffold
from deepport.cli.main import main
from deepport.conformance import certificate
from deepport.conformance.certificate import MANIFEST, SUMS, TEST_TIER_ENV, nonce_seed, read_archive, write_archive
from deepport.conformance.certificate_verify import VALID_TEST, verify_certificate
from deepport.conformance.verify import INVALID, NOT_CERTIFICATION
from deepport.dispatch import registry

pytestmark = pytest.mark.usefixtures("clean_env")
REPO = Path(__file__).resolve().parents[1]
NONCE = "acme-2026-12-01-customer-chosen"
SELECTION = ["--op", "mla_decode", "--case", "empty"]  # two mla_decode/core cases: seconds on a CPU


def _deepport(args: list[str], root: Path, *, test_tier: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPPORT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO)])
    if test_tier:
        env[TEST_TIER_ENV] = "smoke"
    return subprocess.run([sys.executable, "-m", "deepport", *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)


def make_vendor_package(root: Path) -> Path:
    """The out-of-tree package: scaffolded from the template, mla_decode filled with the oracle, and an
    entry point declared the way an installed distribution declares it."""
    scaffold.new_backend("acme_port", root)
    with (root / "acme_port" / "mla_decode.py").open("a") as f:
        f.write("\n\nfrom deepport.kernels.f64.mla_decode import run  # noqa: E402, F811  (the oracle)\n")
    dist = root / "acme_port-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme_port\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[deepport.backends]\nacme_port = acme_port\n")
    return root


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vendor_package(tmp_path_factory.mktemp("acme"))


@pytest.fixture(scope="module")
def archive(vendor: Path) -> Path:
    """``deepport certify --certify`` of the entry-point backend (test mode), in a fresh process."""
    proc = _deepport(["certify", "--certify", "--tier", "smoke", "--backend", "acme_port", *SELECTION,
                      "--nonce", NONCE, "--device", "cpu", "--out", str(vendor / "out")], vendor)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TEST MODE" in proc.stdout and VALID_TEST in " ".join(proc.stdout.split())
    (path,) = (vendor / "out").glob("certificate-acme_port-*.tar.gz")
    return path


def test_an_entry_point_backend_is_certified_verified_and_replayed(vendor: Path, archive: Path) -> None:
    proc = _deepport(["verify", str(archive), "--replay", "2"], vendor)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"verdict: {VALID_TEST}" in out
    assert "replayed 2 case(s) here: 2 as recorded" in out
    assert "acme_port: certified profiles: mla_decode/core" in out
    files = read_archive(archive).files
    assert sorted(files) == sorted([*certificate.FILES, SUMS])
    manifest = json.loads(files[MANIFEST])
    assert manifest["mode"] == "test" and manifest["nonce"] == NONCE and manifest["run_seed"] == nonce_seed(NONCE)
    declared = manifest["backends"]["acme_port"]["declared"]
    assert [op["op"] for op in declared["ops"]] == ["mla_decode"]
    assert declared["ops"][0]["entry"] == "acme_port.mla_decode:run"
    assert manifest["backends"]["acme_port"]["claimed_profiles"] == ["mla_decode/core"]
    assert manifest["waivers"] == [] and manifest["isolation"] == "process"
    assert manifest["software"]["torch"] and manifest["device"]["type"] == "cpu"
    assert manifest["device"]["name"] and manifest["device"]["logical_cores"] >= 1  # which CPU certified it
    results = json.loads(files["results.json"])
    assert {c["case_id"] for c in results["cases"]} == {"mla_decode/half_empty_b4_sq2_causal",
                                                        "mla_decode/all_empty_b3"}
    assert b"<svg" not in files["report.html"] and b"mla_decode/core" in files["report.html"]


def test_a_test_archive_never_verifies_as_a_certificate(archive: Path, clean_env: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert verify_certificate(archive).verdict == NOT_CERTIFICATION  # no test variable: not a certificate
    monkeypatch.setenv(TEST_TIER_ENV, "full")
    rep = verify_certificate(archive)
    assert rep.verdict == NOT_CERTIFICATION and rep.exit_code == 1
    monkeypatch.setenv(TEST_TIER_ENV, "smoke")
    rep = verify_certificate(archive)
    assert rep.verdict == VALID_TEST and rep.exit_code == 0 and not rep.checks.errors


def test_a_module_object_backend_is_loaded_and_recorded_as_a_plugin(vendor: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--backend acme_port:BACKEND`` without any entry point: loaded like --plugin, named in the command."""
    from deepport.cli import certify

    monkeypatch.syspath_prepend(str(vendor))
    try:
        p = certify.plan(["acme_port:BACKEND"], "smoke", "cpu", 3, ["mla_decode"], "empty", vendor / "o")
        assert p.backends == ["acme_port"] and p.plugins == ("acme_port:BACKEND",)
        command = p.command()
        assert "--backend acme_port " in command and "--plugin acme_port:BACKEND" in command
    finally:
        if "acme_port" in {b.name for b in registry.all_backends()}:
            registry.unregister("acme_port")
        for name in [m for m in sys.modules if m == "acme_port" or m.startswith("acme_port.")]:
            del sys.modules[name]


def _rewrite(archive: Path, out: Path, change: Callable[[dict[str, bytes]], None], *, resum: bool = True) -> Path:
    files = read_archive(archive).files
    sums = files.pop(SUMS)
    change(files)
    if resum:
        return write_archive(out / archive.name, files)
    files[SUMS] = sums
    path = out / archive.name
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{archive.name.removesuffix('.tar.gz')}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _json_edit(name: str, edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, bytes]], None]:
    def change(files: dict[str, bytes]) -> None:
        data = json.loads(files[name])
        edit(data)
        files[name] = json.dumps(data, indent=2).encode()

    return change


def _first_case(status: str) -> Callable[[dict[str, Any]], None]:
    def edit(results: dict[str, Any]) -> None:
        results["cases"][0]["status"] = status

    return edit


TAMPERING: dict[str, tuple[Callable[[dict[str, bytes]], None], bool, str]] = {
    "a byte of results.json, sums kept": (
        lambda f: f.__setitem__("results.json", f["results.json"].replace(b'"pass"', b'"pass" ', 1)), False,
        "sha256 of results.json differs from SHA256SUMS"),
    "a case turned into a crash": (_json_edit("results.json", _first_case("crash")), True, "status 'crash'"),
    "a test run relabelled as a certification": (
        _json_edit(MANIFEST, lambda m: m.__setitem__("mode", "certification")), True,
        "mode 'certification' but tier 'smoke'"),
    "another nonce": (_json_edit(MANIFEST, lambda m: m.__setitem__("nonce", "chosen-after-the-run")), True,
                      "is not the one the nonce gives"),
    "other suite code": (_json_edit(MANIFEST, lambda m: m.__setitem__("suite_sha256", "0" * 64)), True,
                         "made with other suite code"),
    "a waiver slipped in": (_json_edit(MANIFEST, lambda m: m.__setitem__("waivers", [{"case": "*"}])), True,
                            "certification never applies waivers"),
    "claims edited": (_json_edit(MANIFEST, lambda m: m["backends"]["acme_port"].__setitem__(
        "claimed_profiles", ["mla_decode/core", "mla_decode/pages"])), True, "recorded claimed profiles"),
    "inputs digest edited": (_json_edit("results.json", lambda r: r["cases"][0]["metrics"]["inputs"].__setitem__(
        "sha256", "f" * 64)), True, "the backend did not run on the suite's inputs"),
    "run in-process": (_json_edit("results.json", lambda r: r.__setitem__("isolation", "none")), True,
                       "certification runs every backend in worker processes"),
    "an extra file": (lambda f: f.__setitem__("notes.txt", b"trust me"), True, "unexpected file notes.txt"),
    "a missing file": (lambda f: f.pop("junit.xml"), True, "missing file junit.xml"),
}


@pytest.fixture
def test_mode(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Test mode, set after ``clean_env`` cleared every DEEPPORT_ variable."""
    monkeypatch.setenv(TEST_TIER_ENV, "smoke")
    yield


@pytest.mark.usefixtures("test_mode")
@pytest.mark.parametrize("what", list(TAMPERING))
def test_tampering_is_caught(archive: Path, tmp_path: Path, what: str) -> None:
    change, resum, says = TAMPERING[what]
    rep = verify_certificate(_rewrite(archive, tmp_path, change, resum=resum))
    messages = [f.message for f in rep.checks.errors]
    assert rep.verdict == INVALID and rep.exit_code == 1, what
    assert any(says in m for m in messages), f"{what}: expected {says!r} in {messages}"


@pytest.mark.usefixtures("test_mode")
def test_unsafe_archive_members_are_refused(archive: Path, tmp_path: Path) -> None:
    path = tmp_path / "evil.tar.gz"
    files = read_archive(archive).files
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"evil/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("evil/../../etc/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    rep = verify_certificate(path)
    assert rep.verdict == INVALID
    assert any("unexpected archive member" in f.message for f in rep.checks.errors)


@pytest.mark.usefixtures("test_mode")
def test_a_crashing_backend_is_recorded_as_crash_and_the_archive_is_invalid(tmp_path: Path) -> None:
    try:
        path, run, _ = certificate.certify(["test_crash"], tmp_path, device=certificate.torch.device("cpu"),
                                           tier="smoke", case_pattern="page_edges",
                                           plugins=["isolation_backends:BACKENDS"], timeout_s=60)
    finally:
        for name in ("test_crash", "test_hang"):
            if name in {b.name for b in registry.all_backends()}:
                registry.unregister(name)
    assert [r.status.value for r in run.cases] == ["crash"]
    rep = verify_certificate(path)
    assert rep.verdict == INVALID
    assert any("status 'crash'" in f.message for f in rep.checks.errors)


@pytest.mark.parametrize(("args", "says"), [
    (["--tier", "smoke"], "--certify runs the whole full tier"),
    (["--op", "mla_decode"], "--certify runs the whole full tier"),
    (["--no-isolate"], "--no-isolate cannot certify"),
    (["--seed", "3"], "derives the run seed from the nonce"),
    (["--nonce", "short"], "a nonce is 8 to 128 characters"),
])
def test_certification_mode_refuses_what_cannot_certify(args: list[str], says: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "--certify", "--backend", "reference", *args]) == 2
    assert says in " ".join(capsys.readouterr().err.split())


def test_a_nonce_outside_certification_mode_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "--backend", "reference", "--nonce", "0123456789"]) == 2
    assert "--nonce is for certification mode" in " ".join(capsys.readouterr().err.split())


@pytest.mark.usefixtures("test_mode")
def test_reference_and_torch_certify_in_test_mode(tmp_path: Path) -> None:
    """The built-in backends CI has: an isolated test-mode certification of a few cases of two op families
    verifies as a test archive (the full tier, hours on a CPU, runs on the target machines)."""
    path, run, manifest = certificate.certify(["reference", "torch"], tmp_path, device=certificate.torch.device("cpu"),
                                              tier="smoke", ops=["mla_decode", "m_grouped_fp8_gemm_nt_contiguous"],
                                              case_pattern="empty", nonce="ci-reference-torch")
    assert run.passed() and len(run.cases) >= 6
    rep = verify_certificate(path)
    assert rep.verdict == VALID_TEST, [f.message for f in rep.checks.errors]
    for name in ("reference", "torch"):
        assert manifest["backends"][name]["claimed_profiles"] == ["mla_decode/core", "fp8_grouped_gemm/core"]


def test_the_suite_digest_covers_the_judging_code_not_the_tools() -> None:
    from deepport.conformance.identity import suite_source_files, suite_source_sha256

    names = {p.relative_to(REPO / "deepport").as_posix() for p in suite_source_files()}
    assert {"conformance/runner.py", "conformance/call.py", "conformance/rehearsal.py", "conformance/snapshot.py",
            "conformance/checker.py", "conformance/tolerance.py", "conformance/profiles.py",
            "conformance/suites/mla_decode.py", "kernels/f64/mla_decode.py", "kernels/mla_decode.py"} <= names
    assert not {n for n in names if n.startswith("conformance/exploits/")}
    assert not {"conformance/report.py", "conformance/verify.py", "conformance/html_report.py",
                "conformance/certificate.py", "conformance/pytest_plugin.py"} & names
    digest, count = suite_source_sha256()
    assert len(digest) == 64 and count == len(names)


@pytest.mark.usefixtures("test_mode")
def test_replay_runs_under_the_recorded_per_call_limit(archive: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that took minutes on the certifying device (``--timeout`` of the certification) is replayed
    under that limit, not a shorter default; ``--timeout`` overrides it."""
    from deepport.conformance import certificate_verify

    limits: list[float] = []

    def spy(results: Any, n: int, **kwargs: Any) -> list[Any]:
        limits.append(kwargs["timeout_s"])
        return []

    monkeypatch.setattr(certificate_verify, "replay", spy)
    slow = _rewrite(archive, tmp_path, _json_edit(MANIFEST, lambda m: m.__setitem__("timeout_s", 3600)))
    assert verify_certificate(slow, regenerate=0, replay_count=1).verdict == VALID_TEST
    verify_certificate(slow, regenerate=0, replay_count=1, timeout_s=7.5)
    verify_certificate(archive, regenerate=0, replay_count=1)
    assert limits == [3600.0, 7.5, 600.0]
    assert certificate_verify.recorded_timeout({"timeout_s": "x"}) == certificate_verify.recorded_timeout({}) == 600.0
