"""Small valid inputs for the grouped FP8 GEMMs, and an independent float64 check of their result.

``blocked_f64`` recomputes the definition the way the docstring writes it, block by block
(``sum_kb SFA[m, kb] * SFB[g, n // gran_n, kb] * (A_blk @ B_blk^T)``), so it shares no code with the
reference backend (which dequantizes first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepport.kernels.fp8_layout import pack_ue8m0, per_block_cast_to_fp8, per_token_cast_to_fp8, unpack_ue8m0


@dataclass
class Grouped:
    a: torch.Tensor
    sfa: torch.Tensor
    b: torch.Tensor
    sfb: torch.Tensor
    gran_n: int

    @property
    def pair_a(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.sfa

    @property
    def pair_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b, self.sfb


def quantize(x: torch.Tensor, w: torch.Tensor, *, ue8m0: bool = False, per_row_b: bool = False) -> Grouped:
    """``x [..., K]`` per token, ``w [G, N, K]`` per 128x128 block (or per row); UE8M0 packs both."""
    k = int(x.shape[-1])
    a, sfa = per_token_cast_to_fp8(x.reshape(-1, k), use_ue8m0=ue8m0)
    per_row = per_row_b or ue8m0
    pairs = [per_token_cast_to_fp8(wg, use_ue8m0=ue8m0) if per_row else per_block_cast_to_fp8(wg) for wg in w]
    b, sfb = torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    if ue8m0:
        sfa, sfb = pack_ue8m0(sfa), pack_ue8m0(sfb)
    return Grouped(a.view(x.shape), sfa.view(*x.shape[:-1], int(sfa.shape[-1])), b, sfb, 1 if per_row else 128)


def contiguous_inputs(rows: list[int], *, n: int = 160, k: int = 256, seed: int = 0, ue8m0: bool = False,
                      per_row_b: bool = False) -> tuple[Grouped, torch.Tensor]:
    """Group ``g`` gets ``rows[g]`` rows, padded to 128 with ``-1``; padding rows of A/SFA are NaN."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for g, m in enumerate(rows):
        ids += [g] * m + [-1] * (-(-m // 128) * 128 - m)
    x = torch.randn(len(ids), k, generator=gen)
    w = torch.randn(len(rows), n, k, generator=gen)
    q = quantize(x, w, ue8m0=ue8m0, per_row_b=per_row_b)
    m_indices = torch.tensor(ids, dtype=torch.int32)
    pad = m_indices < 0
    q.a.view(torch.uint8)[pad] = 0x7F  # e4m3 NaN: never read
    if q.sfa.dtype == torch.float32:
        q.sfa[pad] = float("nan")
    return q, m_indices


def masked_inputs(groups: int, m_max: int, masked: list[int], *, n: int = 160, k: int = 256,
                  seed: int = 0, ue8m0: bool = False) -> tuple[Grouped, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, m_max, k, generator=gen)
    w = torch.randn(groups, n, k, generator=gen)
    q = quantize(x, w, ue8m0=ue8m0)
    for g, m in enumerate(masked):
        q.a[g, m:].view(torch.uint8).fill_(0x7F)
        if q.sfa.dtype == torch.float32:
            q.sfa[g, m:] = float("nan")
    return q, torch.tensor(masked, dtype=torch.int32)


def _scales(sf: torch.Tensor, k: int) -> np.ndarray:
    kb = -(-k // 128)
    as_f32 = unpack_ue8m0(sf, kb) if sf.dtype == torch.int32 else sf
    values: np.ndarray = as_f32.to(torch.float64).numpy()
    return values


def blocked_f64(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor, gran_n: int) -> np.ndarray:
    """One group: ``A [M, K]`` times ``B [N, K]^T`` block by block, in float64."""
    k = int(a.shape[1])
    a64, b64 = a.to(torch.float64).numpy(), b.to(torch.float64).numpy()
    sa, sb = _scales(sfa, k), _scales(sfb, k)
    sb_rows = np.repeat(sb, gran_n, axis=0)[: b64.shape[0]]
    out = np.zeros((a64.shape[0], b64.shape[0]))
    for kb in range(-(-k // 128)):
        blk = slice(128 * kb, 128 * (kb + 1))
        out += sa[:, kb : kb + 1] * sb_rows[None, :, kb] * (a64[:, blk] @ b64[:, blk].T)
    return out
