"""FP8 block scaling: the quantizers, the scale-factor layouts and the UE8M0 packing (DeepGEMM's helpers).

Every FP8 GEMM in deepport multiplies ``float8_e4m3fn`` operands by **dequantization** scale factors
(SFs): ``x ~ x_fp8 * sf``, one SF per block of ``gran_mn x gran_k`` elements (``gran_k = 128``).

SF formats and layouts (logical shape ``[..., MN, ceil(K / 128)]``, or ``[..., ceil(MN / 128), ...]``
for 128x128 weight blocks):

- **float32**: any positive finite value, ``amax / 448`` as produced by the quantizers here.
- **MN-major, TMA-aligned**: ``stride(-2) == 1`` and ``stride(-1) == align(MN, 4)`` (16 bytes of 4-byte
  elements), batch stride ``stride(-1) * size(-1)``. :func:`get_mn_major_tma_aligned_tensor` returns it;
  the padding elements (rows ``MN .. align(MN, 4) - 1`` of each column) are never read by an op.
- **UE8M0, packed**: each SF is a power of two ``2**(e - 127)`` stored as its biased exponent byte
  ``e`` (the fp32 bits ``>> 23``); four consecutive K-block bytes form one little-endian int32 (K-block
  ``4*j + i`` in byte ``i`` of word ``j``), giving int32 ``[..., MN, ceil(ceil(K / 128) / 4)]``. Bytes past
  the last K block are 0. :func:`get_mn_major_tma_aligned_packed_ue8m0_tensor` lays it out MN-major.
"""

from __future__ import annotations

import torch

from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk

FP8_E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value; quantizers map a block's amax onto it."""
BLOCK_K = 128
"""K elements per scale factor (``gran_k``) in every recipe deepport accepts."""
BLOCK_MN = 128
"""Rows of B per scale factor in the default (1, 128, 128) recipe (128x128 weight blocks)."""
AMAX_FLOOR = 1e-4
"""A block's amax is clamped to at least float32(1e-4) before scaling (DeepEP's ``kFP8Margin``)."""
FP8_E4M3_MAX_INV = 0.00223214295692741870880126953125
"""float32(1 / 448), exactly (DeepEP's ``kFP8AmaxInv``): the scale is the amax times this float32 constant."""
TMA_ALIGNMENT_BYTES = 16
UE8M0_PER_INT32 = 4


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def align(x: int, alignment: int) -> int:
    """``x`` rounded up to a multiple of ``alignment``."""
    return ceil_div(x, alignment) * alignment


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """``x`` elements of ``element_size`` bytes, rounded up to a whole number of 16-byte units."""
    if TMA_ALIGNMENT_BYTES % element_size != 0:
        raise ValueError(f"element_size must divide {TMA_ALIGNMENT_BYTES}, got {element_size}")
    return align(x, TMA_ALIGNMENT_BYTES // element_size)


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group's segment in the M-grouped contiguous layout (DeepGEMM's 128)."""
    return 128


def num_k_blocks(k: int) -> int:
    """Scale factors per row along K: ``ceil(K / 128)``."""
    return ceil_div(k, BLOCK_K)


def num_packed_k_words(k: int) -> int:
    """int32 words per row of packed UE8M0 SFs: ``ceil(ceil(K / 128) / 4)``."""
    return ceil_div(num_k_blocks(k), UE8M0_PER_INT32)


# ---- UE8M0 ---------------------------------------------------------------------------------------

def ceil_to_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """Round positive finite float32 SFs **up** to a power of two, bit-exactly (``2**ceil(log2(sf))``),
    the biased exponent clamped to ``[1, 254]``. Returns float32 of ``sf``'s shape."""
    chk.expect_tensor("sf", sf)
    chk.expect_dtype("sf", sf, (torch.float32,))
    bits = sf.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    exponent = exponent.clamp(1, 254)
    return (exponent << 23).view(torch.float32).reshape(sf.shape)


def _ue8m0_exponents(sf: torch.Tensor) -> torch.Tensor:
    """Biased exponent bytes (int32 values in [1, 254]) of power-of-two SFs; raises on any other value."""
    bits = sf.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    bad = ((bits & 0x7FFFFF) != 0) | (bits < 0) | (exponent == 0) | (exponent == 255)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad.reshape(sf.shape))[0])
        raise InvalidArgumentError("sf", f"expected positive normal powers of two (UE8M0), got sf{list(index)} = "
                                   f"{float(sf[index])!r}; round with ceil_to_ue8m0 or quantize with use_ue8m0=True")
    return exponent


