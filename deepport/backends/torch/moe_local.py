"""The local (single-device) data movement of the MoE layouts, as three replaceable steps.

:mod:`deepport.backends.torch.moe_layouts` does the routing and the multi-rank exchange and calls these
steps for the per-device work; another backend passes its own :class:`LocalSteps` (the triton backend's
kernels) and reuses everything else.

- ``place_rows(src, dst, index, zero_missing)``: ``dst[g, i] = src[index[g, i]]`` for every
  ``index >= 0`` (whole rows, bit for bit); ``-1`` rows are zeroed when ``zero_missing`` and left
  untouched otherwise. ``src [n, C]``, ``dst [G, R, C]`` with any strides, ``index`` int64 ``[G, R]``.
- ``weighted_rows(y, src_pos, dst_row, weights, num_rows)``: float32 ``[num_rows, C]`` with
  ``out[dst_row[j]] += weights[j] * y[src_pos[j]]`` (``y [n, C]`` bf16, the others ``[k]``).
- ``cast_fp8(x)``: bf16 ``[T, H]`` -> (e4m3 ``[T, H]``, float32 scales ``[T, H / 128]``): per 128
  channels ``amax = max(|x|, 1e-4)``, ``scale = amax / 448``, ``fp8 = round_to_e4m3(x * (448 / amax))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepport.kernels.moe_args import FP8, FP8_BLOCK
from deepport.kernels.moe_low_latency_dispatch import AMAX_FLOOR, FP8_MAX


@dataclass(frozen=True)
class LocalSteps:
    place_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]
    weighted_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    cast_fp8: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    amax = blocks.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    data = (blocks * (FP8_MAX / amax)[:, :, None]).to(FP8).view(t, hidden)
    return data, amax / FP8_MAX


TORCH = LocalSteps(place_rows, weighted_rows, cast_fp8)
