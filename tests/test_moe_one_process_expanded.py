"""The one-process expanded dispatch and combine (``moe_one_process_expanded``) equal the general route
(``moe_layouts.dispatch_expanded_routed`` / ``combine_expanded_routed``, forced by calling it directly)
bit for bit, handle included, with the torch, triton and opencl steps (triton: TRITON_INTERPRET=1 on the
CPU, set by conftest.py without a GPU; opencl: any OpenCL device, pocl on the CPU); with the torch and
triton steps the dispatch reads the host once and the combine never (the opencl steps copy through the
host by design). ``triton`` is the triton backend's fused dispatch (``moe_expanded_dispatch``, its
``dispatch_expanded_one_process`` step), ``triton-steps`` the torch one-process path with the triton
steps. The one-process dispatch writes into caller buffers poisoned beforehand."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest
import torch
from moe_ep_probe import probe

import deepport
from deepport.backends.torch import moe_layouts, moe_routes
from deepport.backends.torch.moe_local import TORCH, LocalSteps
from deepport.dispatch import registry
from deepport.kernels import moe_combine_expanded as combine_op
from deepport.kernels import moe_dispatch_expanded as dispatch_op
from deepport.kernels.moe_args import MoEGroup
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle

pytestmark = pytest.mark.usefixtures("clean_env")


def _steps(backend: str) -> LocalSteps:
    if backend == "torch":
        return TORCH
    if backend == "opencl":
        pytest.importorskip("pyopencl")
        from deepport.backends.opencl import moe, runtime

        if runtime.unavailable_reason() is not None:
            pytest.skip(f"no OpenCL device: {runtime.unavailable_reason()}")
        return moe.OPENCL
    pytest.importorskip("triton")
    from deepport.backends.triton import _runtime, moe_permute

    if not _runtime.interpreting() and not torch.cuda.is_available():
        pytest.skip("triton needs TRITON_INTERPRET=1 or a CUDA device")
    if backend == "triton-steps":  # the torch one-process path with the triton steps, not the fused dispatch
        return replace(moe_permute.TRITON, dispatch_expanded_one_process=None)
    assert moe_permute.TRITON.dispatch_expanded_one_process is not None
    return moe_permute.TRITON


def _device(backend: str) -> str:
    return "cuda" if backend.startswith("triton") and torch.cuda.is_available() else "cpu"


POISON = 0x7F  # every byte: int32 0x7F7F7F7F, float32 3.4e38, bf16 3.4e38, e4m3 NaN; never a value written


class _PoisonedAlloc:
    """A caller's ``alloc`` whose buffers hold ``POISON`` bytes; remembers what it handed out."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.given: list[torch.Tensor] = []

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if out.numel():
            out.view(torch.uint8).fill_(POISON)
        self.given.append(out)
        return out

    def gave(self, t: torch.Tensor) -> bool:
        return any(t is g for g in self.given)


def _routing(case: str, seed: int) -> dict[str, Any]:
    """Inputs of one routing case: ``idx`` int64 ``[T, K]``, ``w`` float32, ``x`` bf16 ``[T, H]``, ``E``, ``align``."""
    g = torch.Generator().manual_seed(seed)
    t, k, e, hidden, align = 41, 4, 16, 256, 8
    if case == "top8_align128":
        t, k, e, align = 64, 8, 32, 128
    elif case == "top1":
        k = 1
    elif case == "one_expert":
        e = 1
    elif case == "no_tokens":
        t = 0
    idx = torch.randint(-1, e, (t, k), generator=g)
    if case == "unused_experts":  # only even experts: every odd one receives nothing
        idx = torch.where(idx >= 0, idx - idx % 2, -1)
    if case == "duplicates" and t:
        idx[3] = idx[3, 0].clamp(min=0)  # one expert in every slot
        idx[7, :3] = 5  # one expert in three slots: the weight sum's order shows
        idx[9, 1:] = idx[9, 0]
    if case == "nowhere":
        idx.fill_(-1)
    if t > 6 and case not in ("nowhere",):
        idx[6] = -1  # one token routed nowhere
    w = torch.rand(t, k, generator=g) * 4 - 1
    if t and case == "duplicates":
        w[7, :3] = torch.tensor([1e8, 1.0, -1e8])  # a different order of the three sums to a different float
    w = torch.where(idx >= 0, w, float("nan"))  # -1 slots' weights are never read
    x = (torch.randn(t, hidden, generator=g) * 3).to(torch.bfloat16)
    return {"idx": idx, "w": w, "x": x, "E": e, "align": align}


