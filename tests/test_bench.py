"""``deepport bench``: the counting rules, the config registry, the check that keeps wrong backends from
being timed, the JSON and chart outputs, and the CLI, on tiny CPU configs (a GPU run is marked ``gpu``)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from deepport.backends.torch import mla_decode as torch_mla
from deepport.bench import ceilings, check, counting, timing
from deepport.bench.check import find_case
from deepport.bench.configs import all_configs, select
from deepport.bench.results import BenchResult
from deepport.cli.main import main
from deepport.dispatch import Backend, OpSupport, registered
from deepport.kernels.mla_decode import MLADecodeCall

pytestmark = pytest.mark.usefixtures("clean_env")

TINY = "tiny_b2_sq1_hq16_sk256"  # memory-bound tiny CPU config (lengths 256; its check case has lengths <= 200)
RESULT_FIELDS = {"op", "config", "backend", "params", "status", "message", "flops", "bytes", "bound", "check",
                 "timing", "time_us", "tflops", "gbps", "ceiling", "ceiling_value", "ceiling_unit", "pct_of_ceiling",
                 "baseline", "x_baseline", "host_overhead_us"}


def _bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--quick", "--out", str(out), *args])
    path = out / "bench.json"
    return code, json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    """One CLI run on every tiny CPU config (shared by the tests that read its outputs), on torch alone
    (conftest.py's TRITON_INTERPRET=1 makes the triton backend usable on the CPU too)."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--device", "cpu", "--quick", "--backend", "torch", "--out", str(out)])
    return code, json.loads((out / "bench.json").read_text()), out


# ---- counting (benchmarks/README.md) ---------------------------------------------------------------------------------

def test_mla_decode_counts_match_hand_computed_numbers() -> None:
    # b=128, s_q=1, h_q=16, s_k=4096, 576/512: 128*16*4096 * 2*(576+512) FLOP; 128*(16*576 + 4096*576 + 16*512)*2 B
    assert counting.mla_decode_flops(128, 1, 16, 4096, 576, 512) == 18_253_611_008
    assert counting.mla_decode_bytes(128, 1, 16, 1, 4096, 576, 512) == 608_436_224
    assert counting.mla_decode_flops(2, 2, 4, 10.5, 8, 4) == 2 * 2 * 4 * 10.5 * 2 * 12
    assert counting.mla_decode_bytes(1, 1, 2, 1, 3, 4, 2, element_bytes=4) == (8 + 12 + 4) * 4


def test_mla_decode_counts_reproduce_benchs_flashmla_rates() -> None:
    # FlashMLA on an H200 (benchmarks/README.md, "Ceilings and peers"): b=128 h_q=16 s_k=4096 in 202 us is
    # 3.02 TB/s; b=128 h_q=128 s_k=4096 in 321 us is 455 TFLOP/s
    assert counting.mla_decode_bytes(128, 1, 16, 1, 4096, 576, 512) / 202e-6 / 1e12 == pytest.approx(3.01, abs=0.01)
    assert counting.mla_decode_flops(128, 1, 128, 4096, 576, 512) / 321e-6 / 1e12 == pytest.approx(455, abs=1)


@pytest.mark.parametrize(("s_q", "h_q", "h_kv", "compute"), [
    (1, 64, 1, False), (1, 128, 1, True), (2, 64, 1, True), (2, 128, 2, True), (1, 128, 2, False)])
def test_mla_decode_is_compute_bound_from_128_query_rows_per_kv_head(s_q: int, h_q: int, h_kv: int,
                                                                     compute: bool) -> None:
    assert counting.mla_decode_compute_bound(s_q, h_q, h_kv) is compute


def test_gemm_counts_match_hand_computed_numbers() -> None:
    assert counting.gemm_flops(4096, 2112, 7168) == 124_017_180_672
    assert counting.masked_gemm_flops([3, 0, 5], 256, 128) == 2 * 8 * 256 * 128
    # A 1x128 + B 128x128 (e4m3: 1 byte) + fp32 scales (1 + 1 blocks) + bf16 out
    assert counting.fp8_gemm_bytes(1, 128, 128) == 128 + 128 * 128 + 4 * (1 + 1) + 2 * 128
    # N = 2112 is 16.5 blocks of 128 (17 scale rows), K = 7168 is 56 blocks
    assert counting.fp8_gemm_bytes(64, 2112, 7168) == 64 * 7168 + 2112 * 7168 + 4 * (64 * 56 + 17 * 56) + 2 * 64 * 2112


def test_rates_and_ceiling_percentage_follow_from_the_median_time() -> None:
    r = BenchResult("op", "c", "b", {}, "ok", flops=2e12, bytes=3e9, bound="memory")
    r.set_time(1e6)  # one second
    assert (r.tflops, r.gbps) == (pytest.approx(2.0), pytest.approx(3.0))
    r.set_ceiling("hbm_copy", 4.0, "GB/s")
    assert r.pct_of_ceiling == pytest.approx(75.0)
    compute = BenchResult("op", "c", "b", {}, "ok", flops=2e12, bytes=3e9, bound="compute")
    compute.set_time(2e6)
    compute.set_ceiling("bf16_matmul", 4.0, "TFLOP/s")
    assert compute.pct_of_ceiling == pytest.approx(25.0)


# ---- configs --------------------------------------------------------------------------------------------------------

def test_every_config_names_an_existing_check_case_and_counts_per_bench() -> None:
    configs = all_configs()
    assert len({c.id for c in configs}) == len(configs)
    for c in configs:
        assert c.check_case is None or find_case(c.check_case).op == c.op
        assert c.bytes > 0 and (c.flops > 0 or c.op.startswith("moe_"))  # MoE moves data, computes nothing
        assert ceilings.resolve(c.ceiling, "cpu") in ceilings.CEILINGS


def test_mla_decode_has_flashmlas_six_configs_with_the_right_ceilings() -> None:
    gpu = {c.name: c for c in select("cuda", ["mla_decode"])}
    expected = {"b128_sq1_hq16_sk4096": "memory", "b128_sq1_hq16_sk16384": "memory", "b64_sq1_hq16_sk32768": "memory",
                "b128_sq1_hq64_sk8192": "memory", "b128_sq1_hq128_sk4096": "bf16_matmul",
                "b128_sq2_hq128_sk4096_causal": "bf16_matmul"}
    assert {n: c.ceiling for n, c in gpu.items() if n in expected} == expected
    c = gpu["b128_sq1_hq16_sk4096"]
    assert (c.flops, c.bytes) == (18_253_611_008, 608_436_224)
    assert all(c.cpu for c in select("cpu", ["mla_decode"])) and select("cpu", ["mla_decode"])


def test_fp8_gemm_has_the_deepseek_v3_shapes_and_a_float64_row_check() -> None:
    gpu = {c.name: c for c in select("cuda", ["fp8_gemm_nt"])}
    nk = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
    assert set(gpu) == {f"m{m}_n{n}_k{k}" for m in (1, 64, 128, 4096) for n, k in nk}
    c = gpu["m4096_n2112_k7168"]
    assert (c.flops, c.ceiling, c.bound) == (2 * 4096 * 2112 * 7168, "fp8_matmul", "compute")
    for tiny in select("cpu", ["fp8_gemm_nt"]):
        assert tiny.build(torch.device("cpu"), 0).reference_check is not None


def test_grouped_fp8_gemm_configs_count_only_the_rows_in_use() -> None:
    contiguous = {c.name: c for c in select("cuda", ["m_grouped_fp8_gemm_nt_contiguous"])}
    assert set(contiguous) == {f"g{g}_m{m}_n{n}_k{k}" for g, m in ((4, 8192), (8, 4096))
                               for n, k in ((4096, 7168), (7168, 2048))}
    assert contiguous["g4_m8192_n4096_k7168"].flops == 2 * 4 * 8192 * 4096 * 7168
    masked = {c.name: c for c in select("cuda", ["m_grouped_fp8_gemm_nt_masked"])}
    assert len(masked) == 6
    c = masked["g4_m256_n7168_k2048"]
    assert c.params["m_max"] == 4096 and c.flops == 2 * (4 * 256) * 7168 * 2048  # not 4 * 4096 rows


def test_agreement_with_masks_compares_only_the_specified_elements() -> None:
    """Rows past a fixed-capacity layout's counts may differ (NaN included); a specified row may not."""
    ref = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    used = torch.tensor([[True, True, False], [True, False, False]])[..., None]
    got = ref.clone()
    got[0, 2] = float("nan")
    got[1, 1:] = 99.0
    assert check.agreement({"y": got}, {"y": ref}, 0.0, "torch", {"y": used}).passed
    assert not check.agreement({"y": got}, {"y": ref}, 0.0, "torch").passed
    got[1, 0, 1] += 1
    result = check.agreement({"y": got}, {"y": ref}, 0.0, "torch", {"y": used})
    assert not result.passed and "calc_diff" in result.message


def test_one_gpu_moe_permutes_count_each_routed_row_once() -> None:
    """The expanded dispatch reads x once and writes T*k rows; the combines read T*k rows, write T (bf16)."""
    by_id = {c.id: c for c in all_configs()}
    t, h, k = 4096, 7168, 8
    assert by_id["moe_dispatch_expanded/t4096_h7168_top8_of_256"].bytes == t * h * 2 + t * k * h * 2 == 528_482_304
    assert by_id["moe_combine_expanded/t4096_h7168_top8_of_256"].bytes == t * k * h * 2 + t * h * 2
    assert by_id["moe_low_latency_combine/t128_h7168_top8_of_256"].bytes == 128 * k * h * 2 + 128 * h * 2
    assert by_id["moe_low_latency_dispatch/t128_h7168_top8_of_256_fp8"].bytes == 128 * h * 2 + 128 * k * (h + 4 * 56)
    permutes = [c for c in by_id.values() if c.op in ("moe_dispatch_expanded", "moe_combine_expanded",
                                                      "moe_low_latency_dispatch", "moe_low_latency_combine")
                and c.world_size == 1]  # the low-latency ops' 2-rank configs: tests/test_bench_moe_low_latency.py
    assert len(permutes) == 8 and all(c.ceiling == "memory" for c in permutes)


def test_a_config_builds_random_inputs_and_the_same_seed_gives_the_same_data() -> None:
    (c,) = select("cpu", None, TINY)
    a, b, other = (c.build(torch.device("cpu"), s) for s in (5, 5, 6))
    a.call("torch")()
    b.call("torch")()
    other.call("torch")()
    # Same seed, same data: the outputs agree to bf16 rounding. Not bit for bit: two builds are separate
    # buffers, and a CI machine's CPU BLAS once returned results a bf16 ulp apart for them.
    same = (a.outputs["out"].float() - b.outputs["out"].float()).abs()
    apart = (a.outputs["out"].float() - other.outputs["out"].float()).abs()
    scale = a.outputs["out"].float().abs().max()
    assert scale > 0 and a.footprint_bytes > 0
    assert same.max() <= 2 ** -7 * scale and same.mean() <= 2 ** -12 * scale, (same.max(), same.mean(), scale)
    assert apart.mean() > 2 ** -5 * scale, (apart.mean(), scale)  # another seed: other data, not rounding


# ---- the CLI on CPU -------------------------------------------------------------------------------------------------

def test_the_recorded_commit_is_the_one_named_by_the_run_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepport.bench.runner import bench_environment

    monkeypatch.setenv("DEEPPORT_GIT_REVISION", "0123abc")
    assert bench_environment(torch.device("cpu"))["deepport_git"] == "0123abc"
    monkeypatch.delenv("DEEPPORT_GIT_REVISION")
    found = bench_environment(torch.device("cpu"))["deepport_git"]
    assert found is None or (found != "0123abc" and len(found.split("-")[0]) == 40), found


def test_cli_benchmarks_the_tiny_cpu_configs_and_the_json_has_every_field(cpu_run: Any) -> None:
    code, doc, _ = cpu_run
    assert code == 0
    assert doc["schema"] == "deepport.bench" and doc["schema_version"] == 1
    env = doc["environment"]
    assert {"torch", "torch_cuda", "deepport_git", "python"} <= set(env) and env["device"]["name"]
    assert doc["started"] and doc["finished"] and doc["command"].startswith("deepport bench")
    assert set(doc["ceilings"]) == {"cpu_memcpy", "cpu_fp32_matmul"}
    assert all(c["value"] > 0 and c["error"] is None and c["timing"]["samples"]["n"] > 0
               for c in doc["ceilings"].values())
    assert {r["config"] for r in doc["results"]} == {c.name for c in select("cpu")}
    # multi-process configs (the low-latency MoE ops on 2 gloo ranks) time themselves, next to a raw collective:
    # tests/test_bench_moe_low_latency.py checks their results
    ranks = {(c.op, c.name) for c in select("cpu") if c.world_size > 1}
    assert ranks and all(r["status"] == "ok" for r in doc["results"] if (r["op"], r["config"]) in ranks)
    for r in doc["results"]:
        if (r["op"], r["config"]) in ranks:
            continue
        assert set(r) == RESULT_FIELDS and r["status"] == "ok" and r["backend"] == "torch"
        float64_checks = [v for part, v in r["check"].items() if part.startswith("reference")]
        assert float64_checks and all(v["passed"] is True for v in float64_checks)
        assert r["check"]["agreement"]["passed"] is True
        assert r["timing"]["method"] == "cpu_perf_counter"
        samples = r["timing"]["samples"]
        assert samples["n"] == doc["settings"]["samples"]
        assert samples["min_us"] <= samples["median_us"] == r["time_us"] <= samples["max_us"]
        assert sorted(r["timing"]["samples_us"])[len(r["timing"]["samples_us"]) // 2] == r["time_us"]
        assert r["tflops"] == (pytest.approx(r["flops"] / r["time_us"] / 1e6) if r["flops"] else None)
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3)
        assert r["ceiling"] == ("cpu_memcpy" if r["bound"] == "memory" else "cpu_fp32_matmul")
        figure = r["gbps"] if r["bound"] == "memory" else r["tflops"]
        assert r["pct_of_ceiling"] == pytest.approx(100 * figure / doc["ceilings"][r["ceiling"]]["value"])
        assert r["baseline"] == "torch" and r["x_baseline"] == 1.0
        for mode in ("check_values_on", "check_values_off"):
            o = r["host_overhead_us"][mode]
            assert o["dispatch_us"] == pytest.approx(o["public_call_us"] - o["bound_call_us"])
    assert doc["summary"]["ok"] == len(doc["results"])


def test_cli_prints_the_table_with_every_column(cpu_run: Any, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out = cpu_run
    capsys.readouterr()
    assert main(["bench", "--plot", str(out / "bench.json"), "--out", str(tmp_path)]) in (0, 1)  # 1: no matplotlib
    text = capsys.readouterr().out
    for column in ("op", "config", "backend", "time us", "TFLOP/s", "GB/s", "% of ceiling", "x baseline", "timing"):
        assert column in text
    assert TINY in text and "cpu_perf_counter" in text and "cpu_memcpy" in text


def test_plot_renders_a_png_from_a_saved_json(cpu_run: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, _, out = cpu_run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn by the run itself
    assert main(["bench", "--plot", str(out / "bench.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_run_says_so_and_still_writes_the_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, doc = _bench(tmp_path, "--config", TINY)
    assert code == 0 and doc["results"]
    assert not (tmp_path / "bench" / "bench.png").exists()
    text = capsys.readouterr().out
    assert "matplotlib is not installed" in text and "deepport bench --plot" in text
    assert main(["bench", "--plot", str(tmp_path / "bench" / "bench.json")]) == 1


@pytest.mark.parametrize("args", [["--backend", "nonesuch"], ["--baseline", "nonesuch"], ["--op", "nonesuch"],
                                  ["--config", "no_such_config"]])
def test_usage_errors_exit_2_before_anything_runs(tmp_path: Path, args: list[str]) -> None:
    code, doc = _bench(tmp_path, *args)
    assert code == 2 and doc == {}


def test_plot_of_a_file_that_is_not_a_bench_json_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"schema": "deepport.conformance.results"}')
    assert main(["bench", "--plot", str(path)]) == 2


# ---- backends that are wrong, or fail, are never timed --------------------------------------------------------------

def _zeros_run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fast and wrong everywhere."""
    out.zero_()
    lse.zero_()


def _truncating_run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Right for lengths up to 240 (the check case's), wrong beyond: reads only the first 240 tokens."""
    short = dataclasses.replace(call, cache_seqlens=call.cache_seqlens.clamp(max=240), max_seqlen=None)
    torch_mla.run(short, out, lse)


def _raising_run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    raise RuntimeError("kernel launch failed")


def _fp8_zeros_run(call: Any, out: torch.Tensor) -> None:
    out.zero_()


def _backend(name: str, fn: str, op: str = "mla_decode", dtype: torch.dtype = torch.bfloat16) -> Backend:
    support = OpSupport(op=op, entry=f"{__name__}:{fn}", dtypes=frozenset({dtype}))
    return Backend(name=name, summary=f"test backend {name}", version="0", ops=(support,), priority={})


def test_a_wrong_fp8_gemm_backend_fails_the_float64_row_check(tmp_path: Path) -> None:
    with registered(_backend("wrong_fp8", "_fp8_zeros_run", "fp8_gemm_nt", torch.float8_e4m3fn)):
        code, doc = _bench(tmp_path, "--config", "*tiny_m4_*", "--backend", "wrong_fp8")
    assert code == 1
    (wrong,) = [r for r in doc["results"] if r["backend"] == "wrong_fp8"]
    assert wrong["status"] == "check_failed" and wrong["check"]["reference_sample"]["passed"] is False
    assert wrong["timing"] is None


@pytest.mark.parametrize(("fn", "failing_part"), [("_zeros_run", "reference_twin"), ("_truncating_run", "agreement")])
def test_a_wrong_backend_fails_its_check_is_not_timed_and_the_run_exits_1(tmp_path: Path, fn: str,
                                                                          failing_part: str) -> None:
    with registered(_backend("wrong", fn)):
        code, doc = _bench(tmp_path, "--config", TINY, "--backend", "wrong")
    assert code == 1
    by_backend = {r["backend"]: r for r in doc["results"]}
    assert by_backend["torch"]["status"] == "ok"  # the baseline runs first, always
    wrong = by_backend["wrong"]
    assert wrong["status"] == "check_failed" and failing_part in wrong["message"]
    assert wrong["check"][failing_part]["passed"] is False
    assert wrong["timing"] is None and wrong["time_us"] is None and wrong["x_baseline"] is None
    assert doc["summary"]["check_failed"] == 1


def test_a_backend_that_raises_is_recorded_as_an_error_and_the_run_exits_1(tmp_path: Path) -> None:
    with registered(_backend("crashy", "_raising_run")):
        code, doc = _bench(tmp_path, "--config", TINY, "--backend", "crashy")
    assert code == 1
    (crashy,) = [r for r in doc["results"] if r["backend"] == "crashy"]
    assert crashy["status"] == "error" and "kernel launch failed" in crashy["message"]


def test_a_backend_that_does_not_implement_the_op_is_not_supported_not_an_error(tmp_path: Path) -> None:
    other = Backend(name="other_op", summary="implements nothing here", version="0",
                    ops=(OpSupport(op="no_such_op", entry=f"{__name__}:_zeros_run",
                                  dtypes=frozenset({torch.bfloat16})),), priority={})
    with registered(other):
        code, doc = _bench(tmp_path, "--config", TINY, "--backend", "other_op")
    assert code == 0
    (r,) = [r for r in doc["results"] if r["backend"] == "other_op"]
    assert r["status"] == "not_supported" and r["timing"] is None


# ---- timing ---------------------------------------------------------------------------------------------------------

def test_cpu_timing_takes_the_median_of_its_samples_and_rotates_calls() -> None:
    calls: list[int] = []
    measured = timing.time_calls([lambda: calls.append(0), lambda: calls.append(1)], torch.device("cpu"),
                                 samples=5, warmup=2)
    assert measured.method == "cpu_perf_counter" and len(measured.samples_us) == 5
    assert calls == [0, 1, 0, 1, 0, 1, 0]  # warm-up covers every copy, then samples rotate
    assert measured.median_us == sorted(measured.samples_us)[2]
    assert timing.copies_for_rotation(1, torch.device("cpu")) == 1


# ---- on a GPU -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bench_measures_ceilings_and_records_the_timing_method(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    code = main(["bench", "--device", "cuda", "--quick", "--op", "mla_decode", "--config", "*b128_sq1_hq16_sk4096",
                 "--out", str(out)])
    doc = json.loads((out / "bench.json").read_text())
    assert code == 0
    assert doc["ceilings"]["hbm_copy"]["value"] > 100  # GB/s
    results = {r["backend"]: r for r in doc["results"]}  # every usable GPU backend implementing the op
    assert "torch" in results and len(results) == len(doc["results"]), doc["results"]
    for r in results.values():
        assert r["status"] == "ok" and r["timing"]["method"] in {"cuda_graph", "cuda_events"}, r
        assert r["gbps"] > 0 and r["pct_of_ceiling"] > 0 and r["x_baseline"] > 0, r
    assert results["torch"]["x_baseline"] == 1.0


@pytest.mark.parametrize("device_us, capturable, long_graphed, method, per_sample", [
    (50.0, True, True, "cuda_graph", 40), (1500.0, True, True, "cuda_graph", 3),
    (400.0, False, True, "cuda_events", 10), (1500.0, False, True, "cuda_events_flushed", 1),
    (50.0, True, False, "cuda_graph", 40), (1500.0, True, False, "cuda_events_flushed", 1)])
def test_cuda_timing_method_depends_on_capture_not_on_length(monkeypatch: pytest.MonkeyPatch, device_us: float,
                                                             capturable: bool, long_graphed: bool, method: str,
                                                             per_sample: int) -> None:
    """The decision of :func:`timing.time_calls` on CUDA, with the device calls stubbed: a capturable call
    is graph-timed at any length (at least 3 calls per replay once it passes 1 ms), so two backends of one
    config never get different methods from their lengths alone; only an uncapturable call is timed
    with events (a loop under 1 ms, single flushed calls above), with the reason noted. The ceilings
    (``graph_long_calls=False``) time a call of 1 ms or more as single calls even when capturable."""
    used: dict[str, Any] = {}
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    monkeypatch.setattr(timing, "_events_loop", lambda calls, device, n, samples: [device_us] * samples)
    monkeypatch.setattr(timing, "_synchronizes", lambda call: None if capturable else "the call synchronises")
    monkeypatch.setattr(timing, "_graph_probe_us", lambda calls, device: device_us if capturable else None)

    def graph(calls: Any, device: Any, samples: int, n: int) -> timing.Timing:
        used.update(method="cuda_graph", n=n)
        return timing.Timing("cuda_graph", [device_us] * samples, n, len(calls))

    def flushed(calls: Any, device: Any, samples: int) -> timing.Timing:
        used.update(method="cuda_events_flushed", n=1)
        return timing.Timing("cuda_events", [device_us] * samples, 1, len(calls), l2_flush=True)

    monkeypatch.setattr(timing, "_time_graph", graph)
    monkeypatch.setattr(timing, "_time_events_flushed", flushed)
    measured = timing.time_calls([lambda: None], torch.device("cuda"), samples=4, warmup=1,
                                 graph_long_calls=long_graphed)
    got = used.get("method", measured.method)
    assert got == method and measured.calls_per_sample == per_sample, (got, measured)
    assert (measured.notes != []) == (method != "cuda_graph")  # why it was not graphed is recorded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_timing_graphs_capturable_calls_and_falls_back_to_events_for_syncing_ones() -> None:
    device = torch.device("cuda")
    x = torch.randn(256, 256, device=device)
    out = torch.empty_like(x)

    def capturable() -> None:
        torch.mm(x, x, out=out)

    def syncing() -> None:
        torch.mm(x, x, out=out)
        float(out.sum().item())

    graphed = timing.time_calls([capturable], device, samples=5)
    assert graphed.method == "cuda_graph" and graphed.calls_per_sample >= 10 and graphed.median_us > 0
    fallback = timing.time_calls([syncing], device, samples=5)
    assert fallback.method == "cuda_events" and "synchronises" in fallback.notes[0]
    torch.mm(x, x, out=out)  # the context is still usable
    torch.cuda.synchronize()
    assert not torch.cuda.is_current_stream_capturing()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_timing_follows_device_time_not_a_slow_host() -> None:
    """A short kernel behind 3 ms of host work per call: events around calls say > 1 ms, the device says
    microseconds; the method is chosen by the device (graph), and the figure is the kernel's."""
    import time as _time

    device = torch.device("cuda")
    x = torch.randn(256, 256, device=device)
    out = torch.empty_like(x)

    def slow_host() -> None:
        _time.sleep(0.003)
        torch.mm(x, x, out=out)

    measured = timing.time_calls([slow_host], device, samples=5)
    assert measured.method == "cuda_graph", measured
    assert measured.median_us < 500, measured
