"""Conformance cases for ``moe_combine_expanded``: identity experts over the expanded layout.

Each rank expands bf16 ``x``, poisons the alignment padding rows with NaN (a combine must never read
them) and combines, so ``combined_x = x * (sum of the token's weights over its routed slots)``.
"""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs

OP = "moe_combine_expanded"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "world1_align128", alignment=128),
        c(OP, "smoke", "world1_duplicates_nowhere_align8", dup=0.5, nowhere=0.3, alignment=8),
        c(OP, "smoke", "world2_uneven_align16", world=2, tokens=(25, 7), alignment=16, dup=0.2),
        c(OP, "smoke", "world1_nothing_routed_align8", nowhere=1.0, alignment=8),
        c(OP, "smoke", "world2_align8_rank1_receives_nothing", world=2, tokens=(10, 13), alignment=8,
          cold_ranks=(1,)),
        c(OP, "smoke", "world4_empty_rank_hot_expert", world=4, tokens=(0, 8, 8, 15), experts=32, hot=9,
          alignment=4),
        c(OP, "full", "world1_t4096_h7168_top8_of_256_align128", tokens=(4096,), hidden=7168, experts=256, topk=8,
          alignment=128),
        c(OP, "full", "world2_t512_h7168_top8_of_256_align128", world=2, tokens=(512, 400), hidden=7168,
          experts=256, topk=8, alignment=128),
    ]


def rank_specs(inputs: Inputs, me: int) -> Specs:
    p = inputs.params
    return {"combined_x": ((p["tokens"][me], p["hidden"]), torch.bfloat16)}


def output_specs(inputs: Inputs) -> Specs:
    return mc.world_specs(inputs, rank_specs)


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    ex = deepport.moe_dispatch_expanded(c.inputs["x"], c.inputs["topk_idx"], c.inputs["topk_weights"], p["experts"],
                                        group=c.group, expert_alignment=p["alignment"], backend=c.backend)
    assert isinstance(ex.recv_x, torch.Tensor)
    y = ex.recv_x.clone()
    y[ex.m_indices < 0] = float("nan")
    out = deepport.moe_combine_expanded(y, ex.handle, backend=c.backend, alloc=c.alloc)
    return {"combined_x": c.owned("combined_x", out)}


def weighted_identity(inputs: Inputs, me: int) -> dict[str, np.ndarray]:
    """``x * sum of the weights of the routed slots`` on rank ``me``: any weighted combine of identity experts."""
    mine = inputs.rank(me)
    idx = mc.i64(mine["topk_idx"])
    total = np.where(idx >= 0, mc.f64(mine["topk_weights"]), 0.0).sum(axis=1)
    return {"combined_x": mc.f64(mine["x"]) * total[:, None]}


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    return mc.world_reference(inputs, weighted_identity)
