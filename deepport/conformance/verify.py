"""Verifying a ``results.json``: is it a valid certificate for the conformance suite installed here?

A third party runs this on a certificate without the hardware it was made on. It checks that the file
is internally consistent and describes exactly the installed suite's cases, run honestly:

1. schema and ``schema_version`` (:func:`deepport.conformance.report.load_results`);
2. ``suite_version`` and ``generator_version`` are the installed suite's (else it certifies another
   release of the suite);
3. the run is a certification run: tier ``full`` and no case selection (``selection.ops`` and
   ``selection.case_pattern`` null); otherwise the verdict is "not a certification run", and
   everything else is still checked;
4. each listed backend has every case of the tier (of the selected ops and pattern, if any) exactly
   once: missing, extra and duplicate case ids are errors;
5. each case record carries the suite's params, features, profile and tier for its id; its seed is
   ``case.seed(run_seed)`` (seeds derive from the recorded run seed, they were not picked); its status
   is ``pass`` or ``not_supported``; a pass carries
   the digest of its inputs and, per output, ``max_err_over_bound <= 1`` and ``calc_diff`` within the
   suite's bound, and the tolerance it records is the suite's table entry (a loosened one is an error);
6. the ``summary`` block equals the counts recomputed from the case records;
7. the inputs of some cases (the ``regenerate`` smallest, or all) are regenerated from
   ``(case, seed)`` and their sha256 must equal the recorded one (the backend ran on the suite's inputs);
8. the environment names the device and the torch version, and the backends ran isolated in their own
   processes (``"isolation": "process"``); a warning if not;
9. profiles (:mod:`deepport.conformance.profiles`): per backend, the profiles it claims (derived: every
   case of the profile ran and none came back ``not_supported``) all passed entirely, and it claims at
   least one. A backend that does not implement an op (hopper and the MoE ops) or a shape (an extension)
   leaves those profiles unclaimed: the certificate certifies the profiles it claims and says which
   those are, and a failing case fails its profile whatever the claims.

What it cannot check: the backend's outputs. The metrics are the harness's word; only a rerun
(``deepport certify --seed RUN_SEED``, or better a fresh seed) re-measures them.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from deepport.conformance.call import inputs_sha256  # the digest the harness records per case
from deepport.conformance.case import TIERS, Case
from deepport.conformance.profiles import CERTIFIED, FAIL, SUITE_ERROR, profile_table
from deepport.conformance.report import load_results
from deepport.conformance.results import SCHEMA, SCHEMA_VERSION, Status
from deepport.conformance.runner import SUITE_VERSION, select_cases
from deepport.conformance.suites import SUITES
from deepport.conformance.tolerance import TOLERANCES, tolerance

VALID, NOT_CERTIFICATION, INVALID = "VALID CERTIFICATE", "NOT A CERTIFICATION RUN", "INVALID"
DEFAULT_REGENERATE = 8
_ALLOWED = {Status.PASS.value, Status.NOT_SUPPORTED.value}

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found; ``case_id`` and ``backend`` say what it concerns (None: the whole run)."""

    severity: Severity
    message: str
    case_id: str | None = None
    backend: str | None = None

    def where(self) -> str:
        parts = [p for p in (self.case_id, f"on {self.backend}" if self.backend else None) if p]
        return " ".join(parts) if parts else "run"


@dataclass
class VerifyReport:
    """Every finding, whether the run is a certification run, per-backend profile lines, the cases whose
    inputs were regenerated, and the verdict derived from them."""

    findings: list[Finding] = field(default_factory=list)
    certification_run: bool = False
    not_certification_reasons: list[str] = field(default_factory=list)
    profiles: dict[str, list[str]] = field(default_factory=dict)
    regenerated: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def verdict(self) -> str:
        if self.errors:
            return INVALID
        return VALID if self.certification_run else NOT_CERTIFICATION

    @property
    def exit_code(self) -> int:
        """0 for a valid certificate, 1 otherwise (invalid, or not a certification run)."""
        return 0 if self.verdict == VALID else 1

    def error(self, message: str, case_id: str | None = None, backend: str | None = None) -> None:
        self.findings.append(Finding("error", message, case_id, backend))

    def warning(self, message: str, case_id: str | None = None, backend: str | None = None) -> None:
        self.findings.append(Finding("warning", message, case_id, backend))


