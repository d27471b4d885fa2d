"""Semantic tier benchmark: CLIP retrieval, WT-prior AUC and prior speed on a synthetic cohort.

Prints, measured in one run:

* recall@1 / recall@5 (image→text and text→image) on held-out synthetic (slice,
  description) pairs, against chance (exact for the gallery, and the nominal 1/N, 5/N);
* ROC AUC of the WT prior against the true WT mask (brain voxels only) on the held-out
  ("validation") cases and on the training cases, target ≥ 0.85, with the AUC of the
  raw FLAIR intensity as a trivial image-only reference; TC/ET prior AUCs for information;
* seconds per case to compute the priors on this CPU (threads as given).

Usage::

    python bench/bench_semantic.py --data /tmp/sem/synthetic --n 12 --size small

The cohort is generated (``trifuse synth``), preprocessed and described offline when
the data folder does not exist.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/sem/synthetic")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a ClipConfig field, e.g. --set global_branch=true")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from trifuse import keys
    from trifuse.io.cache import load_sample
    from trifuse.semantic.clip import ClipConfig, format_metrics, train_clip
    from trifuse.semantic.clip_data import default_descriptions_dir, resolve_cache
    from trifuse.semantic.describe import describe_cases, load_descriptions
    from trifuse.semantic.priors import PriorConfig, compute_prior, prior_auc

    data = Path(args.data)
    if not data.exists():
        from trifuse.synth import synthesize_cohort

        print(f"generating {args.n} {args.size} synthetic cases in {data} …", flush=True)
        synthesize_cohort(data, args.n, seed=args.seed, layout=2021, size=args.size)
    cache, ids = resolve_cache(data)
    desc_dir = default_descriptions_dir(data)
    descriptions = load_descriptions(desc_dir) if desc_dir.is_dir() else {}
    if any(c not in descriptions for c in ids):
        describe_cases((load_sample(cache, c) for c in ids), "offline", desc_dir)
        descriptions = load_descriptions(desc_dir)

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = ClipConfig.from_dict({"image_size": args.image_size, "epochs": args.epochs, "seed": args.seed} | overrides)
    t0 = time.perf_counter()
    res = train_clip(cache, descriptions, ids, config)
    train_s = time.perf_counter() - t0
    m = res.metrics
    print(f"\n== CLIP ({config.backend}, {args.image_size} px, {args.epochs} epochs, {train_s:.0f} s on "
          f"{args.threads} thread(s)) ==")
    print(format_metrics(m))
    print(f"nominal chance over the {m['n_heldout_pairs']} held-out pairs: @1 {m['nominal_chance']['@1']:.3f}, "
          f"@5 {m['nominal_chance']['@5']:.3f}")

    model = res.model.eval()
    rows = []
    for cid in ids:
        s = load_sample(cache, cid)
        t1 = time.perf_counter()
        p = compute_prior(model, s, descriptions[cid], PriorConfig())
        sec = time.perf_counter() - t1
        brain = s[keys.BRAIN][0].bool()
        label = s[keys.LABEL].bool()
        flair = s[keys.MRI][keys.FLAIR]
        rows.append({
            "case_id": cid,
            "heldout": cid in m["heldout_cases"],
            "seconds": sec,
            "shape": list(brain.shape),
            "auc_wt": prior_auc(p.prior[keys.WT].float(), label[keys.WT], brain),
            "auc_tc": prior_auc(p.prior[keys.TC].float(), label[keys.TC], brain),
            "auc_et": prior_auc(p.prior[keys.ET].float(), label[keys.ET], brain),
            "auc_flair": prior_auc(flair, label[keys.WT], brain),  # full-resolution raw FLAIR: reference
        })

    def mean(key, sel):
        v = [r[key] for r in rows if sel(r) and r[key] == r[key]]
        return (float(np.mean(v)) if v else float("nan")), len(v)

    print("\n== priors (factor 4, three views) ==")
    print(f"{'case':<18}{'split':<8}{'AUC WT':>8}{'AUC TC':>8}{'AUC ET':>8}{'FLAIR':>8}{'s/case':>8}")
    for r in rows:
        print(f"{r['case_id']:<18}{'held' if r['heldout'] else 'train':<8}{r['auc_wt']:>8.3f}{r['auc_tc']:>8.3f}"
              f"{r['auc_et']:>8.3f}{r['auc_flair']:>8.3f}{r['seconds']:>8.2f}")
    summary = {}
    for name, sel in (("held-out", lambda r: r["heldout"]), ("train", lambda r: not r["heldout"])):
        for key in ("auc_wt", "auc_tc", "auc_et", "auc_flair"):
            summary[f"{name} {key}"] = mean(key, sel)
    hv, hn = summary["held-out auc_wt"]
    print(f"\nWT prior AUC on {hn} held-out (validation) case(s): {hv:.3f} (target ≥ 0.85: "
          f"{'met' if hv >= 0.85 else 'NOT met'}); training cases {summary['train auc_wt'][0]:.3f}")
    print(f"reference, raw FLAIR intensity as the WT score: held-out {summary['held-out auc_flair'][0]:.3f}")
    print(f"TC / ET prior AUC (held-out): {summary['held-out auc_tc'][0]:.3f} / {summary['held-out auc_et'][0]:.3f}")
    sec = [r["seconds"] for r in rows]
    shape = rows[0]["shape"]
    print(f"priors: {np.mean(sec):.2f} s per case (median {np.median(sec):.2f}; cropped case ~{shape}) "
          f"on {args.threads} CPU thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"metrics": m, "rows": rows, "train_seconds": train_s}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
