"""``trifuse compare RUN_DIR...``: a markdown table and a bar chart of runs, for offline users."""
from __future__ import annotations

from pathlib import Path

from lightning_app.stages import StageError


def run(args) -> int:
    from trifuse.figures.compare import bar_chart, markdown_table, read_run
    from trifuse.io.nifti import atomic_write_text

    runs, errors = {}, []
    for d in args.runs:
        name = Path(d).name if Path(d).name not in ("", ".") else str(d)
        try:
            runs[name] = read_run(d)
        except FileNotFoundError as exc:
            errors.append(str(exc))
    if not runs:
        raise StageError("no run with metrics: " + "; ".join(errors))
    table = markdown_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.md", table + "\n")
    png = bar_chart(runs, out / "compare.png")
    print(table)
    print(f"wrote {out / 'compare.md'} and {png}")
    for e in errors:
        print(f"skipped: {e}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("compare", help="markdown table + bar chart of Dice/HD95 per region over runs")
    s.add_argument("runs", nargs="+", help="run folders (holding summary.json from evaluate, or CSVLogger metrics.csv)")
    s.add_argument("--out", default="reports/compare", help="output folder")
    s.set_defaults(func=run)
