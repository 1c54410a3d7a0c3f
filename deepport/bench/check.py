"""The check every backend passes before it is timed, so a fast wrong kernel is never reported as a
speed-up. Two halves, both required:

1. **Float64 reference**, one or both of:
   - *twin*: the config's ``check_case`` (a case of the op's conformance suite with the same operand
     layout, small enough for the float64 reference) is run on the backend through the conformance
     runner: poisoned outputs, input-mutation check, the suite's tolerances. One result per (case,
     backend) per run, shared by the configs that name the same case;
   - *sample*: the workload's ``reference_check`` judges part of the config's own output (its outputs
     are poisoned before the call) against a float64 reference with :func:`sampled_rows_check`.
2. **Agreement at full size.** On the config's own inputs, each output agrees with the baseline
   backend's output (itself checked by half 1): the same NaN/inf positions, and DeepGEMM's
   ``calc_diff`` on the finite values within the config's ``agreement`` bound. This catches what
   only goes wrong at size (split-KV, tiling, tails) without a float64 reference of a huge call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.conformance.case import Case
from deepport.conformance.checker import check_output
from deepport.conformance.runner import run_case
from deepport.conformance.suites import SUITES
from deepport.conformance.tolerance import Tolerance


@dataclass
class CheckResult:
    passed: bool
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message, **self.details}


def find_case(case_id: str) -> Case:
    op = case_id.split("/", 1)[0]
    suite = SUITES.get(op)
    if suite is None:
        raise KeyError(f"no conformance suite for {op!r} (check case {case_id!r})")
    for case in suite.cases():
        if case.id == case_id:
            found: Case = case
            return found
    raise KeyError(f"no conformance case {case_id!r} in the {op} suite")


def reference_twin(case_id: str, backend: str, device: torch.device, run_seed: int) -> CheckResult:
    """Half 1: the backend on the conformance case ``case_id``, judged against the float64 reference."""
    try:
        case = find_case(case_id)
    except KeyError as exc:
        return CheckResult(False, str(exc), {"case": case_id})
    (result,) = run_case(case, [backend], device, run_seed)
    status = result.status.value
    return CheckResult(status == "pass", result.message, {"case": case_id, "status": status,
                                                          "seed": result.seed, "run_seed": run_seed})


def _calc_diff(a: torch.Tensor, r: torch.Tensor) -> float:
    denominator = float((a * a + r * r).sum())
    return 0.0 if denominator < 1e-12 else float(1.0 - 2.0 * (a * r).sum() / denominator)


def agreement(outputs: Mapping[str, torch.Tensor], baseline: Mapping[str, torch.Tensor], bound: float,
              baseline_name: str, masks: Mapping[str, torch.Tensor] | None = None) -> CheckResult:
    """Half 2: ``outputs`` against the baseline backend's outputs of the same call. ``masks`` (by output
    name, a boolean tensor broadcastable to the output) restricts the comparison to the elements the op
    specifies (e.g. the rows below each expert's count of a fixed-capacity layout)."""
    details: dict[str, Any] = {"against": baseline_name, "calc_diff_bound": bound, "outputs": {}}
    failures = []
    for name, ref in baseline.items():
        got = outputs[name]
        a, r = got.detach().to(torch.float64), ref.detach().to(torch.float64)
        specified = (masks or {}).get(name)
        if specified is not None:
            keep = specified.to(a.device).expand_as(a)
            a, r = a[keep], r[keep]
        metrics: dict[str, Any] = {}
        for label, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            differ = int((mask(a) != mask(r)).sum())
            if differ:
                failures.append(f"{name}: {label} positions differ from {baseline_name} in {differ} elements")
        finite = torch.isfinite(a) & torch.isfinite(r)
        av, rv = a[finite], r[finite]
        metrics["calc_diff"] = _calc_diff(av, rv)
        metrics["max_abs_diff"] = float((av - rv).abs().max()) if av.numel() else 0.0
        if metrics["calc_diff"] > bound:
            failures.append(f"{name}: calc_diff {metrics['calc_diff']:.3g} against {baseline_name} > {bound:.3g}")
        details["outputs"][name] = metrics
    return CheckResult(not failures, "; ".join(failures), details)


def sample_rows(m: int, most: int = 64) -> list[int]:
    """Up to ``most`` row indices spread over ``[0, m)``, the first and the last included."""
    if m <= most:
        return list(range(m))
    return sorted({round(i * (m - 1) / (most - 1)) for i in range(most)})


def sampled_rows_check(name: str, got: torch.Tensor, reference: torch.Tensor, tol: Tolerance,
                       rows: list[int]) -> dict[str, Any]:
    """Judge ``got[rows]`` against ``reference`` (float64, the exact answer of those rows) with the
    conformance checker (structure, special values, element-wise bound, ``calc_diff``)."""
    result = check_output(name, got[rows].contiguous(), reference.detach().cpu().numpy(), dtype=got.dtype,
                          device=got.device, tol=tol)
    return {"passed": result.passed, "message": "; ".join(result.failures), "rows": len(rows),
            "tolerance": tol.to_dict(), **result.metrics}
