"""Comparing one output with its float64 reference: structure, special values, element-wise, global.

All four must hold for the output to pass; every measured figure is returned for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepport.conformance.tolerance import Tolerance


@dataclass
class OutputCheck:
    name: str
    failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures


def calc_diff(a: np.ndarray, r: np.ndarray) -> float:
    """DeepGEMM's global difference ``1 - 2*sum(a*r) / sum(a*a + r*r)`` in float64 (0 when both ~0)."""
    a64 = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)  # no copy when already contiguous float64
    r64 = np.ascontiguousarray(r, dtype=np.float64).reshape(-1)
    return _diff_from_sums(float(np.dot(a64, r64)), float(np.dot(a64, a64)), float(np.dot(r64, r64)))


def _diff_from_sums(ar: float, aa: float, rr: float) -> float:
    """``calc_diff`` from its three dot products (0 when both vectors are ~0)."""
    denominator = aa + rr
    return 0.0 if denominator < 1e-12 else float(1.0 - 2.0 * ar / denominator)


CHUNK = 1 << 22
"""Elements judged at a time: the checker's float64 temporaries stay a few times 32 MiB whatever the
output's size (a full-tier MoE output holds 2.3e8 elements: 1.9 GB per float64 copy)."""


class _Stream:
    """Per-chunk comparison of an output with its reference, accumulating what :func:`check_output` reports."""

    def __init__(self, atol: float, rtol: float) -> None:
        self.atol, self.rtol = atol, rtol
        self.special = {label: [0, 0, -1] for label in ("NaN", "+inf", "-inf")}  # in output, in ref, first differ
        self.compared = self.mismatches = 0
        self.max_abs = self.max_rel = self.max_over = 0.0
        self.worst_excess, self.worst_at = -np.inf, -1  # the largest err - bound of a mismatch, flat index
        self.ar = self.aa = self.rr = 0.0  # calc_diff's sums over the finite pairs

    def add(self, start: int, a: np.ndarray, r: np.ndarray, extra: np.ndarray | None) -> None:
        finite_a, finite_r = np.isfinite(a), np.isfinite(r)
        finite = finite_a & finite_r
        if not finite.all():
            for label, mask in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
                ga, gr = mask(a), mask(r)
                entry = self.special[label]
                entry[0] += int(np.count_nonzero(ga))
                entry[1] += int(np.count_nonzero(gr))
                if entry[2] < 0 and not np.array_equal(ga, gr):
                    entry[2] = start + int(np.argmax(ga != gr))
            a, r = a[finite], r[finite]
            extra = None if extra is None else extra[finite]
            index = np.flatnonzero(finite) + start
        else:
            index = None
        if not a.size:
            return
        err = np.abs(a - r)
        magnitude = np.abs(r)
        bound = magnitude * self.rtol
        bound += self.atol
        if extra is not None:
            bound += extra
        bad = err > bound
        self.compared += a.size
        self.max_abs = max(self.max_abs, float(err.max()))
        self.max_rel = max(self.max_rel, float((err / np.maximum(magnitude, 1e-30)).max()))
        self.max_over = max(self.max_over, float((err / np.maximum(bound, 1e-300)).max()))
        count = int(np.count_nonzero(bad))
        if count:
            self.mismatches += count
            excess = err - bound
            i = int(np.argmax(excess))
            if excess[i] > self.worst_excess:
                self.worst_excess, self.worst_at = float(excess[i]), start + i if index is None else int(index[i])
        self.ar += float(np.dot(a, r))
        self.aa += float(np.dot(a, a))
        self.rr += float(np.dot(r, r))

    def calc_diff(self) -> float:
        return _diff_from_sums(self.ar, self.aa, self.rr)


def calc_diff_where_finite(got: torch.Tensor, reference: np.ndarray) -> float:
    """:func:`calc_diff` of ``got`` and ``reference`` on the reference's finite elements, :data:`CHUNK`
    elements at a time (a got element that is not finite there makes the sums, and so the result, NaN)."""
    flat_got, flat_ref = got.detach().to("cpu").reshape(-1), reference.reshape(-1)
    ar = aa = rr = 0.0
    for start in range(0, flat_ref.size, CHUNK):
        r = flat_ref[start:start + CHUNK]
        a = flat_got[start:start + CHUNK].to(torch.float64).numpy()
        keep = np.isfinite(r)
        if not keep.all():
            a, r = a[keep], r[keep]
        ar, aa, rr = ar + float(np.dot(a, r)), aa + float(np.dot(a, a)), rr + float(np.dot(r, r))
    return _diff_from_sums(ar, aa, rr)


