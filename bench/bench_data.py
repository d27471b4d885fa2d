"""Foundation benchmark: prints figures and ratios measured side by side in one run.

1. seconds per synthetic full-size case (generate + write BraTS NIfTI.gz)  target ≤ 3 s
2. cached-case load vs NIfTI.gz decode of the same case                     target ≥ 10×
3. DataModule samples/s (2 workers, 128³ patches) vs one SegResNet training step
   on the same patch: samples delivered per step time                        target ≥ 2

Usage: python bench/bench_data.py [--cases 3] [--threads 2] [--workdir /tmp/trifuse-bench]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--workdir", default="/tmp/trifuse-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    data, cache = work / "data", work / "cache"

    from trifuse import keys
    from trifuse.io import cache as cache_mod
    from trifuse.io.discovery import discover_cases
    from trifuse.io.preprocess import preprocess
    from trifuse.io.labels import labels_to_regions
    from trifuse.io.validate import decode_case
    from trifuse.synth import generate_case
    from trifuse.synth.cohort import _templates, case_seed, write_case_folder
    from trifuse.io.discovery import case_id_for

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    _templates()  # template loading is a one-off per process; not part of per-case time
    gen_t, write_t = [], []
    for i in range(args.cases):
        t0 = time.perf_counter()
        case = generate_case(case_seed(0, i), size="full")
        t1 = time.perf_counter()
        write_case_folder(data, case_id_for(2021, i), case, 2021)
        t2 = time.perf_counter()
        gen_t.append(t1 - t0)
        write_t.append(t2 - t1)
    per_case = np.mean(gen_t) + np.mean(write_t)
    print(f"[1] synthetic full-size case (240x240x155): generate {np.mean(gen_t):.2f} s + write NIfTI.gz {np.mean(write_t):.2f} s = {per_case:.2f} s/case (target <= 3 s)")

    preprocess(data, cache, n_folds=min(5, args.cases))
    rec = discover_cases(data)[0]
    nifti_t, cache_t = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        # what a loader without the cache does per case and epoch: decode, crop, z-score, regions
        dec = decode_case(rec)
        stack = np.stack([v.data for v in dec.images])
        brain = (stack != 0).any(0)
        box = cache_mod.brain_box(brain, dec.reference.spacing)
        sl = tuple(slice(a, b) for a, b in box)
        _ = np.stack([cache_mod.zscore(c[sl], brain[sl])[0] for c in stack])
        _ = labels_to_regions(dec.seg.data[sl], rec.year)
        t1 = time.perf_counter()
        s = cache_mod.load_sample(cache, rec.case_id)
        _ = float(s[keys.MRI].sum())  # touch all data
        t2 = time.perf_counter()
        nifti_t.append(t1 - t0)
        cache_t.append(t2 - t1)
    print(
        f"[2] case load: NIfTI.gz decode+crop+z-score {np.median(nifti_t):.3f} s, cache {np.median(cache_t):.3f} s "
        f"-> cache is {np.median(nifti_t) / np.median(cache_t):.1f}x faster (target >= 10x)"
    )

    from trifuse.lightning.data import BratsDataModule

    p = args.patch
    dm = BratsDataModule(str(data), str(cache), patch_size=(p, p, p), batch_size=1, num_workers=2, samples_per_epoch=40, n_folds=min(5, args.cases))
    dm.setup("fit")
    dm.train_ids = dm.train_ids + dm.val_ids
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up excluded
    n = 0
    t0 = time.perf_counter()
    for _ in it:
        n += 1
        if n == 24:
            break
    loader_rate = n / (time.perf_counter() - t0)
    del it, loader

    from monai.networks.nets import SegResNet

    from trifuse.losses import RegionDiceBCELoss as RegionDiceBCE

    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=16)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = RegionDiceBCE()
    x = torch.randn(1, 4, p, p, p)
    y = (torch.rand(1, 3, p, p, p) > 0.5).float()
    step_t = []
    for i in range(3):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        if i:  # first step warms up allocators
            step_t.append(time.perf_counter() - t0)
    step = float(np.mean(step_t))
    print(
        f"[3] DataModule {loader_rate:.2f} samples/s (2 workers, {p}^3 patches, augmentation on); "
        f"SegResNet(16) train step {step:.2f} s on the same patch -> {loader_rate * step:.1f} samples per step time (target >= 2)"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
