"""Expected failures (waivers): a vendor's list of cases it knows its backend does not pass yet.

A waiver file is TOML or JSON (chosen by the ``.toml``/``.json`` suffix), one entry per pattern::

    # waivers.toml: expected failures of the `acme` backend (never applied when certifying)
    [[waiver]]
    case = "mla_decode/ext_page1"          # a case id or an fnmatch glob over case ids
    backend = "acme"                       # optional glob over backend names (default: every backend)
    category = "known-bug"                 # one of CATEGORIES
    reason = "page size 1 reads one token past the length (ACME-1234)"

(JSON: ``{"waiver": [{...}, ...]}`` with the same keys.) Applying waivers to a run
(:func:`apply_waivers`) marks every non-passing case an entry matches (``CaseResult.waiver``), so the
run's verdict ignores it; the case keeps its status and message, and every report shows the waiver.
Waivers are strict: an entry matching a case that **passed** makes that case fail with "unexpected
pass: remove the entry". An entry matching no case of the run is reported (``unused``), not an error:
the run may have selected other ops. Certification (``deepport certify --certify``) never applies
waivers: a certificate records what ran, as it ran.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepport.conformance.results import CaseResult, Status, SuiteRun

CATEGORIES = ("known-bug", "unsupported-feature", "precision", "toolchain", "environment", "suite-issue")
_KEYS = {"case", "backend", "category", "reason"}


class WaiverFileError(ValueError):
    """A waiver file that cannot be read or holds a malformed entry."""


@dataclass(frozen=True)
class Waiver:
    case: str  # case id or glob
    category: str
    reason: str
    backend: str | None = None  # glob over backend names; None: every backend

    def matches(self, case_id: str, backend: str) -> bool:
        if self.backend is not None and not fnmatch.fnmatchcase(backend, self.backend):
            return False
        return case_id == self.case or fnmatch.fnmatchcase(case_id, self.case)

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class WaiverOutcome:
    """What applying waivers did: cases waived, unexpected passes, entries that matched nothing."""

    waived: list[CaseResult] = field(default_factory=list)
    unexpected_passes: list[CaseResult] = field(default_factory=list)
    unused: list[Waiver] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"waived {r.status.value} {r.case_id} on {r.backend} ({r.waiver and r.waiver['category']})"
               for r in self.waived]
        out += [f"unexpected pass {r.case_id} on {r.backend}: remove the waiver entry "
                f"{r.waiver and r.waiver['case']!r}" for r in self.unexpected_passes]
        out += [f"unused waiver entry {w.case!r}" + (f" (backend {w.backend!r})" if w.backend else "")
                for w in self.unused]
        return out


def parse_waivers(data: Any, origin: str = "waivers") -> list[Waiver]:
    """Entries from a loaded document: ``{"waiver": [...]}`` or a bare list of entry objects."""
    entries = data.get("waiver", data.get("waivers")) if isinstance(data, Mapping) else data
    if isinstance(data, Mapping) and set(data) - {"waiver", "waivers"}:
        raise WaiverFileError(f"{origin}: unknown top-level keys {sorted(set(data) - {'waiver', 'waivers'})}; "
                              "expected a list of [[waiver]] entries")
    if not isinstance(entries, list):
        raise WaiverFileError(f"{origin}: expected a list of waiver entries, got {type(entries).__name__}")
    waivers = []
    for i, entry in enumerate(entries):
        where = f"{origin}: waiver {i + 1}"
        if not isinstance(entry, Mapping):
            raise WaiverFileError(f"{where}: expected a table/object, got {type(entry).__name__}")
        unknown = set(entry) - _KEYS
        if unknown:
            raise WaiverFileError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(_KEYS)}")
        for key in ("case", "category", "reason"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise WaiverFileError(f"{where}: `{key}` must be a non-empty string, got {entry.get(key)!r}")
        if entry["category"] not in CATEGORIES:
            raise WaiverFileError(f"{where}: category {entry['category']!r} is not one of {', '.join(CATEGORIES)}")
        backend = entry.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise WaiverFileError(f"{where}: `backend` must be a string, got {backend!r}")
        waivers.append(Waiver(entry["case"], entry["category"], entry["reason"].strip(), backend))
    return waivers


def load_waivers(path: str | Path) -> list[Waiver]:
    """Read a ``.toml`` or ``.json`` waiver file; raises :class:`WaiverFileError` with what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WaiverFileError(f"{p}: cannot read waivers: {exc}") from exc
    return parse_waivers(data, str(p))


def match(waivers: Sequence[Waiver], case_id: str, backend: str) -> Waiver | None:
    """The first entry matching ``case_id`` on ``backend``."""
    return next((w for w in waivers if w.matches(case_id, backend)), None)


def apply_waivers(run: SuiteRun, waivers: Iterable[Waiver]) -> WaiverOutcome:
    """Mark the cases of ``run`` the entries match (in place) and record the entries in ``run.waivers``."""
    entries = list(waivers)
    outcome = WaiverOutcome()
    used: set[int] = set()
    for r in run.cases:
        w = match(entries, r.case_id, r.backend)
        if w is None:
            continue
        used.add(entries.index(w))
        r.waiver = w.to_dict()
        (outcome.unexpected_passes if r.status is Status.PASS else outcome.waived).append(r)
    outcome.unused = [w for i, w in enumerate(entries) if i not in used]
    run.waivers = [w.to_dict() for w in entries]
    return outcome
