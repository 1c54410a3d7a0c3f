"""Tensors past 2^31 elements on the GPU: every backend that runs the op on CUDA (torch, triton, hopper)
computes the right answer where a 32-bit element offset would wrap (skipped without a CUDA device, or
where the device has too little free memory). One call on the device machine:

    python -m pytest -q -p no:cacheprovider -m gpu tests/test_large_sizes_gpu.py

- FP8 GEMM NT with ``M * K > 2^31`` (A of 2.1 GB): sampled rows (at the start, around the 2^31st element of
  A, at the end) against the float64 reference, no NaN left in ``out``.
- FP8 GEMM TN with ``M > 2^31 / 127`` rows: A is ``[K, M]``, so in NT form its K stride is ``M`` and a
  128-wide K tile spans ``127 * M`` elements (the triton kernel's pointer path computed that in int32).
- MLA decode over a cache of more than 2^31 elements, pages on both sides of the 2^31st element, the
  rest of the cache NaN (never read), against the float64 reference on a compacted cache.
- MoE: the expanded and low-latency dispatch + combine of a ``[T, 7168]`` bf16 payload with
  ``T * 7168 > 2^31`` round-trip bit for bit (top-1, weight 1); the layout counts of ``T * 8 > 2^31``
  routing entries equal their closed form.

The CPU checks of the same sizes (validation on meta tensors) are tests/test_large_sizes.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import deepport
from deepport.dispatch import registry
from deepport.errors import BackendNotSupportedError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TWO_31 = 2**31
GIB = 1 << 30


@pytest.fixture(autouse=True)
def _free_memory() -> Iterator[None]:
    yield
    torch.cuda.empty_cache()


def _need(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * GIB:
        pytest.skip(f"needs {gib:g} GiB of free GPU memory, {free / GIB:.1f} GiB free")


def _backend(name: str, op: str) -> None:
    backend = registry.get(name)
    if backend.unavailable_reason is not None:
        pytest.skip(f"{name} unavailable: {backend.unavailable_reason}")
    if backend.support(op) is None:
        pytest.skip(f"{name} does not implement {op}")


def _fp8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random finite e4m3 values of magnitude up to 8 (random bytes; NaN encodings avoided), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    raw = torch.randint(0, 0x50, shape, dtype=torch.uint8, device="cuda", generator=g)
    raw |= (raw & 1) << 7  # the sign from the lowest mantissa bit
    return raw.view(torch.float8_e4m3fn)


def _scales(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return 0.5 + torch.rand(shape, device="cuda", generator=g)


def _close_rows(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within two bf16 steps of the reference (the backends accumulate in float32 in another order, then round
    once; a step is up to 2**-7 of the value); a wrong row read (a wrapped offset) is off by the rows' whole
    magnitude."""
    got, want = got.float(), want.float()
    rms = want.pow(2).mean().sqrt()
    bad = (got - want).abs() > 2**-6 * want.abs() + 1e-3 * rms
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements off, max diff {(got - want).abs().max()}"


def _sample_rows(m: int, around: int) -> torch.Tensor:
    """Rows at the start, around row ``around`` and at the end."""
    rows = torch.cat([torch.arange(0, 32), torch.arange(around - 16, around + 16), torch.arange(m - 64, m)])
    return rows.unique().cuda()


