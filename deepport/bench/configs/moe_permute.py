"""Bench configs for the one-process MoE permutes (DeepSeek-V3: hidden 7168, top-8 of 256 experts):
the expanded layout's dispatch (tokens copied once per selected expert into 128-aligned expert
segments, the grouped GEMM's input) and its weighted combine, and the low-latency layout's dispatch
(fixed per-expert capacity, with the per-token FP8 cast) and weighted combine, in one process (no
collective: ``group=None``). These are the kernels a single GPU runs around the expert GEMMs; the
collectives of several ranks are the ``moe`` configs, and for the low-latency ops those of
:mod:`deepport.bench.configs.moe_low_latency` (registered through this module's ``CONFIGS``).

The low-latency dispatch leaves rows past each expert's ``recv_count`` unspecified: its agreement with
the baseline compares the rows below the counts (``Workload.agreement_masks``), the FP8 payload bit for
bit (as bytes), the scales and the counts exactly.

Bytes (memory-bound, against the copy ceiling): bytes read + written, each row once, counting only
the routed rows (``T * k``; the expanded layout's zeroed padding rows and the index arrays are not
counted, so the figure is a lower bound):

- expanded dispatch: ``x`` read (``T * H * 2``), ``T * k`` rows written (bf16);
- low-latency dispatch: ``x`` read, ``T * k`` rows written as e4m3 (1 byte) plus one float32 scale
  per 128 channels;
- expanded and low-latency combine: ``T * k`` bf16 rows read, ``T`` rows written.

Routing: :func:`deepport.bench.configs.moe.routing` (DeepEP's test routing: distinct experts per
token). Every backend passes the op's conformance twin case first, then agrees with the baseline
backend on the config's own call (dispatch: bit for bit; combine: within one bf16 rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import deepport
from deepport.bench.configs import BenchConfig, Workload, bound_runner
from deepport.bench.configs import moe_low_latency as _ep
from deepport.bench.configs.moe import CPU_HIDDEN, EXPERTS, HIDDEN, TOPK, Pool, routing
from deepport.kernels import OPS

ALIGN = 128  # expert segment alignment of the expanded layout (the grouped GEMM's block)
FP8_BLOCK = 128  # channels per float32 scale of the low-latency dispatch's FP8 cast
_COMBINE_AGREEMENT = 1e-5  # calc_diff of two float32-accumulated sums rounded once to bf16


def _expanded(op: str, tokens: int, hidden: int, experts: int, topk: int) -> Callable[[torch.device, int], Workload]:
    def build(device: torch.device, seed: int) -> Workload:
        x, idx, w = routing(tokens, hidden, experts, topk, seed, device)
        pool, combine_pool = Pool(device), Pool(device)
        first = deepport.moe_dispatch_expanded(x, idx, w, experts, expert_alignment=ALIGN, backend="torch",
                                               alloc=pool.start())
        recv = first.recv_x
        assert isinstance(recv, torch.Tensor)
        y = torch.randn(recv.shape, device=device).to(torch.bfloat16)  # the experts' outputs
        if op == "moe_dispatch_expanded":
            outputs = {"recv_x": recv, "m_indices": first.m_indices, "recv_weights": first.recv_weights}
        else:
            outputs = {"combined_x": deepport.moe_combine_expanded(y, first.handle, backend="torch")}

        def call(backend: str) -> Callable[[], None]:
            def dispatch() -> None:
                deepport.moe_dispatch_expanded(x, idx, w, experts, expert_alignment=ALIGN, backend=backend,
                                               alloc=pool.start())

            def combine() -> None:
                outputs["combined_x"].copy_(deepport.moe_combine_expanded(y, first.handle, backend=backend,
                                                                          alloc=combine_pool.start()))

            return dispatch if op == "moe_dispatch_expanded" else combine

        bound = bound_runner(op, (lambda: OPS[op].bind(x, idx, w, experts, expert_alignment=ALIGN))
                              if op == "moe_dispatch_expanded" else (lambda: OPS[op].bind(y, first.handle)))
        return Workload(call, bound, outputs, (x.numel() + recv.numel()) * 2)

    return build


def _low_latency_dispatch(op: str, tokens: int, hidden: int, experts: int,
                          topk: int) -> Callable[[torch.device, int], Workload]:
    def build(device: torch.device, seed: int) -> Workload:
        x, idx, _ = routing(tokens, hidden, experts, topk, seed, device)
        pool = Pool(device)
        first = deepport.moe_low_latency_dispatch(x, idx, tokens, experts, use_fp8=True, backend="torch",
                                                  alloc=pool.start())
        data, scales = first.recv_x
        # the fp8 payload compared as its bytes (bit for bit); rows past recv_count[e] are unspecified
        outputs = {"recv_x": data.view(torch.uint8), "recv_x_scales": scales, "recv_count": first.recv_count}
        used = (torch.arange(data.shape[1], device=device)[None, :] < first.recv_count[:, None].long())[..., None]
        masks = {"recv_x": used, "recv_x_scales": used}

        def call(backend: str) -> Callable[[], None]:
            def dispatch() -> None:
                deepport.moe_low_latency_dispatch(x, idx, tokens, experts, use_fp8=True, backend=backend,
                                                  alloc=pool.start())

            return dispatch

        bound = bound_runner(op, lambda: OPS[op].bind(x, idx, tokens, experts, use_fp8=True))
        return Workload(call, bound, outputs, x.numel() * 2 + data.numel(), agreement_masks=masks)

    return build


def _low_latency_combine(op: str, tokens: int, hidden: int, experts: int,
                         topk: int) -> Callable[[torch.device, int], Workload]:
    def build(device: torch.device, seed: int) -> Workload:
        x, idx, w = routing(tokens, hidden, experts, topk, seed, device)
        combine_pool = Pool(device)
        first = deepport.moe_low_latency_dispatch(x, idx, tokens, experts, use_fp8=True, backend="torch")
        data, _ = first.recv_x
        y = torch.randn(data.shape, device=device).to(torch.bfloat16)  # the experts' outputs, [L, T_max, H]
        outputs = {"combined_x": deepport.moe_low_latency_combine(y, idx, w, first.handle, backend="torch")}

        def call(backend: str) -> Callable[[], None]:
            def combine() -> None:
                outputs["combined_x"].copy_(deepport.moe_low_latency_combine(y, idx, w, first.handle, backend=backend,
                                                                             alloc=combine_pool.start()))

            return combine

        bound = bound_runner(op, lambda: OPS[op].bind(y, idx, w, first.handle))
        return Workload(call, bound, outputs, y.numel() * 2 + x.numel() * 2)

    return build


def _bytes(op: str, tokens: int, hidden: int, topk: int) -> float:
    rows = tokens * topk
    if op == "moe_dispatch_expanded":
        return float(tokens * hidden * 2 + rows * hidden * 2)
    if op == "moe_low_latency_dispatch":  # e4m3 rows and one float32 scale per 128 channels
        return float(tokens * hidden * 2 + rows * (hidden + 4 * hidden // FP8_BLOCK))
    return float(rows * hidden * 2 + tokens * hidden * 2)  # the two combines


_CHECK_CASES = {  # a one-process conformance case of each op, CPU-sized
    "moe_dispatch_expanded": "moe_dispatch_expanded/world1_align128",
    "moe_combine_expanded": "moe_combine_expanded/world1_align128",
    "moe_low_latency_dispatch": "moe_low_latency_dispatch/world1_fp8_duplicates_tmax24",
    "moe_low_latency_combine": "moe_low_latency_combine/world1_tmax32",
}


def _config(op: str, name: str, tokens: int, hidden: int, experts: int, topk: int, cpu: bool) -> BenchConfig:
    make = _expanded if "expanded" in op else _low_latency_dispatch if "dispatch" in op else _low_latency_combine
    build = make(op, tokens, hidden, experts, topk)
    params: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "num_experts": experts, "topk": topk,
                              "world_size": 1}
    if "expanded" in op:
        params["expert_alignment"] = ALIGN
    else:
        params["max_tokens_per_rank"] = tokens
        if "dispatch" in op:
            params["use_fp8"] = True
    agreement = 0.0 if "dispatch" in op else _COMBINE_AGREEMENT
    return BenchConfig(name=name, op=op, params=params, build=build, flops=0.0, bytes=_bytes(op, tokens, hidden, topk),
                       ceiling="memory", check_case=_CHECK_CASES[op], cpu=cpu, agreement=agreement)


CONFIGS: tuple[BenchConfig, ...] = (
    _config("moe_dispatch_expanded", "t4096_h7168_top8_of_256", 4096, HIDDEN, EXPERTS, TOPK, cpu=False),
    _config("moe_combine_expanded", "t4096_h7168_top8_of_256", 4096, HIDDEN, EXPERTS, TOPK, cpu=False),
    _config("moe_low_latency_dispatch", "t128_h7168_top8_of_256_fp8", 128, HIDDEN, EXPERTS, TOPK, cpu=False),
    _config("moe_low_latency_combine", "t128_h7168_top8_of_256", 128, HIDDEN, EXPERTS, TOPK, cpu=False),
    _config("moe_dispatch_expanded", "cpu_t64_top4_of_16", 64, CPU_HIDDEN, 16, 4, cpu=True),
    _config("moe_combine_expanded", "cpu_t64_top4_of_16", 64, CPU_HIDDEN, 16, 4, cpu=True),
    _config("moe_low_latency_dispatch", "cpu_t32_top4_of_16_fp8", 32, CPU_HIDDEN, 16, 4, cpu=True),
    _config("moe_low_latency_combine", "cpu_t32_top4_of_16", 32, CPU_HIDDEN, 16, 4, cpu=True),
    *_ep.CONFIGS,  # the low-latency ops over 2 ranks (its docstring says why they are registered here)
)
