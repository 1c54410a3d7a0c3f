"""torch.ops.deepport.*: registration from the descriptors, opcheck, the same results as deepport's Python
API, no host read with value checks off (proved on the meta device, which has no values), and
torch.compile(fullgraph=True) of a small model calling them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from custom_op_inputs import OpCall, all_calls, gemm_operands, grouped_operands, mla, routing

import deepport
from deepport.kernels import descriptors
from deepport.kernels.mla_decode import plan_of_tensors
from deepport.kernels.moe_handle import OneProcessRoutes
from deepport.kernels.torch_ops import NOT_CUSTOM_OPS, register_torch_ops

CPU = torch.device("cpu")
OUT_FORMS = {"mla_decode", "fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt",
             "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"}
CALLS = all_calls(CPU)


@pytest.fixture(autouse=True)
def _torch_backend(clean_env: None) -> Iterator[None]:
    with deepport.use_backend("torch"):
        yield


def _leaves(value: Any) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [t for v in value for t in _leaves(v)]


def test_import_registers_each_op_its_descriptor_names_and_says_why_the_others_are_not() -> None:
    named = {d.name for d in descriptors() if d.custom_op is not None}
    assert named == set(register_torch_ops())  # idempotent: registering again changes nothing
    for name in named:
        assert hasattr(torch.ops.deepport, name), name
        assert hasattr(torch.ops.deepport, f"{name}_out") == (name in OUT_FORMS), name
    assert set(NOT_CUSTOM_OPS) == {d.name for d in descriptors()} - named
    assert set(NOT_CUSTOM_OPS) == {"moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded"}


def test_every_registered_custom_op_is_called_below() -> None:
    registered = {n for n in dir(torch.ops.deepport) if isinstance(getattr(torch.ops.deepport, n),
                                                                   torch._ops.OpOverloadPacket)}
    assert registered == {c.op for c in CALLS}


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_custom_op_returns_what_the_deepport_op_computes(call: OpCall) -> None:
    assert call.direct is not None
    got, want = _leaves(call.run()), _leaves(call.direct())
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        assert torch.equal(g.view(torch.uint8) if g.element_size() == 1 else g,
                           w.view(torch.uint8) if w.element_size() == 1 else w), call.op


def _allclose_with_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """opcheck's schema check compares each input before and after the call with ``torch.allclose``, which
    has no CPU kernel for e4m3 (torch 2.13): compare e4m3 tensors bit for bit instead (stricter)."""
    allclose = torch.allclose

    def patched(a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        if a.dtype == b.dtype and a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return allclose(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "allclose", patched)


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_opcheck(call: OpCall, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema (no undeclared mutation or aliasing), fake kernel against the real one (shapes, dtypes,
    strides), autograd registration, and AOT dispatch with symbolic shapes."""
    _allclose_with_fp8(monkeypatch)
    torch.library.opcheck(call.packet.default, call.args, call.kwargs)


def test_mla_plan_is_found_by_its_tensors_and_only_by_them() -> None:
    x = mla(CPU)
    plan = deepport.get_mla_metadata(x["cache_seqlens"], 4, 2)
    assert plan_of_tensors(plan.tile_scheduler_metadata, plan.num_splits) is plan
    copy = plan_of_tensors(plan.tile_scheduler_metadata.clone(), None)  # a copy: matched by value
    assert torch.equal(copy.cache_seqlens, plan.cache_seqlens) and copy.batch == plan.batch
    shorter = deepport.get_mla_metadata(x["cache_seqlens"] - 1, 4, 2)  # the same tables, other lengths
    assert torch.equal(shorter.tile_scheduler_metadata, plan.tile_scheduler_metadata)
    with pytest.raises(deepport.InvalidArgumentError, match="different lengths"):
        plan_of_tensors(plan.tile_scheduler_metadata.clone(), plan.num_splits.clone())
    assert plan_of_tensors(shorter.tile_scheduler_metadata, shorter.num_splits) is shorter
    other = deepport.get_mla_metadata(torch.tensor([64, 1], dtype=torch.int32), 4, 2)
    with pytest.raises(deepport.InvalidArgumentError, match="live plan"):
        plan_of_tensors(torch.zeros_like(plan.tile_scheduler_metadata), None)
    with pytest.raises(deepport.InvalidArgumentError, match="planned for other cache_seqlens"):
        torch.ops.deepport.mla_decode(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], 32,
                                      tile_scheduler_metadata=other.tile_scheduler_metadata)


