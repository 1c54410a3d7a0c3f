"""Profiles: named feature sets per op family, the unit a backend claims and a certificate certifies.

Every conformance case belongs to exactly one profile: the first rule of its op family (``PROFILES``,
in order) whose predicate holds for the case's parameters. A case of an op without a family here (a
toy op added by a test) belongs to ``<op>/core`` or ``<op>/extension`` after its ``Case.profile``.
A profile's cases are all ``core`` cases (upstream's shapes) or all ``extension`` cases.

Claims. A backend claims the profiles listed in ``Backend.profiles`` when it sets that field;
otherwise its claims derive from its declared capabilities: a profile is claimed when at least one of
its cases ran and none came back ``not_supported`` (the answer dispatch gives from the backend's
``OpSupport`` records before the backend runs, so an op the backend does not implement, or a dtype,
recipe or size its requirements exclude, leaves the profile unclaimed).

Verdicts per (backend, profile), from the case records of a run:

- ``CERTIFIED``: claimed, and every case passed;
- ``FAIL``: a case failed, errored, crashed or timed out, or the profile is claimed and a case did not
  pass (``not_supported`` in a claimed profile: the declaration contradicts the claim);
- ``PASS (unclaimed)``: every case passed but the backend does not claim the profile (reported: it could);
- ``PARTIAL``: unclaimed; some cases passed, the others are declared unsupported;
- ``NOT SUPPORTED``: unclaimed; every case declared unsupported;
- ``SUITE ERROR``: a case failed calibration (the suite's fault, never the backend's).

Claimed and failing is a fail; unclaimed but passing is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepport.conformance.case import Case
from deepport.conformance.results import Status

CERTIFIED, FAIL, UNCLAIMED_PASS = "CERTIFIED", "FAIL", "PASS (unclaimed)"
PARTIAL, NOT_SUPPORTED, SUITE_ERROR = "PARTIAL", "NOT SUPPORTED", "SUITE ERROR"
_FAILING = {Status.FAIL.value, Status.ERROR.value, Status.CRASH.value, Status.TIMEOUT.value}

Params = Mapping[str, Any]


@dataclass(frozen=True)
class Profile:
    """A named feature set of one op family. ``rule`` says whether a case (its params and its
    ``core``/``extension`` profile) belongs here, once the family's earlier rules did not take it."""

    name: str
    summary: str
    rule: Callable[[Params, str], bool]
    ops: tuple[str, ...] | None = None  # only cases of these ops (None: every op of the family)

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[0]


def _mla_dims_core(p: Params) -> bool:
    return (p.get("d_qk"), p.get("d_v")) == (576, 512)


def _fp8_extension(p: Params, kind: str) -> bool:
    return kind == "extension"


def _ue8m0(p: Params, kind: str) -> bool:
    return p.get("sf") == "ue8m0"


def _per_row_sfb(p: Params, kind: str) -> bool:
    return p.get("recipe") in ("1d1d", (1, 1, 128), [1, 1, 128])


# Op families: the ops whose cases each family's profiles sort (the first matching prefix wins).
FAMILIES: dict[str, tuple[str, ...]] = {
    "mla_decode": ("mla_decode",),
    "fp8_gemm": ("fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt"),
    "fp8_grouped_gemm": ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked"),
    "moe": ("moe_layout", "moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded",
            "moe_low_latency_dispatch", "moe_low_latency_combine"),
}

