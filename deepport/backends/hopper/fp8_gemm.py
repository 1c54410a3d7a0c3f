"""Host side of the sm90 FP8 GEMMs: dense ``fp8_gemm_nt`` and the M-grouped contiguous and masked layouts.

Each call picks a :class:`~deepport.backends.hopper.configs.GemmConfig` for its shape, gets the
kernel (compiled once, cached on disk), builds the TMA descriptors of A and B and the kernel's
parameter block, and launches on torch's current stream. Nothing is synchronised and no value is
read back, so the calls can be captured in a CUDA graph (with ``DEEPPORT_CHECK_VALUES=0`` for the
grouped ops, whose index check reads the indices on the host).

Operand preparation (copies only where TMA cannot read the caller's tensor): A and B need a 16-byte
aligned base and row and group strides that are multiples of 16 bytes (the op layer already requires
K contiguous); otherwise they are copied into rows padded to 16 bytes (for K not a multiple of 16,
every call). TMA reads zeros past K, so a K tail inside the last 128-block needs nothing else.
The output is written in place with 4-byte stores of bf16 pairs; an output
with an odd row stride or a base not 4-byte aligned is computed into a temporary (a copy of it, so rows
the masked layout leaves alone keep their values) and copied back.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.backends.hopper import jit, launch, tma
from deepport.backends.hopper.configs import (
    VARIANT_CONTIGUOUS,
    VARIANT_DENSE,
    VARIANT_MASKED,
    GemmConfig,
    ceil_div,
    choose,
)
from deepport.backends.hopper.params import LAYOUT_DEFINES, GemmParams
from deepport.backends.hopper.sources import fp8_gemm_source
from deepport.kernels.fp8_gemm import FP8GemmCall
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, MaskedCall

COMPILE_OPTIONS: tuple[str, ...] = ("-lineinfo",)


def kernel_options(config: GemmConfig) -> tuple[str, ...]:
    """NVRTC options of the kernel for ``config`` (beyond the base ``-arch=sm_90a -std=c++17``)."""
    return (*config.defines(), *LAYOUT_DEFINES, *COMPILE_OPTIONS)


_functions: dict[tuple[GemmConfig, int], Any] = {}


def kernel_function(config: GemmConfig, device: torch.device) -> Any:
    """The loaded kernel of ``config`` on ``device`` (compiled or read from the cache on first use, then
    kept per config and device: a call costs one dictionary lookup)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    function = _functions.get((config, index))
    if function is None:
        source = fp8_gemm_source(config.block_n)
        key, cubin = jit.get_cubin(source, kernel_options(config))
        function = launch.load_function(key, cubin, source.entry, index, config.smem_bytes)
        _functions[(config, index)] = function
    return function


# ---- operands --------------------------------------------------------------------------------------

def _tma_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp8, ``[rows, K]`` or ``[G, rows, K]``, K contiguous) itself if TMA can read it, else a copy
    whose rows are padded to a multiple of 16 bytes (the padding is never read: TMA stops at K)."""
    outer = [x.stride(d) for d in range(x.dim() - 1) if x.shape[d] > 1]
    if tma.tma_compatible(x.data_ptr(), tuple(outer)):
        return x
    k = int(x.shape[-1])
    padded = torch.empty((*x.shape[:-1], ceil_div(k, tma.TMA_ALIGN) * tma.TMA_ALIGN), dtype=x.dtype, device=x.device)
    view = padded[..., :k]
    view.copy_(x)
    return view


def _tile_map(x: torch.Tensor, box_rows: int) -> bytes:
    """TMA descriptor of ``x`` ``[rows, K]`` or ``[G, rows, K]`` (fp8, TMA-readable) in ``box_rows`` tiles."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    groups, rows, k = (int(s) for s in x3.shape)
    row_stride = x3.stride(1) if rows > 1 else ceil_div(k, 16) * 16
    group_stride = x3.stride(0) if groups > 1 else ceil_div(rows * row_stride, 16) * 16
    return tma.fp8_tile_map(x3.data_ptr(), k, rows, groups, row_stride, group_stride, box_rows)


