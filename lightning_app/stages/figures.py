"""``trifuse figures KIND``: PNG figures for checking each stage by eye."""
from __future__ import annotations

import argparse
from pathlib import Path

from lightning_app.stages import StageError


def load_case_sample(data: str, case: str | None = None) -> dict:
    """Decode one case straight from its NIfTI files into a (whole-volume) sample dict."""
    import numpy as np

    from trifuse import keys
    from trifuse.io.cache import zscore
    from trifuse.io.discovery import discover_cases
    from trifuse.io.labels import labels_to_regions
    from trifuse.io.validate import decode_case

    records = discover_cases(data)
    if case:
        records = [r for r in records if r.case_id == case]
        if not records:
            raise StageError(f"case {case} not found in {data}")
    rec = records[0]
    decoded = decode_case(rec)
    stack = np.stack([v.data for v in decoded.images]).astype(np.float32)
    brain = (stack != 0).any(0)
    mri = np.stack([zscore(c, brain)[0] for c in stack])
    sample = {
        keys.MRI: mri,
        keys.BRAIN: brain[None],
        keys.CASE_ID: rec.case_id,
        keys.META: {
            "spacing": list(decoded.reference.spacing),
            "affine": decoded.reference.affine.tolist(),
            "year": rec.year,
            "shape": list(brain.shape),
            "crop_box": [[0, s] for s in brain.shape],
            "applied": [],
        },
    }
    if decoded.seg is not None:
        sample[keys.LABEL] = labels_to_regions(decoded.seg.data, rec.year)
        sample[keys.SEG] = decoded.seg.data[None]
    return sample


def _cohort(args, out: Path) -> None:
    from trifuse.figures.cohort import render_cohort_figure

    render_cohort_figure(load_case_sample(args.data, args.case), out)


def _semantic(args, out: Path) -> None:
    from trifuse.figures.semantic import semantic_figure_from_data

    semantic_figure_from_data(args.data, out, case=args.case)


def _physics(args, out: Path) -> None:
    """T1ce, FLAIR, simulated US and synthetic CT in three views (cropped cached case if available)."""
    from lightning_app.stages.physics import cached_samples
    from trifuse.io import cache as cache_mod
    from trifuse.physics.figure import render_physics_figure

    cache_dir, manifest, _ = cached_samples(args.data, None)
    ct_model = cache_dir / "ct_mixture.json"
    ids = [c["case_id"] for c in manifest["cases"]]
    cid = args.case or ids[0]
    if cid not in ids:
        raise StageError(f"case {cid} not found (or invalid) in {args.data}")
    sample = cache_mod.load_sample(cache_dir, cid)
    render_physics_figure(sample, out, ct_model=ct_model if ct_model.exists() else None)


def _cases(args, out: Path) -> None:
    """Truth and prediction of each held-out case in three views, Dice per region in the row title."""
    from lightning_app.stages.evaluate import resolve_data
    from trifuse.figures.cases import cases_figure_from_folders

    if not args.pred:
        raise StageError("figures cases needs --pred PRED_DIR (the trifuse predict output of the --data cases)")
    cases_figure_from_folders(resolve_data(args.data), args.pred, out, max_cases=args.cases or 8, case=args.case)


def _attention(args, out: Path) -> None:
    """The student's TC/ET attention maps next to the priors it received (the method paper's Figure 3)."""
    from lightning_app.stages.evaluate import resolve_data
    from trifuse.figures.attention import NoAttentionError, attention_figure_from_data

    if not args.ckpt:
        raise StageError("figures attention needs --ckpt STUDENT_CKPT (e.g. runs/student/full/checkpoints/best.ckpt)")
    try:
        attention_figure_from_data(args.ckpt, resolve_data(args.data), out, max_cases=args.cases or 4, case=args.case,
                                   device=args.device, tta=args.tta, describer=args.describer)
    except NoAttentionError as exc:
        raise StageError(f"{args.ckpt}: {exc}; no figure written") from None


#: figure kind → renderer(args, out_png); other tiers add theirs here
KINDS = {"cohort": _cohort, "semantic": _semantic, "physics": _physics, "cases": _cases, "attention": _attention}


def run(args) -> int:
    out = Path(args.out) if args.out else Path("reports/figures") / f"{args.kind}.png"
    KINDS[args.kind](args, out)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("figures", help="PNG figures for checking stages by eye")
    s.add_argument("kind", choices=sorted(KINDS))
    s.add_argument("--data", default="data/synthetic", help="dataset folder")
    s.add_argument("--case", default=None, help="case id (default: the first)")
    s.add_argument("--out", default=None, help="PNG path (default reports/figures/KIND.png)")
    s.add_argument("--pred", default=None, help="cases: folder of <case_id>.nii.gz predictions of the --data cases")
    s.add_argument("--ckpt", default=None, help="attention: student checkpoint (with semantic priors)")
    s.add_argument("--cases", type=int, default=None, help="cases / attention: how many cases (default 8 / 4)")
    s.add_argument("--device", default="auto", help="attention: auto (cuda if available), cpu or cuda[:N]")
    s.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="attention: average the maps and prediction over the 8 mirrorings (default off: one pass)")
    s.add_argument("--describer", choices=("as-trained", "offline"), default="as-trained",
                   help="attention: describer of the priors (as `trifuse predict --describer`)")
    s.set_defaults(func=run)