def test_low_latency_combine_rejects_a_handle_of_other_routing() -> None:
    r = routing(CPU)
    _, _, count, packed = torch.ops.deepport.moe_low_latency_dispatch(r["x"], r["topk_idx"], 8, 8, use_fp8=False)
    y = torch.zeros(8, 8, 256, dtype=torch.bfloat16)
    other = torch.roll(r["topk_idx"], 1, dims=1)
    other[1] = 3
    with pytest.raises(deepport.InvalidArgumentError, match="routing the handle"):  # the dispatch's own handle
        torch.ops.deepport.moe_low_latency_combine(y, other, r["topk_weights"], count, packed)
    with pytest.raises(deepport.InvalidArgumentError, match="recv_count"):  # copies: a handle rebuilt, checked
        torch.ops.deepport.moe_low_latency_combine(y, other, r["topk_weights"], count.clone(), packed.clone())


def test_combine_gets_the_dispatch_handle_itself_in_eager_and_compiled_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rebuild (which would read the routing on the host) when the dispatch's tensors reach the combine."""
    import deepport.kernels.torch_ops.moe as ops_moe

    def no_rebuild(*args: Any) -> None:
        raise AssertionError("the handle was rebuilt from tensors")

    monkeypatch.setattr(ops_moe, "OneProcessRoutes", no_rebuild)
    torch._dynamo.reset()
    model = TinyDecode(256, 8, 8)
    args, plan = _decode_inputs(2, plan=True)
    want = model(*args)
    for backend in ("aot_eager", "eager"):
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend=backend)(*args)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    del plan


