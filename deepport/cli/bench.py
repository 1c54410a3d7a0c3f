"""``deepport bench``: time every backend on the op configs, next to ceilings and a baseline.

``deepport bench [--device DEV] [--op OP ...] [--config PATTERN] [--backend B ...] [--baseline NAME]
[--out DIR] [--quick] [--seed N]`` runs the configs of :mod:`deepport.bench.configs` for the device (a
CPU runs the tiny ``cpu`` configs), prints progress (stderr), then the table (stdout), and writes
``DIR/bench.json`` and ``DIR/bench.png`` (the chart needs matplotlib; without it the run says so and
``deepport bench --plot DIR/bench.json`` draws it later). ``deepport bench --plot JSON [--out DIR]``
only draws the chart of a saved run.

Exit status: 0 every backend was checked and timed (or declared a config unsupported), 1 a backend
errored or failed its check on some config (recorded in the JSON), 2 a usage error.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deepport.bench import configs as bench_configs
from deepport.bench import plot, results, runner
from deepport.conformance.runner import default_device
from deepport.dispatch import registry
from deepport.errors import UnknownBackendError

JSON_NAME, PNG_NAME = "bench.json", "bench.png"
_STATUS_STYLE = {"ok": "green", "check_failed": "bold red", "error": "bold red", "not_supported": "yellow",
                 "skipped": "yellow"}


class UsageError(Exception):
    """A request ``bench`` cannot run: exit status 2."""


def plan(device: str | None, ops: Sequence[str] | None, pattern: str | None, backends: Sequence[str] | None,
         baseline: str, quick: bool, seed: int) -> runner.Request:
    try:
        dev = torch.device(device) if device else default_device()
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"device {device!r} is not usable: {exc}") from None
    for name in [baseline, *(backends or [])]:
        try:
            registry.get(name)
        except UnknownBackendError as exc:
            raise UsageError(str(exc)) from None
    try:
        chosen = bench_configs.select(dev.type, ops, pattern)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not chosen:
        raise UsageError(f"no bench config for device type {dev.type!r} matches "
                         f"ops={list(ops) if ops else 'all'} pattern={pattern!r}")
    args = ["deepport", "bench", "--device", str(dev), "--baseline", baseline, "--seed", str(seed)]
    for op in ops or ():
        args += ["--op", op]
    if pattern:
        args += ["--config", pattern]
    for name in backends or ():
        args += ["--backend", name]
    if quick:
        args.append("--quick")
    return runner.Request(dev, chosen, list(backends) if backends else None, baseline, quick, seed,
                          shlex.join(args), {"ops": list(ops) if ops else None, "config_pattern": pattern})


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def print_table(document: dict[str, Any], out: Console) -> None:
    table = Table(title=f"deepport bench on {document['environment']['device']['name']}")
    for column in ("op", "config", "backend", "time us", "TFLOP/s", "GB/s", "% of ceiling", "x baseline",
                   "timing"):
        table.add_column(column, justify="right" if column not in ("op", "config", "backend", "timing") else "left")
    for r in document["results"]:
        if r["status"] != "ok":
            table.add_row(r["op"], r["config"], r["backend"],
                          Text(r["status"], style=_STATUS_STYLE.get(r["status"], "")), "", "", "", "",
                          Text(r["message"][:80]))
            continue
        pct = "-" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.1f}% {r['ceiling']}"
        ratio = "-" if r["x_baseline"] is None else f"{r['x_baseline']:.2f}x {r['baseline']}"
        t = r["timing"] or {}
        method = f"{t.get('method', '?')} x{t.get('calls_per_sample', 1)}"
        table.add_row(r["op"], r["config"], r["backend"], _fmt(r["time_us"]), _fmt(r["tflops"]), _fmt(r["gbps"]),
                      pct, ratio, method)
    if not out.is_terminal:  # logs and pipes get the whole table, not columns cut to 80 characters
        out.width = max(out.width, 170)
    out.print(table)
    ceilings = ", ".join(
        f"{c['name']} {_fmt(c['value'])} {c['unit']}" if c["value"] is not None else f"{c['name']} failed: {c['error']}"
        for c in document["ceilings"].values())
    out.print(Text(f"ceilings measured in this run: {ceilings}"), soft_wrap=True)
    overheads = [(r["config"], r["backend"], r["host_overhead_us"].get("check_values_on", {}).get("dispatch_us"))
                 for r in document["results"] if r["status"] == "ok" and r["host_overhead_us"]]
    if overheads:
        worst = max(overheads, key=lambda x: x[2] or 0.0)
        out.print(Text(f"host overhead of dispatch per call (public op - bound backend call, value checks on): "
                       f"up to {_fmt(worst[2], 3)} us ({worst[1]} on {worst[0]}); per result in the JSON"),
                  soft_wrap=True)


def draw(document: dict[str, Any], path: Path, out: Console) -> bool:
    try:
        plot.render(document, path)
    except plot.PlotUnavailable as exc:
        out.print(Text(f"chart skipped: {exc}; later: deepport bench --plot <bench.json>", style="yellow"),
                  soft_wrap=True)
        return False
    out.print(Text(f"chart: {path}"), soft_wrap=True)
    return True


def bench(request: runner.Request, out_dir: Path, out: Console) -> int:
    err = Console(stderr=True)
    out.print(Text(f"deepport bench: {len(request.configs)} config(s) on {request.device}, baseline "
                   f"{request.baseline}{', quick' if request.quick else ''}"), soft_wrap=True)
    document = runner.run(request, progress=lambda msg: err.print(Text(f"  {msg}", style="dim"), soft_wrap=True))
    print_table(document, out)
    path = results.write(document, out_dir / JSON_NAME)
    out.print(Text(f"results: {path}"), soft_wrap=True)
    draw(document, out_dir / PNG_NAME, out)
    failing = [r for r in document["results"] if r["status"] in results.FAILING]
    for r in failing:
        out.print(Text(f"{r['status']}: {r['op']}/{r['config']} on {r['backend']}: {r['message']}", style="red"),
                  soft_wrap=True)
    return 1 if failing else 0


def plot_saved(json_path: Path, out_dir: Path | None, out: Console) -> int:
    try:
        document = results.load(json_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print_table(document, out)
    return 0 if draw(document, (out_dir or json_path.parent) / PNG_NAME, out) else 1
