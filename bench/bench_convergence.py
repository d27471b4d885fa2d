"""Convergence benchmark: held-out Dice/HD95 by training steps, our recipe beside MONAI's.

Both recipes train through the real path (``lightning.Trainer.fit``) on the same cached
synthetic cohort (2 mm; fold 0 of ``--train-n`` cases for training, its validation cases for
our post-processing decision), with the same patch size, batch size, network width and
steps, and are scored on an independent held-out cohort (``--test-n`` cases, another seed)
by the same BraTS metrics (:class:`trifuse.metrics.BratsRegionMetrics`) at every step count
of ``--steps``:

* **ours** — :class:`trifuse.lightning.teacher.TeacherModule` with the MRI teacher's recipe:
  MONAI ``SegResNetDS`` with deep supervision (3 levels, nnU-Net 1/2^i weights), region
  Dice (batch Dice) + BCE, AdamW with one-cycle cosine, class-ratio patch sampling
  (random/WT/TC/ET), nnU-Net augmentation (:class:`trifuse.transforms.NNUNetAugment`),
  Gaussian sliding window; rows "ours" (raw) and "ours+pp" (with the post-processing decided
  on the fold's validation cases at that step and stored in the checkpoint).
* **defaults** — the teacher defaults before issue 10 (``configs/teacher_mri.yaml`` then:
  SegResNet without deep supervision, per-sample Dice + BCE, foreground sampling p=0.5,
  RandomAugment, lr 1e-3), at the same width, patch, batch and steps: the configured choice
  measured against the old defaults.
* **monai** — MONAI's BraTS tutorial (``brats_segmentation_3d``): ``SegResNet``
  (``blocks_down=[1,2,2,4]``, ``blocks_up=[1,1,1]``, dropout 0.2), ``DiceLoss(smooth_nr=0,
  smooth_dr=1e-5, squared_pred=True, sigmoid=True)``, Adam (wd 1e-5) with cosine annealing,
  the tutorial's transforms (``RandSpatialCropd``, ``RandFlipd`` ×3 p=0.5,
  ``NormalizeIntensityd(nonzero, channel_wise)``, ``RandScaleIntensityd(0.1, p=1)``,
  ``RandShiftIntensityd(0.1, p=1)``) and its sliding window (constant blending). The
  tutorial's lr (1e-4) is meant for 300 epochs; each of ``--monai-lrs`` is trained to
  ``--select-at`` steps (same cosine over the whole run), the best held-out mean Dice there
  is continued to the end, and the table marks which lr that was. Selecting on held-out
  cases favours the anchor, which only makes the comparison harder for us.

Prints one table (steps × recipe: Dice WT/TC/ET/mean, HD95 WT/TC/ET/mean, seconds), the
ratios of our mean Dice over the old defaults' and MONAI's at each step count, and writes ``results.json``.
Nothing asserts: read the figures.

Usage (about an hour on 2 CPU cores with the defaults)::

    .venv/bin/python bench/bench_convergence.py --out runs/bench/convergence
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from trifuse import keys  # noqa: E402
from trifuse.io import cache as cache_mod  # noqa: E402
from trifuse.io.manifest import read_manifest  # noqa: E402
from trifuse.io.preprocess import preprocess  # noqa: E402
from trifuse.metrics import BratsRegionMetrics  # noqa: E402


# --- data -----------------------------------------------------------------------------------
def make_cohorts(root: Path, train_n: int, test_n: int, seed: int) -> tuple[Path, Path]:
    from trifuse.synth import synthesize_cohort

    train, test = root / "train", root / "test"
    synthesize_cohort(train, train_n, seed=seed, layout=2021, size="small")
    synthesize_cohort(test, test_n, seed=seed + 100_000, layout=2021, size="small")
    for d in (train, test):
        preprocess(d, root / "cache" / d.name, n_folds=5, seed=0)
    return root / "cache" / "train", root / "cache" / "test"


def held_out_samples(cache: Path) -> list[dict]:
    ids = [c["case_id"] for c in read_manifest(cache)["cases"]]
    return [cache_mod.load_sample(cache, cid) for cid in ids]


# --- evaluation -----------------------------------------------------------------------------
def model_input(s: dict, inputs=(keys.MRI,)) -> torch.Tensor:
    """(1, C, D, H, W) network input of a whole held-out sample (its pixel tier already applied)."""
    return torch.cat([s[k].float()[None] for k in inputs], dim=1)


@torch.no_grad()
def score(predict_fn, samples: list[dict], decision: dict | None = None, inputs=(keys.MRI,)) -> dict:
    """BraTS Dice/HD95 means of ``predict_fn(input (1,C,D,H,W)) -> logits`` over held-out samples."""
    from trifuse.postprocess import apply_postprocessing

    metrics = BratsRegionMetrics(hd95=True)
    for s in samples:
        logits = predict_fn(model_input(s, inputs))
        pred = torch.sigmoid(logits.float())[0] > 0.5
        if decision:
            pred = apply_postprocessing(pred, decision, s[keys.META]["spacing"])
        metrics.update(pred[None], s[keys.LABEL][None], spacing=[s[keys.META]["spacing"]], case_ids=[s[keys.CASE_ID]])
    out = metrics.compute()
    return {k: float(v) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}


class HeldOutEval(L.Callback):
    """Scores the module on the held-out cohort after the optimizer steps in ``at_steps``."""

    def __init__(self, name: str, at_steps, samples, predict_fn_of, with_post: bool = False, val_cases=None, inputs=(keys.MRI,)):
        self.name, self.at = name, sorted(int(s) for s in at_steps)
        self.inputs = tuple(inputs)
        self.samples, self.predict_fn_of = samples, predict_fn_of
        self.with_post, self.val_cases = with_post, val_cases or []
        self.rows: list[dict] = []
        self.t0 = None
        self.train_s = 0.0

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step not in self.at or any(r["steps"] == step and r["recipe"] == self.name for r in self.rows):
            return
        self.train_s += time.perf_counter() - self.t0
        was = pl_module.training
        pl_module.eval()
        fn = self.predict_fn_of(pl_module)
        row = {"recipe": self.name, "steps": step, "train_s": round(self.train_s, 1), **score(fn, self.samples, inputs=self.inputs)}
        self.rows.append(row)
        print(f"[{self.name}] step {step}: dice WT {row['dice_WT']:.3f} TC {row['dice_TC']:.3f} ET {row['dice_ET']:.3f} mean {row['dice_mean']:.3f}", flush=True)
        if self.with_post and self.val_cases:
            from trifuse.postprocess import PostprocessingSearch

            search = PostprocessingSearch()
            with torch.no_grad():
                for s in self.val_cases:
                    p = torch.sigmoid(fn(model_input(s, self.inputs)).float())[0] > 0.5
                    search.update(p, s[keys.LABEL], s[keys.META]["spacing"])
            decision = search.decide()
            prow = {"recipe": self.name + "+pp", "steps": step, "train_s": round(self.train_s, 1),
                    **score(fn, self.samples, decision, inputs=self.inputs)}
            prow["decision"] = {"min_component_mm3": decision["min_component_mm3"], "et_min_mm3": decision["et_min_mm3"]}
            self.rows.append(prow)
            print(f"[{self.name}+pp] step {step}: dice mean {prow['dice_mean']:.3f} (ET {prow['dice_ET']:.3f}); {prow['decision']}", flush=True)
        pl_module.train(was)
        self.t0 = time.perf_counter()


# --- the pixel tier, as the US/CT teachers see it ----------------------------------------------
def pixel_transforms(modality: str, pixel: str) -> list:
    """The teacher's input transform: ``pixel="case"`` is the current pixel tier (US simulated
    in the frame of the whole cached case, CT in two windows); ``pixel="patch"`` reproduces the
    pixel tier before issue 11 for a before/after comparison on the same budget:

    * US: the probe is placed and the rays cast inside the training patch alone (the patch
      loses its case frame), as ``SimulateUltrasound`` did per patch;
    * CT: one channel, HU/1000 clipped to [-1, 1] (the old encoding), recovered exactly from
      the bone window (-1000..2200 HU, linear) and clipped as the old code did.
    Held-out cases are whole cases either way, as prediction sees them.
    """
    from trifuse.physics.transforms import CASE_FRAME, SimulateUltrasound, SynthesizeCT

    if modality == keys.MRI:
        return []
    if modality == keys.US:
        if pixel == "case":
            return [SimulateUltrasound(mapper="auto", seed=0, jitter_deg=10.0, jitter_mm=5.0)]

        class PatchFrameUS(SimulateUltrasound):
            def __call__(self, data, generator=None):
                data[keys.META].pop(CASE_FRAME, None)  # per-patch probe placement and rays
                return super().__call__(data, generator)

        return [PatchFrameUS(mapper="auto", seed=0, jitter_deg=10.0, jitter_mm=5.0)]
    if pixel == "case":
        return [SynthesizeCT("auto")]
    bone = [w[0] for w in keys.CT_WINDOWS].index("bone")
    _, lo, hi = keys.CT_WINDOWS[bone]

    class OneChannelCT(SynthesizeCT):
        def __call__(self, data, generator=None):
            d = super().__call__(data, generator)
            hu = lo + (hi - lo) * d[keys.CT].narrow(-4, bone, 1)  # channel axis of (C,D,H,W) or (B,C,D,H,W)
            d[keys.CT] = (hu / 1000.0).clamp(-1.0, 1.0)
            return d

    return [OneChannelCT("auto")]


def with_pixel_tier(samples: list[dict], transforms, cache: Path) -> list[dict]:
    """Whole-case samples with the teacher's input made as prediction makes it."""
    out = []
    for s in samples:
        for t in transforms:
            if hasattr(t, "bind_dataset"):
                t.bind_dataset(cache, cache)
            s = t(s, torch.Generator().manual_seed(0))
        out.append(s)
    return out


