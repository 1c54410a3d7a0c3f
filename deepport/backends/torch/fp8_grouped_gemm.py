"""M-grouped block-scaled FP8 GEMMs in PyTorch: the dense torch backend's GEMM once per group segment.

Each segment (a run of rows of one group; group ``g``'s rows of the masked layout) is a dense
``fp8_gemm_nt`` call, validated by the dense op layer and run by
:func:`deepport.backends.torch.fp8_gemm.run`, so both of its paths apply unchanged: cuBLAS's
block-scaled ``scaled_mm`` where it can express the call (sm_90, recipe (1, 128, 128) with float32 SFs,
K a multiple of 512, N of 16: :func:`deepport.backends.torch.fp8_gemm.path`), else per-128-K float32
products with DeepGEMM's promotion on any device. torch's ``scaled_grouped_mm`` takes only row-wise or
MXFP8 scales, so it cannot express DeepGEMM's 1x128/128x128 recipe; the loop over groups is the cuBLAS
form.

The contiguous layout needs the group boundaries on the host: ``m_indices`` comes from the op layer's
value check, or is read here (one device-to-host copy) under ``DEEPPORT_CHECK_VALUES=0``. Padding rows
are zero-filled on the device. The masked layout uses the op layer's host copy of ``masked_m`` to
multiply only the rows in use; under ``DEEPPORT_CHECK_VALUES=0`` (no host copy) it never reads
``masked_m`` on the host: every group multiplies all ``M_max`` rows and a device-side select keeps the
rows past ``masked_m`` as they were, so the call can be captured in a CUDA graph (at the cost of the
padded rows' arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch

from deepport.backends.torch import fp8_gemm as dense
from deepport.kernels import fp8_gemm
from deepport.kernels.fp8_grouped_gemm import ContiguousCall, GroupedFP8Signature, MaskedCall


def _segment(sig: GroupedFP8Signature, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
             out: torch.Tensor) -> None:
    """``out = A_rows @ B[g]^T`` with block scales, as the dense torch backend computes it."""
    dense.run(fp8_gemm.bind("nt", (a, sfa), (b, sfb), out, recipe=sig.recipe), out)


def _runs(m_indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, end, group)`` of equal non-negative ids."""
    if m_indices.size == 0:
        return []
    edges = np.flatnonzero(np.diff(m_indices)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [m_indices.size]))
    return [(int(s), int(e), int(m_indices[s])) for s, e in zip(starts, ends, strict=True) if m_indices[s] >= 0]


def run_contiguous(call: ContiguousCall, out: torch.Tensor) -> None:
    host = call.m_indices_host if call.m_indices_host is not None else call.m_indices.cpu().numpy()
    a, b = call.a, call.b
    for start, end, g in _runs(host):
        _segment(call.signature, a.data[start:end], a.sf[start:end], b.data[g], b.sf[g], out[start:end])
    out.masked_fill_((call.m_indices < 0).unsqueeze(1), 0.0)


def run_masked(call: MaskedCall, out: torch.Tensor) -> None:
    a, b = call.a, call.b
    if call.masked_m_host is None:  # no host copy (DEEPPORT_CHECK_VALUES=0): stay on the device
        _run_masked_on_device(call, out)
        return
    for g, rows in enumerate(int(x) for x in call.masked_m_host):
        if rows:
            _segment(call.signature, a.data[g, :rows], a.sf[g, :rows], b.data[g], b.sf[g], out[g, :rows])


def _run_masked_on_device(call: MaskedCall, out: torch.Tensor) -> None:
    """Every group's ``M_max`` rows, then ``out[g, m] = product`` where ``m < masked_m[g]`` (rows are
    independent, so whatever the unused rows of ``A`` hold stays in the discarded rows)."""
    a, b = call.a, call.b
    g_count, m_max, n = (int(x) for x in out.shape)
    product = torch.empty((m_max, n), dtype=out.dtype, device=out.device)
    in_use = torch.arange(m_max, device=out.device)[None, :] < call.masked_m.to(torch.int64)[:, None]  # [G, M_max]
    for g in range(g_count):
        _segment(call.signature, a.data[g], a.sf[g], b.data[g], b.sf[g], product)
        out[g].copy_(torch.where(in_use[g, :, None], product, out[g]))