PROFILES: tuple[Profile, ...] = (
    Profile("mla_decode/head_dims", "head dims other than d_qk/d_v 576/512 (any page size)",
            lambda p, kind: not _mla_dims_core(p)),
    Profile("mla_decode/pages", "page sizes other than 64 (d_qk/d_v 576/512)",
            lambda p, kind: p.get("page") != 64),
    Profile("mla_decode/fp16", "float16 q and KV cache; otherwise as mla_decode/core",
            lambda p, kind: p.get("dtype") == "float16"),
    Profile("mla_decode/core", "FlashMLA's dense decode: bfloat16, d_qk/d_v 576/512, page 64, s_q 1..4, "
            "h_kv 1..2, causal, varlen with empty requests, softmax_scale, metadata",
            lambda p, kind: True),
    Profile("fp8_gemm/k_tail", "K not a multiple of 128 (a shorter last K block) and padded SFA strides",
            _fp8_extension),
    Profile("fp8_gemm/ue8m0", "UE8M0 SFs packed four per int32, recipe (1, 1, 128), every layout", _ue8m0),
    Profile("fp8_gemm/layouts", "NN, TN and TT operand layouts (float32 SFs)",
            lambda p, kind: p.get("layout") != "nt"),
    Profile("fp8_gemm/sfb_per_row", "recipe (1, 1, 128): float32 SFs per row of B and per 128 K (NT)",
            _per_row_sfb),
    Profile("fp8_gemm/fp32_out", "float32 D, with and without C accumulated in place (NT, recipe (1, 128, 128))",
            lambda p, kind: p.get("dtype") == "float32"),
    Profile("fp8_gemm/core", "DeepGEMM's NT GEMM: recipe (1, 128, 128) (1x128 activation and 128x128 weight "
            "float32 SFs, K- or MN-major SFA), bfloat16 D, K a multiple of 128, any M (0 included) and N",
            lambda p, kind: True),
    Profile("fp8_grouped_gemm/k_tail", "K not a multiple of 128", _fp8_extension),
    Profile("fp8_grouped_gemm/ue8m0", "UE8M0 SFs packed four per int32", _ue8m0),
    Profile("fp8_grouped_gemm/sfb_per_row", "recipe (1, 1, 128): float32 SFs per row of B", _per_row_sfb),
    Profile("fp8_grouped_gemm/core", "M-grouped contiguous (with padding rows and empty groups) and masked "
            "GEMMs, recipe (1, 128, 128) with float32 SFs, bfloat16 D", lambda p, kind: True),
    Profile("moe/ep", "MoE dispatch/combine over 2 and 4 ranks of a torch.distributed group",
            lambda p, kind: int(p.get("world", 1)) > 1),
    Profile("moe/permute", "MoE layout count, permute into the expanded and low-latency layouts (FP8 cast "
            "included) and the weighted un-permute, in one process",
            lambda p, kind: True, ops=("moe_layout", "moe_dispatch_expanded", "moe_combine_expanded",
                                       "moe_low_latency_dispatch", "moe_low_latency_combine")),
    Profile("moe/single", "MoE normal dispatch and combine (DeepEP's intranode layout) in one process",
            lambda p, kind: True),
)
PROFILE_NAMES: tuple[str, ...] = tuple(p.name for p in PROFILES)


def family_of(op: str) -> str | None:
    for family, ops in FAMILIES.items():
        if op in ops:
            return family
    return None


def profile_name(op: str, params: Params, kind: str) -> str:
    """The profile of a case of ``op`` with ``params`` and ``kind`` (``"core"`` or ``"extension"``)."""
    family = family_of(op)
    if family is None:
        return f"{op}/{kind}"
    for profile in PROFILES:
        if profile.family == family and (profile.ops is None or op in profile.ops) and profile.rule(params, kind):
            return profile.name
    raise AssertionError(f"no profile of {family} takes case params {dict(params)}")  # the last rule takes all


def profile_of(case: Case) -> str:
    return profile_name(case.op, case.params, case.profile)


def record_profile(record: Mapping[str, Any]) -> str:
    """The profile of a case record of a ``results.json`` (from its op, params and core/extension kind)."""
    return profile_name(str(record["op"]), record.get("params") or {}, str(record.get("profile", "core")))


def summary_of(name: str) -> str:
    for profile in PROFILES:
        if profile.name == name:
            return profile.summary
    op, _, kind = name.partition("/")
    return f"{kind} cases of {op}"


def unknown_profiles(names: Iterable[str]) -> list[str]:
    """The names that are not profiles of this suite (``<op>/core`` and ``<op>/extension`` of an op with
    cases but no family, such as a toy op added by a test, are profiles)."""
    from deepport.conformance.suites import SUITES

    def known(name: str) -> bool:
        op, _, kind = name.partition("/")
        return name in PROFILE_NAMES or (op in SUITES and family_of(op) is None and kind in ("core", "extension"))

    return [n for n in names if not known(n)]


