"""``deepport report ... --html``: write ``report.html`` (:mod:`deepport.conformance.html_report`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepport.conformance.html_report import render_html
from deepport.conformance.report import write_text

HTML_NAME, BENCH_NAME = "report.html", "bench.json"


def write_html(results: Mapping[str, Any], results_dir: Path, out_dir: Path, bench: Path | None) -> Path:
    """Render the report of ``results`` into ``out_dir/report.html``, with the bench chart of ``bench`` (default:
    ``bench.json`` in ``results_dir`` if present). Raises ValueError for an unreadable bench file."""
    path = bench if bench is not None else results_dir / BENCH_NAME
    document = None
    if bench is not None or path.exists():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read bench results: {exc}") from None
        if not isinstance(document, dict) or not isinstance(document.get("results"), list):
            raise ValueError(f"{path}: not a bench.json of `deepport bench` (no `results` list)")
    return write_text(Path(out_dir) / HTML_NAME, render_html(results, bench=document))
