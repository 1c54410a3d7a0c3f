"""GPU tests of torch.ops.deepport.*: CUDA-graph capture and replay of MLA decode, the FP8 GEMM and the
low-latency MoE path (dispatch, masked grouped GEMM, combine), and a torch.compile'd model (inductor)
captured in a CUDA graph, each compared with eager calls of the same backend.

Each test runs on the torch backend and on the triton and hopper backends where they are registered
and can run the call (else it is skipped, saying why). Value checks are off
(``DEEPPORT_CHECK_VALUES=0``): they read device values on the host, which a capture forbids. A replay
runs with new values written into the captured inputs (new routing too, for the MoE path), so a result
baked in at capture time fails the comparison.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from custom_op_inputs import gemm_operands, grouped_operands

import deepport
from deepport.dispatch import registry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
BACKENDS = ("torch", "triton", "hopper")


@pytest.fixture(autouse=True)
def _capturable(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    yield
    torch.cuda.synchronize()


def _require(backend: str, op: str, *args: Any, **kwargs: Any) -> None:
    """Skip unless ``backend`` is registered and can run this call of ``op`` (the verdict names why not)."""
    if backend not in [b.name for b in deepport.all_backends()]:
        pytest.skip(f"backend {backend!r} is not registered in this build")
    found = deepport.explain(op, *args, backend=backend, **kwargs)
    if found.chosen != backend:
        pytest.skip(f"{backend} cannot run this {op} call: {found.source}")


def _capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm up on a side stream (JIT compiles, plan uploads, allocator), then capture one call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # the warmed-up stream (library handles, workspaces)
        result = fn()
    return graph, result


def _refill(static: torch.Tensor, new: torch.Tensor) -> None:
    """Write ``new`` into a captured input, bit for bit (byte views: e4m3 copies everywhere)."""
    target = static.view(torch.uint8) if static.element_size() == 1 else static
    target.copy_(new.view(torch.uint8) if new.element_size() == 1 else new)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same infinities (an empty MLA row's lse), no NaN, DeepGEMM's global ``calc_diff`` below 1e-5 and every
    element within 2% of the largest magnitude: replays of one backend's kernels agree to rounding."""
    g, w = got.double(), want.double()
    assert not torch.isnan(w).any() and not torch.isnan(g).any(), f"{what}: NaN"
    assert torch.equal(torch.isinf(g), torch.isinf(w)) and torch.equal(g[torch.isinf(g)], w[torch.isinf(w)]), what
    g, w = g[torch.isfinite(w)], w[torch.isfinite(w)]
    denominator = float((g * g + w * w).sum())
    diff = 0.0 if denominator == 0 else 1.0 - 2.0 * float((g * w).sum()) / denominator
    scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
    worst = float((g - w).abs().max()) if w.numel() else 0.0
    assert diff < 1e-5 and worst <= 2e-2 * scale, f"{what}: calc_diff {diff:.3g}, max |diff| {worst:.3g}"


def _mla_inputs(seed: int, lens: list[int], num_blocks: int, max_blocks: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    table = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(b)]).to(torch.int32)
    return {"q": torch.randn(b, 1, 16, 576, generator=g).div(10).to(CUDA, torch.bfloat16),
            "k_cache": torch.randn(num_blocks, 64, 1, 576, generator=g).div(10).to(CUDA, torch.bfloat16),
            "block_table": table.contiguous().to(CUDA), "cache_seqlens": torch.tensor(lens, dtype=torch.int32,
                                                                                       device=CUDA)}


