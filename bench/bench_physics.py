"""Benchmark of the pixel tier (prints, never asserts).

Measured side by side in one run (medians over interleaved repeats, so load from
other processes hits both sides alike):

* US + CT synthesis of one full case (BraTS grid 240×240×155 at 1 mm, cropped to
  the brain box as cached) — target <= 1.5 s on 2 threads;
* US + CT synthesis of a 128³ patch in the frame of its whole case (what training does:
  probe placed on the whole case, once per case, rays cast there, the patch cropped out)
  — target <= 0.25 s — beside the old per-patch simulation (the patch as its own frame);
* patch-vs-case agreement: the correlation of a patch's US with the crop of the whole-case
  US (same probe and seed), for a patch holding the brain surface and one deep in the
  brain, with the case frame and without it (target >= 0.98 with it);
* one MONAI SegResNet(spatial_dims=3, in_channels=4, out_channels=3) training step
  (forward, backward, AdamW step) on the same 128³ patch, init_filters 8 (MONAI
  default) and 16, and the ratio synthesis / step — target <= 0.1.

``--device cuda`` also prints full cases per second on the GPU.

Usage::

    python bench/bench_physics.py [--threads 2] [--repeats 5] [--phantom] [--device cuda] [--resolution-mm 2|0|psf]
                                   [--size full|small] [--patch 128]
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


def full_case(seed: int, phantom: bool, size: str = "full") -> dict:
    """A cropped, z-scored full-size case: the synthetic cohort's, else the phantom."""
    if not phantom:
        try:
            from trifuse.io.cache import brain_box, zscore
            from trifuse.synth.cohort import generate_case

            c = generate_case(seed, size=size)
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


