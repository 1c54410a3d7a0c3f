"""The check a backend's low-latency call passes, on every rank, before a 2-rank bench config times it:
its outputs against the ``reference`` backend's outputs on the same group and inputs.

- dispatch: ``recv_count`` equal; for each local expert ``e``, its first ``recv_count[e]`` rows (the
  only ones the op specifies) equal bit for bit: the payload (bf16, or e4m3 compared as bytes) and,
  with FP8, the float32 scales;
- combine: every element of the bf16 output within one bf16 step of the reference's (both sum in at
  least float32 and round once; a sum lying near a rounding boundary may round to either neighbour), or
  within :data:`CANCELLATION_RMS` times the rms of the reference output: a float32 sum of terms that nearly
  cancel (a result far smaller than its terms) carries the terms' rounding error, which can be many bf16
  steps of the small result (up to 66 measured against float64 sums at 128 tokens x 7168, 8 terms of
  magnitude ~1, H200, 2026-12-03); a wrong or missing term moves an element by about a term, far more.

Each function returns the differences found, one line each saying what was expected and what was got
(an empty list: the outputs agree).
"""

from __future__ import annotations

import torch

from deepport.kernels.moe_args import MoEInput

CANCELLATION_RMS = 2.0 ** -16  # absolute slack of the combine check, in units of the reference output's rms


def _payload(recv_x: MoEInput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(payload as comparable bits, scales or None)``: e4m3 is compared as its bytes."""
    if isinstance(recv_x, tuple):
        data, scales = recv_x
        return data.view(torch.uint8), scales
    return recv_x, None


def dispatch_differences(recv_x: MoEInput, recv_count: torch.Tensor, ref_recv_x: MoEInput,
                         ref_recv_count: torch.Tensor) -> list[str]:
    """How a low-latency dispatch's ``(recv_x, recv_count)`` differs from the reference's (module docstring)."""
    if not torch.equal(recv_count.cpu(), ref_recv_count.cpu()):
        return [f"recv_count: expected {ref_recv_count.tolist()} (reference), got {recv_count.tolist()}"]
    data, scales = _payload(recv_x)
    ref_data, ref_scales = _payload(ref_recv_x)
    if tuple(data.shape) != tuple(ref_data.shape) or data.dtype != ref_data.dtype:
        return [f"recv_x: expected {ref_data.dtype} {tuple(ref_data.shape)} (reference), got {data.dtype} "
                f"{tuple(data.shape)}"]
    rows = torch.arange(data.shape[1], device=data.device)
    used = (rows[None, :] < recv_count.to(data.device, torch.long)[:, None])[..., None]  # [L, R*T_max, 1]
    found = []
    differ = int(((data != ref_data.to(data.device)) & used).any(dim=2).sum())
    if differ:
        found.append(f"recv_x: expected the reference's payload in the {int(recv_count.sum())} rows below recv_count, "
                     f"got {differ} rows that differ")
    if (scales is None) != (ref_scales is None):
        found.append(f"recv_x: expected {'FP8 scales' if ref_scales is not None else 'no scales'} (reference), got "
                     f"{'FP8 scales' if scales is not None else 'none'}")
    elif scales is not None and ref_scales is not None:
        differ = int(((scales != ref_scales.to(scales.device)) & used).any(dim=2).sum())
        if differ:
            found.append(f"recv_x scales: expected the reference's float32 scales in the rows below recv_count, "
                         f"got {differ} rows that differ")
    return found


def bf16_steps(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per element, how many bf16 values lie from ``expected`` to ``got`` (0: equal; +0 and -0 are one value)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)  # sign-magnitude -> one monotone integer line

    return (ordered(got.to(torch.bfloat16)) - ordered(expected.to(torch.bfloat16))).abs()


def combine_differences(combined: torch.Tensor, ref_combined: torch.Tensor) -> list[str]:
    """How a low-latency combine's bf16 output differs from the reference's (module docstring)."""
    if tuple(combined.shape) != tuple(ref_combined.shape) or combined.dtype != ref_combined.dtype:
        return [f"combined_x: expected {ref_combined.dtype} {tuple(ref_combined.shape)} (reference), got "
                f"{combined.dtype} {tuple(combined.shape)}"]
    nan = combined.isnan() != ref_combined.to(combined.device).isnan()
    if bool(nan.any()):
        return [f"combined_x: expected NaN where the reference has NaN, got {int(nan.sum())} elements that differ"]
    ref = ref_combined.to(combined.device)
    steps = torch.where(combined.isnan(), 0, bf16_steps(combined, ref))
    finite = ref.float()[ref.isfinite()]
    slack = CANCELLATION_RMS * (float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0)
    err = torch.where(combined.isnan(), 0, (combined.float() - ref.float()).abs())
    far = (steps > 1) & ~(err <= slack)
    if bool(far.any()):
        i = int(far.flatten().nonzero()[0])
        return [f"combined_x: expected every element within 1 bf16 step of the reference or within {slack:.3g} "
                f"(2^-16 x its rms), got {int(far.sum())} elements further (largest {int(steps[far].max())} "
                f"steps; first at flat index {i}: expected {float(ref.flatten()[i])}, got "
                f"{float(combined.flatten()[i])})"]
    return []