CASES = ("random", "duplicates", "unused_experts", "top1", "one_expert", "no_tokens", "nowhere", "top8_align128")


def _same(a: object, b: object, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), what
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
        if a.dtype != torch.bool and bits is not None:
            a, b = a.view(bits), b.view(bits)
        assert torch.equal(a, b), what
    else:
        assert type(a) is type(b) and a == b, f"{what}: {a!r} != {b!r}"


def _same_handle(got: MoEExpandedHandle, want: MoEExpandedHandle) -> None:
    for name in ("expanded_src_row", "m_indices", "weights"):
        _same(getattr(got, name), getattr(want, name), f"handle.{name}")
    assert isinstance(got.routes, MoEHandle)
    for f in fields(MoEHandle):
        _same(getattr(got.routes, f.name), getattr(want.routes, f.name), f"handle.routes.{f.name}")


def _payload(r: dict[str, Any], fp8: bool, device: str) -> Any:
    x = r["x"].to(device)
    if not fp8:
        return x
    data, scales = TORCH.cast_fp8(x)
    return data, scales.t().contiguous().t()  # column-major scales, as DeepGEMM's SFA


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-steps", "opencl"])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_one_process_expanded_dispatch_and_combine_equal_the_general_route_bit_for_bit(
        backend: str, fp8: bool, case: str) -> None:
    if backend.startswith("triton") and case == "top8_align128" and not torch.cuda.is_available():
        pytest.skip("interpreted kernels at this shape are slow; torch covers it")
    _assert_equal_to_the_general_route(backend, fp8, case)