# --- FP8 GEMM -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton", "hopper"])
def test_fp8_gemm_nt_with_a_past_2_31_elements(backend: str) -> None:
    _backend(backend, "fp8_gemm_nt")
    _need(12)
    m, n, k = TWO_31 // 1024 + 320, 256, 1024  # M * K = 2^31 + 327,680
    a, sfa = _fp8((m, k), 1), _scales((m, k // 128), 2)
    b, sfb = _fp8((n, k), 3), _scales((n // 128, k // 128), 4)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_nt((a, sfa), (b, sfb), out, backend=backend)
    torch.cuda.synchronize()
    assert not bool(out.isnan().any()), "rows left unwritten"
    rows = _sample_rows(m, TWO_31 // k)  # the rows from TWO_31 // k on start past the 2^31st element of A
    want = torch.empty((rows.numel(), n), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_nt((a[rows].contiguous(), sfa[rows].contiguous()), (b, sfb), want, backend="reference")
    _close_rows(out[rows], want, f"{backend} fp8_gemm_nt M={m} K={k}")


@pytest.mark.parametrize("backend", ["torch", "triton", "hopper"])
def test_fp8_gemm_tn_with_more_rows_than_2_31_over_127(backend: str) -> None:
    _backend(backend, "fp8_gemm_tn")
    _need(30)
    m, n, k = 17_000_000, 64, 256  # 127 * M > 2^31: A's K tile spans more elements than int32 holds
    a, sfa = _fp8((k, m), 5), _scales((k // 128, m), 6)  # tn: A [K, M], SFA [K / 128, M]
    b, sfb = _fp8((k, n), 7), _scales((k // 128, 1), 8)  # B [K, N], SFB [K / 128, ceil(N / 128)]
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_tn((a, sfa), (b, sfb), out, backend=backend)
    torch.cuda.synchronize()
    assert not bool(out.isnan().any()), "rows left unwritten"
    rows = _sample_rows(m, TWO_31 // 127)  # every row's K tile spans 127 * M elements
    want = torch.empty((rows.numel(), n), dtype=torch.bfloat16, device="cuda")
    deepport.fp8_gemm_tn((a[:, rows].contiguous(), sfa[:, rows].contiguous()), (b, sfb), want, backend="reference")
    _close_rows(out[rows], want, f"{backend} fp8_gemm_tn M={m}")


# --- MLA decode -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton", "hopper"])
def test_mla_decode_over_a_cache_past_2_31_elements(backend: str) -> None:
    _backend(backend, "mla_decode")
    _need(12)
    page, d_qk, d_v = 64, 576, 512
    per_block = page * d_qk
    num_blocks = TWO_31 // per_block + 1800  # 2.2e9 elements; block ids above 58,254 start past 2^31
    first_past = TWO_31 // per_block + 1
    cache = torch.full((num_blocks, page, 1, d_qk), float("nan"), dtype=torch.bfloat16, device="cuda")
    lens = [700, 1500, 64, 333]
    pages = [-(-n // page) for n in lens]
    g = torch.Generator().manual_seed(9)
    high = iter((first_past + torch.randperm(num_blocks - first_past, generator=g)).tolist())
    low = iter(torch.randperm(first_past, generator=g).tolist())
    table = torch.zeros((len(lens), max(pages)), dtype=torch.int32)
    used: list[int] = []
    for i, n in enumerate(pages):  # requests 0 and 2 read past 2^31 only, 1 alternates sides, 3 before it
        chosen = [next(high if i in (0, 2) or (i == 1 and j % 2 == 0) else low) for j in range(n)]
        used += chosen
        table[i, :n] = torch.tensor(chosen, dtype=torch.int32)
    for block in used:
        cache[block] = (torch.randn(page, 1, d_qk, generator=g) / 4).to(torch.bfloat16).cuda()
    q = (torch.randn(len(lens), 1, 16, d_qk, generator=g) / 4).to(torch.bfloat16).cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    try:
        out, lse = deepport.mla_decode(q, cache, table.cuda(), seqlens, d_v, backend=backend)
    except BackendNotSupportedError as exc:
        pytest.skip(f"{backend}: {'; '.join(exc.reasons)}")
    torch.cuda.synchronize()
    # the same call on a compacted cache (only the used blocks), by the float64 reference
    position = {block: i for i, block in enumerate(used)}
    small = cache[torch.tensor(used, device="cuda")].clone()
    small_table = torch.tensor([[position.get(int(x), 0) for x in row] for row in table], dtype=torch.int32)
    ref, ref_lse = deepport.mla_decode(q, small, small_table.cuda(), seqlens, d_v, backend="reference")
    rms = ref.float().pow(2).mean().sqrt()
    assert not bool(out.isnan().any()), "NaN: a page past the request's blocks was read"
    assert torch.all((out.float() - ref.float()).abs() <= 2.01 / 128 * (ref.float().abs() + rms))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)


# --- MoE ------------------------------------------------------------------------------------------------------

HIDDEN = 7168
TOKENS = TWO_31 // HIDDEN + 1000  # T * H = 2.155e9


def _payload() -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(11)
    return torch.randn((TOKENS, HIDDEN), dtype=torch.bfloat16, device="cuda", generator=g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_expanded_round_trip_past_2_31_elements(backend: str) -> None:
    _backend(backend, "moe_dispatch_expanded")
    _need(40)
    experts, align = 8, 128
    x = _payload()
    idx = (torch.arange(TOKENS, device="cuda") % experts)[:, None]  # top-1: token t to expert t % 8
    weights = torch.ones((TOKENS, 1), device="cuda")
    got = deepport.moe_dispatch_expanded(x, idx, weights, experts, expert_alignment=align, backend=backend)
    recv = got.recv_x
    assert isinstance(recv, torch.Tensor)
    counts = [len(range(e, TOKENS, experts)) for e in range(experts)]
    assert got.num_recv_tokens_per_expert == [-(-c // align) * align for c in counts]
    start = 0
    for e in range(experts):  # expert e's rows: its tokens in token order, then zero padding
        assert torch.equal(recv[start: start + counts[e]], x[e::experts]), f"expert {e}'s rows"
        assert not bool(recv[start + counts[e]: start + got.num_recv_tokens_per_expert[e]].any())
        start += got.num_recv_tokens_per_expert[e]
    back = deepport.moe_combine_expanded(recv, got.handle, backend=backend)
    assert torch.equal(back, x), "combine(dispatch(x)) with weight 1 must give x back bit for bit"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_low_latency_round_trip_past_2_31_elements(backend: str) -> None:
    _backend(backend, "moe_low_latency_dispatch")
    _need(40)
    x = _payload()
    idx = torch.zeros((TOKENS, 1), dtype=torch.int64, device="cuda")  # one expert takes every token
    weights = torch.ones((TOKENS, 1), device="cuda")
    got = deepport.moe_low_latency_dispatch(x, idx, TOKENS, 1, use_fp8=False, backend=backend)
    recv = got.recv_x
    assert isinstance(recv, torch.Tensor) and recv.shape == (1, TOKENS, HIDDEN)
    assert got.recv_count.tolist() == [TOKENS]
    assert torch.equal(recv[0], x)
    back = deepport.moe_low_latency_combine(recv, idx, weights, got.handle, backend=backend)
    assert torch.equal(back, x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_layout_of_more_than_2_31_routing_entries(backend: str) -> None:
    _backend(backend, "moe_layout")
    _need(60)
    tokens, topk, experts = TWO_31 // 8 + 4096, 8, 16  # T * K = 2^31 + 32,768
    t = torch.arange(tokens, device="cuda", dtype=torch.int32)
    idx = ((t[:, None] + torch.arange(topk, device="cuda", dtype=torch.int32)) % experts).to(torch.int32)
    per_rank, per_expert, in_rank = deepport.moe_layout(idx, experts, 2, backend=backend)
    # token t names experts t % 16 ... t % 16 + 7 (mod 16): each expert is named by half the tokens;
    # rank 0 (experts 0-7) by every token but those with t % 16 == 8, rank 1 by all but t % 16 == 0
    phase = t % experts
    assert per_expert.tolist() == [tokens // 2] * experts
    assert per_rank.tolist() == [int((phase != 8).sum()), int((phase != 0).sum())]
    assert torch.equal(in_rank, torch.stack([phase != 8, phase != 0], 1))