# --- our recipe --------------------------------------------------------------------------------
def ours(args, train_cache: Path, samples, val_samples, out: Path, defaults: bool = False) -> list[dict]:
    """Our recipe; ``defaults=True`` trains the teacher defaults before issue 10 instead (row
    "defaults"): SegResNet without deep supervision, per-sample Dice + BCE, foreground
    sampling with p=0.5 (no class ratios), RandomAugment (flips, small rotation of the cropped
    patch, intensity), AdamW lr 1e-3 one-cycle with 20 % warm-up (configs/teacher_mri.yaml
    before this issue, at the same width, patch, batch and steps)."""
    from trifuse.lightning.data import BratsDataModule
    from trifuse.lightning.teacher import OneCycleCosine, TeacherModule
    from trifuse.losses import RegionDiceBCELoss
    from trifuse.nets import SegResNetBackbone, SegResNetDSBackbone

    L.seed_everything(0, workers=True)
    name = "defaults" if defaults else "ours"
    p = args.patch
    dm = BratsDataModule(
        data_dir=str(train_cache),  # unused: the cache exists
        cache_dir=str(train_cache),
        patch_size=(p, p, p),
        batch_size=args.batch,
        num_workers=args.workers,
        samples_per_epoch=args.batch * 50,
        class_ratios=None if defaults else [1.0, 1.0, 1.0, 1.0],
        fg_prob=0.5,
        augment=True if defaults else "nnunet",
        seed=0,
        sample_transforms=pixel_transforms(args.modality, args.pixel),
    )
    dm.prepare_data = lambda: None  # the cache is written by make_cohorts
    channels = {keys.MRI: 4, keys.US: 1, keys.CT: keys.CT_CHANNELS if args.pixel == "case" else 1}[args.modality]
    if args.modality == keys.CT and args.pixel == "patch":  # the old 1-channel CT: the teacher's channel check follows it
        from trifuse.lightning import teacher as teacher_mod

        teacher_mod.INPUT_CHANNELS = {**teacher_mod.INPUT_CHANNELS, keys.CT: 1}
    if defaults:
        net = SegResNetBackbone(in_channels=channels, out_channels=3, init_filters=args.filters, blocks_down=(1, 2, 2, 4))
        criterion, lr, pct = RegionDiceBCELoss(), 1e-3, 0.2
    else:
        net = SegResNetDSBackbone(in_channels=channels, out_channels=3, init_filters=args.filters, dsdepth=3)
        criterion, lr, pct = RegionDiceBCELoss(batch=True, ds_weights="exp"), args.lr, 0.1
    model = TeacherModule(
        modality=args.modality,
        net=net,
        criterion=criterion,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4),
        scheduler=functools.partial(OneCycleCosine, pct_start=pct),  # total_steps from the trainer
        roi_size=(p, p, p),
        sw_batch_size=2,
        overlap=0.5,
        keep_val_example=False,
    )
    cb = HeldOutEval(name, args.steps, samples, lambda m: m.infer, with_post=not defaults, val_cases=val_samples, inputs=model.inputs)
    trainer = L.Trainer(
        max_steps=max(args.steps), accelerator="cpu", devices=1, precision="32-true", logger=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[cb],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / name),
    )
    trainer.fit(model, datamodule=dm)
    return cb.rows


