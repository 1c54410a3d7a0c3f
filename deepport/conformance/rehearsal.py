"""Two calls on the same buffers: a rehearsal with other contents, then the judged call.

A backend may keep state between calls (compiled kernels, plans, workspaces), but its answer must
depend on what its inputs hold, not on where they live or on how many calls came before: a caller
that replays a captured CUDA graph, or reuses preallocated buffers, calls again with new contents at
the same addresses. So the harness calls the op twice on the same tensors (:func:`rehearse`): first
with the case's decoy input (the op's first floating-point operand with every sign flipped: same
shapes and strides, same poison positions, another answer), then, once the case's real values are
back in that memory and every output holds its initial contents again (the poison, and any prefilled
content), the judged call. A backend that caches answers by pointer or by shape, or that is right
only on its first call, answers the judged call with the rehearsal's answer and fails. An input the
rehearsal modified stays modified, so the judged call's input check reports it.

Rehearsed ops are those with an entry in ``DECOY_INPUT``. The MoE ops are not: each rank regenerates
its inputs from the case's seed, so there are no caller buffers to reuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

DECOY_INPUT: dict[str, str] = {
    "mla_decode": "q",
    **{f"fp8_gemm_{layout}": "a" for layout in ("nt", "nn", "tn", "tt")},
    "m_grouped_fp8_gemm_nt_contiguous": "a",
    "m_grouped_fp8_gemm_nt_masked": "a",
}
_SIGN = {1: (torch.uint8, 0x80), 2: (torch.int16, -(2**15)), 4: (torch.int32, -(2**31)), 8: (torch.int64, -(2**63))}


def flip_signs(t: torch.Tensor) -> None:
    """Negate every element of a floating-point tensor in place by flipping its sign bit (any float
    dtype, FP8 included; NaN stays NaN)."""
    bits, mask = _SIGN[t.element_size()]
    view = t.view(bits)
    view.bitwise_xor_(torch.tensor(mask, dtype=bits, device=t.device))


def rehearse(suite: ModuleType, call_spec: Any, tensors: Mapping[str, torch.Tensor], backend: str,
             outputs: Mapping[str, torch.Tensor]) -> bool:
    """Call the op once on the decoy contents, then put the real ones back (see the module docstring).

    Returns whether a rehearsal ran. Exceptions of the rehearsal call propagate: the caller reports them
    as it reports the judged call's.
    """
    name = DECOY_INPUT.get(str(getattr(suite, "OP", "")))
    decoy = tensors.get(name) if name is not None else None
    if decoy is None or not decoy.is_floating_point() or decoy.numel() == 0:
        return False
    real = decoy.clone()
    initial = {n: t.clone() for n, t in outputs.items()}
    flip_signs(decoy)
    suite.invoke(call_spec, tensors, backend, outputs)
    decoy.copy_(real)
    for n, t in outputs.items():
        t.copy_(initial[n])
    return True
