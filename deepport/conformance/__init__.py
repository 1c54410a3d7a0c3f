"""The conformance suite: cases as parameters + seed, a versioned generator, a tolerance table that
backends cannot loosen, a four-part checker, calibration of every case, and anti-cheating rules.

    from deepport.conformance import run_suite
    run = run_suite(["torch"], "smoke")
    assert run.passed()
"""

from deepport.conformance.case import TIERS, Case
from deepport.conformance.results import CaseResult, Status, SuiteRun
from deepport.conformance.runner import SUITE_VERSION, run_suite, select_cases, usable_backends

__all__ = ["SUITE_VERSION", "TIERS", "Case", "CaseResult", "Status", "SuiteRun", "run_suite", "select_cases",
           "usable_backends"]
