"""Automatic selection by measured rankings: a performance table overrides the priorities for the buckets it
measured, never picks a backend that cannot run the call (or is never automatic), falls back to the priority
order elsewhere, can be switched off, and every choice says why. Recording backends (see conftest) show what
really ran; the shipped H200 table is checked on synthetic sm_90 signatures (no GPU needed)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import deepport
from deepport.dispatch import Backend, DeviceInfo, device_info, get, one_of, perf_table, registered, selection
from deepport.errors import InvalidArgumentError
from deepport.kernels import _fp8_checks as fchk
from deepport.kernels.fp8_gemm import FP8GemmSignature
from deepport.kernels.mla_decode import MLADecodeSignature

pytestmark = pytest.mark.usefixtures("clean_env")

CPU = device_info(torch.device("cpu"))
Runs = list[tuple[str, Any]]
RUN = "2026-01-01-fake"


def fake_table(ranking: list[tuple[str, float]] | dict[str, list[tuple[str, float]]], *, device: str = CPU.name,
               family: str = "cpu", rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """A table for mla_decode on ``device``: ``ranking`` for bucket ``q_rows<=4``, or a dict bucket -> ranking."""
    buckets = ranking if isinstance(ranking, dict) else {"q_rows<=4": ranking}
    return {
        "schema": "deepport.perf_table", "schema_version": 1, "family": family, "generated_by": "a test",
        "tie_tolerance": 0.03, "runs": {RUN: {"started": "2026-01-01T00:00:00+00:00", "commit": "0" * 40}},
        "buckets": {"mla_decode": rule or {"ranges": {"q_rows": [4]}, "exact": []}},
        "devices": {device: {"mla_decode": {
            label: {"configs": [f"cfg_{label}"],
                    "ranking": [{"backend": b, "time_us": t, "tflops": None, "gbps": None, "run": RUN}
                                for b, t in found]}
            for label, found in buckets.items()}}},
    }


@pytest.fixture
def use_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Any]], None]:
    """Point ``DEEPPORT_PERF_TABLE`` at a new file holding the given table."""
    count = iter(range(1000))

    def use(table: dict[str, Any]) -> None:
        path = tmp_path / f"table{next(count)}.json"
        path.write_text(json.dumps(table))
        monkeypatch.setenv("DEEPPORT_PERF_TABLE", str(path))

    return use


@contextlib.contextmanager
def several(*backends: Backend) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for backend in backends:
            stack.enter_context(registered(backend))
        yield


@pytest.fixture
def fast_and_slow(make_backend: Callable[..., Backend]) -> Iterator[None]:
    """``slow`` (priority 1000 on the CPU) and ``fast`` (500): the priorities prefer slow."""
    with several(make_backend("slow", {"cpu": 1000}), make_backend("fast", {"cpu": 500})):
        yield


def ran(runs: Runs) -> list[str]:
    return [name for name, _ in runs]


@pytest.mark.usefixtures("fast_and_slow")
def test_the_measured_ranking_overrides_the_priorities(mla_inputs: Callable[..., Any], runs: Runs,
                                                       use_table: Callable[[dict[str, Any]], None]) -> None:
    inputs = mla_inputs()  # s_q 2, h_q 4, h_kv 2: q_rows 4
    assert ran(runs) == [] and deepport.explain("mla_decode", *inputs.args).chosen == "slow"  # no table: priority
    use_table(fake_table([("fast", 10.0), ("slow", 20.0), ("torch", 30.0)]))
    deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["fast"]
    ex = deepport.explain("mla_decode", *inputs.args)
    assert (ex.chosen, ex.source) == ("fast", "automatic")
    assert ex.reason == (f"fast: fastest measured for mla_decode q_rows<=4 on {CPU.name} (10.0 us vs slow 20.0 us, "
                         f"torch 30.0 us; bench {RUN})")
    text = str(ex)
    assert f"why: {ex.reason}" in text and "measured 10.0 us" in text and "measured 20.0 us" in text


@pytest.mark.usefixtures("fast_and_slow")
def test_a_ranked_backend_that_cannot_run_the_call_is_passed_over(
        mla_inputs: Callable[..., Any], runs: Runs, make_backend: Callable[..., Backend],
        use_table: Callable[[dict[str, Any]], None]) -> None:
    use_table(fake_table([("page64", 2.0), ("gone", 3.0), ("manual", 4.0), ("fast", 10.0), ("slow", 20.0)]))
    page64 = make_backend("page64", {"cpu": 2000}, requirements=(one_of("page_block_size", {64}),))
    gone = make_backend("gone", {"cpu": 2000}, probe=lambda: "driver missing")
    manual = make_backend("manual")  # can run the call, but has no automatic priority: never chosen automatically
    inputs = mla_inputs()  # page 16
    with several(page64, gone, manual):
        deepport.mla_decode(*inputs.args)
        ex = deepport.explain("mla_decode", *inputs.args)
    assert ran(runs) == ["fast"] and ex.chosen == "fast"
    assert "fast: fastest measured for mla_decode q_rows<=4" in ex.reason
    assert "faster but cannot run this call: page64 2.0 us, gone 3.0 us, manual 4.0 us" in ex.reason


@pytest.mark.usefixtures("fast_and_slow")
def test_when_no_ranked_backend_can_run_the_priority_order_decides(
        mla_inputs: Callable[..., Any], runs: Runs, use_table: Callable[[dict[str, Any]], None]) -> None:
    use_table(fake_table([("absent", 1.0)]))  # measured once, not registered here
    ex = deepport.explain("mla_decode", *mla_inputs().args)
    assert ex.chosen == "slow" and ex.measured is None
    assert ex.reason.startswith("none of the backends measured for mla_decode q_rows<=4 (absent) can run this call: "
                                "priority order slow>fast>torch")


@pytest.mark.usefixtures("fast_and_slow")
def test_a_bucket_without_measurement_falls_back_to_the_priority_order(
        mla_inputs: Callable[..., Any], runs: Runs, use_table: Callable[[dict[str, Any]], None]) -> None:
    use_table(fake_table([("fast", 10.0), ("slow", 20.0)]))
    inputs = mla_inputs(h_q=8, h_kv=1, s_q=1)  # q_rows 8: bucket q_rows>4, not measured
    deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["slow"]
    reason = deepport.explain("mla_decode", *inputs.args).reason
    assert reason.startswith(f"no measurement for mla_decode q_rows>4 on {CPU.name}: priority order slow>fast>torch")


@pytest.mark.usefixtures("fast_and_slow")
def test_the_exact_bucket_wins_over_the_ranges_only_one(mla_inputs: Callable[..., Any], runs: Runs,
                                                        use_table: Callable[[dict[str, Any]], None]) -> None:
    rule = {"ranges": {"q_rows": [4]}, "exact": ["b"]}  # b: the batch, a feature of the call the op layer hands over
    use_table(fake_table({"q_rows<=4 b=2": [("slow", 5.0), ("fast", 10.0)], "q_rows<=4": [("fast", 1.0)]},
                         rule=rule))
    deepport.mla_decode(*mla_inputs(lens=(5, 33)).args)  # b = 2: its exact bucket
    deepport.mla_decode(*mla_inputs(lens=(3, 1, 4)).args)  # b = 3: not measured, the q_rows<=4 bucket
    assert ran(runs) == ["slow", "fast"]
    assert "measured for mla_decode q_rows<=4 b=2 on" in deepport.explain("mla_decode", *mla_inputs().args).reason


@pytest.mark.usefixtures("fast_and_slow")
def test_a_tie_in_the_table_says_the_priority_order_broke_it(mla_inputs: Callable[..., Any],
                                                             use_table: Callable[[dict[str, Any]], None]) -> None:
    use_table(fake_table([("slow", 10.2), ("fast", 10.0)]))  # the generator's order: within 3%, priority first
    ex = deepport.explain("mla_decode", *mla_inputs().args)
    assert ex.chosen == "slow"
    assert ex.reason.startswith("slow: within 3% of the fastest measured for mla_decode q_rows<=4 on "
                                f"{CPU.name} (slow 10.2 us vs fast 10.0 us; ties keep the priority order")


@pytest.mark.usefixtures("fast_and_slow")
def test_figures_of_another_device_of_the_family_apply_and_say_so(
        mla_inputs: Callable[..., Any], use_table: Callable[[dict[str, Any]], None]) -> None:
    use_table(fake_table([("fast", 10.0), ("slow", 20.0)], device="Another CPU"))
    ex = deepport.explain("mla_decode", *mla_inputs().args)
    assert ex.chosen == "fast"
    assert f"on Another CPU (this device: {CPU.name})" in ex.reason


def test_this_devices_own_figures_come_before_another_devices_exact_bucket() -> None:
    table = fake_table({"q_rows<=4": [("fast", 1.0)]}, rule={"ranges": {"q_rows": [4]}, "exact": ["b"]})
    table["devices"]["Another CPU"] = {"mla_decode": {"q_rows<=4 b=2": {"configs": ["x"], "ranking": [
        {"backend": "slow", "time_us": 1.0, "tflops": None, "gbps": None, "run": RUN}]}}}
    parsed = perf_table.Table.from_json(table, "test")
    labels = parsed.bucket("mla_decode", {"q_rows": 4, "b": 2})
    assert labels == ("q_rows<=4 b=2", "q_rows<=4")
    here = parsed.lookup("mla_decode", labels, CPU.name)
    assert here is not None and (here.device, here.bucket, here.backends) == (CPU.name, "q_rows<=4", ("fast",))
    there = parsed.lookup("mla_decode", labels, "A third CPU")
    assert there is not None and (there.device, there.bucket) == (CPU.name, "q_rows<=4")  # table order
    assert parsed.bucket("mla_decode", {"q_rows": 4}) is None  # a feature the rule needs is missing


@pytest.mark.usefixtures("fast_and_slow")
def test_a_table_of_another_family_is_not_used(mla_inputs: Callable[..., Any],
                                               use_table: Callable[[dict[str, Any]], None]) -> None:
    use_table(fake_table([("fast", 10.0)], family="nvidia-sm90"))
    ex = deepport.explain("mla_decode", *mla_inputs().args)
    assert ex.chosen == "slow"
    assert ex.reason.startswith("no performance table for cpu: priority order slow>fast>torch")


@pytest.mark.usefixtures("fast_and_slow")
def test_deepport_selection_priority_turns_the_table_off(mla_inputs: Callable[..., Any], runs: Runs,
                                                         use_table: Callable[[dict[str, Any]], None],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    use_table(fake_table([("fast", 10.0), ("slow", 20.0)]))
    inputs = mla_inputs()
    monkeypatch.setenv("DEEPPORT_SELECTION", "priority")
    deepport.mla_decode(*inputs.args)
    assert deepport.explain("mla_decode", *inputs.args).reason.startswith(
        "DEEPPORT_SELECTION=priority: priority order slow>fast>torch")
    monkeypatch.setenv("DEEPPORT_SELECTION", "measured")
    deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["slow", "fast"]
    monkeypatch.setenv("DEEPPORT_SELECTION", "fastest")
    with pytest.raises(InvalidArgumentError, match=r"DEEPPORT_SELECTION.*measured, priority.*'fastest'"):
        deepport.mla_decode(*inputs.args)


def test_an_unreadable_table_file_raises_naming_the_variable(mla_inputs: Callable[..., Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    monkeypatch.setenv("DEEPPORT_PERF_TABLE", str(bad))
    with pytest.raises(InvalidArgumentError, match=r"DEEPPORT_PERF_TABLE.*bad\.json.*deepport\.perf_table"):
        deepport.mla_decode(*mla_inputs().args)
    assert deepport.explain("mla_decode", *mla_inputs().args, backend="torch").chosen == "torch"  # explicit: no table


@pytest.mark.usefixtures("fast_and_slow")
def test_the_choice_and_its_reason_are_logged_once_per_bucket(
        mla_inputs: Callable[..., Any], runs: Runs, use_table: Callable[[dict[str, Any]], None],
        caplog: pytest.LogCaptureFixture) -> None:
    use_table(fake_table([("fast", 10.0), ("slow", 20.0)]))
    caplog.set_level(logging.INFO, logger="deepport.dispatch")
    deepport.mla_decode(*mla_inputs().args)
    deepport.mla_decode(*mla_inputs(lens=(3, 1, 4)).args)  # another batch, same signature and bucket
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "-> fast (priority 500): fast: fastest measured for mla_decode q_rows<=4" in message
    deepport.mla_decode(*mla_inputs(h_q=8, h_kv=1, s_q=1).args)  # another signature and bucket
    assert len(caplog.records) == 2 and "no measurement for mla_decode q_rows>4" in caplog.records[1].getMessage()
    assert ran(runs) == ["fast", "fast", "slow"]


def test_device_families() -> None:
    h200 = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA H200", (9, 0), 132)
    assert perf_table.family(h200) == "nvidia-sm90"
    assert perf_table.family(CPU) == "cpu"
    assert perf_table.family(DeviceInfo("cuda", 0, "rocm", "amd", "AMD Instinct MI300X", None, 304)) == "amd-rocm"
    assert perf_table.range_label("m", (64, 128), 1) == "m<=64"
    assert perf_table.range_label("m", (64, 128), 128) == "64<m<=128"
    assert perf_table.range_label("m", (64, 128), 129) == "m>128"


# ---- the shipped table (nvidia-sm90, from benchmarks/results/2026-12-02-h200-bench-b5c5311) --------------------

H200 = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA H200", (9, 0), 132)


@pytest.fixture
def gpu_backends_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """hopper, triton and torch pass their probes (their requirements are checked on the signature as usual), and
    triton's requirements see a compiled-mode process (nothing is launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("hopper", "triton", "torch"):
        monkeypatch.setitem(get(name).__dict__, "unavailable_reason", None)


