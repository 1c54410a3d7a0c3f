"""Calibration: a case must be able to tell right from wrong, or it is a suite bug.

For each case the suite checks, on the reference itself, that
- the reference rounded to the output dtype passes (an honest backend can pass),
- an all-zero output fails, and
- the reference plus 5% Gaussian noise (of the output's rms, or absolute 0.05 where the reference is
  all zero) fails,
unless every output's reference is empty or all zero (M = 0, nothing routed): then zeros are the answer
and only the first check applies.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from deepport.conformance.checker import OutputCheck, calc_diff_where_finite, check_output
from deepport.conformance.tolerance import Tolerance


def _rounded(ref: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(ref).to(dtype)


def calibrate(references: Mapping[str, np.ndarray], dtypes: Mapping[str, torch.dtype],
              tolerances: Mapping[str, Tolerance], seed: int,
              elementwise: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Problems with this case's discriminating power (empty when calibrated). ``elementwise``: the
    suite's per-element bounds, for the tolerances that have one."""
    problems: list[str] = []
    rng = np.random.default_rng(seed)
    cpu = torch.device("cpu")

    bounds = elementwise or {}

    def check(n: str, candidate: torch.Tensor) -> OutputCheck:
        return check_output(n, candidate, references[n], dtype=dtypes[n], device=cpu, tol=tolerances[n],
                            elementwise=bounds.get(n))

    def fails_globally(n: str, candidate: torch.Tensor) -> bool:
        """A cheap sufficient condition for failing: the global difference on the reference's finite
        elements is over the bound (where the candidate is not finite there, the positions check fails)."""
        diff = calc_diff_where_finite(candidate, references[n])
        return bool(np.isnan(diff)) or diff > tolerances[n].max_calc_diff

    def case_passes(candidates: Mapping[str, torch.Tensor]) -> bool:
        if any(fails_globally(n, candidates[n]) for n in references):  # spares the full checks of big outputs
            return False
        return all(check(n, candidates[n]).passed for n in references)

    rounded = {n: _rounded(r, dtypes[n]) for n, r in references.items()}
    if all(r.size == 0 or not np.any(r) for r in references.values()):
        # e.g. M = 0, or no token routed anywhere: the answer is empty or all zero, so zeros are right and
        # only the structure (shapes, dtypes, every element written) can be judged
        return [f"the reference rounded to {dtypes[n]} fails" for n in references if not check(n, rounded[n]).passed]
    for n in references:
        result = check(n, rounded[n])
        if not result.passed:
            problems.append(f"the reference rounded to {dtypes[n]} fails: {'; '.join(result.failures)}")
    zeros = {n: torch.zeros(r.shape, dtype=dtypes[n]) for n, r in references.items()}
    if case_passes(zeros):
        problems.append("an all-zero output passes")
    noisy = {}
    for n, r in references.items():
        finite = r[np.isfinite(r)]
        rms = float(np.sqrt(np.mean(np.square(finite)))) if finite.size else 0.0
        scale = 0.05 * rms if rms > 0 else 0.05
        noisy[n] = _rounded(r + scale * rng.standard_normal(r.shape, dtype=np.float32), dtypes[n])
    if case_passes(noisy):
        problems.append("the reference plus 5% noise passes")
    return problems
