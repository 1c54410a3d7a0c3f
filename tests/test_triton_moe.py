"""The triton backend's MoE steps on the CPU (TRITON_INTERPRET=1 without a GPU), against the torch
backend on the same inputs: routes, counts and moved payloads bit for bit, weighted sums within one
bf16 rounding, the FP8 cast within half an e4m3 step (bit for bit where both round the same float32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import deepport

pytest.importorskip("triton")

from deepport.backends.torch.moe_local import TORCH
from deepport.backends.triton import _runtime, moe_permute

pytestmark = pytest.mark.skipif(not _runtime.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cpu" if _runtime.interpreting() else "cuda"


def _routing(tokens: int = 37, topk: int = 4, experts: int = 16, hidden: int = 256,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, experts, (tokens, topk), generator=g)
    idx[3] = idx[3, 0]  # one token naming the same expert in every slot
    idx[5] = -1  # one token routed nowhere
    weights = torch.rand(tokens, topk, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    return idx.to(DEVICE), weights.to(DEVICE), x.to(DEVICE)


@pytest.mark.parametrize("ranks, experts", [(1, 16), (4, 16), (16, 16), (6, 48), (32, 32)])
def test_layout_counts_equal_torch(ranks: int, experts: int) -> None:
    """Per-rank counts summed in each program first (up to 16 ranks, padded to a power of two) or one atomic
    per (token, rank) above: torch's counts either way (300 tokens: several programs add to each count)."""
    idx, _, _ = _routing(tokens=300)
    got = deepport.moe_layout(idx.to(torch.int32), experts, ranks, backend="triton")
    want = deepport.moe_layout(idx.to(torch.int32), experts, ranks, backend="torch")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("fp8", [False, True])
def test_expanded_dispatch_and_combine_match_torch(fp8: bool) -> None:
    idx, weights, x = _routing()
    payload: object = x
    if fp8:
        data, scales = moe_permute.cast_fp8(x)
        payload = (data, scales)
    got = deepport.moe_dispatch_expanded(payload, idx, weights, 16, expert_alignment=8, backend="triton")
    want = deepport.moe_dispatch_expanded(payload, idx, weights, 16, expert_alignment=8, backend="torch")
    got_x, want_x = (got.recv_x, want.recv_x) if not fp8 else (got.recv_x[0], want.recv_x[0])
    assert torch.equal(got_x.view(torch.uint8), want_x.view(torch.uint8))
    if fp8:
        assert torch.equal(got.recv_x[1], want.recv_x[1])
    assert torch.equal(got.m_indices, want.m_indices) and torch.equal(got.recv_weights, want.recv_weights)
    y = torch.randn(got_x.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    out = deepport.moe_combine_expanded(y, got.handle, backend="triton")
    ref = deepport.moe_combine_expanded(y, want.handle, backend="torch")
    # both sum the top-k weighted rows in fp32, in their own orders: a sum on a bf16 rounding boundary may
    # land one bf16 step apart (up to 2**-7 of the value)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)


def test_low_latency_fp8_dispatch_and_combine_match_torch() -> None:
    idx, weights, x = _routing(tokens=24)
    got = deepport.moe_low_latency_dispatch(x, idx, 32, 16, use_fp8=True, backend="triton")
    want = deepport.moe_low_latency_dispatch(x, idx, 32, 16, use_fp8=True, backend="torch")
    assert torch.equal(got.recv_count, want.recv_count)
    for e, n in enumerate(want.recv_count.tolist()):
        assert torch.equal(got.recv_x[0][e, :n].view(torch.uint8), want.recv_x[0][e, :n].view(torch.uint8))
        assert torch.equal(got.recv_x[1][e, :n], want.recv_x[1][e, :n])
    assert got.recv_x[1].stride() == want.recv_x[1].stride()
    y = torch.randn(got.recv_x[0].shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEVICE)
    out = deepport.moe_low_latency_combine(y, idx, weights, got.handle, backend="triton")
    ref = deepport.moe_low_latency_combine(y, idx, weights, want.handle, backend="torch")
    # both sum the top-k weighted rows in fp32, in their own orders: a sum on a bf16 rounding boundary may
    # land one bf16 step apart (up to 2**-7 of the value)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)


def test_fp8_cast_matches_torch_bits() -> None:
    from deepport.backends.torch import moe_local

    x = (torch.randn(9, 384, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16).to(DEVICE)
    x[2, :128] = 0  # an all-zero block takes the 1e-4 floor
    data, scales = moe_permute.cast_fp8(x)
    ref_data, ref_scales = moe_local.cast_fp8(x)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))