def gemm(m: int, n: int, k: int, *, device: DeviceInfo = H200,
         out: torch.dtype = torch.bfloat16) -> selection.Automatic:
    sig = FP8GemmSignature(device, fchk.FP8_DTYPE, "nt", n, k, fchk.RECIPE_1D2D, fchk.SF_FLOAT32, out, False)
    return selection.automatic("fp8_gemm_nt", sig, {"m": m, "n": n, "k": k})


@pytest.mark.usefixtures("gpu_backends_usable")
def test_the_shipped_h200_table_picks_the_measured_fastest_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    assert perf_table.table_for(H200) is not None
    small = gemm(64, 2112, 7168)
    assert small.backend.name == "triton"  # priorities alone would say hopper
    assert small.reason.startswith("triton: fastest measured for fp8_gemm_nt m<=64 n=2112 k=7168 on NVIDIA H200 (")
    assert small.reason.endswith("bench 2026-12-02-h200-bench-b5c5311)")
    assert gemm(4096, 2112, 7168).backend.name == "torch"  # cuBLAS at M = 4096 on this shape
    assert gemm(4096, 576, 7168).backend.name == "hopper"
    assert gemm(4096, 576, 7168, out=torch.float32).backend.name == "triton"  # hopper needs bf16 out: passed over
    # an unmeasured N x K at M > 1024: the bucket over every measured shape (triton 208 us, torch 209, hopper 216:
    # torch within 3% of triton, below it in priority)
    assert gemm(4096, 1000, 7168).reason.startswith("triton: fastest measured for fp8_gemm_nt m>1024 on NVIDIA H200")
    middle = gemm(512, 2112, 7168)  # 128 < M <= 1024 was not measured
    assert middle.backend.name == "hopper" and middle.reason.startswith(
        "no measurement for fp8_gemm_nt 128<m<=1024 on NVIDIA H200: priority order hopper>triton>torch")
    h100 = DeviceInfo("cuda", 0, "cuda", "nvidia", "NVIDIA H100 80GB HBM3", (9, 0), 132)
    assert "on NVIDIA H200 (this device: NVIDIA H100 80GB HBM3)" in gemm(64, 2112, 7168, device=h100).reason
    mla = MLADecodeSignature(H200, torch.bfloat16, 1, 128, 1, 576, 512, 64, False)
    assert selection.automatic("mla_decode", mla, {"q_rows": 128, "b": 64}).backend.name == "hopper"
    page_1 = MLADecodeSignature(H200, torch.bfloat16, 1, 16, 1, 576, 512, 1, False)  # hopper: pages of >= 8 tokens
    found = selection.automatic("mla_decode", page_1, {"q_rows": 16, "b": 64})
    assert found.backend.name == "triton" and "faster but cannot run this call: hopper" in found.reason
    monkeypatch.setenv("DEEPPORT_SELECTION", "priority")
    assert gemm(64, 2112, 7168).backend.name == "hopper"


def test_the_shipped_tables_name_known_ops_backends_and_their_family() -> None:
    from deepport.kernels import descriptor

    builtin = {"torch", "reference", "triton", "hopper", "opencl"}
    paths = sorted(perf_table.TABLE_DIR.glob("*.json"))
    assert [p.name for p in paths] == ["nvidia-sm90.json"]
    for path in paths:
        table = perf_table.load(path)
        assert table.family == path.stem
        for device, ops in table.devices.items():
            for op, buckets in ops.items():
                assert op in table.buckets
                if descriptor(op).perf_shape is None:  # no shape features: one bucket for every call
                    assert table.buckets[op].ranges == () and table.buckets[op].exact == () and list(buckets) == [
                        "any"], (op, table.buckets[op], list(buckets))
                for label, entry in buckets.items():
                    backends = [f["backend"] for f in entry["ranking"]]
                    assert backends and set(backends) <= builtin, (device, op, label)
                    assert {f["run"] for f in entry["ranking"]} <= set(table.runs)