@pytest.mark.parametrize("plan", [True, False], ids=["plan", "no_plan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_decode_replays_in_a_cuda_graph_like_eager(backend: str, plan: bool) -> None:
    lens = [1, 17, 64, 65, 300, 777, 1024, 0]
    x = _mla_inputs(0, lens, num_blocks=160, max_blocks=16)
    args = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], 512)
    md = deepport.get_mla_metadata(x["cache_seqlens"], 16, 1) if plan else None
    _require(backend, "mla_decode", *args, metadata=md)
    if not plan and backend != "torch":
        pytest.skip(f"{backend} plans on the host without metadata (capture needs get_mla_metadata's plan)")
    tensors = (md.tile_scheduler_metadata, md.num_splits) if md is not None else (None, None)
    out = torch.empty(len(lens), 1, 16, 512, dtype=torch.bfloat16, device=CUDA)
    lse = torch.empty(len(lens), 16, 1, dtype=torch.float32, device=CUDA)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        functional = torch.ops.deepport.mla_decode(*args, None, True, *tensors)
        torch.ops.deepport.mla_decode_out(*args, out, lse, None, True, *tensors)
        return functional

    with deepport.use_backend(backend):
        graph, (g_out, g_lse) = _capture(step)
        new = _mla_inputs(1, lens, num_blocks=160, max_blocks=16)
        if not plan:  # the torch backend reads the whole table under capture: lengths may change too
            new["cache_seqlens"] = torch.tensor([1024, 0, 5, 999, 64, 128, 3, 700], dtype=torch.int32, device=CUDA)
        for name, t in new.items():
            _refill(x[name], t)
        graph.replay()
        want_out, want_lse = deepport.mla_decode(*args, causal=True, metadata=md)
    torch.cuda.synchronize()
    for got, want, what in ((g_out, want_out, "out"), (g_lse, want_lse, "lse"), (out, want_out, "out="),
                            (lse, want_lse, "lse=")):
        _close(got, want, what)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_gemm_replays_in_a_cuda_graph_like_eager(backend: str, layout: str) -> None:
    m, n, k = 96, 512, 1024
    a, sfa, b, sfb = gemm_operands(layout, m, n, k, CUDA, seed=0)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=CUDA)
    _require(backend, f"fp8_gemm_{layout}", (a, sfa), (b, sfb), out)
    functional, out_form = getattr(torch.ops.deepport, f"fp8_gemm_{layout}"), \
        getattr(torch.ops.deepport, f"fp8_gemm_{layout}_out")

    def step() -> torch.Tensor:
        out_form(a, sfa, b, sfb, out)
        result: torch.Tensor = functional(a, sfa, b, sfb)
        return result

    with deepport.use_backend(backend):
        graph, d = _capture(step)
        for static, new in zip((a, sfa, b, sfb), gemm_operands(layout, m, n, k, CUDA, seed=1), strict=True):
            _refill(static, new)
        graph.replay()
        want = torch.empty_like(out)
        getattr(deepport, f"fp8_gemm_{layout}")((a, sfa), (b, sfb), want)
    torch.cuda.synchronize()
    _close(d, want, "functional")
    _close(out, want, "out=")


def _routing(seed: int, tokens: int, experts: int, topk: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)])
    idx[0, -1] = -1  # a slot selecting nothing
    return {"x": torch.randn(tokens, hidden, generator=g).to(CUDA, torch.bfloat16), "topk_idx": idx.to(CUDA),
            "topk_weights": torch.rand(tokens, topk, generator=g).to(CUDA)}


def _ops_of(backend: str, ops: tuple[str, ...]) -> dict[str, str]:
    """``{op: backend}`` for the ``ops`` that ``backend`` implements (skips if it is absent or has none)."""
    if backend not in [b.name for b in deepport.all_backends()]:
        pytest.skip(f"backend {backend!r} is not registered in this build")
    mine = {op: backend for op in ops if registry.get(backend).support(op) is not None}
    if not mine:
        pytest.skip(f"{backend} implements none of {', '.join(ops)}")
    return mine


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_moe_path_replays_with_new_routing_like_eager(backend: str) -> None:
    """dispatch (FP8 cast) -> masked grouped GEMM -> weighted combine, each on ``backend`` where it implements
    the op (torch otherwise), captured once and replayed with other tokens and other routing: the counts and
    rows come from the device on every replay."""
    tokens, experts, topk, hidden, t_max = 32, 16, 4, 1024, 32
    r = _routing(0, tokens, experts, topk, hidden)
    _, _, w, w_sf = grouped_operands(torch.randn(experts, 1, hidden, device=CUDA), experts, hidden)
    mine = _ops_of(backend, ("moe_low_latency_dispatch", "m_grouped_fp8_gemm_nt_masked", "moe_low_latency_combine"))
    d = deepport.moe_low_latency_dispatch(r["x"], r["topk_idx"], t_max, experts)
    y = torch.zeros(experts, t_max, hidden, dtype=torch.bfloat16, device=CUDA)
    calls = {"moe_low_latency_dispatch": (r["x"], r["topk_idx"], t_max, experts),
             "m_grouped_fp8_gemm_nt_masked": (d.recv_x, (w, w_sf), y, d.recv_count, 4),
             "moe_low_latency_combine": (y, r["topk_idx"], r["topk_weights"], d.handle)}
    for op in mine:
        _require(backend, op, *calls[op])

    def step() -> torch.Tensor:
        recv, scales, count, packed = torch.ops.deepport.moe_low_latency_dispatch(r["x"], r["topk_idx"], t_max,
                                                                                  experts)
        h = torch.ops.deepport.m_grouped_fp8_gemm_nt_masked(recv, scales, w, w_sf, count, 4)
        out: torch.Tensor = torch.ops.deepport.moe_low_latency_combine(h, r["topk_idx"], r["topk_weights"], count,
                                                                       packed)
        return out

    with deepport.use_backend("torch", **mine):
        graph, got = _capture(step)
        for name, t in _routing(1, tokens, experts, topk, hidden).items():
            _refill(r[name], t)
        graph.replay()
        want = step()
    torch.cuda.synchronize()
    _close(got, want, "combined")


