"""``deepport tune-table``: turn ``deepport bench`` results into a performance table for automatic selection.

Input: one or more ``bench.json`` files of one device family (:func:`deepport.dispatch.perf_table.family_key`).
Output: the table :mod:`deepport.dispatch.perf_table` reads (its docstring has the schema). How it is built:

- Only results that passed count: status ``ok`` (checked against float64, then timed) with every entry
  of their ``check`` passed. The same (device, op, config, backend) in several runs: the latest run wins.
- Each config's ``params`` become the op's shape features (the op descriptor's ``perf_shape`` function,
  the same one the op layer applies to a call) and fall into the buckets of :data:`BUCKET_RULES`: the
  exact bucket (ranges and exact features) and the ranges-only bucket (every measured shape of that range).
- Per bucket, the backends that passed on every config of it are ranked by the geometric mean of their
  median times over those configs (TFLOP/s and GB/s alike); a backend within ``tolerance`` (3%) of the
  fastest one left keeps the priority order (the device kind's ``Backend.priority``), so a table never
  overturns the priorities on noise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deepport.dispatch import perf_table
from deepport.dispatch.perf_table import BucketRule

TOLERANCE = 0.03
_GEMM = {"ranges": {"m": [64, 128, 1024]}, "exact": ["n", "k"]}  # the triton configs' M buckets
BUCKET_RULES: dict[str, dict[str, Any]] = {
    "mla_decode": {"ranges": {"q_rows": [64]}, "exact": []},  # memory-bound up to 64 query rows per KV head
    **{f"fp8_gemm_{layout}": _GEMM for layout in ("nt", "nn", "tn", "tt")},
    "m_grouped_fp8_gemm_nt_contiguous": {"ranges": {"m": [1024]}, "exact": ["n", "k"]},  # m: rows per group
    "m_grouped_fp8_gemm_nt_masked": {"ranges": {"m": [128, 1024]}, "exact": ["n", "k"]},  # m: expected_m
}
"""Bucket rule per op (written into the table); an op not listed gets one bucket, ``any``."""

Priority = Callable[[str], int | None]


class TuneTableError(ValueError):
    """An input ``tune-table`` cannot use (unreadable, not a bench file, mixed device families)."""


@dataclass(frozen=True)
class _Run:
    run_id: str
    started: str
    family: str
    device: str
    kind: str
    info: dict[str, Any]


@dataclass(frozen=True)
class _Result:
    run: _Run
    op: str
    config: str
    backend: str
    features: dict[str, int]
    time_us: float
    tflops: float | None
    gbps: float | None


def read_run(path: Path) -> tuple[_Run, list[dict[str, Any]]]:
    """One bench file: its run record and its results. The run id is the results folder's name
    (``benchmarks/results/<run id>/bench.json``); :func:`build` tells files of one folder apart."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TuneTableError(f"{path}: cannot read: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != "deepport.bench":
        raise TuneTableError(f"{path}: not a deepport bench file (schema {doc.get('schema')!r})"
                             if isinstance(doc, dict) else f"{path}: not a deepport bench file")
    env = doc.get("environment", {})
    device = env.get("device") or {}
    if not device.get("name") or not device.get("kind"):
        raise TuneTableError(f"{path}: environment.device lacks a name or kind")
    run_id = path.resolve().parent.name or path.stem
    recorded = env.get("deepport_git")
    commit = _commit_file(path.parent / "commit.txt") or recorded
    info = {"started": doc.get("started"), "commit": commit, "device": device["name"],
            "command": doc.get("command"), "torch": env.get("torch"), "file": path.name}
    if commit != recorded:
        info["recorded_git"] = recorded  # the bench saw a stale revision; commit.txt next to it says which
    family = perf_table.family_key(str(device.get("vendor", device["kind"])), str(device["kind"]),
                                   str(device.get("arch", device["kind"])))
    run = _Run(run_id, str(doc.get("started", "")), family, str(device["name"]), str(device["kind"]), info)
    return run, list(doc.get("results", []))


def _commit_file(path: Path) -> str | None:
    """The 40-hex commit a results folder's ``commit.txt`` names, if there is one."""
    if not path.is_file():
        return None
    found = re.search(r"\b[0-9a-f]{40}\b", path.read_text())
    return found.group(0) if found else None


def passed(result: Mapping[str, Any]) -> bool:
    """Checked and timed: status ``ok``, a positive time, and no check entry that did not pass."""
    checks = result.get("check") or {}
    return (result.get("status") == "ok" and (result.get("time_us") or 0) > 0
            and all(c.get("passed", True) is True for c in checks.values() if isinstance(c, dict)))


