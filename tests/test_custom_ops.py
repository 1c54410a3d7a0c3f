"""torch.ops.deepport.*: registration from the descriptors, opcheck, the same results as deepport's Python
API, no host read with value checks off (proved on the meta device, which has no values), and
torch.compile(fullgraph=True) of a small model calling them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from custom_op_inputs import OpCall, all_calls, gemm_operands, grouped_operands, mla, routing
from same_computation import assert_same_up_to_rounding
from torch.utils._python_dispatch import TorchDispatchMode

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
        assert_same_up_to_rounding(g, w, call.op)


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
        assert_same_up_to_rounding(got[0], want[0])
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


class NoHostReads(TorchDispatchMode):
    """Raises on every aten op that reads tensor values on the host (``.item()``, ``bool(t)``, ``int(t)``,
    ``torch.equal``) or whose output shape depends on values (``nonzero``, boolean-mask indexing,
    ``unique``, ``bincount`` ...): on a GPU each is a device-to-host synchronisation, which a CUDA-graph
    capture forbids. Sees the ops called from Python (the op layer, the backends' torch code)."""

    READS: ClassVar[set[str]] = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select",
                                 "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc", "argwhere"}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        reads = name in self.READS or (name == "repeat_interleave" and "output_size" not in (kwargs or {})
                                       and isinstance(args[1] if len(args) > 1 else None, torch.Tensor))
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            reads = True
        if reads:
            raise AssertionError(f"host read: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_no_host_read_catches_a_sync() -> None:
    with NoHostReads(), pytest.raises(AssertionError, match=r"host read: aten\._local_scalar_dense"):
        int(torch.ones(1).sum())
    with NoHostReads(), pytest.raises(AssertionError, match=r"host read: aten\.index"):  # a boolean mask
        torch.ones(3)[torch.ones(3) > 0]
    with NoHostReads(), pytest.raises(AssertionError, match=r"host read: aten\.nonzero"):
        torch.ones(3).nonzero()


def _decode_step_ops(plan: Any) -> Any:
    """The real kernels behind the custom ops (a dispatch mode sees a custom op as one call, not what its
    kernel runs): MLA decode with a plan and without, the FP8 GEMM, moe_layout, the one-process
    low-latency dispatch, the masked grouped GEMM and the combine, on small CPU inputs."""
    x = mla(CPU)
    a, sfa, b, sfb = gemm_operands("nt", 6, 256, 512, CPU)
    r = routing(CPU, tokens=6, experts=8, topk=3, hidden=256)
    _, _, gb, gsfb = grouped_operands(torch.randn(8, 1, 256), 8, 256)
    args = (x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], 32)
    out = torch.empty(6, 256, dtype=torch.bfloat16)
    h = torch.zeros(8, 6, 256, dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        deepport.mla_decode(*args, causal=True, metadata=plan)
        deepport.mla_decode(*args, causal=True)
        deepport.fp8_gemm_nt((a, sfa), (b, sfb), out)
        deepport.moe_layout(r["topk_idx"], 8, 2)
        d = deepport.moe_low_latency_dispatch(r["x"], r["topk_idx"], 6, 8)
        deepport.m_grouped_fp8_gemm_nt_masked(d.recv_x, (gb, gsfb), h, d.recv_count, 2)
        y: torch.Tensor = deepport.moe_low_latency_combine(h, r["topk_idx"], r["topk_weights"], d.handle)
        return y

    return run


def test_value_checks_off_the_decode_step_ops_read_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``DEEPPORT_CHECK_VALUES=0`` the op layer and the torch backend read no value on the host for these
    ops: what a CUDA-graph capture needs (tests/test_custom_ops_gpu.py captures them on a GPU)."""
    run = _decode_step_ops(deepport.get_mla_metadata(mla(CPU)["cache_seqlens"], 4, 2))
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "0")
    with NoHostReads():
        y = run()
    assert tuple(y.shape) == (6, 256) and not torch.isnan(y).any()
    monkeypatch.setenv("DEEPPORT_CHECK_VALUES", "1")
    with NoHostReads(), pytest.raises(AssertionError, match="host read"):  # the value checks do read
        run()


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
        assert_same_up_to_rounding(g, w)
    del plan


def test_compile_with_dynamic_shapes_serves_two_batch_sizes_without_a_graph_break() -> None:
    torch._dynamo.reset()
    model = TinyDecode(256, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch in (2, 3):
        args, _ = _decode_inputs(batch, plan=False)
        for g, w in zip(compiled(*args), model(*args), strict=True):
            assert_same_up_to_rounding(g, w)


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
        assert_same_up_to_rounding(g, w)
    del plan
