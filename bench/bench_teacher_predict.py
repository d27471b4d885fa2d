"""Full-case prediction time of a TeacherModule against plain MONAI SegResNet, same ROI and overlap.

    .venv/bin/python bench/bench_teacher_predict.py            # 240×240×155 case, roi 128³, overlap 0.5
    .venv/bin/python bench/bench_teacher_predict.py --small    # 120×120×78 case, roi 64³: a quick CPU run

What is timed is what ``trifuse predict`` runs per case after decoding: the teacher's
``predict_regions`` (MONAI ``sliding_window_inference`` with the module as predictor,
Gaussian blending, sigmoid, threshold) against the same call on a plain
``monai.networks.nets.SegResNet`` with identical weights. Runs alternate (plain, teacher,
plain, ...) after a warm-up so that load drifts on a shared machine hit both alike; the
ratio of best-of-N times is printed (target ≤ 1.1), with the median ratio for information.
``bench/bench_backbone.py`` measures the bare backbone; this one adds the LightningModule
around it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trifuse.lightning.teacher import TeacherModule  # noqa: E402
from trifuse.nets import SegResNetBackbone  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="120×120×78 case, roi 64³")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-filters", type=int, default=16)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--sw-batch-size", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape, roi = ((120, 120, 78), (64, 64, 64)) if args.small else ((240, 240, 155), (128, 128, 128))
    cfg = dict(spatial_dims=3, in_channels=4, out_channels=3, init_filters=args.init_filters, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    dev = torch.device(args.device)
    plain = SegResNet(**cfg).to(dev).eval()
    teacher = TeacherModule(modality="mri", net=SegResNetBackbone(**cfg), roi_size=roi, overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    teacher.net.load_state_dict(plain.state_dict())
    teacher = teacher.to(dev).eval()
    x = torch.randn(1, 4, *shape, device=dev)

    def plain_predict(v):
        logits = sliding_window_inference(v, roi, sw_batch_size=args.sw_batch_size, predictor=plain, overlap=args.overlap, mode="gaussian")
        return torch.sigmoid(logits) > 0.5

    runners = {"segresnet": plain_predict, "teacher": teacher.predict_regions}

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = fn(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, y

    print(f"case {shape}, roi {roi}, overlap {args.overlap}, sw_batch {args.sw_batch_size}, threads {args.threads}, device {dev}, init_filters {args.init_filters}")
    outs = {k: timed(fn)[1] for k, fn in runners.items()}  # warm-up and the equality check
    same = torch.equal(outs["segresnet"], outs["teacher"])
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, fn in runners.items():
            times[k].append(timed(fn)[0])
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>10}: best {best[k]:.3f} s  median {med[k]:.3f} s  runs {[round(t, 3) for t in v]}")
    print(f"identical masks: {same}")
    print(
        f"ratio teacher/segresnet = {best['teacher'] / best['segresnet']:.3f} best-of-{args.repeats} "
        f"(median ratio {med['teacher'] / med['segresnet']:.3f}; target <= 1.1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
