"""Compare runs offline: a markdown table and a bar chart of Dice and HD95 per region."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from trifuse import keys
from trifuse.figures.common import plt, save_figure

METRICS = [f"dice_{r}" for r in keys.REGIONS] + ["dice_mean"] + [f"hd95_{r}" for r in keys.REGIONS] + ["hd95_mean"]
#: validation Dice after the post-processing decided on the same cases (teachers and student log it)
POST = "post_dice_mean"


def _from_summary(path: Path) -> dict[str, float]:
    """``trifuse evaluate``'s summary.json → flat metrics."""
    s = json.loads(path.read_text())
    out = {}
    for r in list(keys.REGIONS) + ["mean"]:
        block = s.get(r) or s.get("regions", {}).get(r) or (s.get("overall") if r == "mean" else None) or {}
        for m in ("dice", "hd95"):
            v = block.get(m)
            if isinstance(v, dict):
                v = v.get("mean")
            if v is not None:
                out[f"{m}_{r}"] = float(v)
    return out


def _from_csv(path: Path) -> dict[str, float]:
    """Last validation row of a Lightning ``metrics.csv`` (columns ``val/dice_WT`` …)."""
    last: dict[str, float] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            vals = {k.removeprefix("val/"): row[k] for k in row if k.startswith("val/") and row[k] not in ("", None)}
            if any(k in vals for k in METRICS):
                last = {k: float(v) for k, v in vals.items() if k in METRICS or k == POST}
    return last


def read_run(run_dir: str | Path) -> dict[str, float]:
    """Metrics of a run folder: ``summary.json`` (evaluate) if present, else the newest ``metrics.csv``.

    Raises:
        FileNotFoundError: the folder holds neither.
    """
    run_dir = Path(run_dir)
    summaries = sorted(run_dir.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    for s in reversed(summaries):
        m = _from_summary(s)
        if m:
            return m
    csvs = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    for c in reversed(csvs):
        m = _from_csv(c)
        if m:
            return m
    raise FileNotFoundError(f"{run_dir}: no summary.json or metrics.csv with validation metrics")


def markdown_table(runs: dict[str, dict[str, float]]) -> str:
    head = "| run | " + " | ".join(f"Dice {r}" for r in keys.REGIONS) + " | Dice mean | " + " | ".join(f"HD95 {r}" for r in keys.REGIONS) + " | HD95 mean |"
    cols = list(METRICS)
    if any(POST in m for m in runs.values()):  # Dice with and without the post-processing
        head += " Dice mean post-processed |"
        cols.append(POST)
    sep = "|---" * (1 + len(cols)) + "|"
    rows = []
    for name, m in runs.items():
        cells = [f"{m[k]:.4f}" if "dice" in k and k in m else (f"{m[k]:.2f}" if k in m else "–") for k in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + rows)


def bar_chart(runs: dict[str, dict[str, float]], out_png: str | Path) -> Path:
    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(names))
    for ax, metric, label in ((axes[0], "dice", "Dice (higher is better)"), (axes[1], "hd95", "HD95 mm (lower is better)")):
        cats = list(keys.REGIONS) + ["mean"]
        for i, n in enumerate(names):
            vals = [runs[n].get(f"{metric}_{c}", math.nan) for c in cats]
            ax.bar([j + i * width for j in range(len(cats))], vals, width, label=n)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cats))], cats)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
