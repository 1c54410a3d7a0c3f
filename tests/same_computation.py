"""Comparing two runs of one computation on the torch backend's CPU path.

Its dense ops (MLA decode, FP8 GEMMs) go through the CPU BLAS, whose bits are not promised call to call: a
CI machine twice returned bf16 outputs one ulp apart for identical inputs (``deepport.backends.torch.
determinism``). Two runs of the same computation therefore agree exactly in every integer and one-byte
(FP8) element and to a few units in the last place in floating ones; a different computation (another
backend, another op, a wrong argument) misses that by orders of magnitude.
"""

from __future__ import annotations

import torch

# Units in the last place allowed per floating dtype: one for the 8-bit-mantissa outputs (a float32 result
# rounded once), more for float32 outputs such as the LSE (accumulated in float32).
_ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 64, torch.float64: 64}


def assert_same_up_to_rounding(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """``got`` equals ``want`` bit for bit, or, for floating dtypes of two bytes or more, to within a few
    units in the last place (``_ULPS``); NaN only where ``want`` has NaN; shapes and dtypes equal."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), (what, got.shape, got.dtype, want.shape, want.dtype)
    if not got.dtype.is_floating_point or got.element_size() == 1:
        assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                           want.view(torch.uint8) if want.element_size() == 1 else want), what
        return
    ulps, info = _ULPS[got.dtype], torch.finfo(got.dtype)
    torch.testing.assert_close(got, want, rtol=ulps * info.eps, atol=ulps * info.tiny, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
