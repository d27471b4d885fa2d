"""Prediction time per full-size case with and without test-time mirroring, beside MONAI's
SegResNet sliding window on the same case (issue 10's "Measured" item).

The case is a full-size synthetic BraTS 2021 case (240×240×155 at 1 mm, written as NIfTI and
decoded/validated as ``trifuse predict`` does). The model is a SegResNet teacher whose
checkpoint records a training spacing (``--model-spacing``, default 2 mm like the demo's), so
:class:`trifuse.inference.Predictor` resamples the cropped case to that grid, runs the sliding
window (Gaussian blending), and resamples the probabilities back to 1 mm. Timed, alternating
runs after a warm-up (load drifts hit every row alike), best and median of ``--repeats``:

* ``monai sw``: ``monai.inferers.sliding_window_inference`` (windows batched as the teacher's ``sw_batch_size``) with a plain
  ``monai.networks.nets.SegResNet`` holding the same weights, same ROI, overlap and blending,
  on the same resampled array: the network cost alone, the anchor;
* ``predict, no TTA``: ``Predictor.predict_case`` (crop, z-score, resample, window, resample
  back, threshold, paste onto the 240×240×155 grid), one pass;
* ``predict, TTA``: the same with the 8 mirrorings averaged (``trifuse predict`` default).

Prints a table with each row's ratio to ``monai sw``. Nothing asserts: read the figures.

Usage::

    .venv/bin/python bench/bench_predict_tta.py [--model-spacing 2] [--roi 64] [--filters 16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-spacing", type=float, default=2.0, help="training spacing recorded for the model, mm (1: native BraTS grid)")
    ap.add_argument("--roi", type=int, default=64)
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet

    from trifuse import keys
    from trifuse.inference import Predictor, prepare_case, resample_sample
    from trifuse.io.discovery import discover_cases
    from trifuse.io.validate import decode_case
    from trifuse.lightning.teacher import TeacherModule
    from trifuse.nets import SegResNetBackbone
    from trifuse.synth import synthesize_cohort

    work = Path(tempfile.mkdtemp(prefix="bench_tta_"))
    synthesize_cohort(work / "data", 1, seed=7, layout=2021, size="full")
    case = decode_case(discover_cases(work / "data")[0])
    print(f"case {case.record.case_id}: {tuple(case.reference.data.shape)} at {tuple(round(float(s), 2) for s in case.reference.spacing)} mm")

    roi = (args.roi,) * 3
    cfg = dict(spatial_dims=3, in_channels=4, out_channels=3, init_filters=args.filters, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    plain = SegResNet(**cfg).eval()
    teacher = TeacherModule(modality="mri", net=SegResNetBackbone(**cfg), roi_size=roi, overlap=args.overlap)
    teacher.net.load_state_dict(plain.state_dict())
    teacher.trifuse_meta = {"spacing": [args.model_spacing] * 3}
    teacher.eval()
    fast = Predictor(teacher, tta=False, postprocess=False)
    tta = Predictor(teacher, tta=True, postprocess=False)

    sample = prepare_case(case)
    grid = resample_sample(sample, [args.model_spacing] * 3) if fast.needs_resampling(sample[keys.META]["spacing"]) else sample
    x = grid[keys.MRI].float()[None]
    print(f"cropped {tuple(sample[keys.MRI].shape[1:])} → model grid {tuple(x.shape[2:])} at {args.model_spacing:g} mm; "
          f"roi {roi}, overlap {args.overlap}, {args.filters} filters, {args.threads} threads")

    def monai_sw():
        with torch.inference_mode():
            return torch.sigmoid(sliding_window_inference(x, roi, sw_batch_size=teacher.sw_batch_size, predictor=plain, overlap=args.overlap, mode="gaussian")) > 0.5

    runners = {"monai sw": monai_sw, "predict, no TTA": lambda: fast.predict_case(case), "predict, TTA": lambda: tta.predict_case(case)}
    import logging

    logging.getLogger("trifuse.inference").setLevel(logging.ERROR)  # the resampling notice, once per call
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            out = fn()
            times[k].append(time.perf_counter() - t0)
            if k != "monai sw":
                assert tuple(out.shape) == tuple(case.reference.data.shape), (k, out.shape)
    base = min(times["monai sw"])
    print("\n| path | best s | median s | ratio to monai sw (best) |")
    print("|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {min(v):.2f} | {statistics.median(v):.2f} | {min(v) / base:.2f} |")
    print(f"\nTTA / no TTA = {min(times['predict, TTA']) / min(times['predict, no TTA']):.2f} (8 passes of the window)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
