"""Driver of ``scripts/gpu_sanitize.sh``: runs conformance cases under compute-sanitizer, then summarises.

``run``: for each backend given, every op it registers (whatever they are: a new op is picked up) that has
conformance cases, the smoke cases of that op (all, or ``--cases-per-op N`` spread over the list, taking
only cases that launch one of the backend's own kernels), each called once through the public op in this
process (inputs generated from the case's seed, outputs poisoned; no reference is computed). Between cases
it prints ``@@deepport-sanitize begin|end <backend> <op> <case>`` markers (the sanitizer's reports land
between the markers of the case that launched the kernel), counts the launches of the backend's own
kernels (Triton ``JITFunction.run``; the hopper backend's ``launch.launch``) and rewrites ``--json`` after
every case, so a run cut short by its timeout keeps what it did.

``summarize DIR``: reads every ``<job>.log`` / ``<job>.json`` / ``<job>.rc`` there (written by the shell
script: ``<job>`` is ``<tool>-<part>``), splits each log at the markers, parses compute-sanitizer's
reports (one per ``========= <header>`` line and its indented lines), classifies each by kernel name as
ours (a kernel defined in ``deepport/backends/<backend>/``: Triton ``@triton.jit`` functions, ``__global__``
functions of ``.cu``/``.cuh`` sources, names recorded at launch) or foreign (torch, cuBLAS ...), and
writes ``summary.md`` / ``summary.json``: tool x backend x op with cases run, launches of our kernels,
our errors, foreign errors, host API errors, plus every error's first lines. Exit 1 when one of our
kernels has an error, a tool run failed or timed out before its first case, or errors were not attributed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

MARK = "@@deepport-sanitize"
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mla", "fp8", "moe", "other")


def family(op: str) -> str:
    """The job split of an op: ``mla``, ``fp8``, ``moe`` or ``other`` (an op of none of them)."""
    if "mla" in op:
        return "mla"
    if "fp8" in op:
        return "fp8"
    return "moe" if op.startswith("moe") else "other"


# --- our kernels' names ------------------------------------------------------------------------------------

_TRITON_DEF = re.compile(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def\s+(\w+)")
_CUDA_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")


def source_kernel_names(backend: str) -> set[str]:
    """Kernels defined in ``deepport/backends/<backend>/`` (Triton functions and CUDA ``__global__``s)."""
    folder = ROOT / "deepport" / "backends" / backend
    names: set[str] = set()
    for path in folder.rglob("*"):
        if path.suffix == ".py":
            names |= set(_TRITON_DEF.findall(path.read_text(encoding="utf-8", errors="replace")))
        elif path.suffix in (".cu", ".cuh"):
            names |= set(_CUDA_GLOBAL.findall(path.read_text(encoding="utf-8", errors="replace")))
    return names


# --- run ---------------------------------------------------------------------------------------------------


class Launches:
    """Counts launches of the backends' own kernels, by kernel name, for the case running now."""

    def __init__(self) -> None:
        self.now: Counter[str] = Counter()
        self.names: dict[int, str] = {}

    def take(self) -> dict[str, int]:
        got, self.now = dict(self.now), Counter()
        return got

    def install(self, backends: Sequence[str]) -> None:
        if "triton" in backends:
            self._triton()
        if "hopper" in backends:
            self._hopper()

    def _triton(self) -> None:
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        original = JITFunction.run
        counter = self

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            fn = getattr(self, "fn", None)
            counter.now[str(getattr(fn, "__name__", None) or getattr(self, "__name__", "triton_kernel"))] += 1
            return original(self, *args, **kwargs)

        JITFunction.run = run  # type: ignore[method-assign]

    def _hopper(self) -> None:
        from deepport.backends.hopper import launch

        load, fire = launch.load_function, launch.launch
        counter = self

        def load_function(key: str, cubin: bytes, entry: str, *args: Any, **kwargs: Any) -> Any:
            function = load(key, cubin, entry, *args, **kwargs)
            counter.names[id(function)] = entry
            return function

        def launch_counted(function: Any, *args: Any, **kwargs: Any) -> None:
            counter.now[counter.names.get(id(function), "hopper_kernel")] += 1
            fire(function, *args, **kwargs)

        launch.load_function = load_function  # type: ignore[assignment]
        launch.launch = launch_counted  # type: ignore[assignment]


