"""scripts/profile_call.py (the target of scripts/gpu_check.sh's ncu stage) on the CPU's tiny bench configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_call.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("profile_call", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_runs_one_config_on_one_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main(["--op", "fp8_gemm_nt", "--config", "tiny_m4", "--backend", "torch", "--calls", "2"]) == 0
    assert "fp8_gemm_nt/tiny_m4_n256_k512 on torch: ran 2 calls" in capsys.readouterr().out


def test_a_pattern_matching_several_configs_or_none_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    assert script.main(["--op", "mla_decode", "--config", "tiny", "--backend", "torch"]) == 2
    assert "got ['tiny_b2_sq1_hq16_sk256', 'tiny_b1_sq2_hq64_sk128_causal']" in capsys.readouterr().out
    assert script.main(["--op", "mla_decode", "--config", "b128_sq1_hq128", "--backend", "torch"]) == 2
    assert "got []" in capsys.readouterr().out
