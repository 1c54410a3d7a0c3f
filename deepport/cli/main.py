"""``deepport``: the command line.

- ``deepport info [--json]``: the devices and torch build found, every registered backend (available or
  why not, version, the ops it implements with their declared support, its automatic priorities), and
  for each device and op the backend automatic selection picks for the op's core example call.
- ``deepport certify [--backend NAME ...] [--tier smoke|full] [--out DIR] [--device DEV] [--seed N]
  [--op OP ...] [--case PATTERN] [--isolate/--no-isolate] [--plugin MODULE[:ATTR]] [--timeout S]
  [--waivers FILE] [--certify [--nonce N]]``: runs the conformance suite and writes ``results.json``,
  ``junit.xml`` and ``summary.md`` into ``DIR`` (default ``certify-out``); see :mod:`deepport.cli.certify`.
  A backend may be named ``module:object`` (an out-of-tree Backend); ``--waivers`` applies a vendor's
  expected failures; ``--certify`` is certification (the whole full tier, isolated, seeded from the nonce,
  one archive: :mod:`deepport.conformance.certificate`).
- ``deepport report RESULTS_JSON [--out DIR]``: regenerates ``junit.xml`` and ``summary.md`` from a
  saved ``results.json`` (into its own folder unless ``--out`` is given).
- ``deepport verify RESULTS_JSON [--regenerate N|all]``: checks that a ``results.json`` is a valid
  certificate for the installed suite; see :mod:`deepport.cli.verify` (exit 1 unless it is).
- ``deepport merge PART_JSON ... --out DIR``: joins the ``results.json`` of one certification run split
  by op (``certify --op ...`` with the same ``--seed``) into ``DIR/results.json`` (+ ``junit.xml``,
  ``summary.md``), the file one run over those ops would have written; see
  :mod:`deepport.conformance.merge`.
- ``deepport bench [--device DEV] [--op OP ...] [--config PATTERN] [--backend B ...] [--baseline NAME]
  [--out DIR] [--quick] [--seed N] [--plot JSON]``: checked timings of every backend next to ceilings and
  a baseline measured in the same run; see :mod:`deepport.cli.bench` (exit 1 if a backend errored or
  failed its check).
- ``deepport report RESULTS_JSON|DIR --html [--bench BENCH_JSON]`` also writes ``report.html`` (one
  self-contained file; the bench chart when ``bench.json`` sits next to the results or is given).
- ``deepport verify ARCHIVE [--replay N] [--plugin MODULE[:ATTR]] [--device DEV] [--timeout S]``: checks a certificate
  archive of ``certify --certify`` (or the folder it unpacks to); ``--replay N`` re-runs N sampled cases
  here; see :mod:`deepport.conformance.certificate_verify`.
- ``deepport determinism [--backend NAME ...] [--op OP ...] [--case PATTERN] [--device DEV] [--tier T]
  [--repeat N] [--seed N] [--out DIR] [--claims]``: runs each case N times with identical inputs and reports
  bitwise-identical results or the run-to-run spread, against each backend's declared claim; see
  :mod:`deepport.cli.determinism` (exit 1 if a backend claiming bitwise results differed, or errored).
- ``deepport tune-table BENCH_JSON [BENCH_JSON ...] --out FILE [--tolerance F]``: the performance table of
  automatic selection (measured backend rankings per device family, op and shape bucket) from bench
  results; see :mod:`deepport.cli.tune_table`.
- ``deepport new-backend NAME [--out DIR]``: an out-of-tree backend package from the template, with a
  ``pyproject.toml`` registering its entry point; see :mod:`deepport.cli.scaffold` and ``docs/PORTING.md``.

Exit status: 0 success (certify: every case passed or is honestly not supported), 1 a case failed or
errored, 2 a usage error (unknown backend, no matching case, unreadable results file ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from deepport.conformance.case import TIERS

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130  # certify returns 1 itself when a case failed


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected 0 <= seed < 2**63, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepport", description="DeepSeek's inference kernels on any GPU, "
                                     "and the conformance suite that certifies each port.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="devices, backends, and what automatic selection picks")
    info.add_argument("--json", action="store_true", help="print the same information as JSON")

    certify = commands.add_parser("certify", help="run the conformance suite and write reports")
    certify.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                         help="backend(s) to certify (default: every usable backend)")
    certify.add_argument("--tier", choices=TIERS, default=None,
                         help="smoke (quick, cannot certify) or full (default: smoke; with --certify: full)")
    certify.add_argument("--out", type=Path, default=Path("certify-out"), metavar="DIR",
                         help="folder for results.json, junit.xml, summary.md (default: certify-out)")
    certify.add_argument("--device", help="torch device, e.g. cpu, cuda:1 (default: cuda if present, else cpu)")
    certify.add_argument("--seed", type=_seed, metavar="N", help="run seed (default: random; always printed)")
    certify.add_argument("--op", action="extend", nargs="+", metavar="OP", help="only the cases of these ops")
    certify.add_argument("--case", metavar="PATTERN", help="only cases whose id matches (glob or substring)")
    certify.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                         help="run each backend in its own process (default: on for --tier full, off for smoke)")
    certify.add_argument("--plugin", action="append", default=[], metavar="MODULE[:ATTR]",
                         help="import an out-of-tree backend (a Backend or an iterable of them; ATTR "
                              "defaults to BACKEND)")
    certify.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                         help="per-call limit in isolated runs (default: 600)")
    certify.add_argument("--certify", action="store_true",
                         help="certification: the whole full tier, isolated, seeded from a nonce, one archive")
    certify.add_argument("--nonce", metavar="TEXT", help="with --certify: the nonce the run seed derives from "
                         "(default: random; a third party may choose it)")
    certify.add_argument("--waivers", type=Path, metavar="FILE",
                         help="expected failures (TOML or JSON; strict; never with --certify)")

    rep = commands.add_parser("report", help="regenerate junit.xml, summary.md (and report.html) from a results.json")
    rep.add_argument("results", type=Path, metavar="RESULTS_JSON|DIR")
    rep.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: the results file's folder)")
    rep.add_argument("--html", action="store_true", help="also write report.html (one self-contained file)")
    rep.add_argument("--bench", type=Path, metavar="BENCH_JSON",
                     help="bench results for the HTML chart (default: bench.json next to the results, if any)")

    ver = commands.add_parser("verify", help="check that a results.json or certificate archive is valid here")
    ver.add_argument("results", type=Path, metavar="PATH",
                     help="a results.json, or a certificate .tar.gz (or its folder)")
    ver.add_argument("--regenerate", type=_regenerate, default=8, metavar="N|all",
                     help="regenerate and hash the inputs of the N smallest cases, or all (default: 8)")

    mer = commands.add_parser("merge", help="join the results.json of one certification run split by op")
    mer.add_argument("parts", type=Path, nargs="+", metavar="PART_JSON")
    mer.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the merged results.json")

    ben = commands.add_parser("bench", help="time backends on op configs, next to ceilings and a baseline")
    ben.add_argument("--device", help="torch device (default: cuda if present, else cpu; a cpu runs tiny configs)")
    ben.add_argument("--op", action="extend", nargs="+", metavar="OP", help="only the configs of these ops")
    ben.add_argument("--config", metavar="PATTERN", help="only configs whose op/name matches (glob or substring)")
    ben.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                     help="backends to time (default: every usable one implementing the op, except reference)")
    ben.add_argument("--baseline", default="torch", metavar="NAME",
                     help="backend every other is compared with, always run first (default: torch)")
    ben.add_argument("--out", type=Path, metavar="DIR", help="folder for bench.json and bench.png (default: "
                     "bench-out; with --plot: the JSON's folder)")
    ben.add_argument("--quick", action="store_true", help="fewer samples and smaller ceiling runs")
    ben.add_argument("--seed", type=_seed, default=0, metavar="N", help="input seed (default: 0)")
    ben.add_argument("--plot", type=Path, metavar="JSON", help="only draw the chart of a saved bench.json")

    ver.add_argument("--replay", type=int, default=0, metavar="N",
                     help="certificate archives: re-run N randomly chosen cases here and compare (loads the "
                          "plugins the certificate names)")
    ver.add_argument("--plugin", action="append", default=[], metavar="MODULE[:ATTR]",
                     help="with --replay: import an out-of-tree backend first")
    ver.add_argument("--device", help="with --replay: torch device (default: the recorded device type)")
    ver.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="with --replay: per-call limit (default: the one the certificate recorded)")

    det = commands.add_parser("determinism",
                              help="run cases N times with identical inputs: bitwise equal, or the spread")
    det.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                     help="backend(s) to check (default: every usable backend but reference)")
    det.add_argument("--op", action="extend", nargs="+", metavar="OP", help="only the cases of these ops")
    det.add_argument("--case", metavar="PATTERN", help="only cases whose id matches (glob or substring)")
    det.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    det.add_argument("--tier", choices=TIERS, default="smoke", help="case tier (default: smoke)")
    det.add_argument("--repeat", type=int, default=20, metavar="N", help="runs per case (default: 20)")
    det.add_argument("--seed", type=_seed, metavar="N", help="run seed (default: random; always printed)")
    det.add_argument("--out", type=Path, metavar="DIR", help="write DIR/determinism.json")
    det.add_argument("--plugin", action="append", default=[], metavar="MODULE[:ATTR]",
                     help="import an out-of-tree backend first")
    det.add_argument("--claims", action="store_true", help="print the declared claims as a Markdown table and exit")
    tune = commands.add_parser("tune-table", help="the performance table of automatic selection, from bench results")
    tune.add_argument("bench", type=Path, nargs="+", metavar="BENCH_JSON", help="bench.json files of one device family")
    tune.add_argument("--out", type=Path, required=True, metavar="FILE",
                      help="the table to write (shipped: deepport/dispatch/perf_tables/<family>.json)")
    tune.add_argument("--tolerance", type=float, default=0.03, metavar="F",
                      help="backends within this fraction of a faster one keep the priority order (default: 0.03)")

    new = commands.add_parser("new-backend", help="start an out-of-tree backend from the template (docs/PORTING.md)")
    new.add_argument("name", metavar="NAME", help="package and backend name (a lowercase Python identifier)")
    new.add_argument("--out", type=Path, metavar="DIR", help="folder for the package and pyproject.toml "
                     "(default: NAME)")
    return parser


def _regenerate(text: str) -> int | str:
    from deepport.cli.verify import regenerate_count

    return regenerate_count(text)


def _usage_error(command: str, message: str) -> int:
    Console(stderr=True).print(Text(f"deepport {command}: error: {message}", style="red"), soft_wrap=True)
    return EXIT_USAGE


def _info(args: argparse.Namespace) -> int:
    from deepport.cli import info

    data = info.collect()
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        info.render(data, Console())
    return EXIT_OK


def _certify(args: argparse.Namespace) -> int:
    from deepport.cli import certify

    try:
        tier = args.tier or ("full" if args.certify else "smoke")
        p = certify.plan(args.backend, tier, args.device, args.seed, args.op, args.case, args.out,
                         isolate=args.isolate, plugins=args.plugin, timeout_s=args.timeout, certify=args.certify,
                         nonce=args.nonce, waivers=args.waivers)
    except certify.UsageError as exc:
        return _usage_error("certify", str(exc))
    return certify.certify(p, Console())


def _report(args: argparse.Namespace) -> int:
    from deepport.cli.certify import print_table
    from deepport.cli.html import write_html
    from deepport.conformance import report

    path = args.results / report.RESULTS_JSON if args.results.is_dir() else args.results
    try:
        results = report.load_results(path)
    except report.ResultsFileError as exc:
        return _usage_error("report", str(exc))
    out_dir = args.out if args.out is not None else path.parent
    paths = report.write_derived_reports(results, out_dir)
    if args.html:
        try:
            paths["html"] = write_html(results, path.parent, out_dir, args.bench)
        except ValueError as exc:
            return _usage_error("report", str(exc))
    console = Console()
    print_table(results, console)
    console.print(Text(f"run seed {results.get('run_seed')}, tier {results.get('tier')}; reports written:"))
    for path in paths.values():
        console.print(Text(f"  {path}"), soft_wrap=True)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from deepport.cli import verify
    from deepport.conformance import report
    from deepport.conformance.certificate import CertificateFileError
    from deepport.conformance.certificate_verify import is_certificate

    if args.replay < 0:
        return _usage_error("verify", f"--replay expects a non-negative number of cases, got {args.replay}")
    if args.timeout is not None and not args.timeout > 0:
        return _usage_error("verify", f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if is_certificate(args.results):
        try:
            return verify.run_certificate(str(args.results), args.regenerate, args.replay, args.plugin, args.device,
                                          Console(), timeout_s=args.timeout)
        except CertificateFileError as exc:
            return _usage_error("verify", str(exc))
    if args.replay or args.plugin or args.timeout is not None:
        return _usage_error("verify", "--replay, --plugin and --timeout apply to certificate archives (deepport "
                            "certify --certify), not to a results.json")
    try:
        results = report.load_results(args.results)
    except report.ResultsFileError as exc:
        return _usage_error("verify", str(exc))
    return verify.run(results, args.regenerate, Console())


def _merge(args: argparse.Namespace) -> int:
    from deepport.cli.certify import print_table
    from deepport.conformance import report
    from deepport.conformance.merge import MergeError, merge_results

    try:
        parts = [report.load_results(p) for p in args.parts]
        merged = merge_results(parts, [str(p) for p in args.parts])
    except (report.ResultsFileError, MergeError) as exc:
        return _usage_error("merge", str(exc))
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / report.RESULTS_JSON
    results_path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    paths = report.write_derived_reports(merged, out_dir)
    console = Console()
    print_table(merged, console)
    ops = merged["selection"]["ops"]
    console.print(Text(f"merged {len(parts)} part(s), run seed {merged['run_seed']}, "
                       f"{'every op' if ops is None else 'ops ' + ', '.join(ops)}; written:"))
    for path in (results_path, *paths.values()):
        console.print(Text(f"  {path}"), soft_wrap=True)
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from deepport.cli import bench

    try:
        if args.plot is not None:
            return bench.plot_saved(args.plot, args.out, Console())
        request = bench.plan(args.device, args.op, args.config, args.backend, args.baseline, args.quick, args.seed)
    except bench.UsageError as exc:
        return _usage_error("bench", str(exc))
    return bench.bench(request, args.out or Path("bench-out"), Console())


def _determinism(args: argparse.Namespace) -> int:
    from deepport.cli import determinism

    if args.claims:
        sys.stdout.write(determinism.claims_markdown(args.backend) + "\n")
        return EXIT_OK
    try:
        return determinism.determinism(args.backend, args.op, args.case, args.device, args.tier, args.repeat,
                                       args.seed, args.out, args.plugin, Console())
    except determinism.UsageError as exc:
        return _usage_error("determinism", str(exc))
def _tune_table(args: argparse.Namespace) -> int:
    from deepport.bench.tune_table import TuneTableError
    from deepport.cli import tune_table

    if not 0 <= args.tolerance < 1:
        return _usage_error("tune-table", f"--tolerance expects a fraction in [0, 1), got {args.tolerance}")
    try:
        tune_table.write(args.bench, args.out, args.tolerance, Console())
    except TuneTableError as exc:
        return _usage_error("tune-table", str(exc))
    return EXIT_OK


def _new_backend(args: argparse.Namespace) -> int:
    from deepport.cli import scaffold

    try:
        written = scaffold.new_backend(args.name, args.out)
    except scaffold.ScaffoldError as exc:
        return _usage_error("new-backend", str(exc))
    console = Console()
    root = written[-1].parent
    console.print(Text(f"wrote {len(written)} files under {root}:"))
    for path in written:
        console.print(Text(f"  {path}"), soft_wrap=True)
    console.print(Text(f"next: fill an op in {root / args.name}, then `pip install -e {root}` (or put {root} on "
                       f"PYTHONPATH and use --backend {args.name}:BACKEND) and `deepport certify --backend "
                       f"{args.name} --tier smoke --op mla_decode`; the walk-through is docs/PORTING.md"),
                  soft_wrap=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deepport`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors (status 2) and --help (status 0) this way
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handlers = {"info": _info, "certify": _certify, "report": _report, "verify": _verify, "merge": _merge,
                "bench": _bench}
    try:
        return (handlers | {"new-backend": _new_backend, "tune-table": _tune_table,
                            "determinism": _determinism})[args.command](args)
    except KeyboardInterrupt:
        Console(stderr=True).print(Text(f"deepport {args.command}: interrupted", style="red"))
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
