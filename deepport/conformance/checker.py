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
    denominator = float(np.dot(a64, a64) + np.dot(r64, r64))
    if denominator < 1e-12:
        return 0.0
    return float(1.0 - 2.0 * float(np.dot(a64, r64)) / denominator)


def to_float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def check_output(name: str, got: object, reference: np.ndarray, *, dtype: torch.dtype,
                 device: torch.device, tol: Tolerance, elementwise: np.ndarray | None = None) -> OutputCheck:
    """Check ``got`` against ``reference`` (float64, the exact answer before output rounding).

    ``elementwise`` (the reference's shape) is the per-element absolute term of a tolerance that has one
    (``tol.elementwise``: the suite computes it from the inputs); it is added to ``atol + rtol * |r|``."""
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
    a = to_float64(got)
    finite_a, finite_r = np.isfinite(a), np.isfinite(reference)
    all_finite = bool(finite_a.all()) and bool(finite_r.all())  # the usual case: no masks, no indexing
    # 2. exact positions of NaN, +inf, -inf (NaN is never a wildcard)
    for label, mask in (() if all_finite else (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf))):
        ga, gr = mask(a), mask(reference)
        if not np.array_equal(ga, gr):
            where = np.argwhere(ga != gr)[0].tolist()
            result.failures.append(f"{name}: {label} positions differ ({int(np.sum(ga))} in output, "
                                   f"{int(np.sum(gr))} in reference; first at {where})")
    finite = finite_r & finite_a
    av, rv = (a.reshape(-1), reference.reshape(-1)) if all_finite else (a[finite], reference[finite])
    # 3. element-wise |a - r| <= atol + rtol * |r|, atol scaled to the case
    atol = tol.atol(reference)
    err = np.abs(av - rv)
    magnitude = np.abs(rv)
    bound = magnitude * tol.rtol  # in place from here: outputs may hold 10^8 elements
    bound += atol
    if elementwise is not None and tol.elementwise is not None:
        bound += elementwise.reshape(-1) if all_finite else elementwise[finite]
        result.metrics["max_elementwise_bound"] = float(elementwise.max()) if elementwise.size else 0.0
    bad = err > bound
    ratio = np.empty_like(err)
    result.metrics.update(
        elements=int(reference.size), compared=int(rv.size), atol=atol, rtol=tol.rtol,
        max_abs_err=float(err.max()) if err.size else 0.0,
        max_rel_err=float(np.divide(err, np.maximum(magnitude, 1e-30, out=magnitude), out=ratio).max())
        if err.size else 0.0,
        max_err_over_bound=float(np.divide(err, np.maximum(bound, 1e-300), out=ratio).max()) if err.size else 0.0,
        mismatches=int(np.count_nonzero(bad)),
    )
    if bad.any():
        full_index = np.argwhere(finite)[int(np.argmax(err - bound))].tolist()
        worst = tuple(full_index)
        extra = "" if elementwise is None or tol.elementwise is None else \
            f" + {tol.elementwise} (here {float(elementwise[worst]):.3g})"
        result.failures.append(
            f"{name}: {int(bad.sum())}/{rv.size} elements ({100.0 * bad.mean():.3g}%) outside "
            f"atol={atol:.3g} + rtol={tol.rtol:.3g}*|ref|{extra}; worst at {list(worst)}: got {float(a[worst])!r}, "
            f"expected {float(reference[worst])!r}")
    # 4. global difference on the finite values
    diff = calc_diff(av, rv)
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