@pytest.mark.parametrize("wide, nbytes, warps", [(False, 0, 4), (True, 0, 4), (True, 64, 2), (False, 48, 1)])
def test_place_rows_variants_move_the_same_bits(monkeypatch: pytest.MonkeyPatch, wide: bool, nbytes: int,
                                                warps: int) -> None:
    """Every way place_rows can move rows (the knobs scripts/gpu_moe_trace.py --place sweeps) puts the same
    bits where the torch step does: dense fp8-as-byte rows (widened to int64 when allowed), the transposed
    FP8-scale storage (never widened), rows whose byte count only 2 divides, and -1 rows zeroed or kept."""
    monkeypatch.setattr(moe_permute, "_PLACE_WIDE", wide)
    monkeypatch.setattr(moe_permute, "_PLACE_BYTES", nbytes)
    monkeypatch.setattr(moe_permute, "_PLACE_WARPS", warps)
    g = torch.Generator().manual_seed(7)
    index = torch.randint(-1, 9, (3, 5), generator=g).to(DEVICE)
    fp8_rows = torch.randint(0, 255, (9, 224), generator=g, dtype=torch.uint8).to(DEVICE)
    scales = torch.rand(9, 2, generator=g).to(DEVICE)
    odd = torch.randint(-9, 9, (9, 3), generator=g, dtype=torch.int16).to(DEVICE)
    for src, make in ((fp8_rows, lambda: torch.full((3, 5, 224), 77, dtype=torch.uint8, device=DEVICE)),
                      (scales, lambda: torch.full((3, 2, 5), 5.0, device=DEVICE).transpose(1, 2)),
                      (odd, lambda: torch.full((3, 5, 3), 3, dtype=torch.int16, device=DEVICE))):
        for zero_missing in (True, False):
            got, want = make(), make()
            moe_permute.place_rows(src, got, index, zero_missing)
            TORCH.place_rows(src, want, index, zero_missing)
            placed = index >= 0
            assert torch.equal(got[placed].view(torch.uint8), want[placed].view(torch.uint8))
            if zero_missing:
                assert torch.equal(got[~placed].view(torch.uint8), torch.zeros_like(want[~placed]).view(torch.uint8))
            else:  # left as they were
                assert torch.equal(got[~placed].view(torch.uint8), make()[~placed].view(torch.uint8))


def test_place_rows_views_widen_only_where_the_layout_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_permute, "_PLACE_WIDE", True)
    rows = torch.zeros((4, 7168), dtype=torch.uint8, device=DEVICE)
    s, d = moe_permute._place_views(rows, torch.zeros((2, 3, 7168), dtype=torch.uint8, device=DEVICE))
    assert s.dtype == d.dtype == torch.int64 and d.shape == (2, 3, 896)
    s, d = moe_permute._place_views(rows[:, 1:], torch.zeros((2, 3, 7167), dtype=torch.uint8, device=DEVICE))
    assert s.dtype == d.dtype == torch.uint8  # 7167 bytes a row: no wider type divides it
    scales = torch.zeros((4, 56), device=DEVICE)
    s, d = moe_permute._place_views(scales, torch.zeros((2, 56, 3), device=DEVICE).transpose(1, 2))
    assert s.dtype == d.dtype == torch.int32  # strided destination rows: as they are
    monkeypatch.setattr(moe_permute, "_PLACE_WIDE", False)
    s, d = moe_permute._place_views(rows, torch.zeros((2, 3, 7168), dtype=torch.uint8, device=DEVICE))
    assert s.dtype == torch.uint8