def _spread(items: list[Any]) -> list[Any]:
    """``items`` reordered so that any prefix is spread over the list (0, n/2, n/4, 3n/4, ...)."""
    order: list[int] = []
    step = len(items)
    while step >= 1 and len(order) < len(items):
        order += [i for i in range(0, len(items), step) if i not in order]
        step //= 2
    return [items[i] for i in order]


def _say(*parts: object) -> None:
    print(MARK, *parts, flush=True)


def apply_setting(setting: str) -> None:
    """``MODULE:ATTR=VALUE``: import ``MODULE`` and set ``ATTR`` (which must exist) to ``VALUE`` (a Python literal,
    else the string)."""
    import ast
    import importlib

    target, sep, text = setting.partition("=")
    module_name, colon, attr = target.partition(":")
    if not sep or not colon or not attr:
        raise SystemExit(f"--set expects MODULE:ATTR=VALUE, got {setting!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise SystemExit(f"--set {setting!r}: {module_name} has no attribute {attr!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    setattr(module, attr, value)
    _say("set", f"{module_name}:{attr}", "=", repr(value))


def run(args: argparse.Namespace) -> int:
    import torch

    from deepport.conformance.call import stage, synchronize
    from deepport.conformance.runner import select_cases
    from deepport.conformance.suites import SUITES
    from deepport.dispatch import registry
    from deepport.errors import BackendNotSupportedError

    device = torch.device(args.device)
    for setting in args.set:
        apply_setting(setting)
    launches = Launches()
    launches.install(args.backend)
    record: dict[str, Any] = {"backends": {}, "cases": [], "started": time.time(), "done": False,
                              "argv": sys.argv[1:], "kernels": {}}
    out = Path(args.json)

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, out)

    for name in args.backend:
        backend = registry.get(name)
        record["kernels"][name] = sorted(source_kernel_names(name))
        ops = [s.op for s in backend.ops if s.op in SUITES and (not args.op or s.op in args.op)
               and (args.family == "all" or family(s.op) in args.family.split(","))]
        record["backends"][name] = {"ops": ops, "unavailable": backend.unavailable_reason}
        if backend.unavailable_reason is not None:
            _say("skip", name, "unavailable:", backend.unavailable_reason)
            continue
        for op in ops:
            cases = select_cases(args.tier, [op])
            wanted = args.cases_per_op or len(cases)
            taken = 0
            for tried, case in enumerate(_spread(cases)):
                if taken >= wanted or (args.cases_per_op and tried >= 4 * wanted + 4):
                    break  # (the cap: cases that launch none of our kernels, or a launch count that misses them)
                entry: dict[str, Any] = {"backend": name, "op": op, "case": case.id, "status": "ok", "message": ""}
                _say("begin", name, op, case.id)
                started = time.perf_counter()
                try:
                    suite = SUITES[op]
                    call_spec, tensors, outputs = stage(suite, case, case.seed(args.seed), device)
                    suite.invoke(call_spec, tensors, name, outputs)
                    synchronize(device)
                except BackendNotSupportedError as exc:
                    entry["status"], entry["message"] = "not_supported", "; ".join(exc.reasons)[:300]
                except Exception as exc:
                    entry["status"] = "error"
                    entry["message"] = f"{type(exc).__name__}: {exc}"[:2000]
                    traceback.print_exc()
                    if not device_usable(device):  # a kernel fault poisons the context: later cases cannot run
                        entry["message"] += " [the device context is lost: the run stops here]"
                entry["seconds"] = round(time.perf_counter() - started, 3)
                entry["launches"] = launches.take()
                _say("end", name, op, case.id, entry["status"])
                record["cases"].append(entry)
                save()
                if entry["message"].endswith("the run stops here]"):
                    record["aborted"] = entry["case"]
                    break
                if entry["status"] != "not_supported" and (entry["launches"] or not args.cases_per_op):
                    taken += 1
            if record.get("aborted"):
                break
        if record.get("aborted"):
            break
    record["done"] = True
    record["seconds"] = round(time.time() - record["started"], 1)
    save()
    errors = [c for c in record["cases"] if c["status"] == "error"]
    print(f"sanitize driver: {len(record['cases'])} cases, {len(errors)} errors", flush=True)
    return 0


def device_usable(device: Any) -> bool:
    """Whether the device still takes work after a failed case (a CUDA fault is sticky)."""
    import torch

    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except Exception:
        return False
    return True


# --- summarize ---------------------------------------------------------------------------------------------

_SKIP = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application returned")
_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_AT = re.compile(r"\bat (?:0x[0-9a-f]+ in )?(?:void )?([A-Za-z_][\w:]*)")


def reports(lines: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """compute-sanitizer's reports in ``lines``: (header, the report's indented lines)."""
    header: str | None = None
    body: list[str] = []
    for line in lines:
        if not line.startswith("========="):
            continue
        text = line[len("========="):]
        if text.startswith("     ") or text.startswith("\t"):
            if header is not None:
                body.append(text.strip())
            continue
        if header is not None:
            yield header, body
        header, body = text.strip(), []
        if not header or header.startswith(_SKIP):
            header = None
    if header is not None:
        yield header, body


def classify(header: str, body: list[str], ours: set[str]) -> tuple[str, str]:
    """(kind, kernel): kind is ``ours``, ``foreign``, ``api`` (a host API call failed), ``warning``
    or ``tool`` (the sanitizer's own trouble)."""
    device_part: list[str] = []
    for line in [header, *body]:
        if line.startswith("Saved host backtrace"):
            break
        device_part.append(line)
    text = "\n".join(device_part)
    in_our_sources = "deepport/backends/" in text
    if header.startswith("Program hit") or header.startswith("Host API"):
        return "api", ""
    if header.startswith("Warning"):
        return "warning", _kernel(text, ours)
    if "Internal" in header or "not supported" in header.lower() or header.startswith("Error: Target"):
        return "tool", ""
    kernel = _kernel(text, ours)
    return ("ours" if kernel in ours or in_our_sources else "foreign"), kernel


def _kernel(text: str, ours: set[str]) -> str:
    for name in sorted(ours, key=len, reverse=True):
        if re.search(rf"\b{re.escape(name)}\b", text):
            return name
    found = _AT.search(text)
    return found.group(1) if found else "?"


def summarize_job(log: Path, record: dict[str, Any], rc: str) -> dict[str, Any]:
    """Errors of one sanitizer run attributed to the (backend, op) whose markers enclose them."""
    ours = {k for names in record.get("kernels", {}).values() for k in names}
    for case in record.get("cases", []):
        ours |= set(case.get("launches", {}))
    where = ("-", "-", "-")  # (backend, op, case) of the markers around a report
    segments: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    total = None
    last_begin = None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(MARK):
            parts = line.split()
            if len(parts) >= 5 and parts[1] in ("begin", "end"):
                where = (parts[2], parts[3], parts[4])
                last_begin = where if parts[1] == "begin" else None
            continue
        found = _SUMMARY.search(line)
        if found:
            total = int(found.group(1))
        segments[where].append(line)
    found_reports = []
    for (backend, op, case), lines in segments.items():
        for header, body in reports(lines):
            kind, kernel = classify(header, body, ours)
            found_reports.append({"backend": backend, "op": op, "case": case, "kind": kind, "kernel": kernel,
                                  "header": header, "detail": body[:6]})
    counted = sum(1 for r in found_reports if r["kind"] in ("ours", "foreign", "api", "tool"))
    return {"log": log.name, "rc": rc, "error_summary": total, "reports": found_reports,
            "unattributed": max(0, (total or 0) - counted), "timed_out_in": last_begin if rc == "124" else None,
            "done": record.get("done", False), "cases": record.get("cases", []),
            "backends": record.get("backends", {}), "aborted": record.get("aborted")}


def summarize(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    jobs = {}
    for log in sorted(folder.glob("*.log")):
        if log.stem == "plain" or log.stem.startswith("plain-"):
            continue
        json_path = log.with_suffix(".json")
        record = json.loads(json_path.read_text()) if json_path.exists() else {}
        rc_path = log.with_suffix(".rc")
        rc = rc_path.read_text().strip() if rc_path.exists() else "?"
        jobs[log.stem] = summarize_job(log, record, rc)
    table: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    kernels: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    problems: list[str] = []
    for job, got in jobs.items():
        tool = job.split("-")[0]
        for case in got["cases"]:
            row = table[(tool, case["backend"], case["op"])]
            row[case["status"]] += 1
            row["launches"] += sum(case["launches"].values())
            kernels[(tool, case["backend"], case["op"])] |= set(case["launches"])
        for r in got["reports"]:
            table[(tool, r["backend"], r["op"])][r["kind"]] += 1
        if got["rc"] not in ("0", "124") or not got["cases"]:
            problems.append(f"{job}: exit {got['rc']}, {len(got['cases'])} cases run (see {got['log']})")
        if got["rc"] == "124":
            problems.append(f"{job}: timed out in {got['timed_out_in']} after {len(got['cases'])} cases "
                            f"(the cases before it were checked)")
        for backend, info in got.get("backends", {}).items():
            if info.get("unavailable"):
                problems.append(f"{job}: backend {backend} unavailable: {info['unavailable']}")
        if got["unattributed"]:
            problems.append(f"{job}: {got['unattributed']} errors counted by the sanitizer but not printed/parsed")
        if got["aborted"]:
            problems.append(f"{job}: stopped after {got['aborted']}: the device context was lost (a fault)")
        if any(r["kind"] == "tool" for r in got["reports"]):
            problems.append(f"{job}: the sanitizer reported trouble of its own (see its log)")
    lines = ["| tool | backend | op | cases ok | not supported | errored | our kernels (launches) | our errors | "
             "foreign errors | host API errors | warnings |", "| --- " * 11 + "|"]
    for (tool, backend, op), row in sorted(table.items()):
        names = ", ".join(sorted(kernels[(tool, backend, op)])) or "-"
        lines.append(f"| {tool} | {backend} | {op} | {row['ok']} | {row['not_supported']} | {row['error']} | "
                     f"{names} ({row['launches']}) | {row['ours']} | {row['foreign']} | {row['api']} | "
                     f"{row['warning']} |")
    ours = [r | {"job": job} for job, got in jobs.items() for r in got["reports"] if r["kind"] == "ours"]
    others = [r | {"job": job} for job, got in jobs.items() for r in got["reports"] if r["kind"] != "ours"]
    text = "\n".join(["# compute-sanitizer on the smoke tier", "", *lines, ""])
    if problems:
        text += "\nProblems:\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    for title, items in (("Errors in our kernels", ours), ("Other reports (not our kernels)", others)):
        if items:
            grouped = Counter((r["job"], r["kind"], r["kernel"], r["header"][:160]) for r in items)
            text += f"\n{title}:\n" + "\n".join(f"- {n} x [{job}] {kind} {kernel}: {header}"
                                                 for (job, kind, kernel, header), n in grouped.most_common(40)) + "\n"
    (folder / "summary.md").write_text(text, encoding="utf-8")
    (folder / "summary.json").write_text(json.dumps(jobs, indent=1), encoding="utf-8")
    print(text)
    failed = bool(ours) or any(p for p in problems if "timed out" not in p)
    print(f"sanitize: {len(ours)} errors in our kernels, {len(others)} other reports, "
          f"{len(problems)} problems -> {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run", help="run smoke cases of backends in this process (under the sanitizer)")
    r.add_argument("--backend", nargs="+", required=True)
    r.add_argument("--op", nargs="*", default=None, help="only these ops (default: every op the backend registers)")
    r.add_argument("--family", default="all", help="comma-separated op families: mla, fp8, moe, other (or all)")
    r.add_argument("--cases-per-op", type=int, default=0, help="0: every case; N: N cases that launch a kernel")
    r.add_argument("--tier", default="smoke")
    r.add_argument("--device", default="cuda")
    r.add_argument("--seed", type=int, default=2026)
    r.add_argument("--json", required=True)
    r.add_argument("--set", action="append", default=[], metavar="MODULE:ATTR=VALUE",
                   help="set a module attribute before the cases (a variant that is off by default, e.g. "
                        "deepport.backends.triton.moe_permute:_PREFETCH=True); VALUE is a Python literal or a string")
    s = commands.add_parser("summarize", help="parse the logs of a folder into summary.md / summary.json")
    s.add_argument("dir")
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = run if args.command == "run" else summarize
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
