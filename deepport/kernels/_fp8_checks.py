"""Boundary checks shared by the FP8 GEMM op modules (dense and grouped): operands, scale factors,
recipes and outputs. Each raises with the argument's name, expected and got (see :mod:`._checks`).

Names follow DeepGEMM's tuples: ``a[0]`` is A, ``a[1]`` its SFs (SFA), ``b[0]`` is B, ``b[1]`` SFB.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels.fp8_layout import BLOCK_K, BLOCK_MN, ceil_div, num_k_blocks, num_packed_k_words

FP8_DTYPE = torch.float8_e4m3fn

SF_FLOAT32 = "float32"
"""Scale-factor format: float32 dequantization multipliers."""
SF_UE8M0 = "ue8m0"
"""Scale-factor format: power-of-two SFs as biased exponent bytes, four per int32 along K."""
SF_DTYPES = {torch.float32: SF_FLOAT32, torch.int32: SF_UE8M0}

Recipe = tuple[int, int, int]
RECIPE_1D2D: Recipe = (1, BLOCK_MN, BLOCK_K)
"""``(gran_m_a, gran_n_b, gran_k)``: SFA per row x 128 K; SFB per 128x128 block (DeepSeek-V3 inference)."""
RECIPE_1D1D: Recipe = (1, 1, BLOCK_K)
"""SFA and SFB both per row x 128 K (weight gradients; the only recipe of packed UE8M0 SFs)."""
RECIPES: tuple[Recipe, ...] = (RECIPE_1D2D, RECIPE_1D1D)


def expect_pair(name: str, value: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` must be a 2-sequence ``(data, scale_factors)`` of tensors."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        got = f"{type(value).__name__} of length {len(value)}" if isinstance(value, (tuple, list)) else \
            type(value).__name__
        raise ArgumentTypeError(name, f"expected a pair {what}, got {got}")
    return chk.expect_tensor(f"{name}[0]", value[0]), chk.expect_tensor(f"{name}[1]", value[1])


def expect_fp8_operand(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    """An FP8 operand: ``float8_e4m3fn``, ``ndim`` dimensions, last dimension contiguous."""
    chk.expect_dtype(name, t, (FP8_DTYPE,))
    chk.expect_ndim(name, t, ndim, layout)
    chk.expect_last_dim_contiguous(name, t)


def sf_format(name: str, sf: torch.Tensor) -> str:
    """:data:`SF_FLOAT32` or :data:`SF_UE8M0` from the SF tensor's dtype (float32 or int32)."""
    chk.expect_dtype(name, sf, tuple(SF_DTYPES))
    return SF_DTYPES[sf.dtype]


def expect_same_sf_format(name: str, sf: torch.Tensor, fmt: str, anchor: str) -> None:
    got = sf_format(name, sf)
    if got != fmt:
        raise ArgumentTypeError(name, f"expected the SF format of `{anchor}` ({fmt}, dtype "
                                f"{_dtype_of(fmt)}), got {got} (dtype {sf.dtype}); both operands use one format")


def _dtype_of(fmt: str) -> torch.dtype:
    return next(d for d, f in SF_DTYPES.items() if f == fmt)


def resolve_recipe(recipe: object, fmt: str) -> Recipe:
    """The call's recipe: ``recipe`` checked, or the default for the SF format (float32: (1, 128, 128),
    packed UE8M0: (1, 1, 128), as DeepGEMM's default)."""
    if recipe is None:
        return RECIPE_1D2D if fmt == SF_FLOAT32 else RECIPE_1D1D
    if not isinstance(recipe, (tuple, list)) or len(recipe) != 3 or \
            any(isinstance(x, bool) or not isinstance(x, int) for x in recipe):
        raise ArgumentTypeError("recipe", f"expected None or a tuple of 3 ints (gran_m_a, gran_n_b, gran_k), "
                                f"got {recipe!r}")
    resolved: Recipe = (int(recipe[0]), int(recipe[1]), int(recipe[2]))
    if resolved not in RECIPES:
        raise InvalidArgumentError("recipe", f"expected one of {', '.join(map(str, RECIPES))}, got {resolved}")
    if fmt == SF_UE8M0 and resolved != RECIPE_1D1D:
        raise InvalidArgumentError("recipe", f"packed UE8M0 scale factors (int32) need recipe {RECIPE_1D1D}, got "
                                   f"{resolved}; pass float32 SFs for {resolved}")
    return resolved


