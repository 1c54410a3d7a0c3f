"""Multi-rank runs never hang: every path of a rank group (start, job, collective, shutdown) has a
deadline and fails naming the rank and its phase; plugins and entry-point backends reach the ranks.

All on CPU (gloo), with small timeouts. The jobs live in tests/rank_jobs.py (ranks import it: they get
this process's ``sys.path``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from isolation_backends import PLUGIN_MOE, PLUGIN_MOE_LAYOUT

from deepport.conformance import Status, run_suite
from deepport.conformance.rank_group import RankGroup, RankGroupError, RankGroupTimeout
from deepport.dispatch import registered

JOB_TIMEOUT_S = 6.0
# start (two interpreters importing torch on a loaded 2-core machine) + the job's deadline + the stack dump
BOUND_S = JOB_TIMEOUT_S + 20.0


@pytest.fixture
def group() -> Iterator[RankGroup]:
    g = RankGroup(2, "cpu", timeout_s=JOB_TIMEOUT_S)
    yield g
    g.close()


def test_a_stalled_rank_fails_the_job_in_bounded_time_naming_the_rank_and_where_it_is(group: RankGroup) -> None:
    started = time.monotonic()
    with pytest.raises(RankGroupError) as err:
        group.run("rank_jobs:all_reduce_unless_stalled", 2, label="stall test", stalled=1)
    assert time.monotonic() - started < BOUND_S
    message = str(err.value)
    # rank 0 waits in the collective until the process group's timeout and reports it; rank 1 is named
    # with its phase and its Python stack (it sleeps in the job, never reaching the collective)
    assert "job stall test on 2 of 2 cpu ranks" in message
    assert "rank 0 of 2 (phase 'job stall test: all_reduce #1 issued'" in message
    assert "rank 1 of 2 (phase 'job stall test: running'" in message
    assert "rank 1's stack" in message and "all_reduce_unless_stalled" in message
    assert not group.alive()  # killed: the next job starts a fresh group


def test_silent_ranks_time_out_with_each_ranks_phase_and_stack(group: RankGroup) -> None:
    started = time.monotonic()
    with pytest.raises(RankGroupTimeout) as err:
        group.run("rank_jobs:sleep_forever", 2, label="silent")
    assert JOB_TIMEOUT_S <= time.monotonic() - started < BOUND_S
    message = str(err.value)
    assert f"job silent on 2 of 2 cpu ranks: no answer within {JOB_TIMEOUT_S:g} s from rank 0 of 2" in message
    assert "rank 1 of 2 (phase 'job silent: running'" in message
    assert "rank 0's stack" in message and "sleep_forever" in message
    assert isinstance(err.value, TimeoutError)


def test_a_rank_that_dies_fails_the_job_at_once(group: RankGroup) -> None:
    started = time.monotonic()
    with pytest.raises(RankGroupError, match=r"rank 1 of 2 \(phase 'job dying: running'.*(exited|died)"):
        group.run("rank_jobs:die_on", 2, label="dying", dying=1)
    assert time.monotonic() - started < JOB_TIMEOUT_S  # not the deadline: the death is noticed


def test_a_rank_sending_nothing_does_not_hang(group: RankGroup) -> None:
    # rank 1 has no rows for anyone (an empty send buffer); rank 0 sends it 2 rows
    got = group.run("rank_jobs:exchange_rows", 2, rows_from=[2, 0])
    assert got == [[[0.0] * 3] * 2, [[0.0] * 3] * 2]
    got = group.run("rank_jobs:exchange_rows", 2, rows_from=[0, 0])  # nobody sends anything
    assert got == [[], []]
    assert group.alive()


def test_a_failed_start_names_the_rank_and_its_phase() -> None:
    started = time.monotonic()
    with pytest.raises(RankGroupError, match=r"starting 2 nosuchdevice rank processes: rank \d of 2 \(phase "
                                             r"'[^']*'.*exit code 1\); its log ends: "
                                             r".*RuntimeError: Expected one of cpu"):
        RankGroup(2, "nosuchdevice", timeout_s=JOB_TIMEOUT_S, start_timeout_s=60)
    assert time.monotonic() - started < 60


def test_plugin_backends_reach_the_rank_processes() -> None:
    """A backend loaded with ``--plugin`` runs the 2-rank cases (each rank loads the run's plugins)."""
    with registered(PLUGIN_MOE):
        run = run_suite([PLUGIN_MOE.name], "smoke", device="cpu", ops=["moe_dispatch", "moe_combine"],
                        case_pattern="world2", run_seed=5, plugins=["isolation_backends:PLUGIN_MOE"])
    # world2_uneven, world2_fp8_empty_rank, world2_uneven_duplicates, and the three where a rank receives nothing
    assert len(run.cases) == 6
    bad = [f"{r.case_id}: {r.status.value} {r.message}" for r in run.cases if r.status is not Status.PASS]
    assert not bad, "\n".join(bad)


def test_multi_rank_cases_of_an_op_the_backend_lacks_are_not_supported() -> None:
    """As in a world of one: the ranks' BackendNotSupportedError is the case's answer, with its reason
    (not an error that kills the rank group)."""
    with registered(PLUGIN_MOE_LAYOUT):
        run = run_suite([PLUGIN_MOE_LAYOUT.name], "smoke", device="cpu", ops=["moe_dispatch", "moe_combine"],
                        case_pattern="world2", run_seed=7, plugins=["isolation_backends:PLUGIN_MOE_LAYOUT"])
    assert len(run.cases) == 6
    for r in run.cases:
        assert r.status is Status.NOT_SUPPORTED and r.message == "does not implement moe_dispatch", (r.case_id,
                                                                                                    r.message)


def test_plugin_backends_reach_the_ranks_of_an_isolated_worker() -> None:
    with registered(PLUGIN_MOE):
        run = run_suite([PLUGIN_MOE.name], "smoke", device="cpu", ops=["moe_combine"], case_pattern="world2",
                        run_seed=6, plugins=["isolation_backends:PLUGIN_MOE"], isolate=True, timeout_s=300)
    assert len(run.cases) == 2  # world2_uneven_duplicates, world2_rank1_receives_nothing
    assert all(r.status is Status.PASS for r in run.cases), [(r.case_id, r.message) for r in run.cases]


def test_entry_point_backends_reach_the_rank_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend installed as an entry point (group ``deepport.backends``) is registered in every rank:
    the ranks get this process's ``sys.path`` and load entry points themselves."""
    dist_info = tmp_path / "deepport_test_entry_point-0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: deepport-test-entry-point\nVersion: 0\n")
    (dist_info / "entry_points.txt").write_text("[deepport.backends]\ntest_entry_point = entry_point_backend\n")
    (tmp_path / "entry_point_backend.py").write_text(
        "from isolation_backends import PLUGIN_MOE\n"
        "import dataclasses\n"
        "BACKEND = dataclasses.replace(PLUGIN_MOE, name='test_entry_point')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = RankGroup(2, "cpu", timeout_s=60)
    try:
        names = g.run("rank_jobs:registered_backends", 2)
    finally:
        g.close()
    assert all("test_entry_point" in n for n in names), names
