"""DeepEP's ``deep_ep.utils.math``: the metric, FP8 casts and routing helpers its tests use.

- ``calc_diff(x, y)``: DeepEP's form, ``1 - 2 sum((x+1)(y+1)) / sum((x+1)^2 + (y+1)^2)`` in float64,
  returned as a Python float (note the ``+1`` shift, unlike DeepGEMM's ``calc_diff``).
- ``per_token_cast_to_fp8(x)``: per token and 128 channels, ``sf = max(amax, 1e-4) / 448`` and
  ``e4m3(x * (448 / amax))``, bit for bit as DeepEP's kernels compute it
  (:func:`deepport.kernels.fp8_layout.amax_scales`); a channel tail shorter than 128 is its own block.
- ``per_token_cast_back(x_fp8, x_scales)``: ``x_fp8 * scale`` per block, as bf16; int32 scales are
  packed UE8M0 (four exponent bytes per word), as the low-latency dispatch returns with ``use_ue8m0``.
- ``inplace_unique(x, num_slots)``: each row of ``x`` replaced, in place, by its distinct values in
  ``[0, num_slots)`` in descending order, then ``-1``.
- ``create_grouped_scores``, ``hash_tensor(s)``, ``count_bytes``, ``ceil_div``, ``align``, ``safe_div``:
  as upstream.
"""

from __future__ import annotations

import torch

from deepport.compat.deep_gemm.testing import count_bytes  # the same helper in both upstreams' tests
from deepport.kernels import _checks as chk
from deepport.kernels import fp8_layout
from deepport.kernels.fp8_layout import align, ceil_div

__all__ = ["align", "calc_diff", "ceil_div", "count_bytes", "create_grouped_scores", "hash_tensor", "hash_tensors",
           "inplace_unique", "per_token_cast_back", "per_token_cast_to_fp8", "safe_div"]

BLOCK = fp8_layout.BLOCK_K


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity error (0 for equal tensors); see the module docstring."""
    xs, ys = x.double() + 1, y.double() + 1
    return float(1 - 2 * (xs * ys).sum() / (xs * xs + ys * ys).sum())


def safe_div(a: float, b: float) -> float:
    """``a / b``, and 0 for ``0 / 0`` (any other division by zero raises)."""
    if b == 0 and a == 0:
        return 0
    return a / b


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, N]`` -> ``(e4m3 [M, N], sf float32 [M, ceil(N / 128)])``; see the module docstring."""
    chk.expect_tensor("x", x)
    chk.expect_ndim("x", x, 2, "[num_tokens, hidden]")
    m, n = (int(s) for s in x.shape)
    blocks_n = ceil_div(n, BLOCK)
    padded = torch.zeros((m, blocks_n * BLOCK), dtype=torch.float32, device=x.device)
    padded[:, :n] = x.float()
    blocks = padded.view(m, blocks_n, BLOCK)
    sf, multiplier = fp8_layout.amax_scales(blocks.abs().amax(dim=2))
    data = (blocks * multiplier.unsqueeze(2)).to(torch.float8_e4m3fn).view(m, blocks_n * BLOCK)[:, :n]
    return data.contiguous(), sf


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """``x_fp8 [M, N]`` times its per-128-channel scales (float32 ``[M, ceil(N/128)]`` or packed UE8M0
    int32 ``[M, ceil(N/512)]``, any strides) as bf16 ``[M, N]``."""
    chk.expect_tensor("x_fp8", x_fp8)
    chk.expect_tensor("x_scales", x_scales)
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    chk.expect_ndim("x_fp8", x_fp8, 2, "[num_tokens, hidden]")
    m, n = (int(s) for s in x_fp8.shape)
    blocks_n = ceil_div(n, BLOCK)
    scales = x_scales
    if scales.dtype == torch.int32:
        scales = fp8_layout.unpack_ue8m0(scales, int(scales.shape[-1]) * fp8_layout.UE8M0_PER_INT32)
    chk.expect_dtype("x_scales", scales, (torch.float32,))
    scales = scales.reshape(m, -1)[:, :blocks_n]
    padded = torch.zeros((m, blocks_n * BLOCK), dtype=torch.float32, device=x_fp8.device)
    padded[:, :n] = x_fp8.float()
    restored = (padded.view(m, blocks_n, BLOCK) * scales.unsqueeze(2)).view(m, blocks_n * BLOCK)
    return restored.to(torch.bfloat16)[:, :n].contiguous()


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """Replace each row of the integer tensor ``x [rows, cols]`` by its distinct values in ``[0, num_slots)``,
    largest first, padded with -1 (at most ``num_slots`` values are kept)."""
    chk.expect_tensor("x", x)
    chk.expect_ndim("x", x, 2, "[rows, cols]")
    slots = chk.expect_int("num_slots", num_slots, minimum=0)
    present = torch.zeros((int(x.shape[0]), slots + 1), dtype=torch.bool, device=x.device)
    present.scatter_(1, x.masked_fill(x < 0, slots).long(), True)
    ids = torch.arange(slots, device=x.device, dtype=x.dtype).expand(int(x.shape[0]), slots)
    unique = torch.where(present[:, :slots], ids, -1).sort(dim=1, descending=True).values
    kept = min(slots, int(x.shape[1]))
    x.fill_(-1)
    x[:, :kept] = unique[:, :kept]


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``scores [T, E]`` with every expert outside the groups ``group_idx [T, k]`` selects zeroed (the
    experts form ``num_groups`` equal consecutive groups)."""
    tokens, experts = (int(s) for s in scores.shape)
    keep = torch.zeros((tokens, num_groups), dtype=torch.bool, device=scores.device)
    keep.scatter_(1, group_idx.long(), True)
    return (scores.view(tokens, num_groups, -1) * keep.unsqueeze(-1)).view(tokens, experts)


def hash_tensor(t: torch.Tensor) -> int:
    """The sum of ``t``'s bytes read as int32 (a cheap fingerprint to compare reruns)."""
    return int(t.view(torch.int32).sum().item())


def hash_tensors(*tensors: object) -> int:
    """XOR of :func:`hash_tensor` over every tensor given (tuples and lists are walked, ``None`` skipped)."""
    value = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            value ^= hash_tensors(*t)
        elif isinstance(t, torch.Tensor):
            value ^= hash_tensor(t)
    return value
