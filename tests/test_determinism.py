"""Run-to-run reproducibility: every built-in backend declares, per op, whether its results are bitwise
reproducible (and why); ``deepport determinism`` checks the claim by repeated runs with identical inputs,
fails a backend whose claimed-bitwise results differ, and reports the spread where nothing is claimed.

CPU only: reference, torch, opencl (PoCL) and triton (interpreter) on tiny cases; the GPU run is
``scripts/gpu_determinism.sh``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from deepport.cli.determinism import claims_markdown
from deepport.cli.main import main
from deepport.conformance.determinism import DIFFERS, ERROR, IDENTICAL, repeat_case
from deepport.conformance.runner import select_cases
from deepport.dispatch import Backend, OpSupport, not_reproducible, registered, registry, reproducible
from deepport.kernels import DESCRIPTORS
from deepport.kernels.fp8_gemm import FP8GemmCall

_FP8 = frozenset({torch.float8_e4m3fn})
_CALLS = {"n": 0}
_DOCS = Path(__file__).resolve().parents[1] / "docs" / "VALIDATION.md"


def _case(case_id: str):  # type: ignore[no-untyped-def]
    (case,) = [c for c in select_cases("smoke") if c.id == case_id]
    return case


def counting_run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """Writes the number of calls so far: run i differs from the first run by exactly i."""
    out.fill_(float(_CALLS["n"]))
    _CALLS["n"] += 1


def input_writing_run(call: FP8GemmCall, out: torch.Tensor) -> None:
    out.zero_()
    call.sfa.add_(1.0)  # a backend that changes its input


def _gemm_backend(name: str, entry: str, bitwise: bool) -> Backend:
    claim = reproducible("test claim") if bitwise else not_reproducible("test: writes a call counter")
    return Backend(name=name, summary="test", version="0", priority={},
                   ops=(OpSupport(op="fp8_gemm_nt", entry=f"test_determinism:{entry}", dtypes=_FP8),),
                   determinism={"fp8_gemm_nt": claim})


# --- the claims are data -------------------------------------------------------------------------------


def test_every_builtin_backend_declares_every_op_it_implements() -> None:
    ops = {d.name for d in DESCRIPTORS}
    for backend in registry.all_backends():
        implemented = {s.op for s in backend.ops}
        assert implemented <= set(backend.determinism), \
            f"{backend.name} declares no determinism for {sorted(implemented - set(backend.determinism))}"
        assert set(backend.determinism) <= ops, f"{backend.name}: claims for unknown ops"
        for op, claim in backend.determinism.items():
            assert claim.reason, f"{backend.name} {op}: a claim needs a reason"


def test_claims_say_where_they_hold() -> None:
    torch_backend = registry.get("torch")
    combine = torch_backend.determinism_of("moe_combine")
    assert combine is not None and combine.bitwise("cpu") and not combine.bitwise("cuda")
    assert "index_add_" in combine.describe()
    gemm = registry.get("hopper").determinism_of("fp8_gemm_nt")
    assert gemm is not None and gemm.bitwise("cuda") and gemm.bitwise("rocm")
    assert not not_reproducible("x").bitwise("cpu")
    assert registry.get("torch").determinism_of("no_such_op") is None
    mla = torch_backend.determinism_of("mla_decode")  # CPU BLAS bits varied between calls on a CI machine
    assert mla is not None and mla.bitwise("cuda") and not mla.bitwise("cpu")


def test_validation_doc_carries_the_claims_table() -> None:
    text = _DOCS.read_text(encoding="utf-8")
    assert claims_markdown() in text, "docs/VALIDATION.md: paste `deepport determinism --claims` into it"


# --- every CPU backend is reproducible on tiny cases -----------------------------------------------------

_CPU_CASES = {
    "reference": ["fp8_gemm_nt/m40_n256_k512", "moe_combine/world1_duplicates_nowhere",
                  "mla_decode/ext_head_dim_64_32_page32"],
    "torch": ["moe_combine/world1_duplicates_nowhere", "moe_low_latency_combine/world1_duplicates_nowhere"],
    "opencl": ["fp8_gemm_nt/m40_n256_k512", "mla_decode/ext_head_dim_64_32_page32",
               "moe_dispatch_expanded/world1_fp8_align8_duplicates"],
    "triton": ["fp8_gemm_nt/m40_n256_k512", "mla_decode/ext_head_dim_64_32_page32", "moe_layout/ranks1",
               "moe_combine_expanded/world1_duplicates_nowhere_align8"],
}


@pytest.mark.parametrize(("backend", "case_id"), [(b, c) for b, cases in _CPU_CASES.items() for c in cases])
def test_cpu_backends_are_bitwise_reproducible(backend: str, case_id: str) -> None:
    reason = registry.get(backend).unavailable_reason
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
    result = repeat_case(_case(case_id), backend, torch.device("cpu"), seed=11, repeats=3)
    assert result.status == IDENTICAL, result.message
    assert result.runs == 3 and result.claimed is True and not result.failed
    assert result.spreads and all(s.differing == 0 and s.elements > 0 for s in result.spreads)


def test_a_two_rank_case_repeats_on_the_rank_group() -> None:
    result = repeat_case(_case("moe_combine/world2_uneven_duplicates"), "torch", torch.device("cpu"), seed=3,
                         repeats=2)
    assert result.status == IDENTICAL, result.message


# --- the check can fail ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bitwise", [True, False])
def test_differing_runs_fail_only_a_backend_that_claims_bitwise_results(bitwise: bool) -> None:
    backend = _gemm_backend(f"test_counting_{bitwise}", "counting_run", bitwise)
    _CALLS["n"] = 0
    with registered(backend):
        result = repeat_case(_case("fp8_gemm_nt/m40_n256_k512"), backend.name, torch.device("cpu"), seed=1, repeats=4)
    assert result.status == DIFFERS and result.failed is bitwise and result.claimed is bitwise
    (spread,) = result.spreads
    assert spread.name == "out" and spread.differing == spread.elements == 40 * 256
    assert spread.max_abs == 3.0 and spread.max_rel == float("inf")  # the first run is all zeros


def test_a_backend_that_changes_its_inputs_errors() -> None:
    backend = _gemm_backend("test_input_writer", "input_writing_run", True)
    with registered(backend):
        result = repeat_case(_case("fp8_gemm_nt/m40_n256_k512"), backend.name, torch.device("cpu"), seed=1, repeats=2)
    assert result.status == ERROR and "modified its inputs ['sfa_storage']" in result.message and result.failed


def test_cli_exit_status_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = _gemm_backend("test_counting_cli", "counting_run", True)
    _CALLS["n"] = 0
    with registered(backend):
        code = main(["determinism", "--backend", backend.name, "--device", "cpu", "--op", "fp8_gemm_nt",
                     "--case", "m40_n256", "--repeat", "2", "--seed", "5", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 1
    assert re.search(r"test_counting_cli\s+fp8_gemm_nt\s+bitwise\s+0\s+1\s+0\s+0\s+1\s+inf\s+FAIL", printed), printed
    assert (tmp_path / "determinism.json").read_text().count('"failed": true') == 1
    code = main(["determinism", "--backend", "torch", "--device", "cpu", "--op", "fp8_gemm_nt", "--case",
                 "m40_n256", "--repeat", "2"])
    assert code == 0
    assert main(["determinism", "--backend", "torch", "--repeat", "1"]) == 2
    assert main(["determinism", "--backend", "no_such_backend"]) == 2
