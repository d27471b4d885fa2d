"""``trifuse report``: one markdown report of a pipeline run (tables and figures), path printed."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning_app.stages import StageError


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p.resolve(), base.resolve())


def run(args) -> int:
    from trifuse.figures.compare import bar_chart, markdown_table, read_run
    from trifuse.io.nifti import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# TriFuse report: {args.title}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M:%S')}_", ""]
    if args.eval:
        summary_p = Path(args.eval) / "summary.json"
        if not summary_p.exists():
            raise StageError(f"{summary_p}: no evaluation summary (run trifuse evaluate first)")
        s = json.loads(summary_p.read_text())
        lines += ["## Held-out evaluation (BraTS conventions)", ""]
        lines += ["| region | Dice mean ± std | HD95 mm mean ± std |", "|---|---|---|"]
        for r, block in list(s.get("regions", {}).items()) + [("mean", s.get("overall", {}))]:
            d, h = block.get("dice", {}), block.get("hd95", {})
            fmt = lambda x, nd: "–" if x is None else f"{x:.{nd}f}"  # noqa: E731
            lines.append(f"| {r} | {fmt(d.get('mean'), 4)} ± {fmt(d.get('std'), 4)} | {fmt(h.get('mean'), 2)} ± {fmt(h.get('std'), 2)} |")
        lines += ["", f"per-case table: `{_rel(Path(args.eval) / 'per_case.csv', out)}`", ""]
    groups = [("Teachers (validation)", args.teachers or []), ("Student and ablations (validation)", args.runs or [])]
    for title, dirs in groups:
        runs = {}
        for d in dirs:
            try:
                runs[Path(d).name] = read_run(d)
            except FileNotFoundError as exc:
                lines.append(f"- skipped {d}: {exc}")
        if runs:
            lines += [f"## {title}", "", markdown_table(runs), ""]
            png = bar_chart(runs, out / f"{title.split()[0].lower()}_bars.png")
            lines += [f"![{title}]({_rel(png, out)})", ""]
    figs = [Path(f) for f in (args.figures or [])]
    if figs:
        lines += ["## Figures", ""]
        for f in figs:
            if f.exists():
                lines += [f"### {f.stem}", "", f"![{f.stem}]({_rel(f, out)})", ""]
            else:
                lines += [f"- missing figure {f}", ""]
    if args.notes:
        lines += ["## Notes", "", Path(args.notes).read_text() if Path(args.notes).exists() else args.notes, ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    print(f"report: {report.resolve()}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("report", help="markdown report with the tables and figures of a pipeline run")
    s.add_argument("--out", default="reports/demo", help="report folder (report.md goes there)")
    s.add_argument("--title", default="demo on the synthetic cohort")
    s.add_argument("--eval", default=None, help="trifuse evaluate output folder (summary.json, per_case.csv)")
    s.add_argument("--teachers", nargs="*", help="teacher run folders")
    s.add_argument("--runs", nargs="*", help="student / ablation run folders")
    s.add_argument("--figures", nargs="*", help="PNG files to include")
    s.add_argument("--notes", default=None, help="text or a file with notes to append")
    s.set_defaults(func=run)