def _canonical(value: Any) -> str:
    """JSON text with sorted keys: equal only if equal as JSON (``true`` is not ``1``, ``1`` not ``1.0``)."""
    return json.dumps(value, sort_keys=True)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not a real number (bools and NaN included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def generator_version() -> int:
    """The generator version a run of the installed suite records (as :func:`run_suite` computes it)."""
    return max(int(s.GENERATOR_VERSION) for s in SUITES.values())


def input_elements(params: Mapping[str, Any]) -> int:
    """Estimated number of input elements of a case (q plus the KV cache), to pick cheap cases first."""
    def get(key: str) -> int:
        value = params.get(key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else 1

    return get("b") * get("d_qk") * (get("s_q") * get("h_q") + get("s_k"))


def verify_file(path: str | os.PathLike[str], *, regenerate: int | Literal["all"] = DEFAULT_REGENERATE,
                certification_tier: str = "full") -> VerifyReport:
    """:func:`verify` a ``results.json``; raises :class:`~deepport.conformance.report.ResultsFileError`
    when the file is unreadable or not of this schema (check 1)."""
    return verify(load_results(path), regenerate=regenerate, certification_tier=certification_tier)


def verify(results: Mapping[str, Any], *, regenerate: int | Literal["all"] = DEFAULT_REGENERATE,
           certification_tier: str = "full", check_profiles: bool = True) -> VerifyReport:
    """Check ``results`` (a loaded ``results.json``) against the installed suite; see the module docstring.

    ``regenerate``: how many cases (smallest inputs first) get their inputs regenerated and hashed, or
    ``"all"``. ``certification_tier`` is the tier a certificate must be for: always ``"full"``, except
    in this module's tests, which pass ``"smoke"`` to reach the VALID verdict on a CPU-sized run.
    ``check_profiles=False`` leaves check 9 to the caller: a certificate archive records the claims its
    backends declared (:mod:`deepport.conformance.certificate_verify` checks those).
    """
    rep = VerifyReport()
    _check_identity(results, rep)
    expected = _check_certification(results, rep, certification_tier)
    run_seed = results.get("run_seed")
    if isinstance(run_seed, bool) or not isinstance(run_seed, int) or not 0 <= run_seed < 2**64:
        rep.error(f"run_seed must be an integer in [0, 2**64), got {run_seed!r}; case seeds cannot be checked")
        run_seed = None
    records = _records(results, rep)
    suite_cases = {c.id: c for op in SUITES for c in select_cases("full", [op])}
    _check_case_sets(results, records, expected, rep)
    for rec in records:
        case = suite_cases.get(rec["case_id"])
        if case is not None:
            _check_record(rec, case, run_seed, rep)
    _check_summary(results, records, rep)
    if run_seed is not None:
        _check_inputs(records, suite_cases, run_seed, regenerate, rep)
    _check_environment(results, rep)
    rep.profiles = _profiles(results, records, suite_cases)
    if check_profiles:
        backends = results.get("backends")
        _check_profiles({"backends": backends if isinstance(backends, Mapping) else {},
                         "cases": [r for r in records if isinstance(r.get("params", {}), Mapping)]}, rep)
    return rep


def _check_profiles(results: Mapping[str, Any], rep: VerifyReport) -> None:
    """Check 9 on the well-formed records: every claimed (derived) profile passed entirely; each backend
    certifies at least one."""
    for backend, verdicts in profile_table(results).items():
        for v in verdicts:
            if v.verdict in (FAIL, SUITE_ERROR):
                rep.error(f"profile {v.line()}; not passing: {', '.join(v.not_passing[:5])}", backend=backend)
        certified = [v.profile for v in verdicts if v.verdict == CERTIFIED]
        if not certified:
            rep.error("claims no profile that passed: the certificate would certify nothing", backend=backend)
        rep.profiles.setdefault(backend, []).append(f"certified profiles: {', '.join(certified) or 'none'}")


def _check_identity(results: Mapping[str, Any], rep: VerifyReport) -> None:
    """Checks 1 (for dicts not read by load_results) and 2: the schema and the suite release."""
    if results.get("schema") != SCHEMA or results.get("schema_version") != SCHEMA_VERSION:
        rep.error(f"schema {results.get('schema')!r} version {results.get('schema_version')!r}; "
                  f"expected {SCHEMA!r} version {SCHEMA_VERSION}")
    if results.get("suite_version") != SUITE_VERSION:
        rep.error(f"suite_version {results.get('suite_version')!r} is not the installed suite's {SUITE_VERSION!r}: "
                  "this is a certificate for another release of the suite")
    if results.get("generator_version") != generator_version():
        rep.error(f"generator_version {results.get('generator_version')!r} is not the installed suite's "
                  f"{generator_version()}: its inputs came from another generator")


def _check_certification(results: Mapping[str, Any], rep: VerifyReport, certification_tier: str) -> list[Case] | None:
    """Check 3: full tier, whole selection. Returns the cases each backend must have (None: unknown)."""
    tier = results.get("tier")
    selection = results.get("selection") or {}
    if not isinstance(selection, Mapping):
        rep.error(f"selection must be an object, got {selection!r}")
        selection = {}
    ops, pattern = selection.get("ops"), selection.get("case_pattern")
    if tier != certification_tier:
        rep.not_certification_reasons.append(f"tier {tier!r}: only a {certification_tier!r}-tier run certifies")
    if ops:
        rep.not_certification_reasons.append(f"selection restricted to ops {ops!r}")
    if pattern:
        rep.not_certification_reasons.append(f"selection restricted to cases matching {pattern!r}")
    rep.certification_run = not rep.not_certification_reasons
    if tier not in TIERS:
        rep.error(f"unknown tier {tier!r} (expected one of {', '.join(TIERS)}); the case list cannot be checked")
        return None
    if ops is not None and not (isinstance(ops, list) and all(isinstance(o, str) for o in ops)):
        rep.error(f"selection.ops must be a list of op names or null, got {ops!r}")
        return None
    if pattern is not None and not isinstance(pattern, str):
        rep.error(f"selection.case_pattern must be a string or null, got {pattern!r}")
        return None
    try:
        return select_cases(str(tier), ops or None, pattern or None)
    except ValueError as exc:
        rep.error(f"selection cannot be reproduced by the installed suite: {exc}")
        return None


def _records(results: Mapping[str, Any], rep: VerifyReport) -> list[Mapping[str, Any]]:
    """The case records that name a case id, op, backend and status (malformed ones are errors)."""
    records: list[Mapping[str, Any]] = []
    cases = results.get("cases")
    if not isinstance(cases, list):
        rep.error(f"cases must be a list of case records, got {type(cases).__name__}")
        return records
    for i, rec in enumerate(cases):
        if not isinstance(rec, Mapping) or not all(isinstance(rec.get(k), str)
                                                   for k in ("case_id", "op", "backend", "status")):
            rep.error(f"cases[{i}] is not a case record (needs string case_id, op, backend, status)")
            continue
        records.append(rec)
    return records


def _check_case_sets(results: Mapping[str, Any], records: list[Mapping[str, Any]], expected: list[Case] | None,
                     rep: VerifyReport) -> None:
    """Check 4: each listed backend has every expected case exactly once, and no other."""
    backends = results.get("backends", {})
    if not backends:
        rep.error("no backend is listed in `backends`")
    for backend in sorted({r["backend"] for r in records} - set(backends)):
        rep.error("case records for a backend not listed in `backends`", backend=backend)
    for backend in backends:
        counts = Counter(r["case_id"] for r in records if r["backend"] == backend)
        for case_id, n in counts.items():
            if n > 1:
                rep.error(f"recorded {n} times (each case must appear exactly once)", case_id, backend)
        if expected is None:
            continue
        ids = [c.id for c in expected]
        for case_id in ids:
            if case_id not in counts:
                rep.error("missing: a case of the selected tier has no record", case_id, backend)
        for case_id in counts.keys() - set(ids):
            rep.error("extra: not a case of the selected tier in the installed suite", case_id, backend)


def _check_record(rec: Mapping[str, Any], case: Case, run_seed: int | None, rep: VerifyReport) -> None:
    """Check 5 for one record of a known case."""
    cid, backend = case.id, rec["backend"]
    if rec["op"] != case.op:
        rep.error(f"op {rec['op']!r}, but the suite's case is of op {case.op!r}", cid, backend)
    if _canonical(rec.get("params")) != _canonical(json.loads(json.dumps(dict(case.params)))):
        rep.error("params differ from the suite's case", cid, backend)
    if rec.get("features") != list(case.features):
        rep.error(f"features {rec.get('features')!r} differ from the suite's {list(case.features)!r}", cid, backend)
    for key in ("profile", "tier"):
        if rec.get(key) != getattr(case, key):
            rep.error(f"{key} {rec.get(key)!r}, but the suite's case is {getattr(case, key)!r}", cid, backend)
    if run_seed is not None and rec.get("seed") != case.seed(run_seed):
        rep.error(f"seed {rec.get('seed')!r} is not the one derived from the run seed ({case.seed(run_seed)})",
                  cid, backend)
    status = rec["status"]
    if status not in _ALLOWED:
        rep.error(f"status {status!r}: a certificate allows only pass, or not_supported (the backend's "
                  f"declared answer before it ran; message: {rec.get('message') or '(none)'})", cid, backend)
    elif status == Status.PASS.value:
        _check_pass(rec, case, rep)


def _check_pass(rec: Mapping[str, Any], case: Case, rep: VerifyReport) -> None:
    """A pass must carry its input digest and, per output, errors within the suite's own tolerance."""
    cid, backend = case.id, rec["backend"]
    metrics, tolerances = rec.get("metrics"), rec.get("tolerance")
    if not isinstance(metrics, Mapping) or not isinstance(tolerances, Mapping):
        rep.error("a pass without metrics and tolerance objects", cid, backend)
        return
    inputs = metrics.get("inputs")
    if not (isinstance(inputs, Mapping) and isinstance(inputs.get("sha256"), str)):
        rep.error("a pass without the sha256 of its inputs (metrics.inputs.sha256)", cid, backend)
    dtype = case.params.get("dtype")
    outputs = [out for (op, out, dt) in TOLERANCES if op == case.op and dt == dtype]
    if not outputs:
        rep.error(f"the suite has no tolerance for {case.op} at dtype {dtype!r}", cid, backend)
    for out in outputs:
        suite_tol = tolerance(case.op, out, str(dtype)).to_dict()
        recorded = tolerances.get(out)
        if _canonical(recorded) != _canonical(suite_tol):
            looser = isinstance(recorded, Mapping) and (any(
                (_number(recorded.get(k)) or 0.0) > v for k, v in suite_tol.items() if _number(v) is not None)
                or recorded.get("elementwise") != suite_tol.get("elementwise"))
            rep.error(f"`{out}`: recorded tolerance {recorded!r} {'is looser than' if looser else 'differs from'} "
                      f"the suite's {suite_tol!r}", cid, backend)
        m = metrics.get(out)
        if not isinstance(m, Mapping):
            rep.error(f"`{out}`: a pass without metrics for this output", cid, backend)
            continue
        over, diff = _number(m.get("max_err_over_bound")), _number(m.get("calc_diff"))
        if over is None or over > 1.0:
            rep.error(f"`{out}`: max_err_over_bound {m.get('max_err_over_bound')!r} is not <= 1", cid, backend)
        if diff is None or diff > suite_tol["max_calc_diff"]:
            rep.error(f"`{out}`: calc_diff {m.get('calc_diff')!r} is not <= {suite_tol['max_calc_diff']}", cid, backend)
        if m.get("mismatches", 0) != 0:
            rep.error(f"`{out}`: {m.get('mismatches')!r} mismatching elements in a pass", cid, backend)


def _check_summary(results: Mapping[str, Any], records: list[Mapping[str, Any]], rep: VerifyReport) -> None:
    """Check 6: ``summary`` is ``{backend: {op: {status: count}}}`` recomputed from the records."""
    table: dict[str, dict[str, dict[str, int]]] = {}
    for r in records:
        per_op = table.setdefault(r["backend"], {}).setdefault(r["op"], {s.value: 0 for s in Status})
        per_op[r["status"]] = per_op.get(r["status"], 0) + 1
    recorded = results.get("summary")
    if not isinstance(recorded, Mapping):
        rep.error(f"summary must be an object, got {recorded!r}")
        return
    for backend in sorted(set(table) | set(recorded)):
        mine, theirs = table.get(backend, {}), recorded.get(backend)
        if not isinstance(theirs, Mapping):
            rep.error(f"summary has no counts for this backend; the cases give {mine}", backend=backend)
            continue
        for op in sorted(set(mine) | set(theirs)):
            if _canonical(mine.get(op)) != _canonical(theirs.get(op)):
                rep.error(f"summary for {op} says {theirs.get(op)}, the cases give {mine.get(op)}", backend=backend)


def _check_inputs(records: list[Mapping[str, Any]], suite_cases: Mapping[str, Case], run_seed: int,
                  regenerate: int | Literal["all"], rep: VerifyReport) -> None:
    """Check 7: regenerate inputs of cases with a recorded digest and compare it, every backend's record."""
    digests: dict[str, list[tuple[str, Any]]] = {}
    for r in records:
        inputs = r.get("metrics", {}).get("inputs") if isinstance(r.get("metrics"), Mapping) else None
        sha = inputs.get("sha256") if isinstance(inputs, Mapping) else None
        if r["case_id"] in suite_cases and sha is not None:
            digests.setdefault(r["case_id"], []).append((r["backend"], sha))
    order = sorted(digests, key=lambda cid: input_elements(suite_cases[cid].params))
    chosen = order if regenerate == "all" else order[:max(regenerate, 0)]
    for cid in chosen:
        case = suite_cases[cid]
        try:
            actual = inputs_sha256(SUITES[case.op].generate(case, case.seed(run_seed)).tensors)
        except Exception as exc:  # a suite bug, but the certificate cannot be confirmed either
            rep.error(f"regenerating the inputs failed: {exc!r}", cid)
            continue
        rep.regenerated.append(cid)
        for backend, sha in digests[cid]:
            if sha != actual:
                rep.error(f"inputs sha256 {sha!r} is not that of the suite's inputs for this seed ({actual}): "
                          "the backend did not run on the suite's inputs", cid, backend)


def _check_environment(results: Mapping[str, Any], rep: VerifyReport) -> None:
    """Check 8: the environment names the device and the torch version."""
    env = results.get("environment")
    env = env if isinstance(env, Mapping) else {}
    device = env.get("device")
    if not (isinstance(device, Mapping) and device.get("name")):
        rep.warning("environment does not name the device (environment.device.name)")
    if not env.get("torch"):
        rep.warning("environment does not record the torch version (environment.torch)")
    if results.get("isolation") != "process":
        rep.warning(f"backends ran in the harness's process (isolation {results.get('isolation', 'not recorded')!r}); "
                    "a certification run should isolate them (deepport certify --isolate, the default for --tier full)")


def _profiles(results: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
              suite_cases: Mapping[str, Case]) -> dict[str, list[str]]:
    """Per backend: ``core profile: PASS (80/80)`` and the extension counts, by the suite's profiles."""
    lines: dict[str, list[str]] = {}
    for backend in dict.fromkeys([*results.get("backends", {}), *(r["backend"] for r in records)]):
        mine = [r for r in records if r["backend"] == backend]
        profile = {r["case_id"]: suite_cases[r["case_id"]].profile if r["case_id"] in suite_cases
                   else r.get("profile") for r in mine}
        core = [r for r in mine if profile[r["case_id"]] == "core"]
        ext = [r for r in mine if profile[r["case_id"]] == "extension"]
        passed = sum(r["status"] == Status.PASS.value for r in core)
        declined = sum(r["status"] == Status.NOT_SUPPORTED.value for r in core)
        word = ("NOT RUN" if not core else "PASS" if passed == len(core)
                else "INCOMPLETE" if passed + declined == len(core) else "FAIL")
        ext_pass = sum(r["status"] == Status.PASS.value for r in ext)
        ext_ns = sum(r["status"] == Status.NOT_SUPPORTED.value for r in ext)
        lines[backend] = [f"core profile: {word} ({passed}/{len(core)})",
                          f"extensions: {ext_pass}/{len(ext)} passed, {ext_ns} not supported"]
    return lines