def pack_ue8m0(sf: torch.Tensor) -> torch.Tensor:
    """Pack float32 power-of-two SFs ``[..., MN, kb]`` into int32 ``[..., MN, ceil(kb / 4)]``, row-major.

    Byte ``i`` (little-endian) of word ``j`` holds the biased exponent of K-block ``4*j + i``; bytes past
    ``kb`` are 0. Raises :class:`InvalidArgumentError` if an SF is not a positive normal power of two.
    """
    chk.expect_tensor("sf", sf)
    chk.expect_dtype("sf", sf, (torch.float32,))
    if sf.dim() < 2:
        raise InvalidArgumentError("sf", f"expected at least 2 dimensions [..., MN, kb], got shape {tuple(sf.shape)}")
    chk.expect_data("sf", sf)  # the values are checked
    exponent = _ue8m0_exponents(sf)
    kb = int(sf.shape[-1])
    words = ceil_div(kb, UE8M0_PER_INT32)
    padded = torch.zeros((*sf.shape[:-1], words * UE8M0_PER_INT32), dtype=torch.int64, device=sf.device)
    padded[..., :kb] = exponent.to(torch.int64)
    grouped = padded.reshape(*sf.shape[:-1], words, UE8M0_PER_INT32)
    shifts = torch.arange(UE8M0_PER_INT32, device=sf.device, dtype=torch.int64) * 8
    packed = (grouped << shifts).sum(dim=-1)  # < 2**32, exact in int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(torch.int32).contiguous()


