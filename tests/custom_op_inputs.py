"""Small valid calls of every ``torch.ops.deepport`` custom op, each with the same call through deepport's
Python API, on any device (shared by the CPU and GPU custom-op tests).

A :class:`OpCall` holds the custom op's name, its arguments and ``direct``: a function making the same
call through ``deepport.<op>`` and returning what the custom op should return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import deepport
from deepport.kernels.fp8_layout import per_block_cast_to_fp8, per_token_cast_to_fp8

FP8 = torch.float8_e4m3fn


@dataclass
class OpCall:
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    direct: Callable[[], Any] | None = None
    keep: tuple[Any, ...] = ()  # objects the call needs alive (an MLA plan whose tensors are arguments)
    written: tuple[torch.Tensor, ...] = ()  # an out form's outputs (its arguments it writes)

    @property
    def packet(self) -> Any:
        return getattr(torch.ops.deepport, self.op)

    def run(self) -> Any:
        """Call the custom op; an out form's result is what it wrote (one tensor, or a tuple)."""
        got = self.packet(*self.args, **self.kwargs)
        if self.written:
            assert got is None
            return self.written[0] if len(self.written) == 1 else self.written
        return got

    def __str__(self) -> str:
        return self.op


def mla(device: torch.device, *, lens: tuple[int, ...] = (5, 33), s_q: int = 2, h_q: int = 4, h_kv: int = 2,
        d_qk: int = 64, d_v: int = 32, page: int = 16, max_blocks: int = 3, num_blocks: int = 8,
        seed: int = 0) -> dict[str, Any]:
    """MLA decode inputs; each request's pages are distinct blocks."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    q = torch.randn(b, s_q, h_q, d_qk, generator=g).to(torch.bfloat16)
    k_cache = torch.randn(num_blocks, page, h_kv, d_qk, generator=g).to(torch.bfloat16)
    table = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(b)]).to(torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    return {"q": q.to(device), "k_cache": k_cache.to(device), "block_table": table.contiguous().to(device),
            "cache_seqlens": seqlens.to(device), "head_dim_v": d_v}


def mla_calls(device: torch.device) -> list[OpCall]:
    x = mla(device)
    pos = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], x["head_dim_v"])
    s_q, h_q, h_kv = int(x["q"].shape[1]), int(x["q"].shape[2]), int(x["k_cache"].shape[2])
    plan = deepport.get_mla_metadata(x["cache_seqlens"], s_q * h_q // h_kv, h_kv)
    out = torch.empty(2, s_q, h_q, x["head_dim_v"], dtype=torch.bfloat16, device=device)
    lse = torch.empty(2, h_q, s_q, dtype=torch.float32, device=device)
    return [
        OpCall("mla_decode", pos, {"causal": True}, lambda: deepport.mla_decode(*pos, causal=True)),
        OpCall("mla_decode", pos, {"tile_scheduler_metadata": plan.tile_scheduler_metadata,
                                   "num_splits": plan.num_splits, "softmax_scale": 0.1},
               lambda: deepport.mla_decode(*pos, metadata=plan, softmax_scale=0.1), keep=(plan,)),
        OpCall("mla_decode_out", (*pos, out, lse), {"tile_scheduler_metadata": plan.tile_scheduler_metadata},
               lambda: deepport.mla_decode(*pos, metadata=plan), keep=(plan,), written=(out, lse)),
    ]


def gemm_operands(layout: str, m: int, n: int, k: int, device: torch.device,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, sfa, b, sfb)`` stored as ``fp8_gemm_<layout>`` takes them (1x128 A scales, 128x128 B scales)."""
    g = torch.Generator().manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(torch.randn(m, k, generator=g))
    b, sfb = per_block_cast_to_fp8(torch.randn(n, k, generator=g))
    if layout[0] == "t":
        a, sfa = a.t().contiguous(), sfa.t().contiguous()
    if layout[1] == "n":
        b, sfb = b.t().contiguous(), sfb.t().contiguous()
    return a.to(device), sfa.to(device), b.to(device), sfb.to(device)


