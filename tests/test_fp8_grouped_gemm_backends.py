"""Semantics of the M-grouped FP8 GEMMs on every CPU backend: the block-scaled product per group,
padding rows written as +0.0, rows past ``masked_m`` left bit for bit as they were, scale formats and
layouts that must not change the answer, and ``expected_m`` being only a hint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fp8_grouped_inputs import blocked_f64, contiguous_inputs, masked_inputs

import deepport
from deepport.kernels.fp8_layout import get_mn_major_tma_aligned_tensor, unpack_ue8m0

pytestmark = pytest.mark.usefixtures("clean_env")
BACKENDS = ["reference", "torch"]


def _poisoned(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.bfloat16)


def _close_to(got: torch.Tensor, want: np.ndarray) -> None:
    """Within one bfloat16 rounding (plus float32 accumulation) of the float64 value."""
    g = got.to(torch.float64).numpy()
    assert not np.isnan(g).any()
    bound = 2.01 * 2.0**-8 * np.abs(want) + 2.0**-9 * np.sqrt(np.mean(want**2))
    assert (np.abs(g - want) <= bound).all(), float(np.max(np.abs(g - want) - bound))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row_b", [False, True])
def test_contiguous_rows_use_their_groups_weights_and_padding_rows_are_zero(backend: str, per_row_b: bool) -> None:
    q, m_indices = contiguous_inputs([130, 0, 5, 128], per_row_b=per_row_b)
    out = _poisoned(int(m_indices.shape[0]), 160)
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, backend=backend,
                                              recipe=(1, 1, 128) if per_row_b else None)
    ids = m_indices.numpy()
    for g in range(4):
        rows = np.flatnonzero(ids == g)
        if rows.size:
            _close_to(out[rows], blocked_f64(q.a[rows], q.sfa[rows], q.b[g], q.sfb[g], q.gran_n))
    pad = torch.from_numpy(ids < 0)
    assert pad.sum() > 0
    assert torch.equal(out[pad].view(torch.int16), torch.zeros_like(out[pad].view(torch.int16)))  # +0.0 exactly


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_groups_may_come_in_any_order_and_share_nothing(backend: str) -> None:
    q, m_indices = contiguous_inputs([100, 60, 128])
    rows = torch.cat([torch.arange(256, 384), torch.arange(0, 128), torch.arange(128, 256)])  # g2, g0, g1
    out = _poisoned(384, 160)
    deepport.m_grouped_fp8_gemm_nt_contiguous((q.a[rows], q.sfa[rows]), q.pair_b, out, m_indices[rows],
                                              backend=backend)
    reference = _poisoned(384, 160)
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, reference, m_indices, backend=backend)
    assert torch.equal(out.view(torch.int16), reference[rows].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_padding_call_writes_zeros_everywhere(backend: str) -> None:
    q, _ = contiguous_inputs([200, 1])  # 384 rows of A; every one is padding in this call
    q.a.view(torch.uint8).fill_(0x7F)
    q.sfa.fill_(float("nan"))
    m_indices = torch.full((384,), -1, dtype=torch.int32)
    out = _poisoned(384, 160)
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, backend=backend)
    assert torch.equal(out.view(torch.int16), torch.zeros(384, 160, dtype=torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_with_no_rows_is_a_no_op(backend: str) -> None:
    q, _ = contiguous_inputs([1])
    a = (q.a[:0], q.sfa[:0])
    out = _poisoned(0, 160)
    deepport.m_grouped_fp8_gemm_nt_contiguous(a, q.pair_b, out, torch.zeros(0, dtype=torch.int32), backend=backend)
    assert out.shape == (0, 160)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [[0, 40, 7], [40, 40, 40], [0, 0, 0]])
def test_masked_computes_rows_below_masked_m_and_leaves_the_rest_bitwise(backend: str, masked: list[int]) -> None:
    q, masked_m = masked_inputs(3, 40, masked)
    before = torch.randn(3, 40, 160, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16) * 1000
    out = before.clone()
    deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, out, masked_m, 20, backend=backend)
    for g, m in enumerate(masked):
        if m:
            _close_to(out[g, :m], blocked_f64(q.a[g, :m], q.sfa[g, :m], q.b[g], q.sfb[g], q.gran_n))
        assert torch.equal(out[g, m:].view(torch.int16), before[g, m:].view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expected_m_is_only_a_hint(backend: str) -> None:
    q, masked_m = masked_inputs(2, 24, [24, 3])
    results = []
    for hint in (1, 3, 10**6):
        out = _poisoned(2, 24, 160)
        deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, out, masked_m, hint, backend=backend)
        results.append(out.view(torch.int16))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mn_major_sfa_gives_the_same_bits_as_row_major(backend: str) -> None:
    q, masked_m = masked_inputs(3, 37, [37, 5, 0])
    mn = get_mn_major_tma_aligned_tensor(q.sfa)
    assert mn.stride()[1:] == (1, 40)
    outs = []
    for sfa in (q.sfa, mn):
        out = torch.zeros(3, 37, 160, dtype=torch.bfloat16)
        deepport.m_grouped_fp8_gemm_nt_masked((q.a, sfa), q.pair_b, out, masked_m, 8, backend=backend)
        outs.append(out.view(torch.int16))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_ue8m0_scales_match_their_float32_powers_of_two(backend: str) -> None:
    packed, m_indices = contiguous_inputs([70, 128], ue8m0=True)
    as_float = (packed.a, unpack_ue8m0(packed.sfa, 2)), (packed.b, unpack_ue8m0(packed.sfb, 2))
    outs = []
    for a, b, recipe in ((packed.pair_a, packed.pair_b, None), (*as_float, (1, 1, 128))):
        out = _poisoned(256, 160)
        deepport.m_grouped_fp8_gemm_nt_contiguous(a, b, out, m_indices, recipe=recipe, backend=backend)
        outs.append(out.view(torch.int16))
    assert torch.equal(outs[0], outs[1])


def test_torch_and_reference_agree_to_one_rounding_on_a_k_tail() -> None:
    q, m_indices = contiguous_inputs([90, 128], k=320, n=200)
    outs = {}
    for backend in BACKENDS:
        out = _poisoned(256, 200)
        deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, backend=backend)
        outs[backend] = out
    want = outs["reference"].to(torch.float64).numpy()
    _close_to(outs["torch"], want)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_torch_backend_is_the_dense_torch_gemm_per_group(layout: str) -> None:
    if layout == "contiguous":
        q, m_indices = contiguous_inputs([70, 128, 3])
        out = _poisoned(384, 160)
        deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, backend="torch")
        segments = [(slice(0, 70), 0), (slice(128, 256), 1), (slice(256, 259), 2)]
        pieces = [(q.a[rows], q.sfa[rows], g, out[rows]) for rows, g in segments]
    else:
        q, masked_m = masked_inputs(3, 40, [40, 0, 7])
        out = _poisoned(3, 40, 160)
        deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, out, masked_m, 16, backend="torch")
        pieces = [(q.a[g, :m], q.sfa[g, :m], g, out[g, :m]) for g, m in ((0, 40), (2, 7))]
    for a, sfa, g, got in pieces:
        dense = _poisoned(*got.shape)
        deepport.fp8_gemm_nt((a, sfa), (q.b[g], q.sfb[g]), dense, backend="torch")
        assert torch.equal(got.view(torch.int16), dense.view(torch.int16))


def test_automatic_choice_on_cpu_is_torch() -> None:
    q, m_indices = contiguous_inputs([3])
    out = _poisoned(128, 160)
    explanation = deepport.explain("m_grouped_fp8_gemm_nt_contiguous", q.pair_a, q.pair_b, out, m_indices)
    assert explanation.chosen == "torch"