def _output_target(out: torch.Tensor) -> torch.Tensor:
    """``out`` if bf16 pairs can be stored into it (even row strides, 4-byte aligned base), else a
    temporary of the same shape with such a layout."""
    ok = out.data_ptr() % 4 == 0 and all(out.stride(d) % 2 == 0 for d in range(out.dim() - 1) if out.shape[d] > 1)
    if ok:
        return out
    shape = list(out.shape)
    padded = torch.empty((*shape[:-1], shape[-1] + shape[-1] % 2), dtype=out.dtype, device=out.device)
    target = padded[..., : shape[-1]]
    target.copy_(out)  # rows the kernel leaves alone (masked layout) keep their values
    return target


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(group, row, column) element strides of a 2-D or 3-D tensor (group stride 0 for 2-D)."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _launch(config: GemmConfig, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
            groups: torch.Tensor | None, out: torch.Tensor, rows: int, n: int, k: int, num_groups: int,
            m_blocks: int, num_sms: int) -> None:
    """Launch the kernel of ``config`` over ``m_blocks`` (all groups') x ``ceil(n / block_n)`` tiles; ``out``
    is written (through a temporary if its layout needs one). With ``cluster_n = 2`` the A map's box is half
    the tile's rows (each CTA of a cluster loads one half and multicasts it)."""
    device = a.device
    a, b = _tma_view(a), _tma_view(b)
    target = _output_target(out)
    out_strides = _strides3(target)
    params = GemmParams(
        tmap_a=_tile_map(a, config.a_box_rows), tmap_b=_tile_map(b, config.block_n),
        sfa=sfa.data_ptr(), sfb=sfb.data_ptr(), groups=0 if groups is None else groups.data_ptr(),
        out=target.data_ptr(), sfa_strides=_strides3(sfa), sfb_strides=_strides3(sfb),
        out_strides=(out_strides[0], out_strides[1]), rows=rows, n=n, k=k, num_groups=num_groups)
    function = kernel_function(config, device)
    grid = config.grid(m_blocks, ceil_div(n, config.block_n), num_sms)
    launch.launch(function, grid, config.threads, config.smem_bytes, params.pack(), device)
    if target is not out:
        out.copy_(target)


# ---- ops ---------------------------------------------------------------------------------------------

def run(call: FP8GemmCall, out: torch.Tensor) -> None:
    """``fp8_gemm_nt``: ``out = A @ B^T`` with 1x128 / 128x128 block scales, bf16."""
    m, n, k = call.m, call.n, call.k
    sms = call.signature.device.multiprocessors
    config = choose(m, n, k, VARIANT_DENSE, sms)
    _launch(config, call.a, call.sfa, call.b, call.sfb, None, out, m, n, k, 1, ceil_div(m, config.block_m), sms)


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    """``m_grouped_fp8_gemm_nt_contiguous``: row ``m`` times ``B[m_indices[m]]^T``; ``-1`` rows are +0.0."""
    sig = call.signature
    m_sum, n, k, g = call.m_sum, sig.n, sig.k, sig.num_groups
    sms = sig.device.multiprocessors
    config = choose(max(1, m_sum // max(1, g)), n, k, VARIANT_CONTIGUOUS, sms, g)
    _launch(config, call.a.data, call.a.sf, call.b.data, call.b.sf, call.m_indices, out, m_sum, n, k, g,
            ceil_div(m_sum, config.block_m), sms)


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    """``m_grouped_fp8_gemm_nt_masked``: rows ``< masked_m[g]`` of ``out[g]`` written, the rest untouched."""
    sig = call.signature
    g, m_max, n, k = sig.num_groups, call.m_max, sig.n, sig.k
    sms = sig.device.multiprocessors
    config = choose(min(call.expected_m, m_max), n, k, VARIANT_MASKED, sms, g)
    m_blocks = g * ceil_div(m_max, config.block_m)  # an upper bound
    _launch(config, call.a.data, call.a.sf, call.b.data, call.b.sf, call.masked_m, out, m_max, n, k, g, m_blocks, sms)
