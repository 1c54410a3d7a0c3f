"""Conformance cases for ``moe_dispatch`` (normal layout, and the cached re-dispatch through its handle).

Inputs and multi-rank runs: :mod:`deepport.conformance.suites.moe_common`. Every output is exact:
payload rows (bf16, or e4m3 + scales) bit-for-bit in canonical order, local top-k ids with -1,
zeroed non-local weights, aligned per-expert counts, the handle's source indices and per-rank counts.
"""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs
from deepport.kernels.f64.moe import Dispatched, align_up, dispatch_f64

OP = "moe_dispatch"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "world1_t24_e16_top4"),
        c(OP, "smoke", "world1_fp8_colmajor_scales_align4", fp8=True, colmajor_scales=True, alignment=4),
        c(OP, "smoke", "world1_int32_ids_duplicates", idx_dtype="int32", dup=0.4, alignment=8),
        c(OP, "smoke", "world1_hot_expert_top1", topk=1, hot=5, drop=0.0, nowhere=0.2),
        c(OP, "smoke", "world2_uneven", world=2, tokens=(20, 9), dup=0.2, alignment=4),
        c(OP, "smoke", "world1_nothing_routed", nowhere=1.0, alignment=4),
        c(OP, "smoke", "world2_rank1_receives_nothing", world=2, tokens=(12, 9), cold_ranks=(1,), alignment=4),
        c(OP, "smoke", "world2_fp8_rank0_receives_nothing", world=2, tokens=(7, 15), fp8=True, cold_ranks=(0,)),
        c(OP, "smoke", "world2_fp8_empty_rank", world=2, tokens=(0, 17), fp8=True, colmajor_scales=True),
        c(OP, "smoke", "world4_uneven_duplicates", world=4, tokens=(5, 0, 13, 8), experts=32, topk=6, dup=0.3,
          nowhere=0.2, alignment=3),
        c(OP, "smoke", "world4_hot_expert_fp8", world=4, tokens=(7, 7, 7, 7), hot=0, fp8=True),
        c(OP, "full", "world1_t4096_h7168_top8_of_256", tokens=(4096,), hidden=7168, experts=256, topk=8,
          drop=0.0, nowhere=0.0),
        c(OP, "full", "world1_fp8_t4096_h7168_top8_of_256_align128", tokens=(4096,), hidden=7168, experts=256,
          topk=8, fp8=True, alignment=128),
        c(OP, "full", "world2_t1024_h7168_top8_of_256", world=2, tokens=(1024, 1000), hidden=7168, experts=256,
          topk=8),
        c(OP, "full", "world2_fp8_t1024_h7168_top8_of_256", world=2, tokens=(1024, 512), hidden=7168,
          experts=256, topk=8, fp8=True, colmajor_scales=True, alignment=128),
    ]


def _routed(inputs: Inputs, me: int, weights: bool = True) -> Dispatched:
    return dispatch_f64(mc.world_topk(inputs), mc.world_weights(inputs) if weights else None, me,
                        inputs.params["experts"])


def rank_specs(inputs: Inputs, me: int) -> Specs:
    p = inputs.params
    n, k, h = len(_routed(inputs, me, weights=False).src_rank), p["topk"], p["hidden"]
    dtype = mc.FP8 if p["fp8"] else torch.bfloat16
    specs: Specs = {"recv_x": ((n, h), dtype), "recv_topk_idx": ((n, k), getattr(torch, p["idx_dtype"])),
                    "recv_topk_weights": ((n, k), torch.float32),
                    "num_recv_tokens_per_expert": ((p["experts"] // p["world"],), torch.int64),
                    "recv_src_idx": ((n,), torch.int64), "recv_counts": ((p["world"],), torch.int64),
                    "cached_recv_x": ((n, h), dtype)}
    if p["fp8"]:
        specs["recv_x_scales"] = specs["cached_recv_x_scales"] = ((n, h // 128), torch.float32)
    return specs


def output_specs(inputs: Inputs) -> Specs:
    return mc.world_specs(inputs, rank_specs)


def _split(out: dict[str, torch.Tensor], name: str, value: object, c: RankCall) -> None:
    if isinstance(value, tuple):
        out[name], out[f"{name}_scales"] = c.owned(name, value[0]), c.owned(f"{name}_scales", value[1])
    else:
        assert isinstance(value, torch.Tensor)
        out[name] = c.owned(name, value)


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    r = deepport.moe_dispatch(mc.payload(c.inputs), c.inputs["topk_idx"], c.inputs["topk_weights"], p["experts"],
                              group=c.group, expert_alignment=p["alignment"], backend=c.backend, alloc=c.alloc)
    assert r.recv_topk_idx is not None and r.recv_topk_weights is not None and r.num_recv_tokens_per_expert is not None
    out: dict[str, torch.Tensor] = {"recv_topk_idx": c.owned("recv_topk_idx", r.recv_topk_idx),
                                    "recv_topk_weights": c.owned("recv_topk_weights", r.recv_topk_weights),
                                    "num_recv_tokens_per_expert": torch.tensor(r.num_recv_tokens_per_expert,
                                                                               dtype=torch.int64),
                                    "recv_src_idx": r.handle.recv_src_idx.to(torch.int64),
                                    "recv_counts": torch.tensor(r.handle.recv_counts, dtype=torch.int64)}
    _split(out, "recv_x", r.recv_x, c)
    cached = deepport.moe_dispatch(mc.payload(c.inputs, "x2"), handle=r.handle, backend=c.backend, alloc=c.alloc)
    _split(out, "cached_recv_x", cached.recv_x, c)
    return out


def pick_rows(inputs: Inputs, name: str, d: Dispatched) -> np.ndarray:
    """Rows ``(src_rank[i], src_token[i])`` of every rank's tensor ``name``, as float64."""
    parts = [mc.f64(inputs.rank(r)[name]) for r in range(inputs.world)]
    width = parts[0].shape[1:]
    if len(d.src_rank) == 0:
        return np.zeros((0, *width))
    return np.stack([parts[r][t] for r, t in zip(d.src_rank, d.src_token, strict=True)])


def rank_reference(inputs: Inputs, me: int) -> dict[str, np.ndarray]:
    p = inputs.params
    d = _routed(inputs, me)
    assert d.weights is not None
    ref = {"recv_x": pick_rows(inputs, "x", d), "recv_topk_idx": d.local_idx.astype(np.float64),
           "recv_topk_weights": d.weights,
           "num_recv_tokens_per_expert": np.array([align_up(int(v), p["alignment"]) for v in d.per_expert],
                                                  dtype=np.float64),
           "recv_src_idx": d.src_token.astype(np.float64), "recv_counts": d.recv_counts.astype(np.float64),
           "cached_recv_x": pick_rows(inputs, "x2", d)}
    if p["fp8"]:
        ref["recv_x_scales"] = pick_rows(inputs, "x_scales", d)
        ref["cached_recv_x_scales"] = pick_rows(inputs, "x2_scales", d)
    return ref


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    return mc.world_reference(inputs, rank_reference)
