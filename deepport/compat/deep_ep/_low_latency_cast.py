"""DeepEP's low-latency FP8 cast with power-of-two scales (``round_scale=True``, optionally UE8M0).

deepport's low-latency dispatch casts with ``scale = amax / 448`` (DeepEP's ``round_scale=False``). For
``round_scale=True`` the compat layer dispatches bf16 through deepport and casts the received rows
here, per token and 128 channels, exactly as DeepEP's kernel defines it:

- ``amax = max(max |x|, 1e-4)`` in float32;
- ``e = ceil(log2(amax * fl32(1 / 448)))`` (from the float32 bits), ``scale_inv = 2**e`` (the SF);
- ``fp8 = e4m3(x * 2**-e)`` (exact scaling, one rounding to FP8);
- with ``use_ue8m0`` the SFs are stored as their exponent bytes ``e + 127``, four per int32
  (little-endian, consecutive 128-channel blocks), shape ``[..., hidden / 512]``.

Scales are returned column-major in the last two dimensions, like every low-latency SF tensor.
Rows past ``recv_count`` are cast as zeros (they are unspecified in DeepEP's output).
"""

from __future__ import annotations

import torch

from deepport import pack_ue8m0

FP8 = torch.float8_e4m3fn
BLOCK = 128
AMAX_FLOOR = 1e-4
INV_FP8_MAX = torch.tensor(1.0 / 448.0, dtype=torch.float32)  # fl32(1/448), as DeepEP's kFinfoAmaxInvE4M3


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    return ((exponent + 127) << 23).to(torch.int32).view(torch.float32)


def cast_pow2(x: torch.Tensor, recv_count: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` bf16 ``[L, N, hidden]`` (rows ``>= recv_count[e]`` ignored) -> ``(e4m3 [L, N, hidden], SFs)``."""
    experts, rows, hidden = (int(s) for s in x.shape)
    valid = torch.arange(rows, device=x.device)[None, :] < recv_count.to(x.device)[:, None]
    blocks = torch.where(valid[..., None], x.float(), 0.0).view(experts, rows, hidden // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    bits = (amax * INV_FP8_MAX.to(x.device)).view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    data = (blocks * _pow2(-exponent)[..., None]).to(FP8).view(experts, rows, hidden)
    sf = _pow2(exponent)
    if use_ue8m0:
        sf = pack_ue8m0(sf)
    storage = torch.empty((experts, sf.shape[-1], rows), dtype=sf.dtype, device=x.device)
    column_major = storage.transpose(1, 2)
    column_major.copy_(sf)
    return data, column_major
