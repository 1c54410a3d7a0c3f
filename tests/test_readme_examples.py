"""Every ```python block of the README runs as-is on a CPU: each is executed alone, in a fresh interpreter
with no ``DEEPPORT_*`` variable set, from an empty directory, so the README cannot drift from the API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[tuple[str, str]]:
    """``(id, source)`` of each ```python block, the id naming the README section it sits in."""
    readme = (ROOT / "README.md").read_text()
    blocks: list[tuple[str, str]] = []
    for match in re.finditer(r"^```python\n(.*?)^```$", readme, flags=re.S | re.M):
        headings = re.findall(r"^#+ (.+)$", readme[: match.start()], flags=re.M)
        section = re.sub(r"[^a-z0-9]+", "_", headings[-1].lower()).strip("_") if headings else "top"
        blocks.append((f"{len(blocks) + 1}_{section}", match.group(1)))
    return blocks


BLOCKS = readme_python_blocks()


def test_readme_has_a_python_block_for_every_op_family() -> None:
    source = "\n".join(code for _, code in BLOCKS)
    for call in ("deepport.mla_decode(", "deepport.fp8_gemm_nt(", "deepport.m_grouped_fp8_gemm_nt_contiguous(",
                 "deepport.m_grouped_fp8_gemm_nt_masked(", "deepport.moe_dispatch("):
        assert call in source, f"no README python block calls {call}...)"


@pytest.mark.parametrize(("block_id", "code"), BLOCKS, ids=[i for i, _ in BLOCKS])
def test_readme_python_block_runs_on_cpu(block_id: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / f"readme_{block_id}.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPPORT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the blocks promise a CPU; do not let a GPU host pick another path
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README block {block_id} failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
