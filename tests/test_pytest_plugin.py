"""The pytest plugin: ``pytest --deepport-backend NAME`` runs suite cases as ordinary tests in a vendor's CI.

One pytest session in a fresh process, in an empty folder, on two backends of the exploit corpus: the
honest control passes, the cheat that writes zeros fails with the harness's message, an op the backends do
not implement is skipped with the reason, a waived failure is an expected failure and a waived pass an
unexpected one. Without ``--deepport-backend`` the plugin adds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIVERS = """
[[waiver]]
case = "mla_decode/page_edges"
backend = "exploit_zeros"
category = "known-bug"
reason = "writes zeros"

[[waiver]]
case = "mla_decode/all_empty_b3"
backend = "exploit_control"
category = "known-bug"
reason = "fixed long ago"
"""


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPPORT_")}
    env["PYTHONPATH"], env["COLUMNS"] = str(REPO), "400"  # summary lines uncut
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "deepport.conformance.pytest_plugin",
                           "-p", "no:cacheprovider", "-rA", str(tmp_path), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_suite_cases_run_as_tests_with_waivers(tmp_path: Path) -> None:
    (tmp_path / "waivers.toml").write_text(WAIVERS)
    proc = _pytest(tmp_path, "--deepport-plugin", "deepport.conformance.exploits:EXPLOITS",
                   "--deepport-backend", "exploit_zeros", "--deepport-backend", "deepport.conformance.exploits:CONTROL",
                   "--deepport-op", "mla_decode", "--deepport-op", "fp8_gemm_nt",
                   "--deepport-case", "page_edges", "--deepport-case", "all_empty_b3", "--deepport-case", "m40_n256",
                   "--deepport-waivers", str(tmp_path / "waivers.toml"), "--deepport-seed", "7", "--deepport-device",
                   "cpu")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "run seed 7 (reproduce with --deepport-seed 7)" in out
    assert "PASSED deepport[exploit_control]::mla_decode/page_edges" in out
    assert "XFAIL deepport[exploit_zeros]::mla_decode/page_edges - waived (known-bug): writes zeros; fail:" in out
    assert "FAILED deepport[exploit_zeros]::mla_decode/all_empty_b3 - fail: lse: +inf positions differ" in out
    assert "FAILED deepport[exploit_control]::mla_decode/all_empty_b3 - unexpected pass: remove the waiver" in out
    assert "not supported by exploit_zeros: does not implement fp8_gemm_nt" in out
    assert ("reproduce: deepport certify --plugin deepport.conformance.exploits:EXPLOITS --plugin "
            "deepport.conformance.exploits:CONTROL --backend exploit_zeros --tier smoke --device cpu") in out
    assert "2 failed, 1 passed, 2 skipped, 1 xfailed" in out


def test_the_plugin_is_inert_without_a_backend(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    proc = _pytest(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "deepport conformance" not in proc.stdout
