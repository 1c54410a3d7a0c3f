"""The HTML report of a conformance run: one self-contained file, no script, no external resource.

Rendered from a ``results.json`` dict (and, when given, a ``bench.json`` of ``deepport bench``):

- the run's identity (suite, tier, seed, device, software);
- per backend and profile (:mod:`~deepport.conformance.profiles`): the verdict, counts, whether claimed;
- the matrix op x profile x backend: passed / total per cell, coloured by the worst status;
- every case that did not pass (not-supported ones folded per backend and profile): status, message,
  the worst element the checker found and each output's measured errors against its bound, and the
  command that reproduces it;
- the bench chart (per op, each config's backends as bars of % of the ceiling, inline SVG) when bench
  results are given.
"""

from __future__ import annotations

import html
import itertools
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from deepport.conformance.profiles import profile_table, record_profile, summary_of
from deepport.conformance.report import device_label, reproduce_command, unexpected_pass, waived
from deepport.conformance.results import Status

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1b1f24;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f6f8fa}
.pass,.CERTIFIED{background:#dafbe1}.fail,.FAIL,.error,.crash,.timeout{background:#ffebe9}
.not_supported,.NOT.SUPPORTED,.PARTIAL{background:#fff8c5}.internal_error,.SUITE.ERROR{background:#fbefff}
.unclaimed{background:#ddf4ff}.waived{background:#eee}
code,pre{font:12px ui-monospace,monospace}pre{background:#f6f8fa;padding:6px;white-space:pre-wrap}
.case{border:1px solid #d0d7de;margin:10px 0;padding:6px 10px}.muted{color:#57606a}
"""
_WORST = re.compile(r"(\w+): (\d+)/(\d+) elements \(([^)]*)\) outside ([^;]*); worst at (\[[^\]]*\]): got ([^,]*), "
                    r"expected ([^;]+?)(?:;|$| \()")
_RANK = {Status.PASS.value: 0, Status.NOT_SUPPORTED.value: 1, Status.INTERNAL_ERROR.value: 2,
         Status.FAIL.value: 3, Status.ERROR.value: 3, Status.CRASH.value: 3, Status.TIMEOUT.value: 3}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cls(text: str) -> str:
    """A verdict as CSS class names ("NOT SUPPORTED" -> classes NOT and SUPPORTED; parentheses dropped)."""
    return _e(text.replace("(", "").replace(")", ""))


def recorded_plugins(results: Mapping[str, Any]) -> list[str]:
    """The ``--plugin`` values of the run's recorded command (out-of-tree backends it loaded by module path)."""
    try:
        words = shlex.split(str(results.get("command") or ""))
    except ValueError:
        return []
    return [value for flag, value in itertools.pairwise(words) if flag == "--plugin"]


def case_command(results: Mapping[str, Any], case: Mapping[str, Any]) -> str:
    """The command that reruns one case with the run's seed on the recorded device (and the plugins the run
    loaded, so that a backend known only through ``--plugin`` is found again)."""
    dev = (results.get("environment") or {}).get("device") or {}
    device = dev.get("type", "cpu") if dev.get("index") is None else f"{dev.get('type')}:{dev.get('index')}"
    plugins = [arg for p in recorded_plugins(results) for arg in ("--plugin", p)]
    return shlex.join(["deepport", "certify", *plugins, "--backend", str(case["backend"]), "--tier",
                       str(case.get("tier")), "--device", str(device), "--case", str(case["case_id"]), "--seed",
                       str(results.get("run_seed"))])


def worst_elements(case: Mapping[str, Any]) -> list[dict[str, str]]:
    """The worst element per output named in a failure message (index, got, expected, how many are out)."""
    found = []
    for m in _WORST.finditer(str(case.get("message", ""))):
        found.append({"output": m.group(1), "outside": f"{m.group(2)}/{m.group(3)} ({m.group(4)})",
                      "bound": m.group(5), "index": m.group(6), "got": m.group(7), "expected": m.group(8)})
    return found


def _header(results: Mapping[str, Any]) -> str:
    env = results.get("environment") or {}
    software = ", ".join(f"{k} {env[k]}" for k in ("deepport", "deepport_git", "python", "torch", "numpy",
                                                   "torch_cuda", "torch_hip") if env.get(k))
    rows = [("suite", f"{results.get('suite_version')} (generator {results.get('generator_version')})"),
            ("tier", results.get("tier")), ("run seed", results.get("run_seed")), ("device", device_label(results)),
            ("software", software),
            ("started", f"{results.get('started')} ({float(results.get('duration_s', 0)):.1f} s)"),
            ("isolation", results.get("isolation")), ("reproduce", reproduce_command(results))]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _profiles(results: Mapping[str, Any], declared: Mapping[str, Sequence[str] | None] | None) -> str:
    table = profile_table(results, declared)
    backends = list(table)
    names = list(dict.fromkeys(v.profile for verdicts in table.values() for v in verdicts))
    head = "".join(f"<th>{_e(b)}</th>" for b in backends)
    rows = []
    for name in names:
        cells = []
        for b in backends:
            v = next((x for x in table[b] if x.profile == name), None)
            if v is None:
                cells.append("<td class=muted>-</td>")
                continue
            passed = v.counts.get(Status.PASS.value, 0)
            claim = "claimed" if v.claimed else "not claimed"
            cells.append(f"<td class='{_cls(v.verdict)}'><b>{_e(v.verdict)}</b> {passed}/{v.total} "
                         f"<span class=muted>({claim})</span></td>")
        rows.append(f"<tr><th>{_e(name)}<div class=muted>{_e(summary_of(name))}</div></th>{''.join(cells)}</tr>")
    return f"<table><tr><th>profile</th>{head}</tr>{''.join(rows)}</table>"


def _matrix(results: Mapping[str, Any]) -> str:
    cases = [c for c in results.get("cases", []) if isinstance(c, Mapping)]
    backends = list(dict.fromkeys([*results.get("backends", {}), *(str(c["backend"]) for c in cases)]))
    keys = list(dict.fromkeys((str(c["op"]), record_profile(c)) for c in cases))
    head = "".join(f"<th>{_e(b)}</th>" for b in backends)
    rows = []
    for op, profile in keys:
        cells = []
        for b in backends:
            mine = [c for c in cases if c["op"] == op and c["backend"] == b and record_profile(c) == profile]
            if not mine:
                cells.append("<td class=muted>-</td>")
                continue
            worst = max((str(c["status"]) for c in mine), key=lambda s: _RANK.get(s, 3))
            passed = sum(c["status"] == Status.PASS.value for c in mine)
            ns = sum(c["status"] == Status.NOT_SUPPORTED.value for c in mine)
            extra = f", {ns} n/s" if ns else ""
            cells.append(f"<td class='{_e(worst)}'>{passed}/{len(mine)}{extra}</td>")
        rows.append(f"<tr><td>{_e(op)}</td><td>{_e(profile)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>op</th><th>profile</th>{head}</tr>{''.join(rows)}</table>"


def _metrics_table(case: Mapping[str, Any]) -> str:
    metrics = case.get("metrics") or {}
    rows = []
    for output, m in metrics.items():
        if output == "inputs" or not isinstance(m, Mapping):
            continue
        tol = (case.get("tolerance") or {}).get(output, {})
        rows.append(f"<tr><td>{_e(output)}</td><td>{_e(m.get('max_abs_err'))}</td><td>{_e(m.get('max_err_over_bound'))}"
                    f"</td><td>{_e(m.get('mismatches'))}</td><td>{_e(m.get('calc_diff'))}</td>"
                    f"<td><code>{_e(json.dumps(tol, sort_keys=True))}</code></td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th>output</th><th>max abs err</th><th>max err / bound</th><th>mismatches</th>"
            f"<th>calc_diff</th><th>tolerance</th></tr>{''.join(rows)}</table>")


def _failures(results: Mapping[str, Any]) -> str:
    cases = [c for c in results.get("cases", []) if isinstance(c, Mapping)]
    bad = [c for c in cases if c["status"] not in (Status.PASS.value, Status.NOT_SUPPORTED.value)
           or unexpected_pass(c)]
    bad.sort(key=lambda c: (-_RANK.get(str(c["status"]), 3), str(c["backend"]), str(c["case_id"])))
    parts = [] if bad else ["<p>None: every case that ran passed.</p>"]
    for c in bad:
        note = ""
        if waived(c):
            w = c["waiver"]
            note = f" <span class=waived>waived ({_e(w.get('category'))}: {_e(w.get('reason'))})</span>"
        elif unexpected_pass(c):
            note = f" <b>unexpected pass: remove the waiver entry {_e(c['waiver'].get('case'))}</b>"
        worst = "".join(f"<li><code>{_e(w['output'])}</code> worst at <code>{_e(w['index'])}</code>: got "
                        f"<code>{_e(w['got'])}</code>, expected <code>{_e(w['expected'])}</code>; {_e(w['outside'])} "
                        f"outside {_e(w['bound'])}</li>" for w in worst_elements(c))
        parts.append(f"<div class='case {_e(c['status'])}'><b>{_e(c['status'])}</b> <code>{_e(c['case_id'])}</code> on "
                     f"<b>{_e(c['backend'])}</b> ({_e(record_profile(c))}, seed {_e(c.get('seed'))}){note}"
                     f"<pre>{_e(c.get('message') or '(no message)')}</pre>"
                     + (f"<ul>{worst}</ul>" if worst else "") + _metrics_table(c)
                     + f"<div>reproduce: <code>{_e(case_command(results, c))}</code></div></div>")
    unsupported: dict[tuple[str, str], list[str]] = {}
    for c in cases:
        if c["status"] == Status.NOT_SUPPORTED.value:
            unsupported.setdefault((str(c["backend"]), record_profile(c)), []).append(str(c.get("message", "")))
    if unsupported:
        items = "".join(f"<li><b>{_e(b)}</b> {_e(p)}: {len(msgs)} case(s); e.g. {_e(msgs[0])}</li>"
                        for (b, p), msgs in unsupported.items())
        parts.append(f"<h3>Declared not supported</h3><ul>{items}</ul>")
    return "".join(parts)


def _bench_chart(bench: Mapping[str, Any]) -> str:
    """Per op, horizontal bars of % of the ceiling per (config, backend); the figure and time as labels."""
    rows = [r for r in bench.get("results", []) if isinstance(r, Mapping) and r.get("status") == "ok"
            and r.get("pct_of_ceiling") is not None]
    if not rows:
        return "<p>No timed bench result.</p>"
    palette = ("#0969da", "#bf3989", "#1a7f37", "#9a6700", "#8250df", "#cf222e")
    backends = list(dict.fromkeys(str(r["backend"]) for r in rows))
    colour = {b: palette[i % len(palette)] for i, b in enumerate(backends)}
    legend = " ".join(f"<span style='color:{colour[b]}'>&#9632; {_e(b)}</span>" for b in backends)
    out = [f"<p>{legend}</p>"]
    for op in dict.fromkeys(str(r["op"]) for r in rows):
        mine = [r for r in rows if r["op"] == op]
        bar, label_w, width = 16, 260, 420
        height = bar * len(mine) + 24
        svg = [f"<svg width='{label_w + width + 220}' height='{height}' "
               f"role='img' aria-label='{_e(op)}'>"]
        for i, r in enumerate(mine):
            y = 4 + i * bar
            pct = max(0.0, min(float(r["pct_of_ceiling"]), 100.0))
            unit, figure = ("GB/s", r.get("gbps")) if r.get("bound") == "memory" else ("TFLOP/s", r.get("tflops"))
            text = (f"{float(pct):.1f}% of {r.get('ceiling')}; {figure or 0:.4g} {unit}, "
                    f"{float(r.get('time_us') or 0):.4g} us")
            svg.append(f"<text x='0' y='{y + 12}' font-size='11'>{_e(r['config'])} [{_e(r['backend'])}]</text>"
                       f"<rect x='{label_w}' y='{y + 2}' width='{pct / 100 * width:.1f}' height='{bar - 4}' "
                       f"fill='{colour[str(r['backend'])]}'/>"
                       f"<text x='{label_w + pct / 100 * width + 4:.1f}' y='{y + 12}' font-size='10'>{_e(text)}</text>")
        svg.append(f"<line x1='{label_w}' y1='0' x2='{label_w}' y2='{height - 18}' stroke='#888'/>"
                   f"<text x='{label_w + width - 40}' y='{height - 4}' font-size='10'>100%</text></svg>")
        out.append(f"<h3>{_e(op)}</h3>{''.join(svg)}")
    device = ((bench.get("environment") or {}).get("device") or {}).get("name", "?")
    return f"<p class=muted>bench on {_e(device)}: {_e(bench.get('command', ''))}</p>" + "".join(out)


def render_html(results: Mapping[str, Any], *, bench: Mapping[str, Any] | None = None,
                declared: Mapping[str, Sequence[str] | None] | None = None) -> str:
    """The report as one HTML document (a string); ``declared`` as for
    :func:`~deepport.conformance.profiles.profile_table`."""
    body = [f"<h1>deepport conformance: {_e(', '.join(results.get('backends', {})) or '(no backend)')}</h1>",
            _header(results)]
    if results.get("tier") != "full":
        body.append(f"<p><b>{_e(results.get('tier'))}-tier results cannot certify; only the full tier can.</b></p>")
    body += ["<h2>Profiles</h2>", _profiles(results, declared), "<h2>Matrix: op x profile x backend</h2>",
             "<p class=muted>passed/total per cell; n/s = declared not supported; colour = worst status</p>",
             _matrix(results), "<h2>Cases that did not pass</h2>", _failures(results)]
    if bench is not None:
        body += ["<h2>Bench</h2>", _bench_chart(bench)]
    title = f"deepport conformance {results.get('suite_version')} {results.get('tier')}"
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