# --- MONAI's tutorial recipe -----------------------------------------------------------------------
class TutorialPatches(Dataset):
    """Random training crops with the MONAI BraTS tutorial's dictionary transforms."""

    def __init__(self, cache: Path, case_ids, patch: int, n: int, seed: int):
        from monai.transforms import Compose, NormalizeIntensityd, RandFlipd, RandScaleIntensityd, RandShiftIntensityd, RandSpatialCropd

        self.cache, self.ids, self.n, self.seed = cache, list(case_ids), n, seed
        self.tf = Compose([
            RandSpatialCropd(keys=["image", "label"], roi_size=[patch] * 3, random_size=False),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ])
        self.cases = None
        self.patch = patch
        self.count = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from monai.data import set_track_meta

        set_track_meta(False)
        if self.cases is None:  # loaded per worker: small 2 mm cases
            self.cases = [cache_mod.load_sample(self.cache, c) for c in self.ids]
        self.count += 1
        rng = np.random.RandomState((self.seed * 1_000_003 + i * 7919 + self.count * 104729 + torch.initial_seed()) % (2**31))
        self.tf.set_random_state(state=rng)
        s = self.cases[rng.randint(len(self.cases))]
        img = s[keys.MRI].float()
        lab = s[keys.LABEL].float()
        # pad to the ROI like the tutorial's 240x240x155 volumes never need to
        pad = [max(0, self.patch - n) for n in img.shape[1:]]
        if any(pad):
            spec = [v for q in reversed(pad) for v in (q // 2, q - q // 2)]
            img, lab = torch.nn.functional.pad(img, spec), torch.nn.functional.pad(lab, spec)
        d = self.tf({"image": img, "label": lab})
        return torch.as_tensor(d["image"]).float(), torch.as_tensor(d["label"]).float()


class TutorialModule(L.LightningModule):
    def __init__(self, lr: float, total_steps: int, filters: int, patch: int):
        super().__init__()
        from monai.losses import DiceLoss
        from monai.networks.nets import SegResNet

        self.save_hyperparameters()
        self.model = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=filters, in_channels=4, out_channels=3, dropout_prob=0.2)
        self.loss = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self.model(x), y)
        return loss

    def infer(self, x):
        from monai.inferers import sliding_window_inference

        roi = [min(self.hparams.patch, s) for s in x.shape[2:]]
        return sliding_window_inference(x, roi_size=roi, sw_batch_size=2, predictor=self.model, overlap=0.5)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), self.hparams.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def monai_recipe(args, train_cache: Path, samples, out: Path) -> list[dict]:
    ids = read_manifest(train_cache)["folds"]["splits"][0]["train"]
    total = max(args.steps)
    early = [s for s in args.steps if s <= args.select_at]
    rows, best = [], None
    for lr in args.monai_lrs:
        L.seed_everything(0, workers=True)
        ds = TutorialPatches(train_cache, ids, args.patch, args.batch * 50, seed=0)
        loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, persistent_workers=args.workers > 0)
        model = TutorialModule(lr, total, args.filters, args.patch)
        name = f"monai(lr={lr:g})"
        cb = HeldOutEval(name, early, samples, lambda m: m.infer)
        ck = out / f"monai_lr{lr:g}.ckpt"
        trainer = L.Trainer(max_steps=args.select_at, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            callbacks=[cb], enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / name))
        trainer.fit(model, loader)
        trainer.save_checkpoint(ck)
        rows += cb.rows
        at = [r for r in cb.rows if r["steps"] == max(early)][0]
        if best is None or at["dice_mean"] > best[1]["dice_mean"]:
            best = (lr, at, ck, cb.train_s)
    lr, _, ck, spent = best
    print(f"[monai] continuing lr={lr:g} (best held-out mean Dice at step {args.select_at})", flush=True)
    late = [s for s in args.steps if s > args.select_at]
    if late:
        L.seed_everything(1, workers=True)
        ds = TutorialPatches(train_cache, ids, args.patch, args.batch * 50, seed=1)
        loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, persistent_workers=args.workers > 0)
        model = TutorialModule(lr, total, args.filters, args.patch)
        name = f"monai(lr={lr:g})"
        cb = HeldOutEval(name, late, samples, lambda m: m.infer)
        cb.train_s = spent
        trainer = L.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            callbacks=[cb], enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / name))
        trainer.fit(model, loader, ckpt_path=str(ck))
        rows += cb.rows
    for r in rows:
        r["selected"] = r["recipe"] == f"monai(lr={lr:g})"
    return rows


