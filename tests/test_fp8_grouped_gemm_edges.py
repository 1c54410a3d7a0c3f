"""The M-grouped FP8 GEMMs at their smallest legal sizes (one group, N = 1, K = 1, a single real row in
a 128-row block, M_max = 1 with masked_m 0 or 1), on the torch and reference backends, against the block
formula in float64."""

from __future__ import annotations

import pytest
import torch
from fp8_grouped_inputs import blocked_f64, contiguous_inputs, masked_inputs

import deepport

pytestmark = pytest.mark.usefixtures("clean_env")

BACKENDS = ("torch", "reference")
SIZES = [(1, 1), (1, 129), (3, 1)]  # (N, K)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "k"), SIZES)
@pytest.mark.parametrize("rows", [[1], [0, 1], [1, 0, 128]])
def test_contiguous_with_single_rows_and_empty_groups(backend: str, n: int, k: int, rows: list[int]) -> None:
    q, m_indices = contiguous_inputs(rows, n=n, k=k, seed=n + k)
    out = torch.full((int(m_indices.shape[0]), n), float("nan"), dtype=torch.bfloat16)
    deepport.m_grouped_fp8_gemm_nt_contiguous(q.pair_a, q.pair_b, out, m_indices, backend=backend)
    for g in range(len(rows)):
        sel = m_indices == g
        if sel.any():
            want = blocked_f64(q.a[sel], q.sfa[sel], q.b[g], q.sfb[g], q.gran_n)
            assert torch.allclose(out[sel].double(), torch.from_numpy(want), rtol=2**-8, atol=0)
    assert torch.equal(out[m_indices < 0].view(torch.int16), torch.zeros_like(out[m_indices < 0]).view(torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "k"), SIZES)
@pytest.mark.parametrize("masked", [[1], [0], [1, 0]])
def test_masked_with_one_row_per_group(backend: str, n: int, k: int, masked: list[int]) -> None:
    q, masked_m = masked_inputs(len(masked), 1, masked, n=n, k=k, seed=n * k)
    before = torch.full((len(masked), 1, n), 7.0, dtype=torch.bfloat16)
    out = before.clone()
    deepport.m_grouped_fp8_gemm_nt_masked(q.pair_a, q.pair_b, out, masked_m, 1, backend=backend)
    for g, m in enumerate(masked):
        if m:
            want = blocked_f64(q.a[g, :m], q.sfa[g, :m], q.b[g], q.sfb[g], q.gran_n)
            assert torch.allclose(out[g, :m].double(), torch.from_numpy(want), rtol=2**-8, atol=0)
        else:
            assert torch.equal(out[g], before[g])
