"""The Triton FP8 GEMM kernels lower to Hopper's FP8 matrix instructions: each variant is compiled for sm_90a
without a GPU (tests/triton_fp8_lowering.py, in a subprocess with ``TRITON_INTERPRET`` unset) and its PTX
must hold ``wgmma.mma_async`` on e4m3 operands (bf16 ones for float32 results), its SASS ``QGMMA`` (``HGMMA``)
and, for the descriptor variants, bulk tensor copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

LOWERING = Path(__file__).with_name("triton_fp8_lowering.py")


@pytest.mark.slow
def test_every_kernel_variant_lowers_to_hopper_fp8_wgmma() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(LOWERING.parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(LOWERING)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(found) >= 10
    for variant in found:  # float32 results take bf16 MMAs (exact accumulation), all others e4m3 ones
        if variant["precise"]:
            assert variant["wgmma_bf16"] and variant["hgmma"] in (True, None), variant
        else:
            assert variant["wgmma_e4m3"] and variant["qgmma"] in (True, None), variant
        assert variant["tma"] == ("tma" in variant["variant"]), variant
