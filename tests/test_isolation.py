"""Process isolation (``run_suite(..., isolate=True)``): the backend runs in a spawned worker, the
judgement in the harness; a crash or a hang costs one case, not the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepport.conformance import Status, run_suite
from deepport.conformance.exploits import EXPLOITS as CORPUS
from deepport.dispatch import registry

pytestmark = pytest.mark.timeout(300)

SEED = 20261128
FEW = "mla_decode/b3_sq2_hq16_hkv2_d576v512_p64_sk100_causal_bfloat16"
PLUGIN = "deepport.conformance.exploits:EXPLOITS"


def _forget(*names: str) -> None:
    """Plugins register in this process too; drop them so other tests see the built-ins only."""
    for name in names:
        if name in {b.name for b in registry.all_backends()}:
            registry.unregister(name)


def test_isolated_run_passes_an_honest_backend_and_records_the_isolation() -> None:
    run = run_suite(["torch", "reference"], "smoke", case_pattern="*sq2*causal*", run_seed=SEED, isolate=True)
    assert run.isolation == "process" and run.to_dict()["isolation"] == "process"
    assert len(run.cases) >= 6
    assert all(r.status is Status.PASS for r in run.cases), [(r.case_id, r.message) for r in run.cases]
    assert all(r.metrics["inputs"]["sha256"] for r in run.cases)


@pytest.mark.parametrize("name", ["exploit_zeros", "exploit_zeroes_pristine_inputs", "exploit_mutates_q"])
def test_plugins_reach_the_worker_and_cheats_are_still_rejected(name: str) -> None:
    try:
        run = run_suite([name], "smoke", case_pattern=FEW, run_seed=SEED, isolate=True, plugins=[PLUGIN])
    finally:
        _forget(*(b.name for b in CORPUS))
    (result,) = run.cases
    assert result.status is Status.FAIL, result.message


def test_isolated_backends_run_a_case_at_the_same_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the two backends waits for the other's call to start: run one after the other, the first
    would raise after 60 s; run at the same time, both pass (and are judged, in order)."""
    monkeypatch.setenv("DEEPPORT_TEST_RENDEZVOUS", str(tmp_path))  # the spawned workers inherit it
    try:
        run = run_suite(["test_meet_a", "test_meet_b"], "smoke", case_pattern=FEW, run_seed=SEED, isolate=True,
                        plugins=["isolation_backends:RENDEZVOUS"])
    finally:
        _forget("test_meet_a", "test_meet_b")
    assert [r.backend for r in run.cases] == ["test_meet_a", "test_meet_b"]
    assert all(r.status is Status.PASS for r in run.cases), [(r.backend, r.message) for r in run.cases]


def test_a_backend_that_kills_its_process_is_a_crash_and_the_run_goes_on() -> None:
    try:
        run = run_suite(["test_crash", "torch"], "smoke", case_pattern="*page*", run_seed=SEED, isolate=True,
                        plugins=["isolation_backends:BACKENDS"])
    finally:
        _forget("test_crash", "test_hang")
    crashed = [r for r in run.cases if r.backend == "test_crash"]
    honest = [r for r in run.cases if r.backend == "torch"]
    assert len(crashed) >= 2, "the worker must be restarted after a crash"
    assert all(r.status is Status.CRASH and "worker process died (exit code 3)" in r.message for r in crashed)
    assert all(r.status is Status.PASS for r in honest)


def test_a_backend_that_hangs_is_stopped_at_the_timeout() -> None:
    try:
        run = run_suite(["test_hang"], "smoke", case_pattern=FEW, run_seed=SEED, isolate=True,
                        plugins=["isolation_backends:BACKENDS"], timeout_s=5)
    finally:
        _forget("test_crash", "test_hang")
    (result,) = run.cases
    assert result.status is Status.TIMEOUT and "timed out after 5 s" in result.message


def test_isolated_backends_share_one_judgement_per_case_and_cheats_still_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backend in its own worker: the case's reference is computed once (after the first call) and
    judges each backend; a cheat judged against the shared expectations still fails, and one that
    changes its inputs is still caught (digests are compared per call)."""
    from deepport.conformance.suites import SUITES

    suite = SUITES["mla_decode"]
    calls: list[int] = []
    original = suite.reference
    monkeypatch.setattr(suite, "reference", lambda inputs: (calls.append(1), original(inputs))[1])
    names = ["torch", "exploit_zeros", "exploit_mutates_q", "reference"]
    try:
        run = run_suite(names, "smoke", case_pattern=FEW, run_seed=SEED, isolate=True, plugins=[PLUGIN])
    finally:
        _forget(*(b.name for b in CORPUS))
    status = {r.backend: r for r in run.cases}
    assert len(calls) == 1, f"the reference was computed {len(calls)} times for one case"
    assert status["torch"].status is Status.PASS and status["reference"].status is Status.PASS
    assert status["exploit_zeros"].status is Status.FAIL
    assert status["exploit_mutates_q"].status is Status.FAIL and "modified" in status["exploit_mutates_q"].message
    in_process = run_suite(["torch", "reference"], "smoke", case_pattern=FEW, run_seed=SEED)
    assert len(calls) == 3, "in one process each backend's judgement recomputes the reference after its call"
    assert all(r.status is Status.PASS for r in in_process.cases)


def _calls_order(monkeypatch: pytest.MonkeyPatch, fits: bool) -> list[str]:
    from deepport.conformance import isolation, runner
    events: list[str] = []
    submit, collect = isolation.BackendWorker.submit, isolation.BackendWorker.collect

    def logged_submit(self: isolation.BackendWorker, *args: object) -> None:
        events.append("submit")
        submit(self, *args)  # type: ignore[arg-type]

    def logged_collect(self: isolation.BackendWorker) -> object:
        events.append("collect")
        return collect(self)

    monkeypatch.setattr(isolation.BackendWorker, "submit", logged_submit)
    monkeypatch.setattr(isolation.BackendWorker, "collect", logged_collect)
    monkeypatch.setattr(runner, "_fits_at_once", lambda suite, case, backends: fits)
    run = run_suite(["torch", "reference"], "smoke", case_pattern=FEW, run_seed=SEED, isolate=True)
    assert [r.status for r in run.cases] == [Status.PASS, Status.PASS], [r.message for r in run.cases]
    return events


def test_backends_run_one_after_another_when_the_memory_estimate_does_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert _calls_order(monkeypatch, fits=True) == ["submit", "submit", "collect", "collect"]
    assert _calls_order(monkeypatch, fits=False) == ["submit", "collect", "submit", "collect"]


def test_the_memory_estimate_decides_with_one_copy_per_backend_and_one_for_the_judge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from deepport.conformance import runner
    from deepport.conformance.suites import SUITES
    masked = SUITES["m_grouped_fp8_gemm_nt_masked"]
    big = next(c for c in masked.cases() if c.id.endswith("g32_em192_mmax1024_n4096_k7168"))
    need = masked.footprint_bytes(big)
    assert 10e9 < need < 16e9  # 12.2 GB measured when generating it
    monkeypatch.setattr(runner, "_available_memory", lambda: 3 * need)
    assert runner._fits_at_once(masked, big, 2) and not runner._fits_at_once(masked, big, 3)
    monkeypatch.setattr(runner, "_available_memory", lambda: None)  # unknown: as before, at the same time
    assert runner._fits_at_once(masked, big, 3)
    assert runner._fits_at_once(SimpleNamespace(), big, 3)  # a suite without an estimate
