"""The Triton kernels compile for Hopper (sm_90a) without a GPU and use its tensor cores.

Compilation runs in a subprocess with TRITON_INTERPRET unset (conftest.py sets it for this process, and
the interpreter replaces compilation). Each tuned configuration must fit the 227 KB of shared memory a
Hopper block can have; the compute-bound one must issue wgmma, the memory-bound ones at least mma.sync.
The MoE kernels (the fused one-process expanded dispatch's included) must compile, the FP8 cast through
Hopper's e4m3 conversion instruction; of the fused dispatch's layout kernels only the count kernel (its
totals) issues atomics. The dense FP8 GEMM's tail split, launched by its real host code, must compile
both kernels (the GEMM on e4m3 wgmma with bulk tensor copies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[1]
HOPPER_SMEM_PER_BLOCK = 227 * 1024


def _lower(what: str) -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_lowering.py"), what], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report: dict[str, dict[str, int]] = json.loads(res.stdout.strip().splitlines()[-1])
    return report


@pytest.fixture(scope="module")
def mla_report() -> dict[str, dict[str, int]]:
    return _lower("mla")


def test_mla_kernels_target_sm_90a_and_fit_shared_memory(mla_report: dict[str, dict[str, int]]) -> None:
    assert {"split rows<=16", "split rows<=32", "split rows>32", "combine"} <= set(mla_report)
    for name, counts in mla_report.items():
        assert counts["sm_90a"] == 1, name
        assert counts["shared"] <= HOPPER_SMEM_PER_BLOCK, (name, counts)


def test_compute_bound_mla_config_issues_wgmma_and_loads_k_by_bulk_tensor_copies(
        mla_report: dict[str, dict[str, int]]) -> None:
    counts = mla_report["split rows>32"]  # the H200 entry: k_tma, and the cache here allows it
    assert counts["wgmma"] > 0 and counts["tma"] > 0, counts


def test_split_v_config_issues_wgmma_and_loads_k_by_bulk_tensor_copies(mla_report: dict[str, dict[str, int]]) -> None:
    counts = mla_report["split rows>32 v_split=2 k_tma"]
    assert counts["wgmma"] > 0 and counts["tma"] > 0, counts


def test_memory_bound_mla_configs_use_tensor_cores(mla_report: dict[str, dict[str, int]]) -> None:
    for bucket in ("rows<=16", "rows<=32"):
        counts = mla_report[f"split {bucket}"]
        assert counts["wgmma"] + counts["mma_sync"] > 0, counts


def test_moe_kernels_compile_for_sm_90a_and_cast_with_the_e4m3_instruction() -> None:
    report = _lower("moe")
    assert set(report) == {"layout", "layout_table", "place_rows", "weighted_rows", "weighted_rows_prefetch",
                           "token_rows", "token_rows_window", "token_rows_landed", "token_rows_at", "rank_rows_at",
                           "receive_meta",
                           "rank_rows_table", "sum_table", "parts_to_blocks", "rows_to_blocks_table",
                           "blocks_to_rows_table",
                           "rows_to_blocks", "rows_to_blocks_counted", "blocks_to_rows", "token_table", "ll_layout",
                           "ll_positions", "cast_fp8",
                           "expanded_count",
                           "expanded_layout", "expanded_rows", "expanded_scatter", "expanded_pad_rows",
                           "ll_send_rows", "ll_send_window", "ll_window_rows", "ll_return", "ll_return_slots",
                           "ll_pairs", "ll_return_window", "ll_pairs_landed", "scatter_row_pair",
                           "scatter_row_pair_landed", "ll_receive_landed"}
    assert all(counts["sm_90a"] == 1 for counts in report.values())
    assert report["cast_fp8"]["e4m3_cvt"] > 0 and report["ll_send_rows"]["e4m3_cvt"] > 0
    # the sender that stores straight into the peers' slots: the same cast, its rows in words (the one byte
    # store is the in_rank flag), no atomics (the exchange kernel signals)
    window = report["ll_send_window"]
    assert window["e4m3_cvt"] > 0 and window["wide_stores"] > 0 and window["byte_stores"] <= 1, window
    partial = report["token_rows_window"]  # the combine's partial sums into the peers' slots: in words
    assert partial["wide_stores"] > 0 and partial["byte_stores"] == 0, partial
    # the low-latency combine's final sum reads the landed float32 partial sums in 16-byte loads, no atomics
    assert report["token_rows_landed"]["v4_loads"] > 0 and report["token_rows_landed"]["atomics"] == 0, report
    # rows read by address (a peer transport's blocks) load as wide as rows read by index
    assert report["token_rows_at"]["v4_loads"] >= report["token_rows"]["v4_loads"] > 0, report
    # and with the addresses made in the kernel (2 terms against 8): as wide per term
    assert 4 * report["rank_rows_at"]["v4_loads"] >= report["token_rows_at"]["v4_loads"] > 0, report
    # the normal dispatch's rows into the peers' blocks and out of this rank's: 16 bytes per store, never bytes
    # the graphed combine's sums load as wide as the eager ones
    assert report["rank_rows_table"]["v4_loads"] == report["rank_rows_at"]["v4_loads"] > 0, report
    for name in ("rows_to_blocks", "blocks_to_rows", "parts_to_blocks", "rows_to_blocks_table", "blocks_to_rows_table",
                 "rows_to_blocks_counted"):
        # bytes only for the handle's copy of in_rank (the table variant: one flag per rank, 2 here)
        flags = 2 if name == "rows_to_blocks_table" else 0
        assert report[name]["stores_16B"] > 0 and report[name]["byte_stores"] == flags, (name, report[name])
    # the receiver's payload and scales in one launch: the payload in 16-byte stores, never bytes
    for name in ("scatter_row_pair", "scatter_row_pair_landed"):  # also reading the rows where they landed
        pair = report[name]
        assert pair["stores_16B"] > 0 and pair["byte_stores"] == 0, (name, pair)
    # the landed rows' alignment is known (16-byte slots, rows and parts): 16-byte loads
    assert report["scatter_row_pair_landed"]["v4_loads"] > 0, report["scatter_row_pair_landed"]
    assert report["expanded_count"]["atomics"] > 0  # the integer totals
    no_atomics = ("expanded_layout", "expanded_scatter", "expanded_pad_rows", "token_rows", "token_rows_window",
                  "token_rows_at", "rank_rows_at", "rank_rows_table", "sum_table", "parts_to_blocks", "receive_meta",
                  "rows_to_blocks_table", "blocks_to_rows_table",
                  "rows_to_blocks", "rows_to_blocks_counted", "blocks_to_rows",
                  "token_table", "ll_layout",
                  "ll_positions", "ll_send_rows", "ll_send_window", "ll_return", "ll_return_slots", "ll_pairs",
                  "ll_return_window", "ll_pairs_landed", "scatter_row_pair", "scatter_row_pair_landed",
                  "ll_receive_landed")
    for name in no_atomics:
        assert report[name]["atomics"] == 0, name


def test_fp8_tail_split_launches_compile_for_sm_90a() -> None:
    report = _lower("fp8_tail")
    for tiles in ("128x128", "halves"):
        gemm, reduce = report[f"{tiles} fp8_gemm_nt_kernel"], report[f"{tiles} tail_reduce_kernel"]
        assert gemm["programs"] == 528 + 16 * 8 and reduce["programs"] == 16, report
        assert gemm["wgmma"] > 0 and gemm["tma"] > 0 and gemm["shared"] <= HOPPER_SMEM_PER_BLOCK, report
        assert all(counts["sm_90a"] == 1 for counts in (gemm, reduce)), report
