"""The grouped FP8 GEMM conformance cases: smoke passes on the built-in backends, the generator poisons
what the op must not read, and the exact checks catch backends that are close but not right on
padding rows and rows past ``masked_m``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fp8_grouped_inputs import contiguous_inputs

import deepport.backends.torch.fp8_grouped_gemm as torch_impl
from deepport.conformance.case import Case
from deepport.conformance.checker import calc_diff
from deepport.conformance.runner import run_case, select_cases
from deepport.conformance.suites import SUITES
from deepport.conformance.suites.fp8_grouped_gemm import sfa_view
from deepport.conformance.tolerance import tolerance
from deepport.dispatch import Backend, OpSupport, registered
from deepport.kernels.fp8_grouped_gemm import OP_CONTIGUOUS, OP_MASKED, ContiguousCall, MaskedCall

pytestmark = pytest.mark.usefixtures("clean_env")
OPS = [OP_CONTIGUOUS, OP_MASKED]
SMOKE = select_cases("smoke", ops=OPS)
FULL_ONLY = [c for c in select_cases("full", ops=OPS) if c.tier == "full"]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id.removeprefix("m_grouped_fp8_gemm_nt_") for c in cases]


@pytest.mark.parametrize("case", SMOKE, ids=_ids(SMOKE))
def test_smoke_case_passes_on_builtin_backends(case: Case) -> None:
    for result in run_case(case, ["reference", "torch"], "cpu", run_seed=20261128):
        assert result.status.value == "pass", f"{result.backend}: {result.message}"


def test_full_tier_has_the_issues_shapes_and_bounds() -> None:
    contiguous = {(c.params["groups"], c.params["expected_m"]) for c in FULL_ONLY if c.op == OP_CONTIGUOUS}
    masked = {(c.params["groups"], c.params["expected_m"]) for c in FULL_ONLY if c.op == OP_MASKED}
    assert {(4, 8192), (8, 4096)} <= contiguous
    assert {(32, 192), (6, 1024), (32, 20), (6, 20)} <= masked
    assert {(c.params["n"], c.params["k"]) for c in FULL_ONLY} >= {(4096, 7168), (7168, 2048)}
    for op in OPS:
        tolerance(op, "out", "float8_e4m3fn")
    ids = [c.id for c in select_cases("full", ops=OPS)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", SMOKE[:3] + SMOKE[-4:], ids=_ids(SMOKE[:3] + SMOKE[-4:]))
def test_generator_is_deterministic_and_poisons_rows_never_read(case: Case) -> None:
    suite = SUITES[case.op]
    one, two = suite.generate(case, 11), suite.generate(case, 11)
    for name, t in one.tensors.items():
        other = two.tensors[name]
        assert t.stride() == other.stride(), name
        assert torch.equal(t.contiguous().view(torch.uint8), other.contiguous().view(torch.uint8)), name
    a, sfa = one.tensors["a"], sfa_view(one, one.tensors)
    if case.op == OP_CONTIGUOUS:
        unused = one.tensors["m_indices"] < 0
    else:
        unused = torch.arange(a.shape[1])[None, :] >= one.tensors["masked_m"][:, None]
    if unused.any():
        assert (a.view(torch.uint8)[unused] == 0x7F).all()  # e4m3 NaN
        rows = sfa[unused]
        assert (rows.view(torch.uint8) == 0xFF).all() if rows.dtype == torch.int32 else rows.isnan().all()
    assert not a.view(torch.uint8)[~unused].eq(0x7F).all()


@pytest.mark.parametrize("case", SMOKE, ids=_ids(SMOKE))
def test_simulated_and_unquantized_references_agree_like_deepgemms_test(case: Case) -> None:
    suite = SUITES[case.op]
    inputs = suite.generate(case, 3)
    simulated, exact = suite.reference(inputs)["out"], suite.exact_reference(inputs)["out"]
    assert np.array_equal(np.isnan(simulated), np.isnan(exact))
    finite = np.isfinite(simulated)
    assert calc_diff(simulated[finite], exact[finite]) < 1e-3


def test_mn_major_sfa_is_a_tma_aligned_view_of_poisoned_storage() -> None:
    (case,) = [c for c in SMOKE if c.id.endswith("masked/g3_sfa_mn_major_mmax_odd")]
    inputs = SUITES[case.op].generate(case, 1)
    storage = inputs.tensors["sfa"]
    view = sfa_view(inputs, inputs.tensors)
    assert view.shape == (3, 37, 3) and view.stride() == (120, 1, 40)
    assert storage[:, :, 37:].isnan().all()  # TMA padding: an op reading past M_max gets NaN
# ---- backends that are close, but not right ----------------------------------------------------------

def tiny_padding(call: ContiguousCall, out: torch.Tensor) -> None:
    torch_impl.run_contiguous(call, out)
    out[call.m_indices < 0] = 2.0**-100  # passes any tolerance; padding rows must be +0.0


def negative_zero_padding(call: ContiguousCall, out: torch.Tensor) -> None:
    torch_impl.run_contiguous(call, out)
    out[call.m_indices < 0] = -0.0


def zero_the_rest(call: MaskedCall, out: torch.Tensor) -> None:
    out.zero_()
    torch_impl.run_masked(call, out)


def nan_the_rest(call: MaskedCall, out: torch.Tensor) -> None:
    out.fill_(float("nan"))
    torch_impl.run_masked(call, out)


@pytest.fixture
def cheats() -> Iterator[None]:
    backends = [Backend(name=f"cheat_{fn}", summary="close but wrong", version="0", priority={},
                        ops=(OpSupport(op=op, entry=f"{__name__}:{fn}", dtypes=frozenset({torch.float8_e4m3fn})),))
                for op, fn in ((OP_CONTIGUOUS, "tiny_padding"), (OP_CONTIGUOUS, "negative_zero_padding"),
                               (OP_MASKED, "zero_the_rest"), (OP_MASKED, "nan_the_rest"))]
    with contextlib.ExitStack() as stack:
        for backend in backends:
            stack.enter_context(registered(backend))
        yield


@pytest.mark.parametrize(("case_id", "cheat"), [
    ("m_grouped_fp8_gemm_nt_contiguous/g3_one_group_zero_rows_padding_blocks", "tiny_padding"),
    ("m_grouped_fp8_gemm_nt_contiguous/g2_mostly_padding", "negative_zero_padding"),
    ("m_grouped_fp8_gemm_nt_masked/g3_garbage_prefill", "zero_the_rest"),
    ("m_grouped_fp8_gemm_nt_masked/g3_all_zero_garbage_prefill", "nan_the_rest"),
    ("m_grouped_fp8_gemm_nt_masked/g4_em64", "zero_the_rest"),
])
def test_exact_checks_reject_close_but_wrong_backends(cheats: None, case_id: str, cheat: str) -> None:
    (case,) = [c for c in SMOKE if c.id == case_id]
    (result,) = run_case(case, [f"cheat_{cheat}"], "cpu", run_seed=5)
    assert result.status.value == "fail", result.message
    assert "must be exact" in result.message


def test_contiguous_inputs_helper_builds_an_aligned_layout() -> None:
    _, m_indices = contiguous_inputs([130, 0, 1])
    assert m_indices.shape == (384,) and m_indices[130:256].eq(-1).all() and m_indices[256] == 2