def sf_shape(mn: int, k: int, gran_mn: int, fmt: str) -> tuple[int, int]:
    """Logical ``[rows, cols]`` of one operand's SFs: ``ceil(MN / gran_mn)`` rows; ``ceil(K / 128)`` float32
    columns, or ``ceil(ceil(K / 128) / 4)`` int32 words when packed UE8M0."""
    cols = num_k_blocks(k) if fmt == SF_FLOAT32 else num_packed_k_words(k)
    return ceil_div(mn, gran_mn), cols


def _span(sizes: Sequence[int], strides: Sequence[int]) -> int:
    return 1 + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True) if s > 0)


def expect_sf_layout(name: str, sf: torch.Tensor) -> str:
    """The last two dimensions of ``sf`` must be row-major (``stride(-1) == 1``, ``stride(-2) >= size(-1)``)
    or MN-major (``stride(-2) == 1``, ``stride(-1) >= size(-2)``, e.g. DeepGEMM's TMA-aligned padding);
    a leading group dimension must not overlap the previous group. Padding between rows/columns is never
    read. Returns ``"row-major"`` or ``"mn-major"``."""
    rows, cols = int(sf.shape[-2]), int(sf.shape[-1])
    s_r, s_c = sf.stride(-2), sf.stride(-1)
    row_major = (cols <= 1 or s_c == 1) and (rows <= 1 or s_r >= cols)
    mn_major = (rows <= 1 or s_r == 1) and (cols <= 1 or s_c >= rows)
    if not (row_major or mn_major):
        raise InvalidArgumentError(
            name, f"expected a row-major (stride(-1) == 1, stride(-2) >= {cols}) or MN-major (stride(-2) == 1, "
            f"stride(-1) >= {rows}) layout of the last two dimensions, got shape {tuple(sf.shape)} with strides "
            f"{sf.stride()}")
    if sf.dim() == 3 and int(sf.shape[0]) > 1:
        group = _span(sf.shape[1:], sf.stride()[1:])
        if sf.stride(0) < group:
            raise InvalidArgumentError(name, f"expected groups that do not overlap (stride(0) >= {group}), got "
                                       f"shape {tuple(sf.shape)} with strides {sf.stride()}")
    return "row-major" if row_major else "mn-major"


def expect_scale_factors(name: str, sf: torch.Tensor, shape: Sequence[int], layout: str,
                         device: torch.device, anchor: str) -> str:
    """SFs of the expected ``shape`` (``layout`` describes it), on ``device``, in an accepted layout."""
    chk.expect_ndim(name, sf, len(shape), layout)
    chk.expect_shape(name, sf, shape, layout)
    chk.expect_same_device(name, sf, device, anchor)
    return expect_sf_layout(name, sf)


def expect_gemm_output(name: str, t: object, shape: Sequence[int], dtypes: Collection[torch.dtype],
                       device: torch.device, anchor: str, layout: str) -> torch.Tensor:
    """An output (or accumulator) ``[..., M, N]``: one of ``dtypes``, on ``device``, last dimension contiguous
    and rows that do not overlap (a row stride of at least ``N``)."""
    out = chk.expect_tensor(name, t)
    chk.expect_dtype(name, out, dtypes)
    chk.expect_ndim(name, out, len(shape), layout)
    chk.expect_shape(name, out, shape, layout)
    chk.expect_same_device(name, out, device, anchor)
    chk.expect_last_dim_contiguous(name, out)
    if out.numel() > 0 and _span(out.shape, out.stride()) < out.numel():
        raise InvalidArgumentError(name, f"expected elements that do not overlap, got shape {tuple(out.shape)} "
                                   f"with strides {out.stride()}")
    if out.dim() >= 2 and int(out.shape[-2]) > 1 and out.stride(-2) < int(out.shape[-1]):
        raise InvalidArgumentError(name, f"expected a row stride >= {int(out.shape[-1])} (rows must not overlap), "
                                   f"got strides {out.stride()}")
    return out


def same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``x`` and ``y`` are the same elements (same storage offset, shape and strides), e.g. ``c is d``."""
    return (x.device == y.device and x.data_ptr() == y.data_ptr() and x.shape == y.shape
            and x.stride() == y.stride() and x.dtype == y.dtype)
