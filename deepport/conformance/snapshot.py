"""What the caller sees when the call returns: outputs copied on the caller's stream, then checked again.

An op's outputs must be complete when it returns, in the caller's stream order: the next kernel the
caller queues on the current stream may read them. A backend that writes from a side stream without
making the current stream wait, or from a thread that outlives the call, leaves the caller reading
stale memory even though the memory is right a moment later (after a device-wide synchronize, or
after the thread ran). So, right after the call returns and before any synchronization,
:func:`snapshot` queues a copy of every output on the current stream (on a CPU: copies it at once);
that copy is what gets judged. :func:`after_return` then compares the memory with it once everything
has finished, and also rejects an output object that is no longer a plain ``torch.Tensor`` (a tensor
subclass can show whoever reads it values its memory does not hold).

Copies are made with tensor-subclass dispatch disabled, so they hold the memory's bits whatever the
output object's class pretends.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def snapshot(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of each output's memory, queued on the current stream (no synchronization)."""
    with torch._C.DisableTorchFunctionSubclass():
        return {n: t.detach().clone() for n, t in outputs.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.detach().contiguous().view(_BITS[t.element_size()])


def after_return(outputs: Mapping[str, torch.Tensor], returned: Mapping[str, torch.Tensor]) -> list[str]:
    """Why the outputs the caller got at return cannot be trusted (empty when they can): a tensor
    subclass, or memory that changed after the call returned."""
    problems = []
    for name, t in outputs.items():
        if type(t) is not torch.Tensor:
            problems.append(f"output `{name}` is a {type(t).__name__} (a torch.Tensor subclass), not a plain "
                            "torch.Tensor: a subclass can show the harness values its memory does not hold")
            continue
        before = returned[name]
        if t.shape != before.shape or t.dtype != before.dtype or t.numel() == 0:
            continue
        if not torch.equal(_bits(t), _bits(before)):
            problems.append(f"output `{name}` changed after the call returned (a write still in flight when it "
                            "returned: a side stream the current stream does not wait for, or a thread that outlives "
                            "the call)")
    return problems