def test_one_process_routes_build_the_normal_dispatch_handle() -> None:
    r = routing(CPU)
    want = deepport.moe_dispatch(r["x"], r["topk_idx"], r["topk_weights"], 8).handle
    got = OneProcessRoutes(r["topk_idx"].clone(), 8, 256).build()
    for field in ("send_counts", "recv_counts", "num_recv_tokens_per_expert", "rank", "world_size", "num_experts",
                  "hidden"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("topk_idx", "is_token_in_rank", "recv_src_idx", "recv_topk_idx"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def test_value_checks_off_no_op_reads_a_device_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta tensors have no values: any host read (``.item()``, ``.tolist()``, ``nonzero``) raises. With
    ``DEEPPORT_CHECK_VALUES=0`` the decode-step ops run on them through the torch backend, which is what a
    CUDA-graph capture needs."""
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    x = {k: _meta(v) if isinstance(v, torch.Tensor) else v for k, v in mla(CPU).items()}
    plan = deepport.get_mla_metadata(mla(CPU)["cache_seqlens"], 4, 2)
    for tensors in ((plan.tile_scheduler_metadata, plan.num_splits), (None, None)):
        out, lse = torch.ops.deepport.mla_decode(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], 32,
                                                 None, True, *tensors)
        assert out.device.type == "meta" and tuple(lse.shape) == (2, 4, 2)
    a, sfa, b, sfb = (_meta(t) for t in gemm_operands("nt", 6, 256, 512, CPU))
    assert tuple(torch.ops.deepport.fp8_gemm_nt(a, sfa, b, sfb).shape) == (6, 256)
    r = {k: _meta(v) for k, v in routing(CPU, tokens=6, experts=8, topk=3, hidden=256).items()}
    torch.ops.deepport.moe_layout(r["topk_idx"], 8, 2)
    recv, scales, count, packed = torch.ops.deepport.moe_low_latency_dispatch(r["x"], r["topk_idx"], 6, 8)
    ga, gsfa, gb, gsfb = grouped_operands(torch.randn(8, 6, 256), 8, 256)
    h = torch.ops.deepport.m_grouped_fp8_gemm_nt_masked(recv, scales, _meta(gb), _meta(gsfb), count, 2)
    y = torch.ops.deepport.moe_low_latency_combine(h, r["topk_idx"], r["topk_weights"], count, packed)
    assert tuple(y.shape) == (6, 256) and y.device.type == "meta"
    del ga, gsfa


class TinyDecode(torch.nn.Module):
    """A decode step's shape in miniature: MLA decode over a paged cache, an FP8 projection, then the
    one-process low-latency MoE (dispatch, grouped GEMM, combine), every op a torch.ops.deepport call."""

    def __init__(self, hidden: int, experts: int, t_max: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.experts, self.t_max = experts, t_max
        self.router = torch.nn.Parameter(torch.randn(experts, hidden, generator=g), requires_grad=False)
        _, _, wb, wsfb = grouped_operands(torch.randn(experts, 1, hidden, generator=g), experts, hidden)
        self.register_buffer("w", wb)
        self.register_buffer("w_sf", wsfb)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
                proj: torch.Tensor, proj_sf: torch.Tensor, tsm: torch.Tensor | None = None,
                splits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attn, lse = torch.ops.deepport.mla_decode(q, k_cache, block_table, seqlens, 256, None, False, tsm, splits)
        tokens = attn.reshape(-1, attn.shape[-1])  # [b * s_q * h_q, d_v]
        a, sfa = deepport.per_token_cast_to_fp8(tokens)
        x = torch.ops.deepport.fp8_gemm_nt(a, sfa, proj, proj_sf)  # [tokens, hidden]
        scores = torch.sigmoid(x.float() @ self.router.t())
        weights, idx = scores.topk(2, dim=1)
        recv, scales, count, packed = torch.ops.deepport.moe_low_latency_dispatch(x, idx, self.t_max, self.experts)
        h = torch.ops.deepport.m_grouped_fp8_gemm_nt_masked(recv, scales, self.w, self.w_sf, count, 4)
        y = torch.ops.deepport.moe_low_latency_combine(h, idx, weights.contiguous(), count, packed)
        return y, lse


def _decode_inputs(batch: int, *, plan: bool) -> tuple[tuple[Any, ...], Any]:
    x = mla(CPU, lens=tuple(range(3, 3 + 7 * batch, 7)), s_q=1, h_q=2, h_kv=1, d_qk=320, d_v=256, page=16,
            max_blocks=4, num_blocks=4 * batch)
    md = deepport.get_mla_metadata(x["cache_seqlens"], 2, 1) if plan else None
    _, _, proj, proj_sf = gemm_operands("nt", 1, 256, 256, CPU)
    args = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], proj, proj_sf)
    return (args + ((md.tile_scheduler_metadata, md.num_splits) if md else ())), md


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_traces_the_custom_ops_and_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    model = TinyDecode(256, 8, 8)
    args, plan = _decode_inputs(3, plan=True)
    want = model(*args)
    got = torch.compile(model, fullgraph=True, backend=backend)(*args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    del plan


def test_compile_with_dynamic_shapes_serves_two_batch_sizes_without_a_graph_break() -> None:
    torch._dynamo.reset()
    model = TinyDecode(256, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch in (2, 3):
        args, _ = _decode_inputs(batch, plan=False)
        for g, w in zip(compiled(*args), model(*args), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DEEPPORT_TEST_INDUCTOR_CPU") != "1",
                    reason="inductor's C++ compile takes about 50 s on two CPU cores: set DEEPPORT_TEST_INDUCTOR_CPU=1 "
                           "(tests/test_custom_ops_gpu.py compiles with inductor on CUDA)")
def test_compile_with_inductor_on_the_cpu_matches_eager() -> None:
    torch._dynamo.reset()
    model = TinyDecode(256, 8, 8)
    args, plan = _decode_inputs(3, plan=True)
    want = model(*args)
    for g, w in zip(torch.compile(model, fullgraph=True)(*args), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    del plan