@pytest.mark.parametrize("tokens, topk, experts, capacity", [(37, 4, 16, 37), (24, 8, 32, 40), (1, 3, 4, 2),
                                                             (0, 4, 8, 16), (70, 1, 2, 80)])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_low_latency_layout_and_positions_steps_equal_the_torch_derivation(
        tokens: int, topk: int, experts: int, capacity: int, idx_dtype: torch.dtype) -> None:
    """The one-process low-latency layout kernel (sources, received rows, counts) and the combine's
    positions kernel give torch's tensors entry for entry: duplicate slots, unrouted tokens, one token,
    none, top-1, more tokens than one loop step of the kernels."""
    from deepport.backends.torch import moe_one_process as one

    g = torch.Generator().manual_seed(tokens * 7 + topk)
    idx = torch.randint(-1, experts, (tokens, topk), generator=g)
    if tokens > 5:
        idx[3] = idx[3, 0].clamp(min=0)  # one expert in every slot
        idx[5] = -1  # routed nowhere
    idx = idx.to(DEVICE, idx_dtype)
    mask = one.expert_mask(idx, experts)
    want_src = one.packed_sources(mask, capacity)
    row_of_token, _ = one.received_rows(mask)
    want_packed = torch.where(want_src >= 0, row_of_token[want_src.clamp(min=0)], -1) if tokens else want_src
    count = torch.full((experts,), 0x7F7F7F7F, dtype=torch.int32, device=DEVICE)  # poisoned: must be written
    assert moe_permute.TRITON.low_latency_layout is not None and moe_permute.TRITON.low_latency_positions is not None
    src, packed = moe_permute.TRITON.low_latency_layout(idx, experts, capacity, count)
    assert torch.equal(src, want_src) and torch.equal(packed, want_packed)
    assert torch.equal(count, mask.sum(dim=0).to(torch.int32))
    # the combine: slot k of token t reads row e * capacity + (t's place among e's tokens)
    place = torch.full((experts, tokens + 1), -1, dtype=torch.int64)
    for e in range(experts):
        for p, t in enumerate(want_src[e].tolist()):
            if t >= 0:
                place[e, t] = e * capacity + p
    want_pos = torch.tensor([[place[e, t].item() if e >= 0 else -1 for e in row]
                             for t, row in enumerate(idx.tolist())], dtype=torch.int64).reshape(tokens, topk)
    got_pos = moe_permute.TRITON.low_latency_positions(idx, capacity)
    assert torch.equal(got_pos.cpu(), want_pos)


def test_scatter_rows_writes_each_distinct_target_once_with_the_bits_of_torch() -> None:
    """The source-side placement of the low-latency receiver: dense FP8 rows and the transposed scale
    storage, rows naming one target in several slots (written once), untouched rows left as they were."""
    g = torch.Generator().manual_seed(8)
    targets = torch.tensor([[4, 4, 9, 4], [0, 0, 0, 0], [13, 2, 13, 7], [11, 11, 11, 11], [1, 3, 5, 6]],
                           device=DEVICE)  # flat rows of a [3, 5] layout
    fp8_rows = torch.randint(0, 255, (5, 224), generator=g, dtype=torch.uint8).to(DEVICE)
    scales = torch.rand(5, 2, generator=g).to(DEVICE)
    for src, make in ((fp8_rows.view(torch.float8_e4m3fn),
                       lambda: torch.full((3, 5, 224), 77, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)),
                      (scales, lambda: torch.full((3, 2, 5), 5.0, device=DEVICE).transpose(1, 2))):
        got, want = make(), make()
        moe_permute.scatter_rows(src, got, targets)
        assert TORCH.scatter_rows is not None
        TORCH.scatter_rows(src, want, targets)
        assert torch.equal(got.reshape(15, -1).view(torch.uint8), want.reshape(15, -1).view(torch.uint8))
        untouched = sorted(set(range(15)) - set(targets.reshape(-1).tolist()))
        assert torch.equal(got.reshape(15, -1)[untouched].view(torch.uint8),
                           make().reshape(15, -1)[untouched].view(torch.uint8))
    moe_permute.scatter_rows(scales[:0], torch.zeros(3, 5, 2, device=DEVICE), targets[:0])  # nothing to place


