"""Evaluation reports: ``metrics.json``, a markdown table and a recall@K plot (PNG) for one run;
one combined table (markdown, CSV, JSON) and one plot for a batch of runs."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_RECALL = re.compile(r"^(?:(?P<prefix>.+)_)?(?P<name>R|Rsubset)@(?P<k>\d+)$")


def recall_curves(metrics: dict[str, float]) -> dict[str, list[tuple[int, float]]]:
    """Group ``[prefix_]R@K`` / ``Rsubset@K`` keys into curves ``{prefix | "R" | "Rsubset": [(K, value)]}``
    sorted by K (``mAP``, ``avg`` and other keys are not recall curves)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in metrics.items():
        m = _RECALL.match(key)
        if m:
            name = m.group("prefix") or m.group("name")
            curves.setdefault(name, []).append((int(m.group("k")), float(value)))
    return {name: sorted(points) for name, points in curves.items()}


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (missing cells are empty; floats to 2 decimals)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _metric_columns(results: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for r in results:
        columns += [k for k in r["metrics"] if k not in columns]
    return columns


def plot_recall(results: Sequence[dict[str, Any]], path: str | Path, title: str = "Recall@K") -> Path:
    """One PNG with a recall@K curve per (run, metric family); x axis K (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        for name, points in recall_curves(r["metrics"]).items():
            label = f"{r['dataset']}/{r['split']}" + ("" if name == "R" else f" {name}")
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xscale("log")
    ks = sorted({k for r in results for pts in recall_curves(r["metrics"]).values() for k, _ in pts})
    if ks:
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md`` and ``recall.png`` for one evaluation result
    ``{"dataset", "split", "model", "metrics": {...}, ...}``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "plot": out / "recall.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    row = {"dataset": result["dataset"], "split": result["split"], **result["metrics"]}
    header = f"# {result['dataset']} ({result['split']}) — {result['model']}\n\n"
    paths["markdown"].write_text(header + markdown_table([row], ["dataset", "split", *result["metrics"]]))
    plot_recall([result], paths["plot"], title=f"{result['dataset']} ({result['split']}) — {result['model']}")
    return paths


def write_batch_report(results: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """One combined table of several results (``results.md``, ``results.csv``, ``results.json``)
    and one plot (``recall.png``); columns are the union of the metric keys."""
    if not results:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["dataset", "split", "model", *_metric_columns(results)]
    rows = [{"dataset": r["dataset"], "split": r["split"], "model": r["model"], **r["metrics"]} for r in results]
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "markdown": out / "results.md",
        "plot": out / "recall.png",
    }
    paths["json"].write_text(json.dumps(list(results), indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    paths["markdown"].write_text(markdown_table(rows, columns))
    plot_recall(results, paths["plot"], title="Recall@K")
    return paths
