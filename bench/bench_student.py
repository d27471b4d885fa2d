"""Student benchmark: prints figures and ratios measured side by side in one run.

1. student training step with three frozen teachers (targets computed inline, and
   asynchronously with one-batch look-ahead) over the student alone, same patch
   (targets: ≤ 1.6 on CPU; ≤ 1.3 with the async overlap on a GPU);
2. student whole-case sliding-window inference (priors + FiLM + gates) over a plain MONAI
   SegResNet with the same width, ROI and overlap (target ≤ 1.3).

Usage: python bench/bench_student.py [--patch 64] [--steps 4] [--case 128 128 96] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import time

import torch


def make_batch(b: int, p: int, i: int, device) -> dict:
    from trifuse import keys

    g = torch.Generator().manual_seed(i)
    shape = (b, 1, p, p, p)
    return {
        keys.MRI: torch.randn((b, 4, p, p, p), generator=g).to(device),
        keys.US: torch.rand(shape, generator=g).to(device),
        keys.CT: (torch.rand(shape, generator=g) * 0.1).to(device),
        keys.LABEL: (torch.rand((b, 3, p, p, p), generator=g) > 0.8).to(torch.uint8).to(device),
        keys.PRIOR: torch.rand((b, 3, p // 4, p // 4, p // 4), generator=g).to(device),
        keys.TEXT: torch.randn((b, 128), generator=g).to(device),
        keys.CASE_ID: [f"c{i}_{j}" for j in range(b)],
        keys.META: [{"patch_box": [[i, i + p]] * 3, "applied": []} for _ in range(b)],
    }


def time_steps(model, batches, opt, cb=None, lookahead=False) -> float:
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        if cb is not None:
            from trifuse.lightning.distill import _batch_key

            key = _batch_key(batch)
            if key not in cb._pending:
                cb._pending[key] = cb._submit(batch)
            if lookahead and i + 1 < len(batches):
                cb._pending[_batch_key(batches[i + 1])] = cb._submit(batches[i + 1])
        opt.zero_grad(set_to_none=True)
        loss = model.training_step(batch, i)
        loss.backward()
        opt.step()
        if batch[next(iter(batch))].is_cuda:
            torch.cuda.synchronize()
        if i:  # first step warms up allocators and threads
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--case", type=int, nargs=3, default=(128, 128, 96))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from trifuse.lightning.distill import AsyncTeacherDistillation
    from trifuse.lightning.student import StudentModule
    from trifuse.lightning.teacher import TeacherModule
    from trifuse.nets.backbone import SegResNetBackbone

    f = args.filters
    torch.manual_seed(0)
    teachers = {}
    for m in ("mri", "us", "ct"):
        net = SegResNetBackbone(in_channels=4 if m == "mri" else 1, init_filters=f)
        teachers[m] = TeacherModule(modality=m, net=net).to(device).eval().requires_grad_(False)
    bott = f * 8
    full = StudentModule(init_filters=f, teacher_channels=bott, warmup_steps=0, roi_size=(args.patch,) * 3).to(device)
    alone = StudentModule(init_filters=f, use_response=False, use_feature=False, teacher_modalities=(), teacher_channels=[], roi_size=(args.patch,) * 3).to(device)
    batches = [make_batch(args.batch, args.patch, i, device) for i in range(args.steps + 1)]

    opt_alone = torch.optim.AdamW(alone.parameters(), 1e-4)
    t_alone = time_steps(alone, batches, opt_alone)

    sync = AsyncTeacherDistillation({m: "-" for m in teachers}, asynchronous=False)
    sync.teachers = teachers
    full.distiller = sync
    opt_full = torch.optim.AdamW(full.parameters(), 1e-4)
    t_sync = time_steps(full, batches, opt_full, sync)

    asyn = AsyncTeacherDistillation({m: "-" for m in teachers}, asynchronous=True)
    asyn.teachers = teachers
    asyn._pool = cf.ThreadPoolExecutor(1)
    if device.type == "cuda":
        asyn._stream = torch.cuda.Stream(device=device)
    full.distiller = asyn
    t_async = time_steps(full, batches, opt_full, asyn, lookahead=True)
    asyn._pool.shutdown()

    print(f"device {device}, {torch.get_num_threads()} threads, patch {args.patch}^3, batch {args.batch}, {f} filters")
    print(f"[1] student alone {t_alone:.3f} s/step; with 3 teachers inline {t_sync:.3f} s ({t_sync / t_alone:.2f}x); "
          f"async look-ahead {t_async:.3f} s ({t_async / t_alone:.2f}x)  (target <= 1.6 CPU, <= 1.3 GPU async)")

    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet

    plain = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=f).to(device).eval()
    full.eval()
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
