"""Conformance cases for ``moe_low_latency_dispatch``: packed per-expert rows, optionally cast to FP8.

Rows past an expert's ``recv_count`` are unspecified, so each rank zeroes them (by its own counts,
which are checked exactly) before returning; the scales must come column-major (the masked GEMM's
layout). bf16 rows are exact; the FP8 scales must be DeepEP's float32 ``amax * float32(1/448)`` bit
for bit (the op's docstring), and FP8 rows within half an e4m3 step of ``float32(x * float32(448 /
amax))``.
"""

from __future__ import annotations

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case
from deepport.conformance.suites import moe_common as mc
from deepport.conformance.suites.moe_common import Inputs, RankCall, Specs
from deepport.conformance.suites.moe_dispatch import _routed, pick_rows
from deepport.kernels.f64.moe import cast_fp8_f64, packed_rows_f64

OP = "moe_low_latency_dispatch"
GENERATOR_VERSION = mc.GENERATOR_VERSION
generate, dtype_name, invoke = mc.generate, mc.dtype_name, mc.invoke  # shared by every MoE suite


def cases() -> list[Case]:
    c = mc.case
    return [
        c(OP, "smoke", "world1_bf16_tmax32", t_max=32),
        c(OP, "smoke", "world1_fp8_duplicates_tmax24", use_fp8=True, t_max=24, dup=0.4),
        c(OP, "smoke", "world2_fp8_uneven_tmax24", world=2, tokens=(24, 5), use_fp8=True, t_max=24),
        c(OP, "smoke", "world1_fp8_nothing_routed_tmax16", use_fp8=True, t_max=16, tokens=(12,), nowhere=1.0),
        c(OP, "smoke", "world2_fp8_rank1_receives_nothing_tmax16", world=2, tokens=(11, 16), use_fp8=True, t_max=16,
          cold_ranks=(1,)),
        c(OP, "smoke", "world4_bf16_empty_rank_hot", world=4, tokens=(3, 0, 10, 6), experts=32, hot=17, t_max=12),
        c(OP, "full", "world1_fp8_t128_h7168_top8_of_256", tokens=(128,), hidden=7168, experts=256, topk=8,
          use_fp8=True, t_max=128),
        c(OP, "full", "world2_fp8_t128_h7168_top8_of_256", world=2, tokens=(128, 100), hidden=7168, experts=256,
          topk=8, use_fp8=True, t_max=128),
    ]


def _capacity(inputs: Inputs) -> int:
    return int(inputs.params["world"] * inputs.params["t_max"])


def rank_specs(inputs: Inputs, me: int) -> Specs:
    p = inputs.params
    num_local, h = p["experts"] // p["world"], p["hidden"]
    shape = (num_local, _capacity(inputs), h)
    specs: Specs = {"recv_x": (shape, mc.FP8 if p["use_fp8"] else torch.bfloat16),
                    "recv_count": ((num_local,), torch.int32)}
    if p["use_fp8"]:
        specs["recv_x_scales"] = ((num_local, _capacity(inputs), h // 128), torch.float32)
    return specs


def output_specs(inputs: Inputs) -> Specs:
    return mc.world_specs(inputs, rank_specs)


def _valid_rows_only(t: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    out = t.contiguous().clone()
    raw = out.view(torch.uint8) if out.dtype == mc.FP8 else out
    rows = torch.arange(out.shape[1], device=out.device)
    raw[rows[None, :] >= count.to(torch.int64).clamp(0, out.shape[1])[:, None]] = 0
    return out


def run(c: RankCall) -> dict[str, torch.Tensor]:
    p = c.params
    r = deepport.moe_low_latency_dispatch(c.inputs["x"], c.inputs["topk_idx"], p["t_max"], p["experts"],
                                          group=c.group, use_fp8=p["use_fp8"], backend=c.backend, alloc=c.alloc)
    count = c.owned("recv_count", r.recv_count)
    out = {"recv_count": count}
    if isinstance(r.recv_x, tuple):
        data, scales = c.owned("recv_x", r.recv_x[0]), c.owned("recv_x_scales", r.recv_x[1])
        cap = int(scales.shape[1])
        if scales.dim() == 3 and cap > 1 and tuple(scales.stride()[1:]) != (1, cap):
            raise RuntimeError(f"`recv_x` scales must be column-major in the last two dimensions (strides "
                               f"(*, 1, {cap})), got strides {scales.stride()}")
        out["recv_x"], out["recv_x_scales"] = _valid_rows_only(data, count), _valid_rows_only(scales, count)
    else:
        out["recv_x"] = _valid_rows_only(c.owned("recv_x", r.recv_x), count)
    return out


def rank_reference(inputs: Inputs, me: int) -> dict[str, np.ndarray]:
    p = inputs.params
    d = _routed(inputs, me, weights=False)
    num_local, h = p["experts"] // p["world"], p["hidden"]
    packed = packed_rows_f64(d.local_idx, num_local, _capacity(inputs))
    rows = pick_rows(inputs, "x", d)
    valid = packed >= 0
    x = np.zeros((num_local, _capacity(inputs), h))
    ref = {"recv_count": d.per_expert.astype(np.float64)}
    if p["use_fp8"]:
        values, scales = cast_fp8_f64(rows.reshape(len(rows), h))
        s = np.zeros((num_local, _capacity(inputs), h // 128))
        x[valid], s[valid] = values[packed[valid]], scales[packed[valid]]
        ref["recv_x_scales"] = s
    else:
        x[valid] = rows[packed[valid]]
    ref["recv_x"] = x
    return ref


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    return mc.world_reference(inputs, rank_reference)
