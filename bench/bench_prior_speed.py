"""Priors at the cost of a forward pass: prior seconds per case against the student's own
sliding window (and the MRI teacher's) on the same case, and the priors' WT/TC/ET AUC,
for several slice strides — at 2 mm ("small") and 1 mm ("full") synthetic cases.

Measured in one run, on this CPU, for each size:

* ``describe``: the offline description of the case (what ``trifuse predict`` runs);
* ``priors @ stride k``: :func:`trifuse.semantic.priors.compute_prior` with
  ``PriorConfig(slice_step=k)`` (every k-th slice of each view through the image tower,
  the reduced grid filled by cell averages / interpolation);
* ``student``: ``StudentModule.infer`` (sliding window, priors on, FiLM and gates on) and
  ``teacher``: ``TeacherModule.infer`` (MRI teacher), same width and ROI, untrained
  weights (the cost does not depend on the weights);
* the held-out WT/TC/ET AUC of the priors at each stride (CLIP trained here on the
  2 mm cohort; the 1 mm cases use the same CLIP, slices are fitted to its input size).

Usage::

    python bench/bench_prior_speed.py --n 8 --n-full 2 --epochs 20 --threads 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _timed(f, reps=1):
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/bench_prior_speed")
    ap.add_argument("--n", type=int, default=8, help="2 mm cases (CLIP is trained on them)")
    ap.add_argument("--n-full", type=int, default=2, help="1 mm cases (timing and AUC only)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="student/teacher init_filters")
    ap.add_argument("--roi", type=int, default=128)
    ap.add_argument("--strides", default="1,2,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from trifuse import keys
    from trifuse.io.cache import load_sample
    from trifuse.lightning.student import StudentModule
    from trifuse.lightning.teacher import TeacherModule
    from trifuse.semantic.clip import ClipConfig, train_clip
    from trifuse.semantic.clip_data import default_descriptions_dir, resolve_cache
    from trifuse.semantic.describe import describe_cases, load_descriptions
    from trifuse.semantic.offline import OfflineDescriber
    from trifuse.semantic.priors import PriorConfig, compute_prior, prior_auc
    from trifuse.synth import synthesize_cohort

    root = Path(args.root)
    strides = [int(s) for s in args.strides.split(",")]
    cohorts = {}
    for size, n in (("small", args.n), ("full", args.n_full)):
        if n <= 0:
            continue
        data = root / size / "synthetic"
        if not data.exists():
            print(f"generating {n} {size} cases …", flush=True)
            synthesize_cohort(data, n, seed=1 if size == "full" else 0, layout=2021, size=size)
        cache, ids = resolve_cache(data)
        desc_dir = default_descriptions_dir(data)
        descs = load_descriptions(desc_dir) if desc_dir.is_dir() else {}
        if any(c not in descs for c in ids):
            describe_cases((load_sample(cache, c) for c in ids), "offline", desc_dir)
            descs = load_descriptions(desc_dir)
        cohorts[size] = (cache, ids, descs)
    cache, ids, descs = cohorts["small"]
    t0 = time.perf_counter()
    res = train_clip(cache, descs, ids, ClipConfig(image_size=args.image_size, epochs=args.epochs, seed=0))
    print(f"CLIP trained in {time.perf_counter() - t0:.0f} s; held-out cases {res.metrics['heldout_cases']}")
    model = res.model.eval()
    held = set(res.metrics["heldout_cases"])
    student = StudentModule(init_filters=args.width, use_response=False, use_feature=False,
                            roi_size=(args.roi,) * 3).eval()
    from trifuse.nets.backbone import SegResNetBackbone

    net = SegResNetBackbone(spatial_dims=3, in_channels=4, out_channels=3, init_filters=args.width)
    teacher = TeacherModule(modality="mri", net=net, roi_size=(args.roi,) * 3).eval()
    out = {}
    for size, (cache, ids_, descs_) in cohorts.items():
        rows = []
        for cid in ids_:
            s = load_sample(cache, cid)
            x = torch.as_tensor(s[keys.MRI]).float()[None]
            x = x[..., : x.shape[2] // 8 * 8, : x.shape[3] // 8 * 8, : x.shape[4] // 8 * 8]  # the nets' stride
            row = {"case_id": cid, "heldout": size == "full" or cid in held, "shape": list(x.shape[2:])}
            _, row["describe_s"] = _timed(lambda: OfflineDescriber().describe(s))
            for k in strides:
                p, sec = _timed(lambda: compute_prior(model, s, descs_[cid], PriorConfig(slice_step=k)))
                row[f"prior_s@{k}"] = sec
                brain, label = s[keys.BRAIN][0].bool(), s[keys.LABEL].bool()
                for r in keys.REGIONS:
                    row[f"auc_{r}@{k}"] = prior_auc(p.prior[keys.REGIONS.index(r)].float(), label[keys.REGIONS.index(r)], brain)
            prior = torch.nn.functional.interpolate(p.prior.float()[None], size=[(n + 3) // 4 for n in x.shape[2:]])
            with torch.no_grad():
                _, row["student_s"] = _timed(lambda: student.infer(x, prior, p.text[None]))
                _, row["teacher_s"] = _timed(lambda: teacher.infer(x))
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        out[size] = rows

    def mean(rows, key, sel=lambda r: True):
        v = [r[key] for r in rows if sel(r) and r[key] == r[key]]
        return float(np.mean(v)) if v else float("nan")

    print(f"\n== priors vs forward passes ({args.threads} CPU thread(s), width {args.width}, ROI {args.roi}³) ==")
    for size, rows in out.items():
        sw, te, de = mean(rows, "student_s"), mean(rows, "teacher_s"), mean(rows, "describe_s")
        print(f"[{'2 mm' if size == 'small' else '1 mm'}, {len(rows)} case(s), ~{rows[0]['shape']}] student sliding "
              f"window {sw:.2f} s, MRI teacher {te:.2f} s, offline describe {de:.2f} s")
        for k in strides:
            pr = mean(rows, f"prior_s@{k}")
            aucs = " / ".join(f"{mean(rows, f'auc_{r}@{k}', lambda r_: r_['heldout']):.3f}" for r in keys.REGIONS)
            print(f"  stride {k}: priors {pr:.2f} s (+describe {pr + de:.2f} s) = {(pr + de) / sw:.2f}x the student's "
                  f"sliding window; student predict incl. priors / teacher = {(pr + de + sw) / te:.2f}; "
                  f"held-out AUC WT/TC/ET {aucs}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
