"""Distributed faults of the MoE ops, on two gloo ranks (CPU): uneven token counts and a rank that sends
nothing give the reference's answer; a peer that stalls (never calls the op) or dies in the middle of
it makes the op raise a clear error within the process group's limit, instead of hanging.

The conformance suite's multi-rank cases cover uneven and empty ranks for each op on its own; here every
backend runs all MoE ops in one job on such worlds. The rank group's own deadlines (a rank that stalls or
dies inside a job) are tests/test_rank_group.py's. The jobs live in tests/moe_fault_jobs.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deepport.conformance.rank_group import RankGroup
from deepport.dispatch import registry

STALL_S = 2.0  # the subgroup's collective limit in the stall tests
SLACK_S = 15.0  # on top of it: the op's own work and a loaded 2-core machine


def _usable(backend: str) -> str | None:
    reason = registry.get(backend).unavailable_reason
    if reason is None and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "triton runs on the CPU only under TRITON_INTERPRET=1"
    return reason


class _Shared:
    """Two gloo ranks shared by the tests that leave the world group usable (stalls happen on subgroups);
    started again after a test that failed (a failed job kills the group)."""

    group: RankGroup | None = None

    def get(self) -> RankGroup:
        if self.group is None or not self.group.alive():
            if self.group is not None:
                self.group.kill()
            self.group = RankGroup(2, "cpu", timeout_s=120)
        return self.group


@pytest.fixture(scope="module")
def shared() -> Iterator[_Shared]:
    holder = _Shared()
    yield holder
    if holder.group is not None:
        holder.group.close()


@pytest.fixture
def ranks(shared: _Shared) -> RankGroup:
    return shared.get()


def _transport_error_types() -> set[str]:
    """The MoE transport's own error types, where the torch backend has them (``MoECommError``)."""
    from deepport.backends.torch import moe_comm

    return {name for name in ("MoECommError", "MoECommTimeout") if hasattr(moe_comm, name)}


def _assert_clear(outcome: dict[str, Any], backend: str, words: tuple[str, ...]) -> None:
    assert outcome["types"], f"{backend}: the op returned instead of raising: {outcome}"
    text = outcome["message"].lower()
    assert any(w in text for w in words) or "TimeoutError" in outcome["types"], outcome
    if backend != "reference" and _transport_error_types():  # the torch transport wraps what gloo says
        assert "MoECommError" in outcome["types"], outcome


# --- uneven worlds and a rank that sends nothing -----------------------------------------------------------------

WORLDS = {
    # rank 1 has tokens but routes every slot nowhere; rank 0 keeps its tokens on its own experts:
    # no row crosses ranks in either direction
    "rank1_routes_nowhere": ([7, 5], ["local", "nowhere"]),
    # rank 1 has no tokens at all, rank 0 sends to both ranks
    "rank1_empty": ([9, 0], ["spread", "spread"]),
    # every rank keeps its rows (nothing crosses), different counts
    "all_local_uneven": ([3, 8], ["local", "local"]),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["torch", "opencl", "triton"])
@pytest.mark.parametrize("world", sorted(WORLDS))
def test_uneven_ranks_and_a_rank_sending_nothing_match_the_reference(ranks: RankGroup, backend: str,
                                                                    world: str) -> None:
    reason = _usable(backend)
    if reason is not None:
        pytest.skip(reason)
    tokens, routes = WORLDS[world]
    problems = ranks.run("moe_fault_jobs:agree_with_reference", 2, label=f"{backend} {world}", backend=backend,
                         tokens=tokens, routes=routes)
    assert problems == [[], []]


# --- a peer that stalls ---------------------------------------------------------------------------------------------

STALLS = [("torch", op) for op in ("moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded",
                                   "moe_low_latency_dispatch", "moe_low_latency_combine")] + [
    ("reference", "moe_dispatch"), ("reference", "moe_low_latency_combine"),
    ("opencl", "moe_combine"), ("triton", "moe_combine_expanded")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("backend", "op"), STALLS)
def test_a_stalled_peer_makes_the_op_raise_a_timeout(ranks: RankGroup, backend: str, op: str) -> None:
    reason = _usable(backend)
    if reason is not None:
        pytest.skip(reason)
    started = time.monotonic()
    mine, stalled = ranks.run("moe_fault_jobs:stalled_peer", 2, label=f"stall {backend} {op}", backend=backend,
                              op=op, timeout_s=STALL_S)
    assert stalled is None
    assert STALL_S * 0.9 <= mine["elapsed"] < STALL_S + SLACK_S, mine  # waited for the limit, then raised
    assert time.monotonic() - started < STALL_S + SLACK_S + 10
    _assert_clear(mine, backend, ("timed out", "timeout"))
    assert ranks.alive()  # the world group survives a subgroup's timeout


# --- a peer that dies -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("backend", "op", "die_at"), [
    ("torch", "moe_dispatch", 2),  # after the count exchange, before the rows
    ("torch", "moe_low_latency_combine", 1),
    ("reference", "moe_dispatch_expanded", 2),
])
def test_a_peer_that_dies_mid_op_fails_the_op_at_once(backend: str, op: str, die_at: int) -> None:
    group = RankGroup(2, "cpu", timeout_s=90)
    try:
        started = time.monotonic()
        mine, dead = group.run("moe_fault_jobs:dying_peer", 2, label=f"die {backend} {op}", backend=backend, op=op,
                               die_at=die_at)
    finally:
        group.kill()
    assert dead is None, dead
    assert mine["elapsed"] < 20, mine  # noticed as a death, not waited out (the subgroup's limit is 60 s)
    assert time.monotonic() - started < 45
    _assert_clear(mine, backend, ("connection", "closed", "reset", "peer", "broken pipe", "timed out"))
