"""The dense FP8 GEMMs at their smallest legal sizes (M = 0 or 1, N = 1, K = 1, K one past a 128 block),
every layout and scale-factor format, on the torch and reference backends, against the block formula in
float64 (``fp8_grouped_inputs.blocked_f64``, shared with no backend)."""

from __future__ import annotations

import pytest
import torch
from fp8_grouped_inputs import blocked_f64

import deepport
from deepport.kernels.fp8_layout import pack_ue8m0, per_block_cast_to_fp8, per_token_cast_to_fp8

pytestmark = pytest.mark.usefixtures("clean_env")

BACKENDS = ("torch", "reference")
SHAPES = [(1, 1, 1), (0, 1, 1), (1, 1, 129), (2, 1, 1), (1, 3, 1), (3, 129, 2)]


def operands(m: int, n: int, k: int, ue8m0: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a, sfa = per_token_cast_to_fp8(torch.randn(m, k, generator=g), use_ue8m0=ue8m0)
    if ue8m0:
        b, sfb = per_token_cast_to_fp8(torch.randn(n, k, generator=g), use_ue8m0=True)
    else:
        b, sfb = per_block_cast_to_fp8(torch.randn(n, k, generator=g))
    return a, sfa, b, sfb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_smallest_shapes_match_the_block_formula(backend: str, layout: str, ue8m0: bool, m: int, n: int,
                                                 k: int) -> None:
    a, sfa, b, sfb = operands(m, n, k, ue8m0)
    want = blocked_f64(a, sfa, b, sfb, 1 if ue8m0 else 128)
    if ue8m0:
        sfa, sfb = pack_ue8m0(sfa), pack_ue8m0(sfb)
    if layout[0] == "t":
        a, sfa = a.t().contiguous(), sfa.t().contiguous()
    if layout[1] == "n":
        b, sfb = b.t().contiguous(), sfb.t().contiguous()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    getattr(deepport, f"fp8_gemm_{layout}")((a, sfa), (b, sfb), out, backend=backend)
    assert not out.isnan().any()
    assert torch.allclose(out.double(), torch.from_numpy(want), rtol=2**-8, atol=1e-12)  # exact cancellation
