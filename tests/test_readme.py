"""The README's two quick-start commands stay true: CI runs the test command verbatim, and the main
command sets up and runs `deepport certify`."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [next(line for line in b.splitlines() if line and not line.startswith("#")) for b in blocks]


def test_readme_quick_start_has_exactly_two_commands() -> None:
    assert len(_quick_start_commands()) == 2


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _quick_start_commands()[1]
    assert "pytest" in test_command
    assert ".venv/bin/lint-imports" in test_command, "CI checks the import layers (pyproject [tool.importlinter])"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f"`.ci/run` does not run the README's test command:\n  {test_command}"


def test_readme_main_command_sets_up_and_certifies() -> None:
    main_command = _quick_start_commands()[0]
    assert main_command.startswith("python3 -m venv .venv")
    assert "-c constraints/cpu.txt" in main_command
    assert main_command.endswith("deepport certify")


def test_constraints_pin_torch_exactly_and_the_package_does_not() -> None:
    assert "torch==2.13.0" in (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch==', pyproject) is None, "the package must not pin torch; users bring their own"