def build(paths: Sequence[Path], priority: Callable[[str, str], int | None],
          features: Callable[[str], Callable[[Mapping[str, Any]], dict[str, int]] | None],
          tolerance: float = TOLERANCE, command: str = "deepport tune-table") -> dict[str, Any]:
    """The performance table (JSON-ready) of the bench files ``paths``.

    ``priority(backend, device_kind)`` gives a backend's automatic priority (``None``: none), which orders
    ties; ``features(op)`` gives the op's params-to-features function (``None``: one bucket per op).
    """
    if not paths:
        raise TuneTableError("no bench file given")
    runs = [read_run(p) for p in paths]
    ids = [run.run_id for run, _ in runs]
    runs = [(replace(run, run_id=f"{run.run_id}/{path.name}") if ids.count(run.run_id) > 1 else run, results)
            for path, (run, results) in zip(paths, runs, strict=True)]
    families = sorted({run.family for run, _ in runs})
    if len(families) != 1:
        raise TuneTableError(f"one table is for one device family; these files span {', '.join(families)}")
    latest: dict[tuple[str, str, str, str], _Result] = {}
    for run, results in sorted(runs, key=lambda r: r[0].started):  # later runs replace earlier ones
        for r in results:
            if not passed(r):
                continue
            fn = features(str(r["op"]))
            feats = fn(r.get("params", {})) if fn is not None else {}
            result = _Result(run, str(r["op"]), str(r["config"]), str(r["backend"]), feats, float(r["time_us"]),
                             r.get("tflops"), r.get("gbps"))
            latest[(run.device, result.op, result.config, result.backend)] = result
    rules = {op: BucketRule.from_json(rule) for op, rule in BUCKET_RULES.items()}
    devices: dict[str, dict[str, dict[str, Any]]] = {}
    kinds = {run.device: run.kind for run, _ in runs}
    for (device, op, _, _), result in latest.items():
        rule = rules.setdefault(op, BucketRule((), ()))
        labels = rule.labels(result.features)
        if labels is None:
            continue
        buckets = devices.setdefault(device, {}).setdefault(op, {})
        for label in (labels[1], labels[0]):
            buckets.setdefault(label, []).append(result)
    table_devices = {
        device: {op: {label: _entry(found, kinds[device], priority, tolerance) for label, found in buckets.items()}
                 for op, buckets in ops.items()}
        for device, ops in devices.items()
    }
    used_ops = {op for ops in devices.values() for op in ops}
    return {
        "schema": perf_table.SCHEMA, "schema_version": perf_table.SCHEMA_VERSION, "family": families[0],
        "generated_by": command, "tie_tolerance": tolerance,
        "notes": "time_us: the bench's median time per config; a bucket of several configs gives the geometric "
                 "mean over them. Ranked: backends that passed their check on every config of the bucket.",
        "runs": {run.run_id: run.info for run, _ in runs},
        "buckets": {op: rule.to_json() for op, rule in rules.items() if op in used_ops},
        "devices": table_devices,
    }


def _entry(found: list[_Result], kind: str, priority: Callable[[str, str], int | None],
           tolerance: float) -> dict[str, Any]:
    configs = list(dict.fromkeys(r.config for r in found))
    per_backend: dict[str, list[_Result]] = {}
    for r in found:
        per_backend.setdefault(r.backend, []).append(r)
    complete = {b: rs for b, rs in per_backend.items() if {r.config for r in rs} == set(configs)}
    figures = [_figure(b, rs) for b, rs in complete.items()]
    return {"configs": configs, "ranking": rank(figures, lambda backend: priority(backend, kind), tolerance)}


def _figure(backend: str, results: list[_Result]) -> dict[str, Any]:
    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v]
        return perf_table.geomean(known) if len(known) == len(values) else None

    time_us = perf_table.geomean([r.time_us for r in results])
    tflops, gbps = mean([r.tflops for r in results]), mean([r.gbps for r in results])
    runs = sorted({r.run.run_id for r in results})
    return {"backend": backend, "time_us": round(time_us, 2),
            "tflops": None if tflops is None else round(tflops, 1), "gbps": None if gbps is None else round(gbps, 1),
            "run": ", ".join(runs)}


def rank(figures: list[dict[str, Any]], priority: Priority, tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """Fastest first; among the backends within ``tolerance`` of the fastest one left, the highest priority
    goes first (no priority ranks below any priority; equal priorities: the faster)."""
    left = sorted(figures, key=lambda f: f["time_us"])
    ranked: list[dict[str, Any]] = []
    while left:
        limit = left[0]["time_us"] * (1.0 + tolerance)
        tied = [f for f in left if f["time_us"] <= limit]
        pick = max(tied, key=lambda f: _priority_key(priority(f["backend"])))  # max keeps the first (faster) on ties
        ranked.append(pick)
        left.remove(pick)
    return ranked


def _priority_key(value: int | None) -> tuple[int, int]:
    return (0, 0) if value is None else (1, value)


def dumps(value: Any, indent: int = 0, width: int = 150, prefix: int = 0) -> str:
    """JSON indented two spaces a level, with each object or list that fits on a line of ``width`` columns
    (a ranking entry, a bucket rule) on one line."""
    flat = json.dumps(value)
    if indent + prefix + len(flat) <= width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 2, width, len(json.dumps(k)) + 2)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + dumps(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def summary_rows(table: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(device, op, bucket, ranking text)`` per entry, for the command's printout."""
    rows = []
    for device, ops in table["devices"].items():
        for op, buckets in ops.items():
            for label, entry in buckets.items():
                text = " > ".join(f"{f['backend']} {f['time_us']:.1f} us" for f in entry["ranking"]) or "(none passed)"
                rows.append((device, op, f"{label} [{len(entry['configs'])}]", text))
    return rows
