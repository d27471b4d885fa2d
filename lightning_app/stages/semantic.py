"""``trifuse semantic``: per-case multi-view semantic priors from the CLIP encoder."""
from __future__ import annotations

import sys
from pathlib import Path

from lightning_app.stages import StageError, progress


def run(args) -> int:
    from trifuse.semantic.clip_data import default_clip_dir, default_descriptions_dir, default_priors_dir, resolve_cache
    from trifuse.semantic.describe import load_descriptions, read_describe_manifest
    from trifuse.semantic.provenance import DescriberMismatchError
    from trifuse.semantic.priors import PriorConfig, compute_priors

    cache_dir, case_ids = resolve_cache(args.data, args.cache)
    desc_dir = Path(args.descriptions) if args.descriptions else default_descriptions_dir(args.data)
    try:  # one describer per set: a mixture (stale files of another describer) is refused, naming the cases
        descriptions = load_descriptions(desc_dir) if desc_dir.is_dir() else {}
    except DescriberMismatchError as exc:
        raise StageError(str(exc)) from None
    missing = [c for c in case_ids if c not in descriptions]
    if missing:
        raise StageError(f"{len(missing)} case(s) have no description in {desc_dir}: {', '.join(missing[:10])}"
                         f"{' …' if len(missing) > 10 else ''} by its describer (run `trifuse describe --data {args.data}`; "
                         f"failed views are listed in {desc_dir}/failures.jsonl)")
    ckpt = Path(args.clip) if args.clip else default_clip_dir(args.data) / "clip.pt"
    if not ckpt.exists():
        raise StageError(f"{ckpt}: no CLIP checkpoint (run `trifuse clip --data {args.data}` or pass --clip)")
    out = Path(args.out) if args.out else default_priors_dir(args.data)
    config = PriorConfig(factor=args.factor, description_weight=args.description_weight, slice_step=args.slice_step,
                         device=args.device)
    try:
        manifest = read_describe_manifest(desc_dir) or {}
        report = compute_priors(cache_dir, descriptions, ckpt, out, case_ids, config, force=args.force,
                                progress=progress("semantic"), describer_identity=manifest.get("describer"))
    except DescriberMismatchError as exc:
        raise StageError(str(exc)) from None
    line = (f"priors: {len(report.written)} written, {len(report.skipped)} up to date, {len(report.failed)} failed; "
            f"{report.seconds_per_case:.2f} s per case; in {out}")
    aucs = [v for v in report.auc_wt.values() if v == v]
    if aucs:
        line += f"; WT prior AUC vs labels (diagnostic) mean {sum(aucs) / len(aucs):.3f} over {len(aucs)} case(s)"
    print(line)
    if report.failed:
        for cid, msg in sorted(report.failed.items()):
            print(f"FAILED {cid}: {msg}", file=sys.stderr)
        raise StageError(f"priors failed for {len(report.failed)} case(s): {', '.join(sorted(report.failed))}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("semantic", help="multi-view semantic priors (WT/TC/ET) and text embeddings per case")
    s.add_argument("--data", required=True, help="dataset folder")
    s.add_argument("--cache", default=None, help="preprocessed cache (default: <data>/../cache/<name>)")
    s.add_argument("--descriptions", default=None, help="describe output (default: <data>/../descriptions/<name>)")
    s.add_argument("--clip", default=None, help="CLIP checkpoint (default: runs/clip/<name>/clip.pt)")
    s.add_argument("--out", default=None, help="priors folder (default: <data>/../priors/<name>)")
    s.add_argument("--factor", type=int, default=4, help="prior grid = cropped case grid / factor")
    s.add_argument("--description-weight", type=float, default=None,
                   help="weight of the case description in each query (default: as trained)")
    s.add_argument("--slice-step", type=int, default=2,
                   help="use every n-th slice per view (default 2: half the passes, same AUC on the reduced grid)")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, …")
    s.add_argument("--force", action="store_true", help="recompute even if up to date")
    s.set_defaults(func=run)