def test_scatter_row_pair_places_payload_and_scales_in_one_launch_with_the_bits_of_torch() -> None:
    """The low-latency receiver's two parts (FP8 payload rows, float32 scales into their transposed storage)
    read from one packed received row each, under targets with -1 (skipped) and repeats (written once): the
    bits of torch's ``scatter_rows`` per part; rows no target names keep their poison."""
    g = torch.Generator().manual_seed(9)
    targets = torch.tensor([[4, 4, -1, 9], [-1, -1, -1, -1], [13, 2, 13, 7], [11, -1, 11, 11], [1, 3, 5, 6]],
                           device=DEVICE)  # flat rows of a [3, 5] layout
    packed = torch.randint(0, 255, (5, 224 + 8 + 8), generator=g, dtype=torch.uint8).to(DEVICE)  # payload, scales
    payload = packed[:, :224].view(torch.float8_e4m3fn)
    scales = packed[:, 224:232].view(torch.float32)
    def poisoned() -> list[torch.Tensor]:
        return [torch.full((3, 5, 224), 0xFF, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn),
                torch.full((3, 2, 5), float("nan"), device=DEVICE).transpose(1, 2)]

    got, one_by_one, want = poisoned(), poisoned(), poisoned()
    moe_permute.scatter_row_pair([(payload, got[0]), (scales, got[1])], targets)
    assert TORCH.scatter_rows is not None
    for src, single, dst in ((payload, one_by_one[0], want[0]), (scales, one_by_one[1], want[1])):
        moe_permute.scatter_rows(src, single, targets)
        TORCH.scatter_rows(src, dst, targets)  # torch's step never sees -1 targets: only the named rows compare
    named = sorted(set(targets.reshape(-1).tolist()) - {-1})
    unnamed = sorted(set(range(15)) - set(named))
    for a, single, b, fresh in zip(got, one_by_one, want, poisoned(), strict=True):
        a, single, b, fresh = (t.reshape(15, -1).view(torch.uint8) for t in (a, single, b, fresh))
        assert torch.equal(a, single)
        assert torch.equal(a[named], b[named])
        assert torch.equal(a[unnamed], fresh[unnamed])
    moe_permute.scatter_row_pair([(payload[:0], got[0]), (scales[:0], got[1])], targets[:0])  # nothing to place


def test_token_rows_into_float32_rows_sum_like_weighted_rows() -> None:
    """The low-latency combine's partial sums: float32 rows of a per-slot table (-1 skipped) equal the
    sorted weighted sum over the same terms, bit for bit."""
    g = torch.Generator().manual_seed(9)
    y = torch.randn(40, 96, generator=g).to(torch.bfloat16).to(DEVICE)
    table = torch.randint(-1, 40, (11, 4), generator=g).to(DEVICE)
    weights = torch.rand(11, 4, generator=g).to(DEVICE)
    got = torch.full((11, 96), float("nan"), device=DEVICE)
    moe_permute.token_rows_into(y, table, weights, got)
    valid = table >= 0
    rows = torch.arange(11, device=DEVICE)[:, None].expand(11, 4)
    want = moe_permute.weighted_rows(y, torch.where(valid, table, 0).reshape(-1),
                                     torch.where(valid, rows, 11).reshape(-1), weights.reshape(-1), 12)[:11]
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_take_rows_into_gathers_the_same_bits_as_indexing_into_packed_rows(dtype: torch.dtype) -> None:
    from deepport.backends.torch.moe_comm import RowFormat, same_bits
    from deepport.backends.triton import moe_routes

    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, 96, generator=g).to(dtype).to(DEVICE)
    index = torch.tensor([28, 0, 5, 5, 17, 3], dtype=torch.int64, device=DEVICE)
    fmt = RowFormat.of([("meta", torch.int32, 3), ("x", dtype, 96)])  # the payload at an offset in each row
    send = torch.full((6, fmt.row_bytes), 0xA5, dtype=torch.uint8, device=DEVICE)  # poisoned
    d, s = same_bits(fmt.part(send, "x"), x)
    moe_routes.take_rows_into(s, index, d)
    assert torch.equal(fmt.part(send, "x").view(torch.uint8), x[index].view(torch.uint8))
    assert bool((fmt.part(send, "meta").view(torch.uint8) == 0xA5).all())  # nothing else written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sum_rows_adds_each_destinations_rows_in_entry_order(dtype: torch.dtype) -> None:
    from deepport.backends.triton import moe_routes

    g = torch.Generator().manual_seed(4)
    rows = torch.randn(23, 3, 40, generator=g).to(dtype)
    dst = torch.randint(0, 9, (23,), generator=g)
    dst[dst == 4] = 5  # destination 4 gets no row: its sum is 0
    want = torch.zeros(9, 3, 40, dtype=torch.float32)
    for e in range(23):  # the order the step promises: entry order, float32
        want[dst[e]] += rows[e].to(torch.float32)
    got = moe_routes.sum_rows(rows.to(DEVICE), dst.to(DEVICE), 9)
    assert got.dtype == torch.float32 and got.shape == (9, 3, 40)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(moe_routes.sum_rows(rows[:0].to(DEVICE), dst[:0].to(DEVICE), 4).cpu(), torch.zeros(4, 3, 40))