def patch_box(shape, centre, size: int = 128) -> list[list[int]]:
    """A size³ box around ``centre`` (voxels), shifted to lie inside ``shape`` where it fits."""
    box = []
    for c, n in zip(centre, shape):
        lo = int(min(max(0, round(c) - size // 2), max(0, n - size)))
        box.append([lo, min(n, lo + size)])
    return box


def patch(sample: dict, box, size: int = 128, frame: bool = True) -> dict:
    """The patch ``box`` of a case as the loader makes it (padded to size³, same case id); with
    ``frame`` it carries the whole-case frame (``meta["case_frame"]``, in memory here)."""
    from trifuse.physics.transforms import CASE_FRAME

    sl = tuple(slice(a, b) for a, b in box)
    meta = dict(sample[keys.META], applied=[], patch_box=box)
    if frame:
        meta[CASE_FRAME] = {"mri": sample[keys.MRI], "brain": sample[keys.BRAIN]}
    out = {keys.MRI: sample[keys.MRI][(slice(None), *sl)], keys.BRAIN: sample[keys.BRAIN][(slice(None), *sl)],
           keys.CASE_ID: sample[keys.CASE_ID], keys.META: meta}
    pad = [size - (b - a) for a, b in box]
    if any(pad):  # as the loader: extra // 2 in front
        p = []
        for v in reversed(pad):
            p += [v // 2, v - v // 2]
        out[keys.MRI] = torch.nn.functional.pad(out[keys.MRI], p)
        out[keys.BRAIN] = torch.nn.functional.pad(out[keys.BRAIN], p)
    return out


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def crop_padded(vol: torch.Tensor, box, size: int) -> torch.Tensor:
    """The part of a padded patch tensor that holds the box (undo the loader's padding)."""
    sl = [slice(None)]
    for a, b in box:
        front = (size - (b - a)) // 2
        sl.append(slice(front, front + b - a))
    return vol[tuple(sl)]


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
    ap.add_argument("--size", default="full", choices=("full", "small"), help="synthetic case size (small: the 2 mm demo cohort)")
    ap.add_argument("--patch", type=int, default=128, help="training patch edge in voxels")
    ap.add_argument("--resolution-mm", type=lambda v: v if v == "psf" else float(v), default=ProbeConfig().resolution_mm,
                    help="US working resolution in mm (0 = native voxels, 'psf' = chosen from the PSF)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device

    t = time.perf_counter()
    full = full_case(args.seed, args.phantom, args.size)
    print(f"case: MRI {tuple(full[keys.MRI].shape)} (cropped brain box) built in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    model = fit_ct_from_samples([full], n_components=6, max_voxels=100_000, seed=0)
    print(f"CT mixture fitted in {time.perf_counter() - t:.2f} s: components {model.tissues}")
    res = args.resolution_mm or None
    us = SimulateUltrasound(ProbeConfig(resolution_mm=res), seed=0)
    ct = SynthesizeCT(model)
    # the usual foreground patch (centred on the FLAIR-abnormal centroid), framed and as its own frame
    mri = full[keys.MRI]
    fl = (mri[keys.FLAIR] > 2.0) & full[keys.BRAIN][0]
    centre = fl.nonzero().float().mean(0).tolist() if fl.any() else [n / 2 for n in mri.shape[1:]]
    box = patch_box(mri.shape[1:], centre, args.patch)
    pt = patch(full, box, args.patch)
    pt_own = patch(full, box, args.patch, frame=False)

    # patch-vs-case agreement: a patch at the probe face (brain surface) and one deep in the brain
    with torch.no_grad():
        whole = us(full)
    rec = whole[keys.META]["applied"][-1]
    sp = full[keys.META]["spacing"]
    face = [c / s for c, s in zip(rec["centre_mm"], sp)]
    deep = [(c + 55.0 * a) / s for c, a, s in zip(rec["centre_mm"], rec["direction"], sp)]
    print(f"probe face {[round(v) for v in face]}, target {[round(t / s) for t, s in zip(rec['target_mm'], sp)]} (voxels)")
    for name, c in (("with the brain surface", face), ("deep, no brain surface", deep)):
        b = patch_box(mri.shape[1:], c, 48)
        has_surface = not bool(full[keys.BRAIN][(slice(None), *[slice(x, y) for x, y in b])].all())
        ref = whole[keys.US][(slice(None), *[slice(x, y) for x, y in b])]
        line = []
        for fr in (True, False):
            with torch.no_grad():
                got = crop_padded(us(patch(full, b, 48, frame=fr))[keys.US], b, 48)
            line.append(f"{'case frame' if fr else 'own frame (old)'} r = {corr(got, ref):.4f}")
        print(f"48^3 patch {name} (surface in patch: {has_surface}): " + ", ".join(line) + "   (target >= 0.98 with the case frame)")
    with torch.no_grad():
        us(pt)  # the whole-case probe is placed once per case (cached, as in a loader worker)

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

    full_d, pt_d, own_d = to(full, dev), to(pt, dev), to(pt_own, dev)
    # warm-up (allocator, lazy init), then interleaved repeats
    synth(full_d), synth(pt_d), synth(own_d), step(8), step(16)
    times = {"full": [], "patch": [], "own": [], 8: [], 16: []}
    for _ in range(args.repeats):
        times["full"].append(timed(lambda: synth(full_d), dev))
        times["patch"].append(timed(lambda: synth(pt_d), dev))
        times["own"].append(timed(lambda: synth(own_d), dev))
        for f in (8, 16):
            times[f].append(timed(lambda: step(f), dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"device {dev}, torch threads {torch.get_num_threads()}, US working resolution {res or 'native'} mm, "
          f"{args.repeats} repeats (median / best)")
    print(f"US+CT full case {tuple(full[keys.MRI].shape[1:])}: {med['full']:.3f} / {best['full']:.3f} s   (target <= 1.5 s)")
    n = args.patch
    print(f"US+CT {n}^3 patch, case frame: {med['patch']:.3f} / {best['patch']:.3f} s   (target <= 0.25 s at 128^3)")
    print(f"US+CT {n}^3 patch, own frame (old per-patch): {med['own']:.3f} / {best['own']:.3f} s")
    for f in (8, 16):
        print(f"SegResNet(init_filters={f:2d}) step on {n}^3: {med[f]:.3f} / {best[f]:.3f} s   "
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
