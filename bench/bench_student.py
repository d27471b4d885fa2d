"""Student benchmark through ``Trainer.fit``: prints figures and ratios measured side by side in one run.

1. Student training step with three frozen teachers over the student alone, each run a real
   ``Trainer.fit`` on the same synthetic cohort, data module and seed:

   * ``online inline``  — targets computed in the training step (no overlap);
   * ``online async``   — background thread + one-batch look-ahead (:class:`LookaheadDataLoader`);
   * ``cached``         — targets read from the per-case cache (built before the run, not timed).

   Also the look-ahead share (batches whose targets were started while the student was on
   an earlier one) and the share of step time spent waiting for targets. Targets on CPU:
   cached ≤ 1.15, async ≤ inline; on a GPU: async ≤ 1.3, cached ≤ 1.1.
   The step time is the median interval between consecutive ``on_train_batch_end`` calls
   (data loading included), after ``--warmup`` steps.
2. Student whole-case sliding-window inference (priors + FiLM + gates) over a plain MONAI
   SegResNet of the same width, ROI and overlap (target ≤ 1.3).

The three teachers are full-size teachers (16 filters, as trained) that all read the MRI
(``inputs: [mri]``): their compute is the real one, and no pixel-tier simulation enters the
data pipeline, so the ratios isolate the distillation. The student runs without the semantic
tier (no priors) in part 1.

Usage: python bench/bench_student.py [--patch 48] [--steps 12] [--device cpu|cuda] [--precision 32-true|16-mixed|bf16-mixed]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


class StepClock:
    """Median interval between consecutive training-batch ends (seconds), after ``warmup`` steps."""

    def __init__(self, warmup: int):
        import lightning as L

        class _CB(L.Callback):
            def __init__(cb):
                cb.t, cb.cpu = [], []

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                if torch.cuda.is_available() and pl_module.device.type == "cuda":
                    torch.cuda.synchronize()
                cb.t.append(time.perf_counter())
                cb.cpu.append(time.process_time())

        self.cb = _CB()
        self.warmup = warmup

    def median(self, cpu: bool = False) -> float:
        """Median wall (or, with ``cpu``, this process's CPU) seconds per step."""
        t = self.cb.cpu if cpu else self.cb.t
        d = [b - a for a, b in zip(t[self.warmup :], t[self.warmup + 1 :])]
        return statistics.median(d) if d else float("nan")


def save_teachers(root: Path) -> dict[str, str]:
    import lightning as L

    from trifuse.lightning.teacher import TeacherModule

    out = {}
    for i, m in enumerate(("mri", "us", "ct")):
        torch.manual_seed(i)
        t = TeacherModule(modality=m, inputs=["mri"])  # default net: SegResNet, 16 filters
        d = root / "teachers" / m
        d.mkdir(parents=True, exist_ok=True)
        out[m] = str(d)
        if (d / "best.ckpt").exists():  # a rerun in the same --workdir keeps its teachers (and their cached targets)
            continue
        tr = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
        tr.strategy.connect(t)
        tr.save_checkpoint(d / "best.ckpt")
    return out


def run(args, data, cache, variant: str, teachers: dict[str, str]):
    import lightning as L

    from trifuse.lightning.data import BratsDataModule
    from trifuse.lightning.distill import AsyncTeacherDistillation
    from trifuse.lightning.student import StudentModule

    L.seed_everything(0, verbose=False)
    p = args.patch
    dm = BratsDataModule(str(data), str(cache), patch_size=(p, p, p), batch_size=args.batch, num_workers=0, steps_per_epoch=args.steps,
                         n_folds=3, augment=args.augment, limit_val_cases=1)
    alone = variant == "alone"
    model = StudentModule(init_filters=args.filters, teacher_modalities=() if alone else ("mri", "us", "ct"), teacher_channels=[] if alone else 128,
                          use_response=not alone, use_feature=not alone, use_semantic=False, warmup_steps=0, roi_size=(p, p, p), compute_hd95=False, lr=1e-4)
    clock = StepClock(args.warmup)
    callbacks = [clock.cb]
    cb = None
    if not alone:
        cb = AsyncTeacherDistillation(
            teachers, asynchronous=variant != "inline", lookahead=variant == "async", watch=False,
            mode="cached" if variant == "cached" else "online", cache_dir=str(cache), cache_roi=(p, p, p), cache_overlap=0.25,
        )
        callbacks.append(cb)
        if variant == "cached":  # build the cache before the timed run (a one-off cost per dataset)
            dm.prepare_data()
            dm.setup("fit")
            cb._load_all(torch.device(args.device))
            t0 = time.perf_counter()
            n = cb.prepare_cache(dm, torch.device(args.device))
            if n:
                print(f"    cache: {n} case file(s) (cases x teachers) built in {time.perf_counter() - t0:.1f} s (before the timed run)")
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision, max_epochs=1, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tempfile.mkdtemp())
    trainer.fit(model, dm)
    model.cpu_s_per_step = clock.median(cpu=True)
    return clock.median(), cb, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="run the four variants this many times, interleaved; report the median")
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--case", type=int, nargs=3, default=(128, 128, 96))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--augment", action="store_true", help="RandomAugment on (cached mode replays its flips and rotations on the cached targets)")
    ap.add_argument("--cohort", default="small", choices=["tiny", "small"])
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from trifuse.io.preprocess import preprocess
    from trifuse.synth import synthesize_cohort

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_student_"))
    data, cache = root / "synthetic", root / "cache"
    synthesize_cohort(data, 6, seed=3, layout=2021, size=args.cohort)
    preprocess(data, cache, n_folds=3)
    teachers = save_teachers(root)

    print(f"device {args.device}, precision {args.precision}, {torch.get_num_threads()} threads, patch {args.patch}^3, batch {args.batch}, "
          f"student {args.filters} filters, 3 teachers 16 filters, {args.steps} steps (median after {args.warmup}), {args.rounds} interleaved "
          f"round(s), augment={args.augment}")
    # interleaved rounds: load from other processes on the machine hits every variant alike
    runs: dict[str, list] = {v: [] for v in ("alone", "inline", "async", "cached")}
    for _ in range(args.rounds):
        for variant in runs:
            t, cb, model = run(args, data, cache, variant, teachers)
            runs[variant].append((t, cb, model.cpu_s_per_step))
    res = {v: (statistics.median(r[0] for r in rs), rs[-1][1], statistics.median(r[2] for r in rs)) for v, rs in runs.items()}
    base, base_cpu = res["alone"][0], res["alone"][2]
    print("    wall s/step and ratio (what a user waits); process CPU s/step and ratio (robust to other load on the machine)")
    print(f"[1] student alone          {base:.3f} s/step   1.00x   cpu {base_cpu:.3f} s  1.00x")
    for v, label in (("inline", "online inline "), ("async", "online async  "), ("cached", "cached        ")):
        t, cb, c = res[v]
        extra = f"look-ahead share {cb.lookahead_share:.2f}, waiting share {cb.wait_share:.2f}"
        if v == "cached":
            extra += f", cached share {cb.stats['cached'] / max(cb.stats['steps'], 1):.2f}"
        print(f"    {label}         {t:.3f} s/step   {t / base:.2f}x   cpu {c:.3f} s  {c / base_cpu:.2f}x   ({extra})")
    ti, ta, tc = res["inline"][0], res["async"][0], res["cached"][0]
    print(f"    targets: cached <= 1.15x: {tc / base:.2f} ({'met' if tc / base <= 1.15 else 'NOT met'}); "
          f"async <= inline: {ta:.3f} vs {ti:.3f} ({'met' if ta <= ti else 'NOT met'})  [GPU targets: async <= 1.3x, cached <= 1.1x]")

    if args.skip_infer:
        return
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet

    from trifuse.lightning.student import StudentModule

    device = torch.device(args.device)
    f = args.filters
    full = StudentModule(init_filters=f, use_response=False, use_feature=False, teacher_modalities=(), teacher_channels=[], roi_size=(args.patch,) * 3).to(device).eval()
    plain = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=f).to(device).eval()
    x = torch.randn((1, 4, *args.case), device=device)
    prior = torch.rand((1, 3, *[s // 4 for s in args.case]), device=device)
    text = torch.randn(1, 128, device=device)
    roi = (args.patch,) * 3
    ts, tp = [], []
    with torch.inference_mode():
        for i in range(3):
            t0 = time.perf_counter()
            full.infer(x, prior, text)
            t1 = time.perf_counter()
            sliding_window_inference(x, roi, 1, plain, 0.5, mode="gaussian")
            t2 = time.perf_counter()
            if i:
                ts.append(t1 - t0)
                tp.append(t2 - t1)
    s, p = statistics.median(ts), statistics.median(tp)
    print(f"[2] whole case {tuple(args.case)}, ROI {roi}, overlap 0.5: student {s:.2f} s, MONAI SegResNet {p:.2f} s -> ratio {s / p:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
