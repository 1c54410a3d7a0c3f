"""The MoE conformance suites: every smoke case (1, 2 and 4 ranks over gloo) passes on the built-in
backends, and backends that break the contract in small ways fail."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from deepport.backends.torch import moe_layouts, moe_routes
from deepport.conformance import Status
from deepport.conformance.runner import run_suite
from deepport.conformance.suites import SUITES
from deepport.dispatch import Backend, OpSupport, get, registered
from deepport.dispatch.registry import all_backends, unregister
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult
from deepport.kernels.moe_low_latency_dispatch import MoELowLatencyDispatchCall, MoELowLatencyDispatchResult

MOE_OPS = [op for op in SUITES if op.startswith("moe_")]


def test_every_moe_op_has_single_and_multi_rank_smoke_cases() -> None:
    for op in MOE_OPS:
        worlds = {c.params["world"] for c in SUITES[op].cases() if c.tier == "smoke"}
        assert worlds == ({1} if op == "moe_layout" else {1, 2, 4}), (op, worlds)


@pytest.mark.timeout(600)
def test_moe_smoke_passes_on_reference_and_torch_including_gloo_ranks() -> None:
    run = run_suite(["reference", "torch"], "smoke", ops=MOE_OPS, run_seed=20261128)
    bad = [f"{r.case_id} on {r.backend}: {r.status.value} {r.message}" for r in run.cases if r.status != Status.PASS]
    assert not bad, "\n".join(bad)
    assert {r.params["world"] for r in run.cases} == {1, 2, 4}


# --- backends that cheat a little must fail -----------------------------------------------------------


def _reversed_rows(call: MoEDispatchCall) -> MoEDispatchResult:
    r = moe_routes.dispatch(call)
    assert isinstance(r.recv_x, torch.Tensor)
    r.recv_x.copy_(r.recv_x.flip(0))
    return r


def _last_row_unwritten(call: MoEDispatchCall) -> MoEDispatchResult:
    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return call.alloc(shape, dtype)

    r = moe_routes.dispatch(dataclasses.replace(call, alloc=alloc))
    assert isinstance(r.recv_x, torch.Tensor)
    fresh = call.alloc(tuple(r.recv_x.shape), r.recv_x.dtype)  # poisoned in the suite: never written
    fresh[:-1] = r.recv_x[:-1]
    return r._replace(recv_x=fresh)


def _weighted_combine(call: MoECombineCall) -> MoECombineResult:
    assert call.topk_weights is not None
    scaled = (call.x.float() * call.topk_weights.sum(1, keepdim=True)).to(torch.bfloat16)
    return moe_routes.combine(dataclasses.replace(call, x=scaled))


def _row_major_scales(call: MoELowLatencyDispatchCall) -> MoELowLatencyDispatchResult:
    r = moe_layouts.dispatch_low_latency(call)
    assert isinstance(r.recv_x, tuple)
    scales = call.alloc(tuple(r.recv_x[1].shape), torch.float32)
    scales.copy_(r.recv_x[1])
    return r._replace(recv_x=(r.recv_x[0], scales))


CHEATS: dict[str, tuple[str, Any, str]] = {
    "reversed_rows": ("moe_dispatch", _reversed_rows, "moe_dispatch/world1_t24_e16_top4"),
    "last_row_unwritten": ("moe_dispatch", _last_row_unwritten, "moe_dispatch/world1_int32_ids_duplicates"),
    "weighted_combine": ("moe_combine", _weighted_combine, "moe_combine/world1_t24_e16_top4"),
    "row_major_scales": ("moe_low_latency_dispatch", _row_major_scales,
                         "moe_low_latency_dispatch/world1_fp8_duplicates_tmax24"),
}


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_a_cheating_moe_backend_fails(name: str) -> None:
    op, fn, case_id = CHEATS[name]
    globals()[f"_cheat_{name}"] = fn
    backend = Backend(name=f"cheat_{name}", summary="test", version="0", priority={},
                      ops=(OpSupport(op=op, entry=f"{__name__}:_cheat_{name}",
                                     dtypes=frozenset({torch.bfloat16, torch.float8_e4m3fn})),
                           *[s for s in _torch_ops() if s.op != op]))
    with registered(backend):
        run = run_suite([backend.name], "smoke", ops=[op], case_pattern=case_id, run_seed=7)
    (result,) = run.cases
    assert result.status in (Status.FAIL, Status.ERROR), (result.status, result.message)


def _torch_ops() -> tuple[OpSupport, ...]:
    return tuple(s for s in get("torch").ops if s.op.startswith("moe_"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("isolate", [False, True], ids=["in_process", "isolated"])
def test_a_backend_without_moe_is_not_supported_on_multi_rank_cases_too(isolate: bool) -> None:
    """An MLA-only backend (the corpus's control) gets ``not_supported`` with dispatch's reason on every MoE
    case, those whose ranks run in rank processes included (their BackendNotSupportedError crosses back as
    that verdict, not as an error): a vendor's MLA-only certificate can verify."""
    try:
        run = run_suite(["exploit_control"], "smoke", ops=["moe_dispatch", "moe_combine"], case_pattern="world2",
                        run_seed=11, isolate=isolate, plugins=["deepport.conformance.exploits:CONTROL"],
                        timeout_s=240)
    finally:  # the plugin registered the control in this process too: leave the registry as it was
        if "exploit_control" in {b.name for b in all_backends()}:
            unregister("exploit_control")
    assert {c.params["world"] for c in run.cases} == {2}
    for r in run.cases:
        assert r.status is Status.NOT_SUPPORTED, (r.case_id, r.status, r.message)
        assert r.message.startswith("does not implement moe_dispatch"), r.message  # combine's ranks dispatch first


def test_every_moe_op_has_a_case_where_a_rank_receives_no_row() -> None:
    from deepport.conformance.suites import moe_common

    for op in ("moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded",
               "moe_low_latency_dispatch", "moe_low_latency_combine", "moe_layout"):
        cold = [c for c in SUITES[op].cases() if "rank_receives_nothing" in c.features]
        assert cold, f"{op}: no case where a rank receives nothing"
        for c in cold:  # the cold ranks' experts are never named by any token of any rank
            p = c.params
            ranks = max(p["world"], p["num_ranks"])
            per_rank = p["experts"] // ranks
            for r in range(p["world"]):
                idx = moe_common.rank_inputs(p, 7, r)["topk_idx"]
                owners = set((idx[idx >= 0] // per_rank).tolist())
                assert owners and not owners & set(p["cold_ranks"]), (c.id, owners)


def test_a_rank_group_packs_empty_tensors_of_any_stride() -> None:
    from deepport.conformance.rank_group import pack, unpack

    empty = torch.empty_strided((0, 3), (0, 0), dtype=torch.int64)  # stride 0: a dtype view refuses it
    back = unpack(pack(empty))
    assert back.shape == (0, 3) and back.dtype == torch.int64


def test_calibration_takes_zeros_for_the_answer_when_the_reference_is_all_zero() -> None:
    import numpy as np

    from deepport.conformance.calibration import calibrate
    from deepport.conformance.tolerance import tolerance

    tol = {"counts": tolerance("moe_layout", "num_tokens_per_rank", "bfloat16")}
    zero = {"counts": np.zeros(4)}
    assert calibrate(zero, {"counts": torch.int32}, tol, 0) == []
    some = {"counts": np.array([0.0, 3.0, 1.0, 0.0])}
    assert "an all-zero output passes" not in " ".join(calibrate(some, {"counts": torch.int32}, tol, 0))
