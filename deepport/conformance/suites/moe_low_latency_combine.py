"""Conformance cases for ``moe_low_latency_combine``: identity experts over the low-latency layout.

Each rank dispatches bf16 ``x`` (no FP8 cast), poisons every row past an expert's count with NaN (a
combine must never read them) and combines with its top-k weights, so ``combined_x = x * (sum of the
token's weights over its routed slots)``.
"""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_combine_expanded import weighted_identity
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs

OP = "moe_low_latency_combine"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "world1_tmax32", t_max=32),
        c(OP, "smoke", "world1_duplicates_nowhere", t_max=24, dup=0.5, nowhere=0.3),
        c(OP, "smoke", "world2_uneven", world=2, tokens=(16, 3), t_max=16, dup=0.2),
        c(OP, "smoke", "world1_nothing_routed", t_max=16, tokens=(12,), nowhere=1.0),
        c(OP, "smoke", "world2_rank0_receives_nothing", world=2, tokens=(6, 16), t_max=16, cold_ranks=(0,)),
        c(OP, "smoke", "world4_empty_rank_hot", world=4, tokens=(5, 12, 0, 7), experts=32, hot=2, t_max=12),
        c(OP, "full", "world1_t128_h7168_top8_of_256", tokens=(128,), hidden=7168, experts=256, topk=8, t_max=128),
        c(OP, "full", "world2_t128_h7168_top8_of_256", world=2, tokens=(128, 77), hidden=7168, experts=256,
          topk=8, t_max=128),
    ]


def rank_specs(inputs: Inputs, me: int) -> Specs:
    p = inputs.params
    return {"combined_x": ((p["tokens"][me], p["hidden"]), torch.bfloat16)}


def output_specs(inputs: Inputs) -> Specs:
    return mc.world_specs(inputs, rank_specs)


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    r = deepport.moe_low_latency_dispatch(c.inputs["x"], c.inputs["topk_idx"], p["t_max"], p["experts"],
                                          group=c.group, use_fp8=False, backend=c.backend)
    assert isinstance(r.recv_x, torch.Tensor)
    y = r.recv_x.clone()
    rows = torch.arange(y.shape[1], device=y.device)
    y[rows[None, :] >= r.recv_count.to(torch.int64)[:, None]] = float("nan")
    out = deepport.moe_low_latency_combine(y, c.inputs["topk_idx"], c.inputs["topk_weights"], r.handle,
                                           backend=c.backend, alloc=c.alloc)
    return {"combined_x": c.owned("combined_x", out)}


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    return mc.world_reference(inputs, weighted_identity)
