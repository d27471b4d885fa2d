"""``trifuse report``: one markdown report of a pipeline run (tables and figures), path printed."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning_app.stages import StageError


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p.resolve(), base.resolve())


def _fmt(x, nd: int) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _grid(values) -> str:
    """``240×240×155``; a spacing ``(1, 1, 1)`` reads ``1`` (isotropic), else ``1×1×2``."""
    return "×".join(f"{float(v):.3g}" for v in values)


def _spacing(values) -> str:
    vals = [float(v) for v in values]
    return f"{vals[0]:.3g}" if max(vals) - min(vals) <= 1e-3 * max(vals) else _grid(vals)


def fullsize_section(eval_dir, out: Path) -> list[str]:
    """The report section of ``trifuse report --fullsize EVAL_DIR``, every value read from files.

    The case's shape and spacing come from its input image header (the data folder named in
    ``EVAL_DIR/summary.json``), the training spacing, resampling and seconds from the prediction
    log beside the predictions (``<pred_dir>.predict.json``, ``trifuse predict`` writes it), Dice and HD95
    from the summary.
    """
    from lightning_app.stages.predict import log_path
    from trifuse import keys
    from trifuse.io.discovery import discover_cases
    from trifuse.io.nifti import load_header

    summary_p = Path(eval_dir) / "summary.json"
    if not summary_p.exists():
        raise StageError(f"{summary_p}: no evaluation summary of the full-size case (run make demo-fullsize first)")
    s = json.loads(summary_p.read_text())
    pred_dir, data_dir = Path(s["pred_dir"]), Path(s["data_dir"])
    log_p = log_path(pred_dir)
    log = json.loads(log_p.read_text()).get("cases", {}) if log_p.is_file() else {}
    rows, grids = [], set()
    for rec in discover_cases(data_dir):
        if rec.seg is None:
            continue
        img = load_header(rec.images[keys.MODALITIES[0]])
        shape, spacing = _grid(img.shape[:3]), _spacing(img.header.get_zooms()[:3])
        grids.add((spacing, shape))
        r = log.get(rec.case_id, {})
        model = _spacing(r["model_spacing"]) if r.get("model_spacing") else "not recorded"
        resampled = {True: "yes", False: "no"}.get(r.get("resampled"), "–")
        rows.append((rec.case_id, shape, spacing, model, resampled, _fmt(r.get("seconds"), 1), r))
    if not rows:
        raise StageError(f"{data_dir}: no case with a reference segmentation (the full-size evaluation read it)")
    title = f"Full-size case{'s' if len(rows) > 1 else ''}" + (
        " ({} mm, {})".format(*next(iter(grids))) if len(grids) == 1 else ""
    )
    lines = [f"## {title}", ""]
    lines += ["| case | input shape | input spacing mm | model spacing mm | resampled | prediction s |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row[:6])} |" for row in rows]
    lines.append("")
    recs = [row[6] for row in rows]
    if not all(recs):
        lines.append(f"No prediction record for every case in `{_rel(log_p, out)}` (written by `trifuse predict`): "
                     "training spacing, resampling and time are not known for those.")
    elif all(r["resampled"] for r in recs):
        models = sorted({_spacing(r["model_spacing"]) for r in recs})
        lines.append(f"The model was trained on {' / '.join(models)} mm cases; the case went through the spacing-aware path "
                     "(resampled to the training spacing, the region probabilities resampled back to the input grid before thresholding).")
    else:
        lines.append("Cases at the model's training spacing (resampled: no) were predicted on their own grid, without resampling.")
    ckpts = sorted({r["ckpt"] for r in recs if r.get("ckpt")})
    if ckpts:
        lines.append("checkpoint: " + ", ".join(f"`{c}`" for c in ckpts))
    n = s.get("n_cases", len(rows))
    lines += [""] + ([f"Mean over the {n} cases:", ""] if n > 1 else []) + ["| region | Dice | HD95 mm |", "|---|---|---|"]
    for r, block in list(s.get("regions", {}).items()) + [("mean", s.get("overall", {}))]:
        lines.append(f"| {r} | {_fmt(block.get('dice', {}).get('mean'), 4)} | {_fmt(block.get('hd95', {}).get('mean'), 2)} |")
    if s.get("n_missing") or s.get("n_invalid"):
        lines += ["", f"{s.get('n_missing', 0)} missing and {s.get('n_invalid', 0)} invalid prediction(s), scored as empty."]
    lines += ["", f"per-case table: `{_rel(Path(eval_dir) / 'per_case.csv', out)}`", ""]
    return lines


def _named(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the run the predictions came from, else the folder)."""
    name, sep, d = spec.partition("=")
    return (name, Path(d)) if sep else (Path(spec).name, Path(spec))


