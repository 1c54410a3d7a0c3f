"""DeepGEMM's ``deep_gemm.utils.math``: ``ceil_div``/``align``, UE8M0 rounding and packing, the FP8 quantizers.

All are deepport's own helpers (:mod:`deepport.kernels.fp8_layout`) under DeepGEMM's names and
signatures. The quantizers follow DeepGEMM's math (``sf = max(amax, 1e-4) / 448`` per 1x128 row block,
128x1 column block or 128x128 block, optionally rounded up to a power of two) and divide by ``sf``
where DeepGEMM multiplies by ``1 / sf``: the SFs are identical, and a rare element whose quotient lies
within one float32 rounding of an FP8 rounding boundary may round to the neighbouring FP8 value
(never with power-of-two SFs, where both are exact). Not provided: the FP4 helpers
(``per_token_cast_to_fp4``, ``cast_back_from_fp4``, ``transpose_packed_fp4``: deepport has no FP4 GEMM).
"""

from __future__ import annotations

import torch

from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels import fp8_layout
from deepport.kernels.fp8_layout import align, ceil_div, ceil_to_ue8m0, unpack_ue8m0

__all__ = [
    "align", "ceil_div", "ceil_to_ue8m0", "pack_ue8m0_to_int", "per_block_cast_to_fp8", "per_channel_cast_to_fp8",
    "per_custom_dims_cast_to_fp8", "per_token_cast_to_fp8", "unpack_ue8m0_from_int",
]


def _gran_k(gran_k: object) -> None:
    if chk.expect_int("gran_k", gran_k, minimum=1) != fp8_layout.BLOCK_K:
        raise InvalidArgumentError("gran_k", f"expected {fp8_layout.BLOCK_K} (deepport's FP8 GEMMs use 128-wide K "
                                   f"blocks), got {gran_k}")


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(e4m3 [M, K], sf [M, ceil(K/128)])``, one SF per row and 128 K (float32, or with
    ``use_packed_ue8m0`` int32 words of four exponent bytes; that needs ``use_ue8m0=True``)."""
    _gran_k(gran_k)
    data, sf = fp8_layout.per_token_cast_to_fp8(x, use_ue8m0=chk.expect_bool("use_ue8m0", use_ue8m0))
    return data, fp8_layout.pack_ue8m0(sf) if chk.expect_bool("use_packed_ue8m0", use_packed_ue8m0) else sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """``x [N, K]`` -> ``(e4m3 [N, K], sf float32 [ceil(N/128), ceil(K/128)])``, one SF per 128x128 block."""
    _gran_k(gran_k)
    return fp8_layout.per_block_cast_to_fp8(x, use_ue8m0=chk.expect_bool("use_ue8m0", use_ue8m0))


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """``x [K, N]`` (K a multiple of 128) -> ``(e4m3 [K, N], sf float32 [K/128, N])``: one SF per column and
    128 rows, the K-direction blocks of weight-gradient operands (``sf[j, n]`` covers ``x[128j:128j+128, n]``).
    Same math as :func:`per_token_cast_to_fp8` on ``x``'s transpose."""
    _gran_k(gran_k)
    chk.expect_tensor("x", x)
    chk.expect_ndim("x", x, 2, "[K, N]")
    if int(x.shape[0]) % fp8_layout.BLOCK_K != 0:
        raise InvalidArgumentError("x", f"expected K = x.shape[0] to be a multiple of {fp8_layout.BLOCK_K}, got "
                                   f"{int(x.shape[0])}")
    data, sf = fp8_layout.per_token_cast_to_fp8(x.t(), use_ue8m0=chk.expect_bool("use_ue8m0", use_ue8m0))
    return data.t().contiguous(), sf.t().contiguous()


def per_custom_dims_cast_to_fp8(x: torch.Tensor, dims: tuple[int, ...], use_ue8m0: bool) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """One SF per index of the kept ``dims`` (the amax is taken over every other dimension):
    ``(e4m3 of x's shape, sf float32)``, ``sf`` squeezed as upstream (e.g. ``[S]`` for ``dims=(0,)``)."""
    chk.expect_tensor("x", x)
    chk.expect_dtype("x", x, (torch.float32, torch.bfloat16, torch.float16))
    if not isinstance(dims, (tuple, list)) or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise InvalidArgumentError("dims", f"expected a tuple of dimension indices, got {dims!r}")
    kept = {d % x.dim() for d in dims} if x.dim() else set()
    reduced = tuple(i for i in range(x.dim()) if i not in kept)
    amax = x.abs().float().amax(dim=reduced, keepdim=True) if reduced else x.abs().float()
    sf = fp8_layout.amax_scales(amax)[0]
    sf = ceil_to_ue8m0(sf) if chk.expect_bool("use_ue8m0", use_ue8m0) else sf
    return (x.float() / sf).to(torch.float8_e4m3fn), sf.squeeze()


def pack_ue8m0_to_int(x: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two SFs ``[..., 4w]`` -> int32 ``[..., w]``, four exponent bytes per word (byte ``i``
    of word ``j`` = SF ``4j + i``). The last dimension must be a multiple of 4, as upstream; an SF that is
    not a positive power of two raises (upstream asserts it too)."""
    chk.expect_tensor("x", x)
    chk.expect_dtype("x", x, (torch.float32,))
    if x.dim() < 1 or int(x.shape[-1]) % fp8_layout.UE8M0_PER_INT32 != 0:
        raise InvalidArgumentError("x", f"expected a last dimension that is a multiple of 4, got shape "
                                   f"{tuple(x.shape)}")
    flat = x.reshape(-1, int(x.shape[-1])) if x.dim() >= 2 else x.reshape(1, -1)
    return fp8_layout.pack_ue8m0(flat).reshape(*x.shape[:-1], int(x.shape[-1]) // fp8_layout.UE8M0_PER_INT32)


def unpack_ue8m0_from_int(packed_sf: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_ue8m0_to_int`: int32 ``[..., w]`` -> float32 ``[..., 4w]`` powers of two
    (a zero byte gives 0.0, as upstream)."""
    chk.expect_tensor("packed_sf", packed_sf)
    words = int(packed_sf.shape[-1]) if packed_sf.dim() else 0
    return unpack_ue8m0(packed_sf, words * fp8_layout.UE8M0_PER_INT32)
