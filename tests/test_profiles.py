"""Profiles: every case belongs to exactly one named feature set; claims follow the declaration; claimed and
failing is a fail, unclaimed but passing is reported; the porting guide lists the profiles as they are."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from deepport.conformance import select_cases
from deepport.conformance.profiles import (
    CERTIFIED,
    FAIL,
    NOT_SUPPORTED,
    PARTIAL,
    PROFILE_NAMES,
    PROFILES,
    UNCLAIMED_PASS,
    backend_profiles,
    cases_by_profile,
    certified,
    profile_of,
    record_profile,
    unknown_profiles,
)
from deepport.conformance.results import Status

PORTING = Path(__file__).resolve().parents[1] / "docs" / "PORTING.md"


def test_every_case_has_one_profile_of_one_kind_and_every_profile_has_smoke_cases() -> None:
    grouped = cases_by_profile(select_cases("full"))
    assert set(grouped) == set(PROFILE_NAMES), "a profile without cases, or a case outside every profile"
    for name, cases in grouped.items():
        kinds = {c.profile for c in cases}
        assert len(kinds) == 1, f"{name} mixes core and extension cases: {kinds}"
        assert any(c.tier == "smoke" for c in cases), f"{name} has no smoke case: CI never exercises it"
        assert all(c.op.startswith(name.split("/")[0].replace("fp8_grouped_gemm", "m_grouped_fp8_gemm"))
                   or (name.startswith("moe/") and c.op.startswith("moe_")) for c in cases), name


@pytest.mark.parametrize(("case_id", "profile"), [
    ("mla_decode/b3_sq2_hq16_hkv2_d576v512_p64_sk100_causal_bfloat16", "mla_decode/core"),
    ("mla_decode/float16_hq3", "mla_decode/fp16"),
    ("mla_decode/ext_page16_causal", "mla_decode/pages"),
    ("mla_decode/ext_head_dim_64_32_page32", "mla_decode/head_dims"),
    ("fp8_gemm_nt/m40_n256_k512", "fp8_gemm/core"),
    ("fp8_gemm_nt/accumulate_m32_n200_k512", "fp8_gemm/fp32_out"),
    ("fp8_gemm_nt/recipe_1d1d_m16_n200_k384", "fp8_gemm/sfb_per_row"),
    ("fp8_gemm_tn/m40_n256_k512", "fp8_gemm/layouts"),
    ("fp8_gemm_nt/ue8m0_m10_n256_k640_mn", "fp8_gemm/ue8m0"),
    ("fp8_gemm_nt/ext_k_tail_m9_n256_k1000", "fp8_gemm/k_tail"),
    ("m_grouped_fp8_gemm_nt_masked/g3_garbage_prefill", "fp8_grouped_gemm/core"),
    ("m_grouped_fp8_gemm_nt_contiguous/g2_ue8m0_packed", "fp8_grouped_gemm/ue8m0"),
    ("moe_dispatch/world2_uneven", "moe/ep"),
    ("moe_low_latency_dispatch/world1_fp8_nothing_routed_tmax16", "moe/permute"),
    ("moe_layout/nothing_routed_ranks2", "moe/permute"),
    ("moe_dispatch/world1_nothing_routed", "moe/single"),
])
def test_cases_map_to_the_profile_their_params_say(case_id: str, profile: str) -> None:
    cases = {c.id: c for c in select_cases("full")}
    if case_id not in cases:  # a renamed case: pick one of the op with the profile, to keep the test honest
        pytest.fail(f"case {case_id} is gone; choose another case of {profile}")
    assert profile_of(cases[case_id]) == profile


def test_a_results_record_maps_like_its_case_json_round_trip_included() -> None:
    for case in select_cases("smoke"):
        record = {"op": case.op, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in case.params.items()},
                  "profile": case.profile}
        assert record_profile(record) == profile_of(case), case.id


def _records(profile_cases: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Case records of the given statuses, per profile name (taking real cases of that profile)."""
    grouped = cases_by_profile(select_cases("smoke"))
    out = []
    for profile, statuses in profile_cases.items():
        for case, status in zip(grouped[profile], statuses, strict=False):
            out.append({"case_id": case.id, "op": case.op, "params": dict(case.params), "profile": case.profile,
                        "status": status, "backend": "b"})
    return out


def _by_name(records: list[dict[str, Any]], declared: tuple[str, ...] | None = None) -> dict[str, str]:
    return {v.profile: v.verdict for v in backend_profiles(records, declared)}


def test_derived_claims_certified_partial_and_not_supported() -> None:
    records = _records({"mla_decode/core": ["pass"] * 3, "mla_decode/pages": ["pass", "not_supported"],
                        "mla_decode/head_dims": ["not_supported"] * 2})
    assert _by_name(records) == {"mla_decode/core": CERTIFIED, "mla_decode/pages": PARTIAL,
                                 "mla_decode/head_dims": NOT_SUPPORTED}
    assert certified(backend_profiles(records, None))


def test_any_failure_fails_its_profile_claimed_or_not() -> None:
    for status in (Status.FAIL, Status.ERROR, Status.CRASH, Status.TIMEOUT):
        records = _records({"mla_decode/core": ["pass", status.value],
                            "mla_decode/pages": ["not_supported", status.value]})
        verdicts = _by_name(records)
        assert verdicts == {"mla_decode/core": FAIL, "mla_decode/pages": FAIL}, status
        assert not certified(backend_profiles(records, None))


def test_explicit_claims_claimed_and_unsupported_fails_unclaimed_passing_is_reported() -> None:
    records = _records({"mla_decode/core": ["pass"] * 2, "mla_decode/fp16": ["pass"] * 2,
                        "mla_decode/pages": ["pass", "not_supported"]})
    verdicts = _by_name(records, ("mla_decode/core", "mla_decode/pages", "fp8_gemm/core"))
    assert verdicts["mla_decode/core"] == CERTIFIED
    assert verdicts["mla_decode/fp16"] == UNCLAIMED_PASS
    assert verdicts["mla_decode/pages"] == FAIL  # the declaration says not supported, the claim says supported
    assert verdicts["fp8_gemm/core"] == FAIL  # claimed, but no case of it ran


def test_a_backend_claiming_nothing_that_passed_certifies_nothing() -> None:
    assert not certified(backend_profiles(_records({"mla_decode/core": ["not_supported"] * 2}), None))


def test_unknown_profile_names() -> None:
    assert unknown_profiles(["mla_decode/core", "mla_decode/fp8-kv", "core", "fp8_gemm/ue8m0"]) == [
        "mla_decode/fp8-kv", "core"]


def test_the_porting_guide_lists_every_profile_as_the_code_defines_it() -> None:
    rows = re.findall(r"^\| `([a-z0-9_]+/[a-z0-9_]+)` \| (.+) \|$", PORTING.read_text(), flags=re.M)
    assert [name for name, _ in rows] == sorted(PROFILE_NAMES, key=lambda n: (
        [p.split("/")[0] for p in PROFILE_NAMES].index(n.split("/")[0]), _doc_order(n)))
    assert {name: text for name, text in rows} == {p.name: p.summary for p in PROFILES}


def _doc_order(name: str) -> int:
    """The guide lists each family's base profile first, then the others in the order of PROFILES reversed
    (the code lists the specific rules first: first match wins)."""
    family = [p.name for p in PROFILES if p.name.split("/")[0] == name.split("/")[0]]
    return list(reversed(family)).index(name)