@pytest.mark.parametrize("fp8", [False, True])
def test_normal_dispatch_and_combine_match_torch(monkeypatch: pytest.MonkeyPatch, fp8: bool) -> None:
    import dataclasses

    from deepport.backends.triton import moe_routes

    ran: list[str] = []

    def counted(name: str, step: Any) -> Any:
        return lambda *args: (ran.append(name), step(*args))[1]

    monkeypatch.setattr(moe_routes, "ROUTES", dataclasses.replace(
        moe_routes.ROUTES, take_rows_into=counted("take_rows_into", moe_routes.take_rows_into),
        sum_rows=counted("sum_rows", moe_routes.sum_rows)))
    idx, weights, x = _routing()
    payload: object = (moe_permute.cast_fp8(x)) if fp8 else x
    got = deepport.moe_dispatch(payload, idx, weights, 16, expert_alignment=4, backend="triton")
    want = deepport.moe_dispatch(payload, idx, weights, 16, expert_alignment=4, backend="torch")
    got_x, want_x = (got.recv_x, want.recv_x) if not fp8 else (got.recv_x[0], want.recv_x[0])
    assert torch.equal(got_x.view(torch.uint8), want_x.view(torch.uint8))
    if fp8:
        assert torch.equal(got.recv_x[1], want.recv_x[1])
    assert torch.equal(got.recv_topk_idx, want.recv_topk_idx)
    assert torch.equal(got.recv_topk_weights, want.recv_topk_weights)
    assert got.num_recv_tokens_per_expert == want.num_recv_tokens_per_expert
    y = torch.randn(tuple(want_x.shape), generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEVICE)
    out = deepport.moe_combine(y, got.handle, got.recv_topk_weights, backend="triton")
    ref = deepport.moe_combine(y, want.handle, want.recv_topk_weights, backend="torch")
    # one process: one row per token, so both sums are that row and its weights, exactly
    assert torch.equal(out.combined_x, ref.combined_x)
    assert torch.equal(out.combined_topk_weights, ref.combined_topk_weights)
    assert {"take_rows_into", "sum_rows"} <= set(ran)  # the triton steps did the per-device work


