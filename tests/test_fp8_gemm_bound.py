"""The FP8 GEMMs' element-wise bound (deepport.conformance.fp8_bound): it covers a model of Hopper's
limited-precision accumulation with margin, and still rejects zeros, 5% noise and a bf16 accumulator."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from deepport.conformance import fp8_bound, select_cases
from deepport.conformance.calibration import calibrate
from deepport.conformance.checker import check_output
from deepport.conformance.suites import fp8_gemm as dense
from deepport.conformance.suites import fp8_grouped_gemm as grouped
from deepport.conformance.tolerance import FP8_ACCUMULATION, tolerance
from deepport.kernels.f64.fp8_gemm import scale_factors_f64
from deepport.kernels.fp8_grouped_gemm import bind_masked

CPU = torch.device("cpu")
DENSE = ["fp8_gemm_nt/m40_n256_k512", "fp8_gemm_nt/deepseek_like_m16_n264_k896", "fp8_gemm_tn/m40_n256_k512",
         "fp8_gemm_nt/accumulate_m32_n200_k512", "fp8_gemm_nt/ext_k_tail_m9_n256_k1000"]
GROUPED = ["m_grouped_fp8_gemm_nt_masked/g4_em64", "m_grouped_fp8_gemm_nt_contiguous/g3_sfb_transposed_n_tail"]


def _case(case_id: str) -> Any:
    (case,) = [c for c in select_cases("smoke") if c.id == case_id]
    return case


def test_gamma_is_the_block_term_plus_one_float32_rounding_per_block_and_for_c() -> None:
    assert fp8_bound.gamma(128) == 16 * 2.0**-13 + 3 * 2.0**-24
    assert fp8_bound.gamma(7168) == 16 * 2.0**-13 + (56 + 2) * 2.0**-24
    assert fp8_bound.gamma(1000) == 16 * 2.0**-13 + (8 + 2) * 2.0**-24  # a K tail is a block of its own
    for op, dtype, u_out in (("fp8_gemm_nt", "bfloat16", 2.0**-8), ("fp8_gemm_tt", "float32", 2.0**-24),
                             ("m_grouped_fp8_gemm_nt_masked", "float8_e4m3fn", 2.0**-8)):
        tol = tolerance(op, "out", dtype)
        assert tol.elementwise == FP8_ACCUMULATION and tol.rtol == u_out and tol.atol_rms == tol.atol_floor == 0
        assert tol.to_dict()["elementwise"] == FP8_ACCUMULATION


@pytest.mark.parametrize("case_id", DENSE + GROUPED)
def test_smoke_cases_calibrate_and_reject_zeros_and_noise_element_wise(case_id: str) -> None:
    case = _case(case_id)
    suite = grouped if case.op.startswith("m_grouped") else dense
    inputs = suite.generate(case, 11)
    (name, (_, dtype)), = suite.output_specs(inputs).items()
    ref = suite.reference(inputs)[name]
    bound = suite.elementwise_bound(inputs)[name]
    tol = tolerance(case.op, name, suite.dtype_name(inputs))
    assert bound.shape == ref.shape and (bound >= 0).all() and bound.max() > 0
    assert calibrate({name: ref}, {name: dtype}, {name: tol}, 3, {name: bound}) == []
    computed = bound > 0  # rows the op computes (not padding, not past masked_m)
    finite = ref[computed]
    rms = float(np.sqrt(np.mean(finite**2)))
    noise = np.random.default_rng(0).standard_normal(ref.shape) * 0.05 * rms
    noisy = np.where(computed, ref + noise, ref)
    check = check_output(name, torch.from_numpy(noisy).to(dtype), ref, dtype=dtype, device=CPU, tol=tol,
                         elementwise=bound)
    assert check.metrics["mismatches"] > 0, "5% noise passes the element-wise bound"
    assert not check_output(name, torch.from_numpy(np.where(computed, 0.0, ref)).to(dtype), ref, dtype=dtype,
                            device=CPU, tol=tol, elementwise=bound).passed
    no_bound = check_output(name, torch.from_numpy(ref).to(dtype), ref, dtype=dtype, device=CPU, tol=tol)
    assert not no_bound.passed and "needs the suite's 'fp8_accumulation' bound" in no_bound.failures[0]


def _dense_operands(case_id: str) -> tuple[np.ndarray, ...]:
    """A dense case's float64 e4m3 values ``a [M, K]``, ``b [N, K]``, scales per row ``[M, nb]``, ``[N, nb]``,
    and C (or zeros)."""
    inputs = dense.generate(_case(case_id), 5)
    call = dense._bound_call(inputs)
    k = call.k
    sfa = scale_factors_f64(call.sfa, call.sf_format, k)
    sfb = scale_factors_f64(call.sfb, call.sf_format, k)[np.arange(call.n) // call.gran_n]
    c = np.zeros((call.m, call.n)) if call.c is None else call.c.double().numpy()
    return call.a.double().numpy(), call.b.double().numpy(), sfa, sfb, c


def _emulated(case_id: str, fraction_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """(the emulated kernel's float32 result, the reference, the bound term, the tolerance) of a dense case."""
    case = _case(case_id)
    inputs = dense.generate(case, 5)
    a, b, sfa, sfb, c = _dense_operands(case_id)
    got = fp8_bound.emulate_sm90(a, b, sfa, sfb, fraction_bits).astype(np.float64)
    got = (got + c).astype(np.float32).astype(np.float64)  # C added in float32, as DeepGEMM does
    tol = tolerance(case.op, "out", dense.dtype_name(inputs))
    return got, dense.reference(inputs)["out"], dense.elementwise_bound(inputs)["out"], tol


@pytest.mark.parametrize("case_id", DENSE)
def test_a_limited_precision_accumulator_passes_with_margin_and_noise_does_not(case_id: str) -> None:
    got, ref, bound, tol = _emulated(case_id, fraction_bits=13)
    dtype = torch.float32 if tol.rtol < 2.0**-9 else torch.bfloat16
    out = torch.from_numpy(got).to(dtype)
    check = check_output("out", out, ref, dtype=dtype, device=CPU, tol=tol, elementwise=bound)
    assert check.passed, check.failures
    k = int(dense._bound_call(dense.generate(_case(case_id), 5)).k)
    magnitudes = bound / fp8_bound.gamma(k)
    assert fp8_bound.excess(out.double().numpy(), ref, magnitudes, k, tol.rtol) <= 1.0  # the GPU tests' helper
    assert fp8_bound.excess(ref * (1 + 2**-6), ref, magnitudes, k, tol.rtol) > 1.0
    # the accumulation error alone stays below half of the block term: the constant's 2x margin
    assert float(np.max(np.abs(got - ref) / magnitudes)) < 0.5 * fp8_bound.C_BLOCK * fp8_bound.U_ACC
    rms = float(np.sqrt(np.mean(ref**2)))
    noisy = torch.from_numpy(ref + np.random.default_rng(1).standard_normal(ref.shape) * 0.05 * rms).to(dtype)
    assert not check_output("out", noisy, ref, dtype=dtype, device=CPU, tol=tol, elementwise=bound).passed


def test_a_bf16_precision_accumulator_fails() -> None:
    got, ref, bound, tol = _emulated("fp8_gemm_nt/deepseek_like_m16_n264_k896", fraction_bits=7)
    check = check_output("out", torch.from_numpy(got).to(torch.bfloat16), ref, dtype=torch.bfloat16, device=CPU,
                         tol=tol, elementwise=bound)
    assert not check.passed


def test_the_block_constant_covers_outlier_dominated_blocks_of_the_grouped_generator() -> None:
    """x64 outliers (the grouped suite's) at small K are the model's worst case: one product dominates a
    block and the others are truncated against its exponent."""
    inputs = grouped.generate(_case("m_grouped_fp8_gemm_nt_masked/g4_em64"), 2)
    t = inputs.tensors
    call = bind_masked((t["a"], grouped.sfa_view(inputs, t)), (t["b"], t["sfb"]),
                       torch.empty((*t["a"].shape[:-1], int(t["b"].shape[1])), dtype=torch.bfloat16),
                       t["masked_m"], inputs.expected_m)
    k = call.signature.k
    worst = 0.0
    for g, rows in enumerate(inputs.rows_in_use):
        if not rows:
            continue
        a = call.a.data[g, :rows].double().numpy()
        b = call.b.data[g].double().numpy()
        sfa = scale_factors_f64(call.a.sf[g], call.a.sf_format, k)[:rows]
        sfb = scale_factors_f64(call.b.sf[g], call.b.sf_format, k)[np.arange(b.shape[0]) // call.b.gran_mn]
        got = fp8_bound.emulate_sm90(a, b, sfa, sfb).astype(np.float64)
        deq_a, deq_b = a * np.repeat(sfa, 128, 1)[:, :k], b * np.repeat(sfb, 128, 1)[:, :k]
        ref, mag = deq_a @ deq_b.T, np.abs(deq_a) @ np.abs(deq_b).T
        worst = max(worst, float(np.max(np.abs(got - ref) / mag)))
    assert 0 < worst < 0.5 * fp8_bound.C_BLOCK * fp8_bound.U_ACC
    assert math.log2(worst) > -16  # the model is not trivially exact: truncation shows


@pytest.mark.parametrize("case_id", ["fp8_gemm_nt/accumulate_m32_n200_k512", *GROUPED,
                                     "m_grouped_fp8_gemm_nt_masked/g4_zero_and_full_hint1"])
def test_the_magnitudes_kept_by_the_reference_equal_a_separate_pass(case_id: str) -> None:
    case = _case(case_id)
    suite = grouped if case.op.startswith("m_grouped") else dense
    kept = suite.generate(case, 4)
    suite.reference(kept)
    separate = suite.generate(case, 4)
    assert separate.magnitudes is None
    np.testing.assert_allclose(suite.elementwise_bound(kept)["out"], suite.elementwise_bound(separate)["out"],
                               rtol=1e-12, atol=0)
