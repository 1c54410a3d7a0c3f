"""Conformance cases for ``moe_combine``: the identity-expert round trip of a normal dispatch.

Each rank dispatches bf16 ``x`` (provenance-encoded, see :mod:`~deepport.conformance.suites.moe_common`)
and combines the received rows unchanged, so ``combined_x = x * (number of ranks the token reached)``
(0 for tokens routed nowhere) and, with the received weights, ``combined_topk_weights`` = the original
weights on routed slots and 0 on -1 slots, exactly.
"""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs
from deepport.kernels.f64.moe import layout_f64

OP = "moe_combine"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "world1_t24_e16_top4"),
        c(OP, "smoke", "world1_duplicates_nowhere", dup=0.5, nowhere=0.3),
        c(OP, "smoke", "world2_uneven_duplicates", world=2, tokens=(19, 6), dup=0.3),
        c(OP, "smoke", "world1_nothing_routed", nowhere=1.0),
        c(OP, "smoke", "world2_rank1_receives_nothing", world=2, tokens=(12, 9), cold_ranks=(1,), dup=0.2),
        c(OP, "smoke", "world4_empty_rank_hot_expert", world=4, tokens=(9, 0, 4, 12), experts=32, hot=31),
        c(OP, "full", "world1_t4096_h7168_top8_of_256", tokens=(4096,), hidden=7168, experts=256, topk=8),
        c(OP, "full", "world2_t1024_h7168_top8_of_256", world=2, tokens=(1024, 777), hidden=7168, experts=256,
          topk=8),
    ]


def rank_specs(inputs: Inputs, me: int) -> Specs:
    p = inputs.params
    t = p["tokens"][me]
    return {"combined_x": ((t, p["hidden"]), torch.bfloat16), "combined_topk_weights": ((t, p["topk"]), torch.float32)}


def output_specs(inputs: Inputs) -> Specs:
    return mc.world_specs(inputs, rank_specs)


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    d = deepport.moe_dispatch(c.inputs["x"], c.inputs["topk_idx"], c.inputs["topk_weights"], p["experts"],
                              group=c.group, backend=c.backend)
    out = deepport.moe_combine(d.recv_x, d.handle, d.recv_topk_weights, backend=c.backend, alloc=c.alloc)  # type: ignore[arg-type]
    assert out.combined_topk_weights is not None
    return {"combined_x": c.owned("combined_x", out.combined_x),
            "combined_topk_weights": c.owned("combined_topk_weights", out.combined_topk_weights)}


def rank_reference(inputs: Inputs, me: int) -> dict[str, np.ndarray]:
    p = inputs.params
    mine = inputs.rank(me)
    idx = mc.i64(mine["topk_idx"])
    reached = layout_f64(idx, p["experts"], p["world"])[2].sum(axis=1).astype(np.float64)
    return {"combined_x": mc.f64(mine["x"]) * reached[:, None],
            "combined_topk_weights": np.where(idx >= 0, mc.f64(mine["topk_weights"]), 0.0)}


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    return mc.world_reference(inputs, rank_reference)