def test_low_latency_sender_and_receiver_kernels_agree_across_step_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-kernel sender and the receive routes kernel walk tokens / received slots in steps, carrying counts
    from one step to the next: many small steps give the outputs of one large step (the rank tests' sizes fit
    one); the sender writes the routes, meta and (FP8-cast) rows that the torch ops derive."""
    from deepport.backends.torch.moe_index import running_slot, selection_mask

    g = torch.Generator().manual_seed(11)
    world, t_max, num_local, k = 3, 70, 4, 3
    idx = torch.randint(-1, world * num_local, (t_max, k), generator=g).to(DEVICE)
    slots = world * t_max
    meta = torch.full((slots, 1 + k), -1, dtype=torch.int32)
    for s in range(world):  # each source's routed slots first, then unused ones
        n = int(torch.randint(0, t_max + 1, (1,), generator=g))
        meta[s * t_max: s * t_max + n, 0] = torch.randint(0, 500, (n,), generator=g).to(torch.int32)
        meta[s * t_max: s * t_max + n, 1:] = torch.randint(-1, world * num_local, (n, k), generator=g).to(torch.int32)
    meta = meta.to(DEVICE)

    def receive() -> tuple[torch.Tensor, ...]:
        return moe_permute.low_latency_receive(meta, 1, num_local, torch.empty(num_local, dtype=torch.int32,
                                                                                device=DEVICE))

    x = torch.randn(t_max, 256, generator=g).to(torch.bfloat16).to(DEVICE)

    def send_rows(fp8: bool) -> tuple[torch.Tensor, ...]:
        meta = torch.full((world * t_max, 1 + k), -7, dtype=torch.int32, device=DEVICE)
        rows = torch.zeros((world * t_max, 256 * (1 if fp8 else 2)), dtype=torch.uint8, device=DEVICE)
        scales = torch.zeros((world * t_max, 2), dtype=torch.float32, device=DEVICE) if fp8 else None
        got = moe_permute.low_latency_send_rows(x, idx, world, num_local, t_max, meta, rows, scales)
        return (*got, meta, rows, *(() if scales is None else (scales,)))

    for fn, attr in ((receive, "_RECEIVE_SLOTS"), (lambda: send_rows(False), "_SEND_ROWS_TOKENS"),
                     (lambda: send_rows(True), "_SEND_ROWS_TOKENS")):
        monkeypatch.setattr(moe_permute, attr, 256)
        want = fn()
        monkeypatch.setattr(moe_permute, attr, 16)
        monkeypatch.setattr(moe_permute, "_SEND_ROWS_BLOCKS", 1)  # the payload in one program per block
        got = fn()
        monkeypatch.setattr(moe_permute, "_SEND_ROWS_BLOCKS", 8)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), (attr, i)
    # the receiver's pairs as the torch ops derive them, duplicate ids in a row included (the first names the pair)
    from deepport.backends.torch.moe_low_latency import _pairs
    from deepport.backends.torch.moe_routes import local_ids

    recv_token, recv_local, valid, position, count, target, _ = receive()
    assert torch.equal(recv_token, meta[:, 0].to(torch.int64))
    want_local = torch.where(meta[:, :1] >= 0, local_ids(meta[:, 1:].to(torch.int64), 1, num_local), -1)
    repeats = (want_local[:, :, None] == want_local[:, None, :]) & (want_local[:, :, None] >= 0)
    assert int(torch.triu(repeats.to(torch.int8), diagonal=1).sum()) > 0  # some row names a local expert twice
    want_valid, want_position, want_count = _pairs(want_local, num_local)
    assert torch.equal(recv_local, want_local) and torch.equal(valid, want_valid) and torch.equal(count, want_count)
    assert torch.equal(position[want_valid], want_position[want_valid])
    assert torch.equal(target, torch.where(want_valid, want_local * slots + want_position, -1))
    # what the torch ops derive: ranks, rows in each rank's block, metadata of the sent rows, the rest token -1
    in_rank = selection_mask(idx, world, num_local)
    send_slot = running_slot(in_rank)
    target = torch.where(send_slot >= 0, torch.arange(world, device=DEVICE)[None, :] * t_max + send_slot, -1)
    tok, rank = torch.nonzero(target >= 0, as_tuple=True)
    want_meta = torch.full((slots, 1 + k), -1, dtype=torch.int32, device=DEVICE)
    want_meta[target[tok, rank]] = torch.cat([tok.to(torch.int32)[:, None], idx[tok].to(torch.int32)], dim=1)
    for fp8 in (False, True):
        got_rows = send_rows(fp8)
        assert torch.equal(got_rows[0], in_rank) and torch.equal(got_rows[1], send_slot)
        assert torch.equal(got_rows[2], target)
        sent = want_meta[:, 0] >= 0  # unused rows: token -1, their ids left as they were
        assert torch.equal(got_rows[3][:, 0], want_meta[:, 0]) and torch.equal(got_rows[3][sent], want_meta[sent])
        payload, scales = moe_permute.cast_fp8(x) if fp8 else (x, None)
        expect = torch.zeros_like(got_rows[4])
        expect.view(payload.dtype)[target[tok, rank]] = payload[tok]
        assert torch.equal(got_rows[4].view(torch.uint8), expect.view(torch.uint8)), fp8
        if scales is not None:
            expect_s = torch.zeros_like(got_rows[5])
            expect_s[target[tok, rank]] = scales[tok]
            assert torch.equal(got_rows[5], expect_s)
