"""GPU check of issue 9 (run by ``bench/gpu_check.sh``; at most 8 minutes on one GPU).

1. On a tiny synthetic cohort (pixel tier on: US and CT made on the fly), train the three
   teachers and the student (three online teachers) for a few dozen steps in ``16-mixed`` and
   in ``bf16-mixed``: every training loss must be finite and the soft Dice of a fixed batch must
   rise (after vs before training). Fails with a non-zero exit otherwise.
2. Prints: teacher and student training patches/s at 128³ (batch 2, 16-mixed); the student step
   with three teachers (online async, cached) over the student alone, through ``Trainer.fit``
   (``bench_student.run``); full-case inference seconds on a 240×240×155 case; pixel-tier
   cases/s (``bench_physics.py --device cuda``).

``--dry-run`` runs the same code paths on the CPU with tiny sizes (bf16-mixed only: Lightning has
no CPU 16-mixed) and asserts finiteness only: it checks the script, not a GPU.
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def soft_dice(logits: torch.Tensor, label: torch.Tensor) -> float:
    p = torch.sigmoid(logits.float()).flatten(2)
    t = label.float().flatten(2)
    return float(((2 * (p * t).sum(-1) + 1e-5) / (p.sum(-1) + t.sum(-1) + 1e-5)).mean())


class LossLog:
    def __init__(self):
        import lightning as L

        class _CB(L.Callback):
            def __init__(cb):
                cb.losses = []

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                cb.losses.append(float(loss.detach()))

        self.cb = _CB()


def trainer(args, precision, callbacks, root):
    import lightning as L

    return L.Trainer(accelerator=args.accel, devices=1, precision=precision, max_epochs=1, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=str(root))


def datamodule(args, data, cache, with_pixel: bool):
    from trifuse.lightning.data import BratsDataModule
    from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT

    tf = [SimulateUltrasound(seed=0), SynthesizeCT(model_or_path="auto")] if with_pixel else []
    p = args.patch
    dm = BratsDataModule(str(data), str(cache), patch_size=(p, p, p), batch_size=2, num_workers=args.workers, steps_per_epoch=args.steps,
                         n_folds=3, augment=False, sample_transforms=tf, limit_val_cases=1, fg_prob=1.0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def fixed_batch(dm, device):
    from trifuse.lightning.data import collate_samples

    ds = dm.train_dataset()
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate_samples([ds[i] for i in range(4)]).items()}


def train_check(args, data, cache, work: Path) -> list[str]:
    """Part 1: teachers and student train with finite losses and rising Dice in each precision."""
    import lightning as L

    from trifuse.lightning.distill import AsyncTeacherDistillation
    from trifuse.lightning.student import StudentModule
    from trifuse.lightning.teacher import TeacherModule

    failures = []
    device = torch.device(args.device)
    dm = datamodule(args, data, cache, with_pixel=True)
    batch = fixed_batch(dm, device)
    for precision in args.precisions:
        amp_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        amp = partial(torch.autocast, device.type, dtype=amp_dtype)
        paths = {}
        for m in ("mri", "us", "ct"):
            L.seed_everything(0, verbose=False)
            t = TeacherModule(modality=m, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4), scheduler=None, roi_size=(args.patch,) * 3)
            t.to(device).eval()
            with torch.no_grad(), amp():
                before = soft_dice(t.net(t.net_input(batch)), batch["label"])
            t.train()
            log = LossLog()
            tr = trainer(args, precision, [log.cb], work / f"{m}_{precision}")
            t0 = time.perf_counter()
            tr.fit(t, dm)
            dt = time.perf_counter() - t0
            t.to(device).eval()
            with torch.no_grad(), amp():
                after = soft_dice(t.net(t.net_input(batch)), batch["label"])
            ok = all(math.isfinite(v) for v in log.cb.losses) and len(log.cb.losses) == args.steps
            rises = after > before
            print(f"  {precision:10s} teacher {m}: {len(log.cb.losses)} steps in {dt:.1f} s, loss {log.cb.losses[0]:.3f} -> {log.cb.losses[-1]:.3f}, "
                  f"soft Dice {before:.3f} -> {after:.3f}  {'ok' if ok and (rises or args.dry_run) else 'FAIL'}")
            if not ok or (not rises and not args.dry_run):
                failures.append(f"teacher {m} {precision}")
            ck = work / "teachers" / precision / m
            ck.mkdir(parents=True, exist_ok=True)
            tr.save_checkpoint(ck / "best.ckpt")
            paths[m] = str(ck)
        L.seed_everything(0, verbose=False)
        s = StudentModule(init_filters=16, teacher_channels=128, use_semantic=False, warmup_steps=0, lr=1e-3, scheduler="none", roi_size=(args.patch,) * 3, compute_hd95=False)
        s.to(device).eval()
        with torch.no_grad(), amp():
            before = soft_dice(s.student(batch["mri"]), batch["label"])
        s.train()
        log = LossLog()
        cb = AsyncTeacherDistillation(paths, watch=False)
        tr = trainer(args, precision, [log.cb, cb], work / f"student_{precision}")
        t0 = time.perf_counter()
        tr.fit(s, dm)
        dt = time.perf_counter() - t0
        s.to(device).eval()
        with torch.no_grad(), amp():
            after = soft_dice(s.student(batch["mri"]), batch["label"])
        ok = all(math.isfinite(v) for v in log.cb.losses) and len(log.cb.losses) == args.steps
        rises = after > before
        print(f"  {precision:10s} student (3 online teachers, {cb.dtype}): {len(log.cb.losses)} steps in {dt:.1f} s, loss {log.cb.losses[0]:.3f} -> "
              f"{log.cb.losses[-1]:.3f}, soft Dice {before:.3f} -> {after:.3f}, look-ahead share {cb.lookahead_share:.2f}  "
              f"{'ok' if ok and (rises or args.dry_run) else 'FAIL'}")
        if not ok or (not rises and not args.dry_run):
            failures.append(f"student {precision}")
    return failures


def throughput(args) -> None:
    """Part 2a: training patches/s at the throughput patch size (synthetic tensors, no loader)."""
    from trifuse import keys
    from trifuse.lightning.student import StudentModule
    from trifuse.nets.backbone import SegResNetBackbone
    from trifuse.losses import RegionDiceBCELoss

    device = torch.device(args.device)
    p, b = args.tp_patch, 2
    x = torch.randn(b, 4, p, p, p, device=device)
    y = (torch.rand(b, 3, p, p, p, device=device) > 0.8).to(torch.uint8)
    crit = RegionDiceBCELoss()
    for name, net in (("teacher (SegResNet 16)", SegResNetBackbone(in_channels=4, init_filters=16)),
                      ("student (16, FiLM, gates)", StudentModule(init_filters=16, use_response=False, use_feature=False, teacher_modalities=(), teacher_channels=[]).student)):
        net.to(device).train()
        opt = torch.optim.AdamW(net.parameters(), 1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        prior = torch.rand(b, 3, p // 4, p // 4, p // 4, device=device)
        text = torch.randn(b, 128, device=device)
        times = []
        for i in range(args.tp_steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
                out = net(x, prior, text) if name.startswith("student") else net(x)
                loss = crit(out, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"  {name} training at {p}^3, batch {b}, {'16-mixed' if device.type == 'cuda' else 'bf16 autocast'}: {b / t:.1f} patches/s ({t:.3f} s/step)")


def inference(args) -> None:
    """Part 2c: full-case sliding-window inference of the student (priors, FiLM, gates)."""
    from trifuse.lightning.student import StudentModule

    device = torch.device(args.device)
    s = StudentModule(init_filters=16, use_response=False, use_feature=False, teacher_modalities=(), teacher_channels=[],
                      roi_size=(args.tp_patch,) * 3, sw_batch_size=4, overlap=0.5).to(device).eval()
    case = tuple(args.case)
    x = torch.randn(1, 4, *case, device=device)
    prior = torch.rand(1, 3, *[c // 4 for c in case], device=device)
    text = torch.randn(1, 128, device=device)
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
        for i in range(3):
            t0 = time.perf_counter()
            s.infer(x, prior, text)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    print(f"  student full-case inference {case}, ROI {args.tp_patch}^3, overlap 0.5, sw_batch 4: {statistics.median(times):.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, finiteness only (checks the script, not a GPU)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    args.device, args.accel = ("cpu", "cpu") if dry else ("cuda", "gpu")
    args.precisions = ["bf16-mixed"] if dry else ["16-mixed", "bf16-mixed"]
    args.patch, args.steps, args.workers = (32, 3, 0) if dry else (64, 30, 8)
    args.tp_patch, args.tp_steps = (32, 4) if dry else (128, 12)
    args.case = (64, 64, 48) if dry else (240, 240, 155)
    if dry:
        torch.set_num_threads(2)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from lightning_app.cli import main as trifuse
    from trifuse.io.preprocess import preprocess
    from trifuse.synth import synthesize_cohort

    t_all = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    data, cache = work / "synthetic", work / "cache"
    synthesize_cohort(data, 6, seed=3, layout=2021, size="tiny" if dry else "small")
    preprocess(data, cache, n_folds=3)
    if trifuse(["physics", "fit-ct", "--data", str(data), "--cache", str(cache)]) != 0:
        print("gpu_check: physics fit-ct failed", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"gpu_check: device {args.device} ({gpu}), bf16 supported: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}, dry run: {dry}")
    print(f"[1] train {args.steps} steps at {args.patch}^3 (batch 2) in {', '.join(args.precisions)}: finite losses, soft Dice rises")
    failures = train_check(args, data, cache, work)
    print(f"[2a] training throughput")
    throughput(args)
    print(f"[2b] student step with three teachers over the student alone, through Trainer.fit")
    import bench_student

    bs = argparse.Namespace(patch=args.tp_patch if not dry else 32, batch=2, steps=14 if not dry else 4, warmup=3 if not dry else 1, filters=16,
                            device=args.device, precision="16-mixed" if not dry else "32-true", augment=False)
    teachers = bench_student.save_teachers(work / "bench")
    res = {v: bench_student.run(bs, data, cache, v, teachers) for v in ("alone", "async", "cached")}
    base = res["alone"][0]
    for v in ("async", "cached"):
        t, cb, _ = res[v]
        print(f"  {v:7s} {t:.3f} s/step vs alone {base:.3f} -> {t / base:.2f}x (look-ahead share {cb.lookahead_share:.2f}, "
              f"waiting share {cb.wait_share:.2f})   [targets: async <= 1.3x, cached <= 1.1x]")
    print(f"[2c] inference")
    inference(args)
    print(f"[2d] pixel tier")
    if dry:
        print("  skipped in the dry run (bench/bench_physics.py --device cuda prints cases/s)")
    else:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_physics.py"), "--device", "cuda", "--repeats", "2", "--threads", "8"],
                           capture_output=True, text=True, timeout=150)
        lines = [ln for ln in r.stdout.splitlines() if "cases/s" in ln or "full case" in ln]
        print("\n".join("  " + ln for ln in lines) or f"  bench_physics failed: {r.stderr[-300:]}")
    print(f"gpu_check: {time.perf_counter() - t_all:.0f} s in all; " + ("FAILED: " + ", ".join(failures) if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