class DecodeBlock(torch.nn.Module):
    """MLA decode over a paged cache, an FP8 output projection, the one-process low-latency MoE."""

    def __init__(self, hidden: int, experts: int, t_max: int) -> None:
        super().__init__()
        self.experts, self.t_max = experts, t_max
        _, _, proj, proj_sf = gemm_operands("nt", 1, hidden, 512, CUDA, seed=3)
        _, _, w, w_sf = grouped_operands(torch.randn(experts, 1, hidden, device=CUDA), experts, hidden, seed=4)
        self.register_buffer("proj", proj)
        self.register_buffer("proj_sf", proj_sf)
        self.register_buffer("w", w)
        self.register_buffer("w_sf", w_sf)
        self.register_buffer("router", torch.randn(experts, hidden, device=CUDA) / hidden**0.5)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
                tsm: torch.Tensor, splits: torch.Tensor) -> torch.Tensor:
        attn, _ = torch.ops.deepport.mla_decode(q, k_cache, block_table, seqlens, 512, None, False, tsm, splits)
        a, sfa = deepport.per_token_cast_to_fp8(attn.reshape(-1, 512))
        x = torch.ops.deepport.fp8_gemm_nt(a, sfa, self.proj, self.proj_sf)
        weights, idx = torch.sigmoid(x.float() @ self.router.t()).topk(4, dim=1)
        recv, scales, count, packed = torch.ops.deepport.moe_low_latency_dispatch(x, idx, self.t_max, self.experts)
        h = torch.ops.deepport.m_grouped_fp8_gemm_nt_masked(recv, scales, self.w, self.w_sf, count, 4)
        y: torch.Tensor = torch.ops.deepport.moe_low_latency_combine(h, idx, weights.contiguous(), count, packed)
        return y


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="inductor on CUDA needs triton")
@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiled_block_and_its_cuda_graph_match_eager(backend: str) -> None:
    """torch.compile(fullgraph=True) with inductor, then that compiled block captured in a CUDA graph and
    replayed on new inputs; ``backend`` runs every op of the block it implements, torch the others."""
    mine = _ops_of(backend, ("mla_decode", "fp8_gemm_nt", "moe_low_latency_dispatch", "m_grouped_fp8_gemm_nt_masked",
                             "moe_low_latency_combine"))
    torch._dynamo.reset()
    lens = [5, 64, 200, 511]
    x = _mla_inputs(0, lens, num_blocks=40, max_blocks=8)
    x["q"] = x["q"][:, :, :8].contiguous()  # 4 requests x 8 heads = 32 tokens into the MoE
    md = deepport.get_mla_metadata(x["cache_seqlens"], 8, 1)
    args = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], md.tile_scheduler_metadata, md.num_splits)
    block = DecodeBlock(1024, 16, 32)
    with deepport.use_backend("torch", **mine):
        try:
            want = block(*args)
        except deepport.BackendNotSupportedError as exc:
            pytest.skip(f"{backend} cannot run one of the block's calls: {exc}")
        compiled = torch.compile(block, fullgraph=True)
        _close(compiled(*args), want, "compiled")
        graph, y = _capture(lambda: compiled(*args))
        new = _mla_inputs(1, lens, num_blocks=40, max_blocks=8)
        new["q"] = new["q"][:, :, :8].contiguous()
        for name, t in new.items():
            _refill(x[name], t)
        graph.replay()
        want = block(*args)
    torch.cuda.synchronize()
    _close(y, want, "compiled, replayed")
