"""``deepport verify``: a genuine run verifies cleanly, and every kind of tampering is an error.

The genuine run is the whole smoke tier on the torch backend (once per module). Smoke is not a
certification tier, so it verifies as "NOT A CERTIFICATION RUN"; to reach the VALID verdict on a
CPU, tests pass ``certification_tier="smoke"`` (a test hook of :func:`verify`, documented there).
Parts of one run split by op merge into one certificate (``deepport merge``). The committed full-tier
certificate is checked by tests/test_certificates.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deepport.cli.main import main
from deepport.conformance.merge import MergeError, merge_results
from deepport.conformance.results import Status
from deepport.conformance.runner import run_suite, select_cases
from deepport.conformance.suites import SUITES
from deepport.conformance.verify import INVALID, NOT_CERTIFICATION, VALID, input_elements, verify

Results = dict[str, Any]


@pytest.fixture(scope="module")
def genuine() -> Results:
    """The whole smoke tier on torch, isolated as a certification run is, read back from results.json."""
    run = run_suite(["torch"], "smoke", device="cpu", run_seed=20261128, isolate=True)
    data: Results = json.loads(json.dumps(run.to_dict()))
    return data


@pytest.fixture
def results(genuine: Results) -> Results:
    return copy.deepcopy(genuine)


def _index(results: Results, name: str) -> int:
    return next(i for i, c in enumerate(results["cases"]) if c["case_id"] == f"mla_decode/{name}")


def _smallest(results: Results) -> int:
    """The case verify regenerates first (fewest input elements)."""
    return min(range(len(results["cases"])), key=lambda i: input_elements(results["cases"][i]["params"]))


def test_smoke_run_is_not_a_certification_run_and_has_no_error(results: Results) -> None:
    rep = verify(results)
    assert rep.findings == []
    assert rep.verdict == NOT_CERTIFICATION and rep.exit_code == 1
    assert rep.not_certification_reasons == ["tier 'smoke': only a 'full'-tier run certifies"]
    assert len(rep.regenerated) == 8
    n_core = sum(c.profile == "core" for c in select_cases("smoke"))
    assert rep.profiles["torch"][0] == f"core profile: PASS ({n_core}/{n_core})"


def test_smoke_run_is_valid_when_smoke_is_made_the_certification_tier(results: Results) -> None:
    rep = verify(results, certification_tier="smoke", regenerate="all")
    assert rep.verdict == VALID and rep.exit_code == 0
    assert len(rep.regenerated) == len(select_cases("smoke"))


def _split(results: Results, groups: list[list[str]]) -> list[Results]:
    """``results`` as the parts of the same run made with ``certify --op`` per group of ops."""
    parts = []
    for ops in groups:
        part = copy.deepcopy(results)
        part["cases"] = [c for c in results["cases"] if c["op"] in ops]
        part["selection"] = {"ops": ops, "case_pattern": None}
        part["summary"] = {b: {op: n for op, n in per.items() if op in ops} for b, per in results["summary"].items()}
        parts.append(part)
    return parts


GROUPS = [["mla_decode", "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt"],
          ["m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"],
          [op for op in SUITES if op.startswith("moe_")]]


def test_parts_of_one_run_merge_into_a_valid_certificate(results: Results, tmp_path: Path) -> None:
    paths = []
    for i, part in enumerate(_split(results, GROUPS)):
        assert verify(part, certification_tier="smoke", regenerate=0).verdict == NOT_CERTIFICATION
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["selection"] == {"ops": None, "case_pattern": None}
    assert len(merged["cases"]) == len(results["cases"]) and merged["summary"] == results["summary"]
    assert [p["selection"]["ops"] for p in merged["parts"]] == GROUPS
    rep = verify(merged, certification_tier="smoke", regenerate=2)
    assert rep.verdict == VALID and rep.findings == [], rep.findings


def test_merging_refuses_parts_of_different_runs_or_overlapping_ops(results: Results) -> None:
    a, b, c = _split(results, GROUPS)
    other_seed = copy.deepcopy(b)
    other_seed["run_seed"] += 1
    with pytest.raises(MergeError, match="run_seed"):
        merge_results([a, other_seed, c])
    with pytest.raises(MergeError, match="are in an earlier part too"):
        merge_results([a, b, c, b])
    other_device = copy.deepcopy(c)
    other_device["environment"]["device"]["name"] = "another GPU"
    with pytest.raises(MergeError, match="device"):
        merge_results([a, b, other_device])
    partial = merge_results([a, c])  # the grouped FP8 GEMMs missing: a selection, not a certificate
    assert partial["selection"]["ops"] == sorted(GROUPS[0] + GROUPS[2])
    assert verify(partial, certification_tier="smoke", regenerate=0).verdict == NOT_CERTIFICATION


def test_a_run_without_process_isolation_gets_a_warning(results: Results) -> None:
    results["isolation"] = "none"
    rep = verify(results, certification_tier="smoke", regenerate=1)
    assert rep.verdict == VALID and not rep.errors
    (warning,) = rep.warnings
    assert warning.message.startswith("backends ran in the harness's process")


def test_a_filtered_run_is_not_a_certification_run_but_is_checked_for_its_selection() -> None:
    data = json.loads(json.dumps(run_suite(["torch"], "smoke", device="cpu", run_seed=5,
                                           case_pattern="page_edges").to_dict()))
    rep = verify(data, certification_tier="smoke")
    assert rep.verdict == NOT_CERTIFICATION and not rep.errors
    assert rep.not_certification_reasons == ["selection restricted to cases matching 'page_edges'"]
    data["cases"].append({**data["cases"][0], "case_id": "mla_decode/all_empty_b3"})
    assert any("extra" in f.message for f in verify(data, certification_tier="smoke").errors)


def _set(path: str, value: Any) -> Callable[[Results], None]:
    """Set ``results[k1][k2]...`` (``#name`` picks the case with that id, ``#smallest`` the cheapest)."""
    def tamper(results: Results) -> None:
        node: Any = results
        keys: list[Any] = path.split(".")
        for i, key in enumerate(keys):
            if key.startswith("#"):
                keys[i] = _smallest(results) if key == "#smallest" else _index(results, key[1:])
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value(node[keys[-1]]) if callable(value) else value
    return tamper


def _drop(results: Results) -> None:
    del results["cases"][_index(results, "page_edges")]


def _duplicate(results: Results) -> None:
    results["cases"].append(copy.deepcopy(results["cases"][_index(results, "page_edges")]))


def _core_not_supported(results: Results) -> None:
    case = results["cases"][_index(results, "page_edges")]
    case.update(status="not_supported", metrics={}, tolerance={}, message="no")


def _relabel_core_as_extension(results: Results) -> None:
    _core_not_supported(results)
    results["cases"][_index(results, "page_edges")]["profile"] = "extension"


def _extra(results: Results) -> None:
    full_only = next(c for c in select_cases("full") if c.tier == "full")
    results["cases"].append({**results["cases"][0], "case_id": full_only.id})


TAMPERINGS: dict[str, tuple[Callable[[Results], None], str | None, str]] = {
    "seed": (_set("cases.#page_edges.seed", lambda s: s + 1), "page_edges", "not the one derived from the run seed"),
    "run_seed": (_set("run_seed", 1), "page_edges", "not the one derived from the run seed"),
    "drop": (_drop, "page_edges", "missing"),
    "duplicate": (_duplicate, "page_edges", "recorded 2 times"),
    "extra": (_extra, "sk1024", "extra"),
    "param": (_set("cases.#page_edges.params.s_k", 99), "page_edges", "params differ"),
    "param_type": (_set("cases.#page_edges.params.varlen", 1), "page_edges", "params differ"),
    "features": (_set("cases.#page_edges.features", ["bfloat16"]), "page_edges", "features"),
    "tier": (_set("cases.#page_edges.tier", "full"), "page_edges", "tier 'full'"),
    "loosened_tolerance": (_set("cases.#page_edges.tolerance.out.rtol", lambda r: 2 * r), "page_edges",
                           "is looser than"),
    "dropped_tolerance": (_set("cases.#page_edges.tolerance", {}), "page_edges", "differs from"),
    "relabelled_extension": (_relabel_core_as_extension, "page_edges", "profile 'extension'"),
    "fail": (_set("cases.#page_edges.status", "fail"), "page_edges", "status 'fail'"),
    "internal_error": (_set("cases.#page_edges.status", "internal_error"), "page_edges", "status 'internal_error'"),
    "error_over_bound": (_set("cases.#page_edges.metrics.out.max_err_over_bound", 1.5), "page_edges",
                         "max_err_over_bound 1.5"),
    "calc_diff": (_set("cases.#page_edges.metrics.lse.calc_diff", 1e-3), "page_edges", "calc_diff"),
    "no_output_metrics": (_set("cases.#page_edges.metrics", {"inputs": {"sha256": "x"}}), "page_edges",
                          "without metrics for this output"),
    "input_sha": (_set("cases.#smallest.metrics.inputs.sha256", "0" * 64), None, "inputs sha256"),
    "suite_version": (_set("suite_version", "2025.1.0"), None, "another release of the suite"),
    "generator_version": (_set("generator_version", 0), None, "another generator"),
    "summary": (_set("summary.torch.mla_decode.pass", lambda n: n - 1), None, "summary for mla_decode"),
    "unlisted_backend": (_set("cases.#page_edges.backend", "other"), None, "not listed in `backends`"),
    "malformed_record": (_set("cases.#page_edges", "garbage"), None, "not a case record"),
    "schema": (_set("schema_version", 2), None, "schema"),
}


def test_a_core_case_declared_unsupported_leaves_its_profile_uncertified(results: Results) -> None:
    _core_not_supported(results)
    _recount(results)
    rep = verify(results, certification_tier="smoke")
    assert rep.verdict == VALID, rep.errors
    (certified,) = [line for line in rep.profiles["torch"] if line.startswith("certified profiles:")]
    assert "mla_decode/core" not in certified and "fp8_gemm/core" in certified
    assert rep.profiles["torch"][0].startswith("core profile: INCOMPLETE")


def test_a_backend_without_an_op_certifies_the_profiles_of_the_others(results: Results) -> None:
    """Two backends, one of which implements no FP8 GEMM (as hopper implements no MoE op)."""
    other = []
    for rec in results["cases"]:
        copy_ = {**copy.deepcopy(rec), "backend": "other"}
        if rec["op"].startswith("fp8_gemm"):
            copy_.update(status="not_supported", metrics={}, tolerance={}, message="not implemented")
        other.append(copy_)
    results["cases"] += other
    results["backends"]["other"] = copy.deepcopy(results["backends"]["torch"])
    _recount(results)
    rep = verify(results, certification_tier="smoke")
    assert rep.verdict == VALID, rep.errors
    (certified,) = [line for line in rep.profiles["other"] if line.startswith("certified profiles:")]
    assert "fp8_gemm" not in certified and "mla_decode/core" in certified


def test_a_backend_that_certifies_nothing_is_an_error(results: Results) -> None:
    for rec in results["cases"]:
        rec.update(status="not_supported", metrics={}, tolerance={}, message="no")
    _recount(results)
    rep = verify(results, certification_tier="smoke")
    assert rep.verdict == INVALID
    assert any("certify nothing" in f.message and f.backend == "torch" for f in rep.errors)


def _recount(results: Results) -> None:
    """The summary block recomputed from the (edited) case records, as an honest run would write it."""
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for rec in results["cases"]:
        per_op = summary.setdefault(rec["backend"], {}).setdefault(rec["op"], {s.value: 0 for s in Status})
        per_op[rec["status"]] += 1
    results["summary"] = summary


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_an_error(results: Results, name: str) -> None:
    tamper, case, words = TAMPERINGS[name]
    tamper(results)
    rep = verify(results, certification_tier="smoke")
    assert rep.verdict == INVALID and rep.exit_code == 1
    hits = [f for f in rep.errors if words in f.message and (case is None or case in (f.case_id or ""))]
    assert hits, f"{name}: no error with {words!r} on {case}; got {rep.errors}"


def test_the_tampered_input_sha_names_the_case_and_backend(results: Results) -> None:
    i = _smallest(results)
    results["cases"][i]["metrics"]["inputs"]["sha256"] = "0" * 64
    (error,) = verify(results, certification_tier="smoke").errors
    assert error.case_id == results["cases"][i]["case_id"] and error.backend == "torch"


def test_regenerate_zero_skips_the_input_check(results: Results) -> None:
    results["cases"][_smallest(results)]["metrics"]["inputs"]["sha256"] = "0" * 64
    rep = verify(results, certification_tier="smoke", regenerate=0)
    assert rep.verdict == VALID and rep.regenerated == []


def test_extension_not_supported_is_allowed(results: Results) -> None:
    case = results["cases"][_index(results, "ext_page1")]
    case.update(status="not_supported", metrics={}, tolerance={}, message="page 1 unsupported")
    counts = results["summary"]["torch"]["mla_decode"]
    counts["pass"] -= 1
    counts["not_supported"] += 1
    rep = verify(results, certification_tier="smoke")
    assert rep.verdict == VALID, rep.findings
    assert rep.profiles["torch"][1].endswith("passed, 1 not supported")


def test_missing_environment_is_a_warning_only(results: Results) -> None:
    results["environment"] = {}
    rep = verify(results, certification_tier="smoke")
    assert rep.verdict == VALID and len(rep.warnings) == 2


def test_cli_verify_prints_the_verdict_and_exits_1_for_a_smoke_run(
        results: Results, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main(["verify", str(path)]) == 1
    printed = capsys.readouterr().out
    assert "verdict: NOT A CERTIFICATION RUN" in printed and "core profile: PASS" in printed
    results["cases"][0]["seed"] += 1
    path.write_text(json.dumps(results))
    assert main(["verify", str(path), "--regenerate", "all"]) == 1
    printed = capsys.readouterr().out
    assert "verdict: INVALID" in printed and results["cases"][0]["case_id"] in printed


def test_cli_verify_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    path.write_text("not json {")
    assert main(["verify", str(path)]) == 2
    assert "cannot read conformance results" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "absent.json")]) == 2
    assert main(["verify", str(path), "--regenerate", "some"]) == 2
