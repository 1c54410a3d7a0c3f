"""``deepport tune-table BENCH_JSON [BENCH_JSON ...] --out FILE [--tolerance F]``: write the performance table
automatic selection reads (:mod:`deepport.bench.tune_table` builds it, :mod:`deepport.dispatch.perf_table`
reads it) and print its rankings. Ship it as ``deepport/dispatch/perf_tables/<family>.json``, or point
``DEEPPORT_PERF_TABLE`` at it.

Exit status: 0 written, 2 a usage error (an unreadable or foreign file, files of several device families).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from deepport.bench import tune_table
from deepport.dispatch import registry
from deepport.errors import UnknownBackendError
from deepport.kernels import descriptor


def builtin_priority(backend: str, kind: str) -> int | None:
    """A registered backend's automatic priority on a device kind (``None``: none, or not registered)."""
    try:
        return registry.get(backend).auto_priority(kind)
    except UnknownBackendError:  # measured once, no longer registered: ranks below every priority on ties
        return None


def perf_shape(op: str) -> Callable[[Mapping[str, Any]], dict[str, int]] | None:
    """The op's params-to-shape-features function (its descriptor's ``perf_shape``), ``None`` if it has none."""
    try:
        return descriptor(op).load_perf_shape()
    except ValueError:  # an op this deepport does not have: one bucket
        return None


def write(paths: Sequence[Path], out: Path, tolerance: float, console: Console) -> Mapping[str, Any]:
    """Build the table of ``paths``, write it to ``out`` and print its rankings (raises TuneTableError)."""
    command = shlex.join(["deepport", "tune-table", *map(str, paths), "--out", str(out),
                          *(["--tolerance", str(tolerance)] if tolerance != tune_table.TOLERANCE else [])])
    table = tune_table.build(paths, builtin_priority, perf_shape, tolerance, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tune_table.dumps(table) + "\n", encoding="utf-8")
    console.print(Text(f"{table['family']}: measured rankings, fastest first (ties within {tolerance:.0%} keep the "
                       "priority order); [n]: configs in the bucket", style="bold"), soft_wrap=True)
    for device, op, bucket, ranking in tune_table.summary_rows(table):
        console.print(Text(f"  {device}  {op}  {bucket}: {ranking}"), soft_wrap=True)
    console.print(Text(f"wrote {out} ({len(table['runs'])} run(s): {', '.join(table['runs'])})"), soft_wrap=True)
    return table
