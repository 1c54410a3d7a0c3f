"""The PNG chart of a bench run: per op, each config's backends as bars of % of the ceiling.

matplotlib is optional (``pip install deepport[bench]``) and imported only here, on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def render(document: dict[str, Any], path: Path) -> Path:
    """Draw ``document`` (a bench results document) into ``path`` (PNG); raises :class:`PlotUnavailable`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install matplotlib, or deepport[bench])") from None
    results = [r for r in document.get("results", []) if r.get("status") == "ok" and r.get("time_us")]
    ops = list(dict.fromkeys(r["op"] for r in results)) or ["(no timed results)"]
    device = document.get("environment", {}).get("device", {}).get("name", "?")
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 4.5 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        rows = [r for r in results if r["op"] == op]
        configs = list(dict.fromkeys(r["config"] for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        width = 0.8 / max(len(backends), 1)
        for j, backend in enumerate(backends):
            xs, heights, labels = [], [], []
            for i, name in enumerate(configs):
                hit = next((r for r in rows if r["config"] == name and r["backend"] == backend), None)
                if hit is None:
                    continue
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                heights.append(hit.get("pct_of_ceiling") or 0.0)
                figure = hit["gbps"] if hit.get("bound") == "memory" else hit["tflops"]
                unit = "GB/s" if hit.get("bound") == "memory" else "TFLOP/s"
                labels.append(f"{figure:.3g} {unit}\n{hit['time_us']:.4g} us")
            bars = ax.bar(xs, heights, width, label=backend)
            ax.bar_label(bars, labels=labels, fontsize=6)
        ceiling_of = {r["config"]: r.get("ceiling") or "?" for r in rows}
        ax.set_xticks(range(len(configs)), [f"{c}\nvs {ceiling_of[c]}" for c in configs], rotation=20, ha="right",
                      fontsize=7)
        ax.set_ylabel("% of the ceiling measured in the run")
        ax.set_title(f"{op} on {device}")
        if backends:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
