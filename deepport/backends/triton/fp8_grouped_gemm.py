"""M-grouped block-scaled FP8 GEMMs on Triton: host side of the contiguous and masked kernels.

- contiguous: one program per (128-aligned M tile, N tile); the tile's group is read from ``m_indices``
  on the device (no host sync: ``m_indices_host`` is not needed), padding tiles skip the K loop and
  store zeros, padding rows inside a tile are stored as +0.0. ``block_m`` must divide 128.
- masked: a persistent grid (``waves`` programs per multiprocessor, at most one per possible tile)
  reads ``masked_m`` on the device and walks only the tiles of rows in use; rows past ``masked_m[g]``
  are never written. The call is CUDA-graph capturable.

B is read as ``[G * N, K]`` (and masked A as ``[G * M_max, K]``) through tensor descriptors when the
strides allow; tiles that reach into the next group's rows are never stored.
"""

from __future__ import annotations

import torch

from deepport.backends.triton import fp8_configs
from deepport.backends.triton.fp8_gemm_kernels import (
    m_grouped_fp8_gemm_nt_contiguous_kernel,
    m_grouped_fp8_gemm_nt_masked_kernel,
)
from deepport.backends.triton.fp8_launch import operand, rows_view, staged, unstage
from deepport.kernels._fp8_checks import SF_UE8M0
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall, ScaledOperand
from deepport.kernels.fp8_layout import ceil_div, get_mk_alignment_for_contiguous_layout


def _flags(b: ScaledOperand, k: int, use_tma: bool, config: fp8_configs.GemmConfig) -> dict[str, object]:
    return dict(GRAN_N=b.gran_mn, UE8M0=b.sf_format == SF_UE8M0, USE_TMA=use_tma, EVEN_K=k % 128 == 0,
                SFB_SCALAR=b.gran_mn % config.block_n == 0, SPLIT_N=config.split_n, BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, **config.launch_options())


def _b_operand(b: torch.Tensor, config: fp8_configs.GemmConfig) -> object | None:
    flat = rows_view(b)
    return None if flat is None else operand(flat, config.block_n // config.split_n, config.tma)


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    device = call.signature.device
    g, n, k = (int(s) for s in call.b.data.shape)
    config = fp8_configs.choose(fp8_configs.CONTIGUOUS, device.name, device.multiprocessors,
                                max(1, call.m_sum // g), n, k)
    launch_contiguous(call, out, config)


def launch_contiguous(call: ContiguousCall, out: torch.Tensor, config: fp8_configs.GemmConfig) -> None:
    """The contiguous layout with ``config`` (``block_m`` must divide 128)."""
    m = call.m_sum
    if m == 0:
        return
    align = get_mk_alignment_for_contiguous_layout()
    if align % config.block_m:
        raise ValueError(f"block_m must divide the contiguous layout's alignment {align}, got {config.block_m}")
    a, sfa, b, sfb = call.a.data, call.a.sf, call.b.data, call.b.sf
    _, n, k = (int(s) for s in b.shape)
    a_desc, b_desc = operand(a, config.block_m, config.tma), _b_operand(b, config)
    use_tma = a_desc is not None and b_desc is not None
    target = staged(out)
    grid = (ceil_div(m, config.block_m) * ceil_div(n, config.block_n),)
    m_grouped_fp8_gemm_nt_contiguous_kernel[grid](
        a_desc if use_tma else a, b_desc if use_tma else b, sfa, sfb, call.m_indices, target, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), sfa.stride(0), sfa.stride(1),
        sfb.stride(0), sfb.stride(1), sfb.stride(2), target.stride(0), target.stride(1),
        GROUP_M=config.group_m, **_flags(call.b, k, use_tma, config))
    unstage(out, target)


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    device = call.signature.device
    _, n, k = (int(s) for s in call.b.data.shape)
    config = fp8_configs.choose(fp8_configs.MASKED, device.name, device.multiprocessors, call.expected_m, n, k)
    launch_masked(call, out, config)


def launch_masked(call: MaskedCall, out: torch.Tensor, config: fp8_configs.GemmConfig) -> None:
    """The masked layout with ``config``; ``masked_m`` is read only on the device."""
    a, sfa, b, sfb = call.a.data, call.a.sf, call.b.data, call.b.sf
    g, m_max, k = (int(s) for s in a.shape)
    n = int(b.shape[1])
    flat_a = rows_view(a)
    a_desc = None if flat_a is None else operand(flat_a, config.block_m, config.tma)
    b_desc = _b_operand(b, config)
    use_tma = a_desc is not None and b_desc is not None
    target = staged(out, keep=True)
    tiles = g * ceil_div(m_max, config.block_m) * ceil_div(n, config.block_n)
    programs = max(1, min(tiles, config.waves * call.signature.device.multiprocessors))
    m_grouped_fp8_gemm_nt_masked_kernel[(programs,)](
        a_desc if use_tma else a, b_desc if use_tma else b, sfa, sfb, call.masked_m, target, g, m_max, n, k,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        sfa.stride(0), sfa.stride(1), sfa.stride(2), sfb.stride(0), sfb.stride(1), sfb.stride(2),
        target.stride(0), target.stride(1), target.stride(2), **_flags(call.b, k, use_tma, config))
    if target is not out:
        in_use = torch.arange(m_max, device=out.device)[None, :] < call.masked_m[:, None]
        unstage(out, target, in_use[:, :, None])
