"""Benchmark of the pixel tier (prints, never asserts).

Measured side by side in one run (medians over interleaved repeats, so load from
other processes hits both sides alike):

* US + CT synthesis of one full case (BraTS grid 240×240×155 at 1 mm, cropped to
  the brain box as cached) — target <= 1.5 s on 2 threads;
* US + CT synthesis of a 128³ patch — target <= 0.25 s;
* one MONAI SegResNet(spatial_dims=3, in_channels=4, out_channels=3) training step
  (forward, backward, AdamW step) on the same 128³ patch, init_filters 8 (MONAI
  default) and 16, and the ratio synthesis / step — target <= 0.1.

``--device cuda`` also prints full cases per second on the GPU.

Usage::

    python bench/bench_physics.py [--threads 2] [--repeats 5] [--phantom] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from trifuse import keys
from trifuse.physics.ct import fit_ct_from_samples
from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT
from trifuse.physics.ultrasound import ProbeConfig


def full_case(seed: int, phantom: bool) -> dict:
    """A cropped, z-scored full-size case: the synthetic cohort's, else the phantom."""
    if not phantom:
        try:
            from trifuse.io.cache import brain_box, zscore
            from trifuse.synth.cohort import generate_case

            c = generate_case(seed, size="full")
            sp = c["spacing"]
            sp = [float(sp)] * 3 if np.isscalar(sp) else [float(v) for v in sp]
            brain = np.zeros(c["t1"].shape, dtype=bool)
            for k in keys.MODALITIES:
                brain |= c[k] > 0
            box = brain_box(brain, sp)
            sl = tuple(slice(a, b) for a, b in box)
            mri = np.stack([zscore(c[k].astype(np.float32), brain)[0][sl] for k in keys.MODALITIES])
            return {keys.MRI: torch.from_numpy(mri), keys.BRAIN: torch.from_numpy(brain[sl].copy())[None],
                    keys.CASE_ID: f"synth_{seed}", keys.META: {"spacing": sp, "crop_box": box, "applied": []}}
        except ImportError as e:  # synthetic cohort not available: fall back to the phantom
            print(f"(synthetic cohort unavailable: {e}; using the phantom)")
    from trifuse.physics.phantom import make_head_phantom

    s = make_head_phantom((170, 200, 150), seed=seed)
    return s


def patch(sample: dict, size: int = 128) -> dict:
    """A size³ patch centred on the FLAIR-abnormal centroid (the usual foreground crop)."""
    mri = sample[keys.MRI]
    fl = (mri[keys.FLAIR] > 2.0) & sample[keys.BRAIN][0]
    idx = fl.nonzero().float().mean(0) if fl.any() else torch.tensor(mri.shape[1:]) / 2
    sl = []
    for c, n in zip(idx.tolist(), mri.shape[1:]):
        lo = int(min(max(0, round(c) - size // 2), max(0, n - size)))
        sl.append(slice(lo, lo + size))
    pad = [max(0, size - (s.stop - s.start if s.stop <= n else n - s.start)) for s, n in zip(sl, mri.shape[1:])]
    out = {keys.MRI: mri[(slice(None), *sl)], keys.BRAIN: sample[keys.BRAIN][(slice(None), *sl)],
           keys.CASE_ID: sample[keys.CASE_ID] + "_patch", keys.META: dict(sample[keys.META], applied=[])}
    if any(pad):
        p = []
        for v in reversed(pad):
            p += [0, v]
        out[keys.MRI] = torch.nn.functional.pad(out[keys.MRI], p)
        out[keys.BRAIN] = torch.nn.functional.pad(out[keys.BRAIN], p)
    return out


def to(sample: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--phantom", action="store_true", help="use the analytic phantom instead of the synthetic cohort")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution-mm", type=float, default=ProbeConfig().resolution_mm,
                    help="US working resolution (0 = native voxels)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device

    t = time.perf_counter()
    full = full_case(args.seed, args.phantom)
    print(f"case: MRI {tuple(full[keys.MRI].shape)} (cropped brain box) built in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    model = fit_ct_from_samples([full], n_components=6, max_voxels=100_000, seed=0)
    print(f"CT mixture fitted in {time.perf_counter() - t:.2f} s: components {model.tissues}")
    res = args.resolution_mm or None
    us = SimulateUltrasound(ProbeConfig(resolution_mm=res), seed=0)
    ct = SynthesizeCT(model)
    pt = patch(full)

    def synth(s):
        with torch.no_grad():
            ct(us(s))

    from monai.networks.nets import SegResNet

    nets = {}
    for f in (8, 16):
        net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=f).to(dev)
        nets[f] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4))
    x = pt[keys.MRI][None].to(dev)
    y = (torch.rand(1, 3, *x.shape[2:], device=dev) > 0.9).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(f):
        net, opt = nets[f]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    full_d, pt_d = to(full, dev), to(pt, dev)
    # warm-up (allocator, lazy init), then interleaved repeats
    synth(full_d), synth(pt_d), step(8), step(16)
    times = {"full": [], "patch": [], 8: [], 16: []}
    for _ in range(args.repeats):
        times["full"].append(timed(lambda: synth(full_d), dev))
        times["patch"].append(timed(lambda: synth(pt_d), dev))
        for f in (8, 16):
            times[f].append(timed(lambda: step(f), dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"device {dev}, torch threads {torch.get_num_threads()}, US working resolution {res or 'native'} mm, "
          f"{args.repeats} repeats (median / best)")
    print(f"US+CT full case {tuple(full[keys.MRI].shape[1:])}: {med['full']:.3f} / {best['full']:.3f} s   (target <= 1.5 s)")
    print(f"US+CT 128^3 patch:        {med['patch']:.3f} / {best['patch']:.3f} s   (target <= 0.25 s)")
    for f in (8, 16):
        print(f"SegResNet(init_filters={f:2d}) step on 128^3: {med[f]:.3f} / {best[f]:.3f} s   "
              f"ratio synthesis/step = {med['patch'] / med[f]:.3f}   (target <= 0.1)")
    if dev.startswith("cuda"):
        n = max(10, args.repeats)
        sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            synth(full_d)
        sync(dev)
        print(f"GPU: {n / (time.perf_counter() - t):.1f} full cases/s (US+CT)")


if __name__ == "__main__":
    main()
