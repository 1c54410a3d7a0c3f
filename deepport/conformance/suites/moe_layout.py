"""Conformance cases for ``moe_layout`` (one process; ``num_ranks`` is only a number here). Exact."""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs
from deepport.kernels.f64.moe import layout_f64

OP = "moe_layout"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "t24_e16_top4_ranks4", num_ranks=4),
        c(OP, "smoke", "int32_ids_duplicates_nowhere_ranks2", idx_dtype="int32", dup=0.5, nowhere=0.3, num_ranks=2),
        c(OP, "smoke", "hot_expert_top1_ranks8", topk=1, hot=7, num_ranks=8, drop=0.0),
        c(OP, "smoke", "ranks1", num_ranks=1, tokens=(40,)),
        c(OP, "smoke", "rank2_receives_nothing_ranks4", num_ranks=4, cold_ranks=(2,)),
        c(OP, "smoke", "nothing_routed_ranks2", num_ranks=2, nowhere=1.0),
        c(OP, "full", "t4096_top8_of_256_ranks8", tokens=(4096,), experts=256, topk=8, num_ranks=8, hidden=128),
    ]


def output_specs(inputs: Inputs) -> Specs:
    p = inputs.params
    t, r = p["tokens"][0], p["num_ranks"]
    return {"num_tokens_per_rank": ((r,), torch.int32), "num_tokens_per_expert": ((p["experts"],), torch.int32),
            "is_token_in_rank": ((t, r), torch.int32)}


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    out = deepport.moe_layout(c.inputs["topk_idx"], p["experts"], p["num_ranks"], backend=c.backend)
    if out.is_token_in_rank.dtype != torch.bool:
        raise RuntimeError(f"`is_token_in_rank`: expected dtype torch.bool, got {out.is_token_in_rank.dtype}")
    return {"num_tokens_per_rank": out.num_tokens_per_rank, "num_tokens_per_expert": out.num_tokens_per_expert,
            "is_token_in_rank": out.is_token_in_rank.to(torch.int32)}


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    p = inputs.params
    per_rank, per_expert, in_rank = layout_f64(mc.world_topk(inputs)[0], p["experts"], p["num_ranks"])
    return {"num_tokens_per_rank": per_rank.astype(np.float64), "num_tokens_per_expert": per_expert.astype(np.float64),
            "is_token_in_rank": in_rank.astype(np.float64)}