def check_output(name: str, got: object, reference: np.ndarray, *, dtype: torch.dtype,
                 device: torch.device, tol: Tolerance, elementwise: np.ndarray | None = None) -> OutputCheck:
    """Check ``got`` against ``reference`` (float64, the exact answer before output rounding).

    ``elementwise`` (the reference's shape) is the per-element absolute term of a tolerance that has one
    (``tol.elementwise``: the suite computes it from the inputs); it is added to ``atol + rtol * |r|``.
    The comparison runs over :data:`CHUNK` elements at a time (same verdict and figures as a whole-array
    comparison; ``calc_diff`` sums its three dot products chunk by chunk)."""
    result = OutputCheck(name)
    if tol.elementwise is not None and (elementwise is None or elementwise.shape != reference.shape):
        result.failures.append(f"{name}: the tolerance needs the suite's {tol.elementwise!r} bound of shape "
                               f"{reference.shape}, got {None if elementwise is None else elementwise.shape}")
        return result
    # 1. exact structure: a plain tensor (no subclass, no lazy object) of the declared dtype, shape, device
    if type(got) is not torch.Tensor:
        result.failures.append(f"{name}: expected a plain torch.Tensor, got {type(got).__name__}")
        return result
    if got.dtype != dtype or tuple(got.shape) != reference.shape or got.device != device:
        result.failures.append(f"{name}: expected {dtype} {reference.shape} on {device}, "
                               f"got {got.dtype} {tuple(got.shape)} on {got.device}")
        return result
    use_bound = elementwise is not None and tol.elementwise is not None
    atol = tol.atol(reference)
    stream = _Stream(atol, tol.rtol)
    flat_got = got.detach().to("cpu").reshape(-1)  # in its own dtype: one copy, a fraction of float64's size
    flat_ref = reference.reshape(-1)
    flat_extra = elementwise.reshape(-1) if use_bound and elementwise is not None else None
    for start in range(0, flat_ref.size, CHUNK):
        stop = min(start + CHUNK, flat_ref.size)
        a = flat_got[start:stop].to(torch.float64).numpy()
        stream.add(start, a, flat_ref[start:stop], None if flat_extra is None else flat_extra[start:stop])
    shape = reference.shape
    # 2. exact positions of NaN, +inf, -inf (NaN is never a wildcard)
    for label, (in_out, in_ref, first) in stream.special.items():
        if first >= 0:
            where = [int(i) for i in np.unravel_index(first, shape)]
            result.failures.append(f"{name}: {label} positions differ ({in_out} in output, {in_ref} in reference; "
                                   f"first at {where})")
    # 3. element-wise |a - r| <= atol + rtol * |r|, atol scaled to the case
    if use_bound and elementwise is not None:
        result.metrics["max_elementwise_bound"] = float(elementwise.max()) if elementwise.size else 0.0
    result.metrics.update(
        elements=int(reference.size), compared=stream.compared, atol=atol, rtol=tol.rtol,
        max_abs_err=stream.max_abs, max_rel_err=stream.max_rel, max_err_over_bound=stream.max_over,
        mismatches=stream.mismatches,
    )
    if stream.mismatches:
        worst = tuple(int(i) for i in np.unravel_index(stream.worst_at, shape))
        extra = "" if not use_bound or elementwise is None else \
            f" + {tol.elementwise} (here {float(elementwise[worst]):.3g})"
        got_worst = float(got.detach()[worst].to("cpu", torch.float64))
        result.failures.append(
            f"{name}: {stream.mismatches}/{stream.compared} elements "
            f"({100.0 * stream.mismatches / stream.compared:.3g}%) outside atol={atol:.3g} + rtol={tol.rtol:.3g}"
            f"*|ref|{extra}; worst at {list(worst)}: got {got_worst!r}, expected {float(reference[worst])!r}")
    # 4. global difference on the finite values
    diff = stream.calc_diff()
    result.metrics["calc_diff"] = diff
    if diff > tol.max_calc_diff:
        result.failures.append(f"{name}: calc_diff {diff:.3g} > {tol.max_calc_diff:.3g}")
    return result


def check_exact(name: str, got: object, reference: np.ndarray, positions: np.ndarray, dtype: torch.dtype) -> list[str]:
    """Elements of ``got`` at ``positions`` (a boolean mask of the output's shape) must equal ``reference``
    rounded to ``dtype`` bit for bit (a NaN matches any NaN: NaN payloads are not canonical); e.g. padding
    rows the op defines as +0.0, or elements it must leave as they were before the call."""
    if type(got) is not torch.Tensor or tuple(got.shape) != reference.shape or got.dtype != dtype:
        return []  # the structure check reports it
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    a = got.detach().cpu()
    r = torch.from_numpy(reference).to(dtype)
    a_bits, r_bits = a.view(bits).numpy()[positions], r.view(bits).numpy()[positions]
    differ = (a_bits != r_bits) & ~(torch.isnan(a).numpy()[positions] & np.isnan(reference[positions]))
    if not differ.any():
        return []
    where = tuple(np.argwhere(positions)[int(np.argmax(differ))].tolist())
    return [f"{name}: {int(differ.sum())}/{differ.size} elements that must be exact differ; first at {list(where)}: "
            f"got {float(a[where])!r}, expected exactly {float(r[where])!r}"]