def unpack_ue8m0(packed: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """The inverse of :func:`pack_ue8m0`: int32 ``[..., MN, words]`` (any strides) to float32
    ``[..., MN, k_blocks]`` powers of two. A zero exponent byte decodes to 0.0 (never produced for a
    real K block)."""
    chk.expect_tensor("packed", packed)
    chk.expect_dtype("packed", packed, (torch.int32,))
    if packed.dim() < 1:
        raise InvalidArgumentError("packed", "expected at least 1 dimension [..., words], got a 0-dimensional tensor")
    chk.expect_int("k_blocks", k_blocks, minimum=0)
    words = int(packed.shape[-1])
    if ceil_div(k_blocks, UE8M0_PER_INT32) != words:
        raise InvalidArgumentError("packed", f"expected ceil({k_blocks} / 4) = {ceil_div(k_blocks, 4)} words per "
                                   f"row for {k_blocks} K blocks, got {words}")
    wide = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(UE8M0_PER_INT32, device=packed.device, dtype=torch.int64) * 8
    exponents = ((wide.unsqueeze(-1) >> shifts) & 0xFF).reshape(*packed.shape[:-1], words * UE8M0_PER_INT32)
    exponents = exponents[..., :k_blocks].to(torch.int32)
    return (exponents << 23).contiguous().view(torch.float32)


# ---- layouts --------------------------------------------------------------------------------------

def is_mn_major_tma_aligned(sf: torch.Tensor) -> bool:
    """Whether ``sf`` (``[MN, k]`` or ``[G, MN, k]``, 4-byte elements) has exactly the MN-major TMA layout."""
    if sf.dim() not in (2, 3) or sf.element_size() != 4:
        return False
    mn, k = int(sf.shape[-2]), int(sf.shape[-1])
    col = get_tma_aligned_size(mn, 4)
    ok = (mn <= 1 or sf.stride(-2) == 1) and (k <= 1 or sf.stride(-1) == col)
    if sf.dim() == 3 and int(sf.shape[0]) > 1:
        ok = ok and sf.stride(0) == col * k
    return ok


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """``sf`` (float32 or int32, ``[MN, k]`` or ``[G, MN, k]``) with the same values laid out MN-major and
    TMA-aligned: ``stride(-2) == 1``, ``stride(-1) == align(MN, 4)``, group stride ``align(MN, 4) * k``.

    Returns ``sf`` itself when it already has that layout, else a copy whose padding rows are zero.
    """
    chk.expect_tensor("sf", sf)
    chk.expect_dtype("sf", sf, (torch.float32, torch.int32))
    if sf.dim() not in (2, 3):
        raise InvalidArgumentError("sf", f"expected 2 or 3 dimensions ([MN, k] or [G, MN, k]), got shape "
                                   f"{tuple(sf.shape)}")
    if is_mn_major_tma_aligned(sf):
        return sf
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    g, mn, k = (int(x) for x in batched.shape)
    col = get_tma_aligned_size(mn, 4)
    storage = torch.zeros((g, k, col), dtype=sf.dtype, device=sf.device)
    storage[:, :, :mn] = batched.transpose(1, 2)
    aligned = storage.transpose(1, 2)[:, :mn, :]
    return aligned if sf.dim() == 3 else aligned[0]


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two SFs ``[MN, kb]`` / ``[G, MN, kb]`` packed four per int32 along K
    (:func:`pack_ue8m0`) and laid out MN-major, TMA-aligned (:func:`get_mn_major_tma_aligned_tensor`)."""
    return get_mn_major_tma_aligned_tensor(pack_ue8m0(sf))


# ---- quantizers -----------------------------------------------------------------------------------

def amax_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's per-block scales of float32 block amaxes, bit for bit on every device:
    ``(sf, multiplier)`` with ``a = max(amax, float32(1e-4))``,

    - ``sf = float32(a * float32(1/448))``: ONE float32 multiplication by the float32 reciprocal
      (``kFP8AmaxInv``), not a division by 448 (the two differ in the last bit for about half of all
      amaxes; CUDA torch's ``tensor / 448`` happens to multiply by the reciprocal, CPU torch divides);
    - ``multiplier = float32(448 / a)``, a correctly rounded float32 division (``kFP8Amax / amax``);
      DeepEP quantizes ``e4m3(float32(x * multiplier))`` (round to nearest even, saturating).

    Both are one correctly rounded float32 operation on exactly representable operands, so every
    IEEE device (and NumPy's float32) gives the same bits.
    """
    a = amax.to(torch.float32).clamp(min=AMAX_FLOOR)
    sf = a * FP8_E4M3_MAX_INV  # float32 x float32(1/448): exact operands, one rounding
    multiplier = torch.full_like(a, FP8_E4M3_MAX) / a  # tensor / tensor: a true division on CPU and CUDA
    return sf, multiplier


def _scale_of(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    sf = amax_scales(amax)[0]
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[M, K]`` (float32/bf16/fp16) with one SF per row and 128-wide K block (1x128).

    ``sf[m, j] = float32(max(amax(x[m, 128*j : 128*(j+1)]), 1e-4) * float32(1/448))`` (DeepEP's rule,
    :func:`amax_scales`; rounded up to a power of two when ``use_ue8m0``), ``x_fp8 =
    float8_e4m3fn(x / sf)`` in float32 arithmetic (round to nearest). A K tail
    shorter than 128 is its own block. Returns ``(x_fp8 [M, K] contiguous, sf float32 [M, ceil(K/128)]
    row-major)``.
    """
    chk.expect_tensor("x", x)
    chk.expect_bool("use_ue8m0", use_ue8m0)
    chk.expect_dtype("x", x, (torch.float32, torch.bfloat16, torch.float16))
    chk.expect_ndim("x", x, 2, "[M, K]")
    m, k = (int(s) for s in x.shape)
    kb = num_k_blocks(k)
    padded = torch.zeros((m, kb * BLOCK_K), dtype=torch.float32, device=x.device)
    padded[:, :k] = x.to(torch.float32)
    blocks = padded.view(m, kb, BLOCK_K)
    sf = _scale_of(blocks.abs().amax(dim=-1), use_ue8m0)
    q = (blocks / sf.unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, kb * BLOCK_K)[:, :k]
    return q.contiguous(), sf.contiguous()


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[N, K]`` with one SF per 128x128 block (weights): as :func:`per_token_cast_to_fp8`
    but the amax is taken over each block (edge blocks are the rows/columns that exist). Returns
    ``(x_fp8 [N, K] contiguous, sf float32 [ceil(N/128), ceil(K/128)] row-major)``."""
    chk.expect_tensor("x", x)
    chk.expect_bool("use_ue8m0", use_ue8m0)
    chk.expect_dtype("x", x, (torch.float32, torch.bfloat16, torch.float16))
    chk.expect_ndim("x", x, 2, "[N, K]")
    n, k = (int(s) for s in x.shape)
    nb, kb = ceil_div(n, BLOCK_MN), num_k_blocks(k)
    padded = torch.zeros((nb * BLOCK_MN, kb * BLOCK_K), dtype=torch.float32, device=x.device)
    padded[:n, :k] = x.to(torch.float32)
    blocks = padded.view(nb, BLOCK_MN, kb, BLOCK_K)
    sf = _scale_of(blocks.abs().amax(dim=(1, 3)), use_ue8m0)
    q = (blocks / sf[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * BLOCK_MN, kb * BLOCK_K)[:n, :k]
    return q.contiguous(), sf.contiguous()
