"""Both split kernels of the OpenCL MLA decode, each forced through its config (``choose_config`` patched), on
the edge cases of the conformance suite: the harness poisons every output (NaN) before the call and
compares with the float64 reference afterwards, so a slot a kernel forgets to write fails.

``choose_config`` picks the staged kernel on GPUs and the row-wise one on CPU drivers (PoCL here); forcing
each one keeps both covered whatever device the tests run on. The staged tiles include the ones GPUs
get (16 and 32 rows, 256 work-items) and an odd small one (3 tokens per lane, 4-row groups, 16-channel
chunks, so partial tiles, chunks and row groups all occur)."""

from __future__ import annotations

import pytest

pytest.importorskip("pyopencl")
from deepport.backends.opencl import mla_decode, runtime
from deepport.conformance.results import Status
from deepport.conformance.runner import run_case, select_cases

if runtime.unavailable_reason() is not None:
    pytest.skip(f"OpenCL backend unavailable: {runtime.unavailable_reason()}", allow_module_level=True)

STAGED_16 = mla_decode.StagedConfig(16, 256)  # what a 48 KiB GPU gets at h_q 16
STAGED_32 = mla_decode.StagedConfig(32, 256, rows_per_thread=16)  # the 32-row tile (second choice at h_q 128)
STAGED_ODD = mla_decode.StagedConfig(8, 32, chunk=16, rows_per_thread=4, tokens_per_thread=3, pv_rows=4)
ROWWISE = mla_decode.MLAConfig(16, 128)  # what it got before the staged kernel (and CPUs still get)

EDGES = (
    "short_causal_sq4",  # lengths 0..5, s_q 4, causal: rows that see nothing (out 0, lse +inf)
    "all_empty_b3",  # every sequence length 0
    "page_edges",  # lengths 1, 63, 64, 65, 128, 129
    "ext_page1",  # pages of one token
    "ext_page16_causal",  # pages of 16, s_q 2, causal, 2 KV heads
    "float16_sq2_causal_gqa",  # fp16 through vload_half
    "ext_gqa_hq24_hkv8",  # 8 KV heads, d_qk / d_v 128 / 128
    "ext_head_dim_64_32_page32",  # d_qk 64 (one partial chunk), d_v 32 (idle PV lanes)
    "metadata_b5",  # the plan from get_mla_metadata, empty requests
    "chunks_b12_one_long",  # one request of 4000 tokens split into many pieces among short ones
    "finite_poison_b4_sq2_causal_gqa",  # finite garbage instead of NaN in the outputs
)
FORCED = [(STAGED_16, case) for case in EDGES] + \
    [(STAGED_32, case) for case in ("b3_sq4_hq16_hkv1_d576v512_p64_sk100_causal_bfloat16", "short_causal_sq4",
                                    "float16_sq2_causal_gqa")] + \
    [(STAGED_ODD, case) for case in ("short_causal_sq4", "ext_head_dim_64_32_page32", "ext_page16_causal",
                                     "long_b1_sk700")] + \
    [(ROWWISE, case) for case in ("short_causal_sq4", "ext_page16_causal", "float16_sq2_causal_gqa",
                                  "ext_gqa_hq24_hkv8")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("cfg", "case_name"), FORCED, ids=[f"{c.kernel}-{c.rows}x{c.threads}-{n}" for c, n in FORCED])
def test_a_forced_split_kernel_passes_the_edge_case(monkeypatch: pytest.MonkeyPatch, cfg: mla_decode.Config,
                                                    case_name: str) -> None:
    chosen: list[mla_decode.Config] = []

    def forced(*shape: int) -> mla_decode.Config:
        chosen.append(cfg)
        return cfg

    monkeypatch.setattr(mla_decode, "choose_config", forced)
    [case] = [c for c in select_cases("smoke", ["mla_decode"]) if c.id == f"mla_decode/{case_name}"]
    [result] = run_case(case, ["opencl"], "cpu", run_seed=20261201)
    assert chosen, "the call did not go through choose_config"
    assert result.status == Status.PASS, f"{result.status.value}: {result.message}"


@pytest.mark.parametrize("cfg", [STAGED_16, STAGED_32, STAGED_ODD, ROWWISE],
                         ids=lambda c: f"{c.kernel}-{c.rows}x{c.threads}")
def test_the_local_memory_a_config_declares_is_what_its_kernel_uses(cfg: mla_decode.Config) -> None:
    """``local_bytes`` decides whether a tile fits the device (48 KiB on NVIDIA): it must be exact."""
    import pyopencl as cl

    rt = runtime.get_runtime()
    defines = {"D_QK": 576, "D_V": 512, "IS_HALF": 0, "COMBINE_THREADS": 64, **cfg.defines()}
    kernel = rt.kernel(mla_decode.SOURCE, cfg.kernel, defines)
    used = int(kernel.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, rt.device))
    assert used == cfg.local_bytes(576)