@dataclass
class ProfileVerdict:
    """One backend on one profile: the counts by status, whether it is claimed (and how), the verdict."""

    profile: str
    claimed: bool
    claim: str  # "declared" (Backend.profiles) or "derived" (from the declared capabilities)
    counts: dict[str, int]
    verdict: str
    required: bool  # its cases are core cases (upstream's shapes)
    not_passing: list[str] = field(default_factory=list)  # case ids that did not pass

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        passed = self.counts.get(Status.PASS.value, 0)
        ns = self.counts.get(Status.NOT_SUPPORTED.value, 0)
        extra = f", {ns} not supported" if ns else ""
        claim = f"claimed ({self.claim})" if self.claimed else "not claimed"
        return f"{self.profile}: {self.verdict} ({passed}/{self.total} passed{extra}; {claim})"

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "claimed": self.claimed, "claim": self.claim, "counts": self.counts,
                "verdict": self.verdict, "required": self.required, "not_passing": self.not_passing}


def _verdict(claimed: bool, counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    passed = counts.get(Status.PASS.value, 0)
    if any(counts.get(s, 0) for s in _FAILING):
        return FAIL
    if counts.get(Status.INTERNAL_ERROR.value, 0):
        return SUITE_ERROR
    if claimed:
        return CERTIFIED if passed == total else FAIL
    if passed == total:
        return UNCLAIMED_PASS
    return PARTIAL if passed else NOT_SUPPORTED


def backend_profiles(records: Sequence[Mapping[str, Any]], declared: Sequence[str] | None) -> list[ProfileVerdict]:
    """The verdict of one backend on every profile its ``records`` (case records of a run) touch, plus any
    ``declared`` profile without a case in the run (a claim the run cannot back: ``FAIL``)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        grouped.setdefault(record_profile(rec), []).append(rec)
    verdicts = []
    for name, recs in grouped.items():
        counts: dict[str, int] = {}
        for rec in recs:
            counts[str(rec["status"])] = counts.get(str(rec["status"]), 0) + 1
        if declared is not None:
            claimed, claim = name in declared, "declared"
        else:
            claimed, claim = counts.get(Status.NOT_SUPPORTED.value, 0) == 0, "derived"
        not_passing = [str(r["case_id"]) for r in recs if r["status"] != Status.PASS.value]
        required = all(r.get("profile") == "core" for r in recs)
        verdicts.append(ProfileVerdict(name, claimed, claim, counts, _verdict(claimed, counts), required, not_passing))
    for name in declared or ():
        if name not in grouped:
            verdicts.append(ProfileVerdict(name, True, "declared", {}, FAIL, False,
                                           ["(no case of this profile ran)"]))
    order = {name: i for i, name in enumerate(PROFILE_NAMES)}
    verdicts.sort(key=lambda v: (order.get(v.profile, len(order)), v.profile))
    return verdicts


def profile_table(results: Mapping[str, Any],
                  declared: Mapping[str, Sequence[str] | None] | None = None) -> dict[str, list[ProfileVerdict]]:
    """``{backend: [ProfileVerdict, ...]}`` for a results dict; ``declared`` maps a backend to its explicit
    ``Backend.profiles`` (absent or ``None``: claims derived from the run)."""
    by_backend: dict[str, list[Mapping[str, Any]]] = {name: [] for name in results.get("backends", {})}
    for rec in results.get("cases", []):
        by_backend.setdefault(str(rec["backend"]), []).append(rec)
    return {b: backend_profiles(recs, (declared or {}).get(b)) for b, recs in by_backend.items()}


def claimed_profiles(verdicts: Iterable[ProfileVerdict]) -> list[str]:
    return [v.profile for v in verdicts if v.claimed]


def certified(verdicts: Sequence[ProfileVerdict]) -> bool:
    """True when this backend's run supports a certificate: no failing profile, at least one claimed one."""
    return bool(verdicts) and all(v.verdict not in (FAIL, SUITE_ERROR) for v in verdicts) and any(
        v.verdict == CERTIFIED for v in verdicts)


def cases_by_profile(cases: Iterable[Case]) -> dict[str, list[Case]]:
    grouped: dict[str, list[Case]] = {}
    for case in cases:
        grouped.setdefault(profile_of(case), []).append(case)
    return grouped
