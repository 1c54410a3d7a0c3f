"""Joining the ``results.json`` of one certification run split by op into one certificate.

A full-tier certification of every op may not fit one sitting (a device session's command limit, or a
second GPU needed only for the multi-rank cases). Run ``deepport certify --tier full --seed N --op ...``
once per group of ops, with the **same run seed**, then ``deepport merge`` the parts: the result is the
``results.json`` one run over every op would have written, whose ``selection`` is the union of the
parts' (null, i.e. the whole tier, when they cover every op), so ``deepport verify`` judges it like any
other certificate (every case of the tier present exactly once, seeds derived from the run seed, inputs
regenerated, tolerances the suite's own).

The parts must agree on what makes them one run: schema, suite and generator versions, tier, run seed,
backends, isolation, and the device and software they ran on (device name, torch, deepport). They must
select disjoint ops and no case pattern. The merged file keeps each part's command, times, selection
and environment under ``parts`` (a key ``verify`` ignores).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

from deepport.conformance.results import SCHEMA, SCHEMA_VERSION, Status
from deepport.conformance.suites import SUITES

_SAME = ("schema", "schema_version", "suite_version", "generator_version", "tier", "run_seed", "isolation")
_ENVIRONMENT = ("deepport", "torch", "torch_cuda", "python")


class MergeError(ValueError):
    """The parts cannot be one certification run (the message says which part differs and how)."""


def _device_name(results: Mapping[str, Any]) -> object:
    env = results.get("environment")
    device = env.get("device") if isinstance(env, Mapping) else None
    return device.get("name") if isinstance(device, Mapping) else None


def _check_parts(parts: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """Raise unless the parts are one run split by op; returns the union of their ops."""
    if not parts:
        raise MergeError("no results to merge")
    first = parts[0]
    if first.get("schema") != SCHEMA or first.get("schema_version") != SCHEMA_VERSION:
        raise MergeError(f"{names[0]}: not a deepport results file of schema version {SCHEMA_VERSION}")
    ops: list[str] = []
    for part, name in zip(parts, names, strict=True):
        for key in _SAME:
            if part.get(key) != first.get(key):
                raise MergeError(f"{name}: {key} {part.get(key)!r} differs from {names[0]}'s {first.get(key)!r}")
        if sorted(part.get("backends", {})) != sorted(first.get("backends", {})):
            raise MergeError(f"{name}: backends {sorted(part.get('backends', {}))} differ from {names[0]}'s "
                             f"{sorted(first.get('backends', {}))}")
        env, env0 = part.get("environment") or {}, first.get("environment") or {}
        for key in _ENVIRONMENT:
            if env.get(key) != env0.get(key):
                raise MergeError(f"{name}: environment.{key} {env.get(key)!r} differs from {names[0]}'s "
                                 f"{env0.get(key)!r}")
        if _device_name(part) != _device_name(first):
            raise MergeError(f"{name}: device {_device_name(part)!r} differs from {names[0]}'s {_device_name(first)!r}")
        selection = part.get("selection") or {}
        if selection.get("case_pattern"):
            raise MergeError(f"{name}: selects cases by pattern {selection['case_pattern']!r}; only whole ops merge")
        selected = selection.get("ops")
        if not selected:
            raise MergeError(f"{name}: selects every op already; nothing to merge it with")
        overlap = sorted(set(selected) & set(ops))
        if overlap:
            raise MergeError(f"{name}: ops {overlap} are in an earlier part too")
        ops += list(selected)
    return ops


def merge_results(parts: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None,
                  command: str = "") -> dict[str, Any]:
    """The results of one run equivalent to ``parts`` (each a loaded ``results.json`` of the same run seed
    selecting other ops); raises :class:`MergeError` when they are not one run split by op."""
    labels = list(names) if names is not None else [f"part {i + 1}" for i in range(len(parts))]
    ops = _check_parts(parts, labels)
    first = parts[0]
    cases = [case for part in parts for case in part.get("cases", [])]
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for r in cases:
        per_op = summary.setdefault(r["backend"], {}).setdefault(r["op"], {s.value: 0 for s in Status})
        per_op[r["status"]] = per_op.get(r["status"], 0) + 1
    every_op = set(ops) == set(SUITES)
    started = min(str(p.get("started", "")) for p in parts)
    finished = max(str(p.get("finished", "")) for p in parts)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        **{k: first.get(k) for k in ("suite_version", "generator_version", "tier", "run_seed")},
        "command": command,
        "started": started,
        "finished": finished,
        "duration_s": sum(float(p.get("duration_s", 0.0)) for p in parts),
        "environment": first.get("environment"),
        "backends": first.get("backends"),
        "selection": {"ops": None if every_op else sorted(ops), "case_pattern": None},
        "isolation": first.get("isolation"),
        "summary": summary,
        "cases": cases,
        "parts": [{"file": label, "command": p.get("command"), "started": p.get("started"),
                   "finished": p.get("finished"), "duration_s": p.get("duration_s"),
                   "selection": p.get("selection"), "environment": p.get("environment")}
                  for label, p in zip(labels, parts, strict=True)],
        "merged": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
