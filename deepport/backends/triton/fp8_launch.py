"""Host-side helpers shared by the Triton FP8 GEMM launchers: operand descriptors and interpreter output staging.

- :func:`operand`: a K-major FP8 operand as a Hopper tensor descriptor (block ``[rows, 128]``) when the
  layout allows bulk tensor copies (unit K stride, 16-byte aligned base and row stride), else the
  tensor itself (the kernel then uses pointer arithmetic).
- :func:`staged` / :func:`unstage`: Triton's CPU interpreter does not round float32 -> bfloat16 stores
  to nearest even (it truncates), so under ``TRITON_INTERPRET=1`` a bfloat16 output is computed into a
  float32 scratch tensor and rounded by torch; on a GPU the kernel writes the output directly.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.backends.triton.fp8_support import interpreting

TMA_ALIGN_BYTES = 16
K_BLOCK = 128


def tma_ready(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can be read through a tensor descriptor (bulk tensor copies)."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % TMA_ALIGN_BYTES == 0
            and (t.stride(0) * size) % TMA_ALIGN_BYTES == 0 and all(s > 0 for s in t.shape))


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` ``[G, R, K]`` as ``[G * R, K]`` without a copy, or ``None`` when its strides do not allow it."""
    g, r, k = (int(s) for s in t.shape)
    if g > 1 and t.stride(0) != r * t.stride(1):
        return None
    return t.as_strided((g * r, k), (t.stride(1), t.stride(2)))


def operand(t: torch.Tensor | None, block_rows: int, use_tma: bool) -> Any:
    """A tensor descriptor of ``t`` (``[rows, K]``) with block ``[block_rows, 128]``, or ``None`` when
    descriptors are not wanted or ``t``'s layout does not allow one."""
    if not use_tma or t is None or not tma_ready(t):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [block_rows, K_BLOCK])


def staged(out: torch.Tensor, keep: bool = False) -> torch.Tensor:
    """The tensor the kernel writes: ``out``, or under the interpreter a float32 scratch of a bfloat16
    ``out`` (``keep``: holding ``out``'s values, for kernels that leave some elements alone)."""
    if out.dtype == torch.float32 or not interpreting():
        return out
    return out.to(torch.float32) if keep else torch.empty(out.shape, dtype=torch.float32, device=out.device)


def unstage(out: torch.Tensor, target: torch.Tensor, written: torch.Tensor | None = None) -> None:
    """Round the interpreter's float32 scratch ``target`` into ``out`` (only where ``written``, a mask
    broadcastable to ``out``, when given: other elements keep their bits)."""
    if target is out:
        return
    if written is None:
        out.copy_(target)
    else:
        out.copy_(torch.where(written, target.to(out.dtype), out))