# --- report -------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = "| steps | recipe | Dice WT | Dice TC | Dice ET | Dice mean | HD95 WT | HD95 TC | HD95 ET | HD95 mean | train s |"
    lines = [head, "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r["steps"], r["recipe"])):
        lines.append(
            f"| {r['steps']} | {r['recipe']}{' *' if r.get('selected') else ''} | {r['dice_WT']:.3f} | {r['dice_TC']:.3f} | {r['dice_ET']:.3f} | "
            f"{r['dice_mean']:.3f} | {r['hd95_WT']:.1f} | {r['hd95_TC']:.1f} | {r['hd95_ET']:.1f} | {r['hd95_mean']:.1f} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    out = []
    for step in sorted({r["steps"] for r in rows}):
        o = [r for r in rows if r["steps"] == step and r["recipe"] == "ours"]
        op = [r for r in rows if r["steps"] == step and r["recipe"] == "ours+pp"]
        m = [r for r in rows if r["steps"] == step and r["recipe"].startswith("monai")]
        d = [r for r in rows if r["steps"] == step and r["recipe"] == "defaults"]
        if o and d:
            out.append(f"step {step}: ours/defaults mean Dice = {o[0]['dice_mean']:.3f}/{d[0]['dice_mean']:.3f} = {o[0]['dice_mean'] / max(d[0]['dice_mean'], 1e-9):.2f}")
        if o and m:
            bm = max(m, key=lambda r: r["dice_mean"])
            line = f"step {step}: ours/monai mean Dice = {o[0]['dice_mean']:.3f}/{bm['dice_mean']:.3f} = {o[0]['dice_mean'] / max(bm['dice_mean'], 1e-9):.2f}"
            if op:
                line += f"; ours+pp/monai = {op[0]['dice_mean'] / max(bm['dice_mean'], 1e-9):.2f}"
            out.append(line + f" (best monai row at this step: {bm['recipe']})")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/convergence")
    ap.add_argument("--data", default=None, help="cohort folder (default: OUT/data)")
    ap.add_argument("--train-n", type=int, default=24)
    ap.add_argument("--test-n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[250, 500, 1000, 2000])
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--filters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3, help="our peak lr (one-cycle)")
    ap.add_argument("--monai-lrs", type=lambda s: [float(v) for v in s.split(",")], default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--select-at", type=int, default=500)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default="ours,defaults,monai", help="comma list of ours, defaults (the teacher defaults before issue 10), monai")
    ap.add_argument("--modality", choices=[keys.MRI, keys.US, keys.CT], default=keys.MRI,
                    help="which teacher our recipe trains (us/ct: their pixel tier on the fly; MONAI's recipe is MRI only)")
    ap.add_argument("--pixel", choices=["case", "patch"], default="case",
                    help="us/ct: the current pixel tier (case) or the one before issue 11 (patch: per-patch US, 1-channel CT)")
    ap.add_argument("--tables-from", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="print the table and ratios of earlier runs' results.json files together (recipes run as "
                         "separate processes side by side on the same --data cohort, e.g. one core each) and exit")
    args = ap.parse_args(argv)
    if args.tables_from:
        rows = []
        for f in args.tables_from:
            d = json.loads(Path(f).read_text())
            rows += d["rows"] if isinstance(d, dict) else d
        print(table(rows) + "\n\n" + ratios(rows))
        return 0
    if args.modality != keys.MRI and "monai" in args.recipes.split(","):
        ap.error("--recipes monai trains on MRI only: use --recipes ours with --modality us/ct")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    t0 = time.perf_counter()
    train_cache, test_cache = make_cohorts(data, args.train_n, args.test_n, args.seed)
    samples = held_out_samples(test_cache)
    val_ids = read_manifest(train_cache)["folds"]["splits"][0]["val"]
    val_samples = [cache_mod.load_sample(train_cache, c) for c in val_ids]
    if args.modality != keys.MRI:
        samples = with_pixel_tier(samples, pixel_transforms(args.modality, args.pixel), test_cache)
        val_samples = with_pixel_tier(val_samples, pixel_transforms(args.modality, args.pixel), train_cache)
    print(f"cohorts ready in {time.perf_counter() - t0:.0f} s: {len(read_manifest(train_cache)['folds']['splits'][0]['train'])} training, "
          f"{len(val_ids)} validation (post-processing), {len(samples)} held-out cases; patch {args.patch}^3, batch {args.batch}, "
          f"{args.filters} filters, steps {args.steps}, teacher {args.modality}" + (f" (pixel tier: {args.pixel})" if args.modality != keys.MRI else ""), flush=True)
    rows: list[dict] = []
    recipes = args.recipes.split(",")
    if "ours" in recipes:
        rows += ours(args, train_cache, samples, val_samples, out)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    if "defaults" in recipes:
        rows += ours(args, train_cache, samples, val_samples, out, defaults=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    if "monai" in recipes:
        rows += monai_recipe(args, train_cache, samples, out)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))
    print("\n" + table(rows))
    print("\n" + ratios(rows))
    print(f"\n(* = the MONAI lr continued to the end; total {time.perf_counter() - t0:.0f} s; results in {out / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