def gemm_calls(device: torch.device, layout: str) -> list[OpCall]:
    m, n, k = 5, 160, 256
    a, sfa, b, sfb = gemm_operands(layout, m, n, k, device)
    fn = getattr(deepport, f"fp8_gemm_{layout}")

    def direct(dtype: torch.dtype = torch.bfloat16, c: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(m, n, dtype=dtype, device=device)
        fn((a, sfa), (b, sfb), out, c=c)
        return out

    c = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(device)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    calls = [OpCall(f"fp8_gemm_{layout}", (a, sfa, b, sfb), {}, direct),
             OpCall(f"fp8_gemm_{layout}_out", (a, sfa, b, sfb, out), {}, direct, written=(out,))]
    if layout == "nt":
        calls += [OpCall("fp8_gemm_nt", (a, sfa, b, sfb), {"c": c}, lambda: direct(torch.float32, c)),
                  OpCall("fp8_gemm_nt", (a, sfa, b, sfb), {"out_dtype": torch.float32, "recipe": [1, 128, 128]},
                         lambda: direct(torch.float32))]
    return calls


def grouped_operands(x: torch.Tensor, groups: int, n: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, sfa, b, sfb)`` for the grouped GEMMs: ``x [..., K]`` per token, ``G`` random ``[N, K]`` weights."""
    k = int(x.shape[-1])
    g = torch.Generator().manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(x.reshape(-1, k).cpu())
    pairs = [per_block_cast_to_fp8(torch.randn(n, k, generator=g)) for _ in range(groups)]
    b, sfb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return (a.view(x.shape).to(x.device), sfa.view(*x.shape[:-1], -1).to(x.device), b.to(x.device),
            sfb.to(x.device))


def grouped_calls(device: torch.device) -> list[OpCall]:
    n, k = 160, 256
    rows = (3, 0, 5)
    ids = [i for g, r in enumerate(rows) if r for i in [g] * r + [-1] * (128 - r)]
    m_indices = torch.tensor(ids, dtype=torch.int32, device=device)
    x = torch.randn(len(ids), k, generator=torch.Generator().manual_seed(2)).to(device)
    ca, csfa, cb, csfb = grouped_operands(x, len(rows), n)

    def contiguous() -> torch.Tensor:
        out = torch.empty(len(ids), n, dtype=torch.bfloat16, device=device)
        deepport.m_grouped_fp8_gemm_nt_contiguous((ca, csfa), (cb, csfb), out, m_indices)
        return out

    masked_m = torch.tensor([2, 0, 8], dtype=torch.int32, device=device)
    xm = torch.randn(3, 8, k, generator=torch.Generator().manual_seed(3)).to(device)
    ma, msfa, mb, msfb = grouped_operands(xm, 3, n)

    def masked() -> torch.Tensor:
        out = torch.zeros(3, 8, n, dtype=torch.bfloat16, device=device)
        deepport.m_grouped_fp8_gemm_nt_masked((ma, msfa), (mb, msfb), out, masked_m, 4)
        return out

    c_out = torch.empty(len(ids), n, dtype=torch.bfloat16, device=device)
    m_out = torch.zeros(3, 8, n, dtype=torch.bfloat16, device=device)
    return [
        OpCall("m_grouped_fp8_gemm_nt_contiguous", (ca, csfa, cb, csfb, m_indices), {}, contiguous),
        OpCall("m_grouped_fp8_gemm_nt_contiguous_out", (ca, csfa, cb, csfb, c_out, m_indices), {}, contiguous,
               written=(c_out,)),
        OpCall("m_grouped_fp8_gemm_nt_masked", (ma, msfa, mb, msfb, masked_m, 4), {}, masked),
        OpCall("m_grouped_fp8_gemm_nt_masked_out", (ma, msfa, mb, msfb, m_out, masked_m, 4), {}, masked,
               written=(m_out,)),
    ]


def routing(device: torch.device, tokens: int = 6, experts: int = 8, topk: int = 3, hidden: int = 256,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """Tokens with top-k routing: a -1 slot, a token routed nowhere and a duplicated expert included."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)])
    if tokens >= 3:
        idx[0, -1] = -1
        idx[1, :] = -1
        idx[2, 1] = idx[2, 0]
    return {"x": torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device),
            "topk_idx": idx.to(device), "topk_weights": torch.rand(tokens, topk, generator=g).to(device)}


def zeros_on(device: torch.device) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
    """An ``alloc`` for the MoE ops whose tensors start zeroed (rows a dispatch leaves unspecified stay 0)."""
    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.uint8 if dtype == FP8 else dtype, device=device).view(dtype)

    return alloc


def moe_calls(device: torch.device) -> list[OpCall]:
    r = routing(device)
    x, idx, w = r["x"], r["topk_idx"], r["topk_weights"]
    experts, t_max = 8, 8

    def layout() -> tuple[torch.Tensor, ...]:
        return tuple(deepport.moe_layout(idx, experts, 2))

    calls = [OpCall("moe_layout", (idx, experts, 2), {}, layout)]
    for fp8 in (True, False):
        def dispatch(fp8: bool = fp8) -> tuple[torch.Tensor, ...]:
            got = deepport.moe_low_latency_dispatch(x, idx, t_max, experts, use_fp8=fp8, alloc=zeros_on(device))
            no_scales = torch.empty(experts, t_max, 0, device=device)
            recv = got.recv_x if isinstance(got.recv_x, tuple) else (got.recv_x, no_scales)
            return (*recv, got.recv_count, got.handle.packed_src_row)

        calls.append(OpCall("moe_low_latency_dispatch", (x, idx, t_max, experts), {"use_fp8": fp8}, dispatch))
    _, _, count, packed = torch.ops.deepport.moe_low_latency_dispatch(x, idx, t_max, experts, use_fp8=False)
    y = torch.randn(experts, t_max, int(x.shape[1]), generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = y.to(device)

    def combine() -> torch.Tensor:
        got = deepport.moe_low_latency_dispatch(x, idx, t_max, experts, use_fp8=False)
        return deepport.moe_low_latency_combine(y, idx, w, got.handle)

    calls.append(OpCall("moe_low_latency_combine", (y, idx, w, count, packed), {}, combine))
    return calls


def all_calls(device: torch.device) -> list[OpCall]:
    calls = mla_calls(device)
    for layout in ("nt", "nn", "tn", "tt"):
        calls += gemm_calls(device, layout)
    return calls + grouped_calls(device) + moe_calls(device)
