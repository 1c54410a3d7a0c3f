"""The local (single-device) data movement of the MoE ops, as replaceable steps.

:mod:`deepport.backends.torch.moe_routes` and :mod:`deepport.backends.torch.moe_layouts` do the routing
and the multi-rank exchange and call these steps for the per-device work; another backend passes its own
:class:`LocalSteps` (the triton and opencl backends' kernels) and reuses everything else.

- ``place_rows(src, dst, index, zero_missing)``: ``dst[g, i] = src[index[g, i]]`` for every
  ``index >= 0`` (whole rows, bit for bit); ``-1`` rows are zeroed when ``zero_missing`` and left
  untouched otherwise. ``src [n, C]``, ``dst [G, R, C]`` with any strides, ``index`` int64 ``[G, R]``.
- ``weighted_rows(y, src_pos, dst_row, weights, num_rows)``: float32 ``[num_rows, C]`` with
  ``out[dst_row[j]] += weights[j] * y[src_pos[j]]`` (``y [n, C]`` bf16, the others ``[k]``).
- ``cast_fp8(x)``: bf16 ``[T, H]`` -> (e4m3 ``[T, H]``, float32 scales ``[T, H / 128]``), DeepEP's rule
  bit for bit (the op's docstring): per 128 channels ``amax = max(|x|, float32(1e-4))``, ``scale =
  float32(amax * float32(1/448))``, ``fp8 = e4m3(float32(x * float32(448 / amax)))``.
- ``take_rows(x, index)``: ``x[index]``, a new ``[k, C]`` tensor (``index`` int64 ``[k]``, no ``-1``): the
  rows a rank sends, in send order. Optional (default: torch indexing).
- ``sum_rows(rows, dst, n)``: float32 ``[n, C]``, row ``d`` the sum of the ``rows[e]`` with ``dst[e] == d``
  (0 where none): the per-token sum of the rows a combine returns. Optional (default: ``index_add_``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepport.kernels.fp8_layout import amax_scales
from deepport.kernels.moe_args import FP8, FP8_BLOCK


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[index]


def sum_rows(rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros((n, *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    total.index_add_(0, dst, rows.to(torch.float32))
    return total


@dataclass(frozen=True)
class LocalSteps:
    place_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]
    weighted_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    cast_fp8: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    take_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = take_rows
    sum_rows: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = sum_rows


def _raw(t: torch.Tensor) -> torch.Tensor:
    """One-byte payloads as uint8 (index_put is not implemented for e4m3 on every device)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def place_rows(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, zero_missing: bool) -> None:
    """A gather and a select over every row (no host read of ``index``: CUDA-graph capturable)."""
    target = _raw(dst)
    if int(src.shape[0]) == 0:  # nothing to place: every index is -1
        if zero_missing:
            target.zero_()
        return
    picked = _raw(src)[index.clamp(min=0)]  # [G, R, C]; rows of -1 read row 0, then dropped
    kept = torch.zeros((), dtype=target.dtype, device=target.device) if zero_missing else target
    target.copy_(torch.where((index >= 0)[..., None], picked, kept))


def weighted_rows(y: torch.Tensor, src_pos: torch.Tensor, dst_row: torch.Tensor, weights: torch.Tensor,
                  num_rows: int) -> torch.Tensor:
    out = torch.zeros((num_rows, int(y.shape[1])), dtype=torch.float32, device=y.device)
    out.index_add_(0, dst_row, y[src_pos].to(torch.float32) * weights[:, None])
    return out


def cast_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, hidden = int(x.shape[0]), int(x.shape[1])
    blocks = x.to(torch.float32).view(t, hidden // FP8_BLOCK, FP8_BLOCK)
    scale, multiplier = amax_scales(blocks.abs().amax(dim=2))
    data = (blocks * multiplier[:, :, None]).to(FP8).view(t, hidden)
    return data, scale


TORCH = LocalSteps(place_rows, weighted_rows, cast_fp8)
