"""The OpenCL backend through the conformance harness on PoCL (or whatever OpenCL device is found): a few
edge-heavy smoke cases of every op it declares, small enough for CI. The whole smoke tier is
``deepport certify --backend opencl --tier smoke`` (about 1.5 minutes on two cores)."""

from __future__ import annotations

import pytest

pytest.importorskip("pyopencl")
from deepport.backends.opencl import runtime
from deepport.conformance.results import Status
from deepport.conformance.runner import run_case, select_cases
from deepport.dispatch import registry

if runtime.unavailable_reason() is not None:
    pytest.skip(f"OpenCL backend unavailable: {runtime.unavailable_reason()}", allow_module_level=True)

CASES = (
    "mla_decode/short_causal_sq4",  # lengths 0..5 with s_q = 4: queries that see nothing (lse +inf)
    "mla_decode/ext_gqa_hq24_hkv8",
    "mla_decode/metadata_b5",  # the plan from get_mla_metadata, empty requests
    "fp8_gemm_nt/ext_k_tail_m9_n256_k1000",  # K not a multiple of 16: the byte-wise load path
    "fp8_gemm_nt/ue8m0_accumulate_m20_n128_k1024",
    "fp8_gemm_nn/ext_k_tail_m17_n130_k328_mn",
    "fp8_gemm_tn/ue8m0_m10_n256_k640_mn",
    "fp8_gemm_tt/accumulate_m32_n200_k512",
    "m_grouped_fp8_gemm_nt_contiguous/g4_empty_groups",
    "m_grouped_fp8_gemm_nt_masked/g3_garbage_prefill",  # rows past masked_m keep their bits
    "moe_layout/int32_ids_duplicates_nowhere_ranks2",
    "moe_dispatch/world1_fp8_colmajor_scales_align4",
    "moe_combine/world1_duplicates_nowhere",
    "moe_dispatch_expanded/world1_fp8_align8_duplicates",
    "moe_combine_expanded/world2_uneven_align16",  # two gloo ranks
    "moe_low_latency_dispatch/world1_fp8_duplicates_tmax24",  # the per-token FP8 cast
    "moe_low_latency_combine/world1_duplicates_nowhere",
)


def test_the_sample_covers_every_op_the_backend_declares() -> None:
    declared = {s.op for s in registry.get("opencl").ops}
    assert {c.split("/")[0] for c in CASES} == declared


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case_id", CASES)
def test_opencl_passes_the_smoke_case(case_id: str) -> None:
    [case] = [c for c in select_cases("smoke", [case_id.split("/")[0]]) if c.id == case_id]
    [result] = run_case(case, ["opencl"], "cpu", run_seed=20261201)
    assert result.status == Status.PASS, f"{result.status.value}: {result.message}"


def test_the_backend_reports_its_opencl_device_and_driver_for_certificates() -> None:
    ident = registry.get("opencl").identity()  # type: ignore[misc]
    (selected,) = [d for d in runtime.describe_devices() if d["selected"]]
    assert ident["opencl_device"] == selected["device"] and ident["driver"] == selected["driver"]
    assert ident["opencl_version"].startswith("OpenCL") and int(ident["compute_units"]) >= 1
