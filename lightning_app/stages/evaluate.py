"""``trifuse evaluate --pred PRED_DIR --data DATA_DIR [--out OUT_DIR]``: BraTS-convention scores.

A thin front of :func:`trifuse.metrics.report.evaluate_folder`: per-region (WT, TC, ET)
Dice and HD95 in mm, both-empty → Dice 1 / HD95 0, one-empty → Dice 0 / HD95 373.13, a
missing prediction scored as empty. Writes ``OUT_DIR/per_case.csv``
(``case_id,region,dice,hd95``) and ``OUT_DIR/summary.json`` atomically and prints the table.
Running it twice rewrites the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

from lightning_app.stages import StageError


def resolve_data(data: str) -> Path:
    """``--data`` as given, or ``data/<name>`` for a bare dataset name (``--data brats2021``)."""
    p = Path(data)
    if not p.exists() and not p.is_absolute() and len(p.parts) == 1 and (Path("data") / p).exists():
        return Path("data") / p
    return p


def run(args) -> int:
    from trifuse.metrics.report import evaluate_folder

    out = Path(args.out) if args.out else Path(args.pred)
    summary = evaluate_folder(
        args.pred,
        resolve_data(args.data),
        out,
        year=args.year,
        hd95_mode=args.hd95_mode,
        lesion_wise=args.lesion_wise,
        print_table=True,
    )
    print(f"evaluate: per_case.csv and summary.json in {out}")
    bad = {**summary["invalid_predictions"], **summary["invalid_references"]}
    if bad:
        for case_id, why in sorted(bad.items()):
            print(f"INVALID {case_id}: {why}", file=sys.stderr)
        first = sorted(bad.items())[0]
        raise StageError(
            f"{len(bad)} case(s) with an unusable file (scores written, see summary.json): {first[0]}: {first[1]}"
            + (f" (and {len(bad) - 1} more, see above)" if len(bad) > 1 else "")
        )
    return 0


def register(sub) -> None:
    s = sub.add_parser("evaluate", help="BraTS-convention Dice/HD95 of a prediction folder against the reference labels")
    s.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz label maps (trifuse predict output)")
    s.add_argument("--data", required=True, help="reference dataset folder (BraTS layout with seg files), or a name under data/")
    s.add_argument("--out", default=None, help="where per_case.csv and summary.json go (default: --pred)")
    s.add_argument("--year", default="auto", help="auto, 2020, 2021 or 2023")
    s.add_argument("--hd95-mode", default="pooled", choices=["pooled", "max_directed"], help="pooled = brats-evaluation; max_directed = MONAI")
    s.add_argument("--lesion-wise", action="store_true", help="also write BraTS 2023 lesion-wise metrics")
    s.set_defaults(func=run)