@pytest.mark.parametrize("case", ["random", "duplicates", "unused_experts"])
def test_the_fused_triton_dispatch_carries_its_counts_across_token_blocks(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _steps("triton")
    from deepport.backends.triton import moe_expanded_dispatch

    monkeypatch.setattr(moe_expanded_dispatch, "_BLOCK_T", 16)  # 41 tokens: three token blocks
    _assert_equal_to_the_general_route("triton", False, case)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", [c for c in CASES if c != "top8_align128"])
def test_the_fused_triton_dispatch_scatters_rows_to_the_same_bits(
        case: str, fp8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_ROWS = "scatter"``: one program per token writes its row into each of its expanded rows, the
    padding rows zeroed by their own kernel; everything equal to the general route, bit for bit (padding
    rows zero, scales included)."""
    _steps("triton")
    from deepport.backends.triton import moe_expanded_dispatch

    monkeypatch.setattr(moe_expanded_dispatch, "_ROWS", "scatter")
    monkeypatch.setattr(moe_expanded_dispatch, "_BLOCK_T", 16)
    _assert_equal_to_the_general_route("triton", fp8, case)


BLOCK_CASES = ("ragged", "expert_absent_in_a_block", "all_to_one_expert", "block_routed_nowhere", "duplicate_slots",
               "one_token", "no_tokens", "experts_288")


def _block_routing(case: str) -> dict[str, Any]:
    """Inputs of one token-block case of the fused triton dispatch (run with 16-token blocks): 37 tokens
    (blocks of 16, 16 and 5) unless the case says otherwise, ``-1`` slots at random."""
    g = torch.Generator().manual_seed(len(case))
    t, k, e = {"one_token": (1, 4, 16), "no_tokens": (0, 4, 16), "experts_288": (24, 8, 288)}.get(case, (37, 4, 16))
    idx = torch.randint(-1, e, (t, k), generator=g)
    if case == "expert_absent_in_a_block":  # block 1 selects even experts only
        idx[16:32] = torch.where(idx[16:32] >= 0, idx[16:32] - idx[16:32] % 2, -1)
    elif case == "all_to_one_expert":  # every slot of every token: expert 3
        idx.fill_(3)
    elif case == "block_routed_nowhere":  # no token of block 1 is routed anywhere, nor token 3
        idx[16:32] = -1
        idx[3] = -1
    elif case == "duplicate_slots":  # slot 1 repeats slot 0 everywhere; token 5 names one expert in every slot
        idx[:, 1] = idx[:, 0]
        idx[5] = idx[5, 0].clamp(min=0)
    w = torch.where(idx >= 0, torch.rand(t, k, generator=g) * 4 - 1, float("nan"))
    x = (torch.randn(t, 128, generator=g) * 3).to(torch.bfloat16)
    return {"idx": idx, "w": w, "x": x, "E": e, "align": 4 if e > 256 else 8}


@pytest.mark.parametrize("rows", ["gather", "scatter"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_the_fused_triton_dispatch_at_token_block_boundaries(
        case: str, idx_dtype: torch.dtype, rows: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _steps("triton")
    from deepport.backends.triton import moe_expanded_dispatch

    monkeypatch.setattr(moe_expanded_dispatch, "_ROWS", rows)
    monkeypatch.setattr(moe_expanded_dispatch, "_BLOCK_T", 16)
    if case != "experts_288":  # 16 experts a step, the blocks before 2 a step (288 experts: 256 a step)
        monkeypatch.setattr(moe_expanded_dispatch, "_TILE", 32)
    _assert_routing_equal_to_the_general_route("triton", case == "ragged", _block_routing(case), idx_dtype)


def _assert_equal_to_the_general_route(backend: str, fp8: bool, case: str) -> None:
    r = _routing(case, seed=len(case) + 10 * fp8)
    _assert_routing_equal_to_the_general_route(backend, fp8, r, torch.int32 if case == "random" else torch.int64)


def _assert_routing_equal_to_the_general_route(backend: str, fp8: bool, r: dict[str, Any],
                                               idx_dtype: torch.dtype) -> None:
    local, device = _steps(backend), _device(backend)
    args = (_payload(r, fp8, device), r["idx"].to(device, idx_dtype), r["w"].to(device), r["E"])
    poisoned = _PoisonedAlloc(device)
    got = moe_layouts.dispatch_expanded(dispatch_op.bind(*args, expert_alignment=r["align"], alloc=poisoned), local)
    outputs = [*(got.recv_x if fp8 else (got.recv_x,)), got.m_indices, got.recv_weights]
    assert all(poisoned.gave(t) for t in outputs)  # written into the caller's poisoned buffers
    call = dispatch_op.bind(*args, expert_alignment=r["align"])
    want = moe_layouts.dispatch_expanded_routed(call, local)
    if fp8:
        assert isinstance(got.recv_x, tuple) and isinstance(want.recv_x, tuple)
        _same(got.recv_x[0], want.recv_x[0], "recv_x[0]")
        _same(got.recv_x[1], want.recv_x[1], "recv_x[1]")
    else:
        _same(got.recv_x, want.recv_x, "recv_x")
    _same(got.m_indices, want.m_indices, "m_indices")
    _same(got.recv_weights, want.recv_weights, "recv_weights")
    _same(got.num_recv_tokens_per_expert, want.num_recv_tokens_per_expert, "num_recv_tokens_per_expert")
    _same_handle(got.handle, want.handle)

    rows, hidden = int(got.m_indices.shape[0]), int(r["x"].shape[1])
    y = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16).to(device)
    y[got.m_indices < 0] = float("nan")  # padding rows are never read
    ref = moe_layouts.combine_expanded_routed(combine_op.bind(y, want.handle), local)
    for handle in (got.handle, want.handle):  # either handle drives either path
        _same(moe_layouts.combine_expanded(combine_op.bind(y, handle), local), ref, "combine_expanded")
    assert not ref.isnan().any()


@pytest.mark.parametrize("case", [c for c in CASES if c != "no_tokens"])
def test_the_triton_token_table_equals_the_torch_one(case: str) -> None:
    """The triton kernel's per-token table (each token's expanded rows ascending, -1 first, and their
    weights) is the torch ops' table entry for entry, on every routing case (duplicate slots, tokens routed
    nowhere, unused experts, top-1, one expert), from int32 and int64 top-k ids."""
    local, device = _steps("triton"), _device("triton")
    assert local.token_table is not None
    from deepport.backends.torch.moe_one_process_expanded import rows_per_token

    for idx_dtype in (torch.int32, torch.int64):
        r = _routing(case, seed=len(case))
        got = moe_layouts.dispatch_expanded(dispatch_op.bind(
            r["x"].to(device), r["idx"].to(device, idx_dtype), r["w"].to(device), r["E"],
            expert_alignment=r["align"]), TORCH)
        h, tokens = got.handle, int(r["idx"].shape[0])
        table, weights = local.token_table(h.expanded_src_row, h.m_indices, h.routes.recv_src_idx,
                                           h.routes.recv_topk_idx, h.weights, tokens)
        if case == "nowhere":  # no expanded row at all (torch's table needs one): every entry -1
            assert int(h.expanded_src_row.shape[0]) == 0
            _same(table, torch.full_like(table, -1), "table")
            continue
        want_table, want_weights = rows_per_token(h, tokens)
        _same(table, want_table, f"table ({idx_dtype})")
        live = want_table >= 0
        assert bool(live.any()) and not bool(live.all())  # both kinds of entry are compared
        _same(weights[live], want_weights[live], f"weights ({idx_dtype})")


@pytest.mark.parametrize("backend", ["torch", "triton", "opencl"])
def test_the_routes_of_a_one_process_expanded_dispatch_drive_a_cached_dispatch(backend: str) -> None:
    local, device = _steps(backend), _device(backend)
    r = _routing("duplicates", seed=3)
    call = dispatch_op.bind(r["x"].to(device), r["idx"].to(device), r["w"].to(device), r["E"],
                            expert_alignment=r["align"])
    got = moe_layouts.dispatch_expanded(call, local).handle.routes
    want = moe_layouts.dispatch_expanded_routed(call, local).handle.routes
    x = torch.randn(r["x"].shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    group = MoEGroup(None, 0, 1, "none")
    _same(moe_routes.resend(x, None, got, group, alloc, local)[0], moe_routes.resend(x, None, want, group, alloc,
                                                                                      local)[0], "cached dispatch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fp8", [False, True])
def test_a_one_process_expanded_dispatch_reads_the_host_once_and_its_combine_never(
        backend: str, fp8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _steps(backend)
    device = _device(backend)

    def general(*args: object, **kwargs: object) -> None:
        raise AssertionError("the one-process call took the general route")

    monkeypatch.setattr(moe_layouts, "dispatch_expanded_routed", general)
    monkeypatch.setattr(moe_layouts, "combine_expanded_routed", general)
    monkeypatch.setattr(moe_routes, "route", general)
    r = _routing("duplicates", seed=5)
    call = dispatch_op.bind(_payload(r, fp8, device), r["idx"].to(device), r["w"].to(device), r["E"],
                            expert_alignment=r["align"])
    with probe() as p:
        sent = registry.get(backend).implementation("moe_dispatch_expanded")(call)
    assert dict(p.syncs) == {"tolist": 1} and not p.collectives and p.host_tensors == 0
    y = torch.randn(sent.m_indices.shape[0], r["x"].shape[1]).to(torch.bfloat16).to(device)
    combine_call = combine_op.bind(y, sent.handle)
    with probe(forbid_syncs=True) as p:
        registry.get(backend).implementation("moe_combine_expanded")(combine_call)
    assert not p.collectives and p.host_tensors == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_public_one_process_expanded_ops_match_the_reference_backend(backend: str) -> None:
    _steps(backend)
    device = _device(backend)
    r = _routing("random", seed=11)
    args = (r["x"].to(device), r["idx"].to(device), r["w"].to(device), r["E"])
    got = deepport.moe_dispatch_expanded(*args, expert_alignment=r["align"], backend=backend)
    want = deepport.moe_dispatch_expanded(*args, expert_alignment=r["align"], backend="reference")
    _same(got.recv_x, want.recv_x, "recv_x")
    _same(got.m_indices, want.m_indices, "m_indices")
    torch.testing.assert_close(got.recv_weights, want.recv_weights, rtol=1e-6, atol=0)
    assert isinstance(got.recv_x, torch.Tensor)
    y = torch.randn(got.recv_x.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)
    out = deepport.moe_combine_expanded(y, got.handle, backend=backend)
    ref = deepport.moe_combine_expanded(y, want.handle, backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6)
    local = _steps(backend)  # the reference backend's handle drives both paths alike
    _same(moe_layouts.combine_expanded(combine_op.bind(y, want.handle), local),
          moe_layouts.combine_expanded_routed(combine_op.bind(y, want.handle), local), "combine of a reference handle")
