"""Conformance cases for ``moe_dispatch_expanded`` (DeepGEMM contiguous layout), all outputs exact
but the per-row weight sums (float32 sums of duplicate slots)."""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs
from deepport.conformance.suites.moe_dispatch import _routed, _split, pick_rows
from deepport.kernels.f64.moe import align_up, expanded_rows_f64

OP = "moe_dispatch_expanded"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "world1_align128", alignment=128),
        c(OP, "smoke", "world1_fp8_align8_duplicates", fp8=True, alignment=8, dup=0.4),
        c(OP, "smoke", "world1_align1_hot_expert", hot=3, alignment=1),
        c(OP, "smoke", "world1_nothing_routed_align8", nowhere=1.0, alignment=8),
        c(OP, "smoke", "world2_fp8_align16_rank0_receives_nothing", world=2, tokens=(9, 14), fp8=True,
          alignment=16, cold_ranks=(0,)),
        c(OP, "smoke", "world2_fp8_align16_uneven", world=2, tokens=(21, 4), fp8=True, colmajor_scales=True,
          alignment=16, dup=0.2),
        c(OP, "smoke", "world4_align4_empty_rank", world=4, tokens=(6, 11, 0, 3), experts=32, alignment=4),
        c(OP, "full", "world1_fp8_t4096_h7168_top8_of_256_align128", tokens=(4096,), hidden=7168, experts=256,
          topk=8, fp8=True, alignment=128),
        c(OP, "full", "world2_fp8_t512_h7168_top8_of_256_align128", world=2, tokens=(512, 300), hidden=7168,
          experts=256, topk=8, fp8=True, alignment=128),
    ]


def _expansion(inputs: Inputs, me: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    p = inputs.params
    d = _routed(inputs, me)
    assert d.weights is not None
    src_row, m_idx, row_w = expanded_rows_f64(d.local_idx, d.weights, p["experts"] // p["world"], p["alignment"])
    return src_row, m_idx, row_w, d.per_expert


def rank_specs(inputs: Inputs, me: int) -> Specs:
    p = inputs.params
    m, h = len(_expansion(inputs, me)[0]), p["hidden"]
    specs: Specs = {"recv_x": ((m, h), mc.FP8 if p["fp8"] else torch.bfloat16), "m_indices": ((m,), torch.int32),
                    "recv_weights": ((m,), torch.float32),
                    "num_recv_tokens_per_expert": ((p["experts"] // p["world"],), torch.int64)}
    if p["fp8"]:
        specs["recv_x_scales"] = ((m, h // 128), torch.float32)
    return specs


def output_specs(inputs: Inputs) -> Specs:
    return mc.world_specs(inputs, rank_specs)


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    r = deepport.moe_dispatch_expanded(mc.payload(c.inputs), c.inputs["topk_idx"], c.inputs["topk_weights"],
                                       p["experts"], group=c.group, expert_alignment=p["alignment"],
                                       backend=c.backend, alloc=c.alloc)
    out = {"m_indices": c.owned("m_indices", r.m_indices), "recv_weights": c.owned("recv_weights", r.recv_weights),
           "num_recv_tokens_per_expert": torch.tensor(r.num_recv_tokens_per_expert, dtype=torch.int64)}
    _split(out, "recv_x", r.recv_x, c)
    return out


def rank_reference(inputs: Inputs, me: int) -> dict[str, np.ndarray]:
    p = inputs.params
    d = _routed(inputs, me)
    src_row, m_idx, row_w, per_expert = _expansion(inputs, me)

    def expand(name: str) -> np.ndarray:
        rows = pick_rows(inputs, name, d)
        out = np.zeros((len(src_row), *rows.shape[1:]))
        out[src_row >= 0] = rows[src_row[src_row >= 0]]
        return out

    ref = {"recv_x": expand("x"), "m_indices": m_idx.astype(np.float64), "recv_weights": row_w,
           "num_recv_tokens_per_expert": np.array([align_up(int(v), p["alignment"]) for v in per_expert],
                                                  dtype=np.float64)}
    if p["fp8"]:
        ref["recv_x_scales"] = expand("x_scales")
    return ref


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    return mc.world_reference(inputs, rank_reference)