def heldout_section(specs, out: Path) -> list[str]:
    """Held-out Dice/HD95 of one or more ``trifuse evaluate`` folders, side by side."""
    evals = []
    for spec in [specs] if isinstance(specs, str) else specs:
        name, d = _named(spec)
        summary_p = d / "summary.json"
        if not summary_p.exists():
            raise StageError(f"{summary_p}: no evaluation summary (run trifuse evaluate first)")
        evals.append((name, d, json.loads(summary_p.read_text())))
    lines = ["## Held-out evaluation (BraTS conventions)", ""]
    regions = list(evals[0][2].get("regions", {}))
    def cells(s, r):
        block = s.get("overall", {}) if r == "mean" else s.get("regions", {}).get(r, {})
        d, h = block.get("dice", {}), block.get("hd95", {})
        return f"{_fmt(d.get('mean'), 4)} ± {_fmt(d.get('std'), 4)}", f"{_fmt(h.get('mean'), 2)} ± {_fmt(h.get('std'), 2)}"
    if len(evals) == 1:
        lines += ["| region | Dice mean ± std | HD95 mm mean ± std |", "|---|---|---|"]
        for r in regions + ["mean"]:
            lines.append(f"| {r} | {' | '.join(cells(evals[0][2], r))} |")
    else:
        names = [e[0] for e in evals]
        lines += ["| region | " + " | ".join(f"{n} Dice" for n in names) + " | " + " | ".join(f"{n} HD95 mm" for n in names) + " |",
                  "|---|" + "---|" * (2 * len(evals))]
        for r in regions + ["mean"]:
            c = [cells(e[2], r) for e in evals]
            lines.append(f"| {r} | " + " | ".join(x[0] for x in c) + " | " + " | ".join(x[1] for x in c) + " |")
    lines.append("")
    for name, d, s in evals:
        n = s.get("n_cases", s.get("cases"))
        lines.append(f"- {name}: {'' if n is None else f'{n} cases, '}per-case table `{_rel(d / 'per_case.csv', out)}`")
    lines.append("")
    return lines


def run(args) -> int:
    from trifuse.figures.compare import bar_chart, markdown_table, read_run
    from trifuse.io.nifti import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# TriFuse report: {args.title}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M:%S')}_", ""]
    if args.eval:
        lines += heldout_section(args.eval, out)
    if getattr(args, "fullsize", None):
        lines += fullsize_section(args.fullsize, out)
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
    s.add_argument("--eval", nargs="+", default=None, metavar="[NAME=]DIR",
                   help="trifuse evaluate output folder(s) (summary.json, per_case.csv); several, as NAME=DIR, are shown side by side")
    s.add_argument("--fullsize", default=None, help="trifuse evaluate output folder of the full-size (1 mm) case (make demo-fullsize): its section")
    s.add_argument("--teachers", nargs="*", help="teacher run folders")
    s.add_argument("--runs", nargs="*", help="student / ablation run folders")
    s.add_argument("--figures", nargs="*", help="PNG files to include")
    s.add_argument("--notes", default=None, help="text or a file with notes to append")
    s.set_defaults(func=run)
