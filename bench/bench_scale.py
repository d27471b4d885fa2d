"""BraTS-scale benchmark: peak memory and cases/s of `trifuse preprocess` and `trifuse predict`
with 1 and 2 worker processes on full-size (240×240×155, 1 mm) synthetic cases, and the
extrapolation to the 1,251 cases of BraTS 2021 training.

Each configuration runs as its own `trifuse` process; a sampler reads the resident set size
of that process and all its descendants from /proc every 50 ms, so "peak RSS" is the peak of
the *sum* over the process tree (the main process plus its workers), in MiB.

Cohort: ``--distinct`` cases are synthesised and the ``--n`` case folders hard-link their
files under BraTS case ids, so generating 40 full-size cases does not dominate the run; every
case is still decoded, validated, cropped, normalised and written (or segmented) in full.

Model for predict: an untrained SegResNet teacher (8 filters, 64³ windows, no mirroring)
whose checkpoint records a training spacing of ``--model-spacing`` mm (default 2, as the
demo's checkpoints): each full-size case is decoded, resampled to that grid, segmented and
its probabilities resampled back and written at 240×240×155. The figures measure the
pipeline's streaming and parallelism, not a tuned network.

Usage: python bench/bench_scale.py [--n 40] [--distinct 4] [--predict-n 40] [--workers 1 2] [--workdir /tmp/trifuse-scale]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BRATS2021_CASES = 1251


def tree_rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` and all its descendants, MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(cmd: list[str], env=None, period_s: float = 0.05) -> dict:
    """Run ``cmd``; return wall seconds, peak process-tree RSS (MiB) and the exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            time.sleep(period_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak[0], "rc": proc.returncode, "tail": out[-1500:]}


def make_cohort(root: Path, n: int, distinct: int, size: str = "full") -> Path:
    """``n`` BraTS 2021 case folders whose files hard-link ``distinct`` synthesised cases."""
    from trifuse import keys
    from trifuse.io.discovery import case_file_name, case_id_for
    from trifuse.synth import synthesize_cohort

    src = root / "distinct"
    synthesize_cohort(src, distinct, seed=0, layout=2021, size=size)
    data = root / "data"
    for i in range(n):
        cid = case_id_for(2021, i)
        scid = case_id_for(2021, i % distinct)
        d = data / cid
        d.mkdir(parents=True, exist_ok=True)
        for m in list(keys.MODALITIES) + ["seg"]:
            dst = d / case_file_name(cid, 2021, m)
            if not dst.exists():
                os.link(src / scid / case_file_name(scid, 2021, m), dst)
    return data


def make_checkpoint(path: Path, roi=(64, 64, 64), init_filters: int = 8, spacing: float | None = None) -> Path:
    """A Lightning checkpoint of an untrained MRI SegResNet teacher that `trifuse predict` loads.

    ``spacing`` (mm) is recorded as the training spacing, as a teacher trained on that grid
    records it: predict then resamples each 1 mm case there, runs the network, and pastes the
    probabilities back onto the full 1 mm grid (the demo's 2 mm checkpoints do this). ``None``:
    no record, the network runs on the native grid.
    """
    import lightning as L
    import torch

    from trifuse.lightning.teacher import TeacherModule
    from trifuse.nets import SegResNetBackbone

    torch.manual_seed(0)
    net_args = {"in_channels": 4, "out_channels": 3, "init_filters": init_filters, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}
    model = TeacherModule(modality="mri", net=SegResNetBackbone(**net_args), roi_size=roi)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "pytorch-lightning_version": L.__version__,
            "hyper_parameters": {
                **dict(model.hparams),
                "_class_path": "trifuse.lightning.teacher.TeacherModule",
                "_instantiator": "lightning.pytorch.cli.instantiate_module",
                "net": {"class_path": "trifuse.nets.SegResNetBackbone", "init_args": net_args},
            },
            "trifuse": {"kind": "teacher", "modality": "mri", "inputs": ["mri"], "in_channels": 4,
                        "roi_size": list(roi), "spacing": None if spacing is None else [float(spacing)] * 3},
        },
        path,
    )
    return path


def subset(data: Path, n: int, dest: Path) -> Path:
    """A dataset folder holding the first ``n`` cases of ``data`` (symlinked case folders)."""
    dest.mkdir(parents=True, exist_ok=True)
    for d in sorted(data.iterdir())[:n]:
        if not (dest / d.name).exists():
            (dest / d.name).symlink_to(d.resolve(), target_is_directory=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="cases for preprocess")
    ap.add_argument("--predict-n", type=int, default=None, help="cases for predict (default --n)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct synthesised cases behind the n folders")
    ap.add_argument("--size", default="full", choices=("full", "small", "tiny"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", nargs="+", default=["preprocess", "predict"], choices=("preprocess", "predict"))
    ap.add_argument("--workdir", default="/tmp/trifuse-scale")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--model-spacing", type=float, default=2.0,
                    help="training spacing recorded in predict's checkpoint, mm (0: none, the network runs at 1 mm)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_cohort(work, args.n, args.distinct, args.size)
    print(f"cohort: {args.n} case folders ({args.distinct} distinct, size {args.size}) in {time.perf_counter() - t0:.0f} s")
    trifuse = [sys.executable, "-c", "import sys; from lightning_app.cli import main; sys.exit(main(sys.argv[1:]))"]
    env = dict(os.environ, WANDB_MODE="offline")
    rows = []
    for stage in args.stages:
        n = args.n if stage == "preprocess" else (args.predict_n or args.n)
        inp = data if n == args.n else subset(data, n, work / f"data{n}")
        for w in args.workers:
            out = work / f"{stage}-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            if stage == "preprocess":
                cmd = trifuse + ["preprocess", "--data", str(inp), "--cache", str(out), "--workers", str(w)]
            else:
                ckpt = work / f"teacher_{args.model_spacing:g}mm.ckpt"
                if not ckpt.exists():
                    make_checkpoint(ckpt, spacing=args.model_spacing or None)
                cmd = trifuse + ["predict", "--ckpt", str(ckpt), "--input", str(inp), "--output", str(out), "--device", "cpu",
                                 "--no-tta", "--no-postprocess", "--workers", str(w)]
            r = measure(cmd, env=env)
            if r["rc"] != 0:
                raise SystemExit(f"{' '.join(cmd[3:])} failed ({r['rc']}):\n{r['tail']}")
            rate = n / r["seconds"]
            rows.append({"stage": stage, "workers": w, "cases": n, "seconds": r["seconds"], "cases_per_s": rate,
                         "peak_rss_mib": r["peak_rss_mib"], "hours_for_1251": BRATS2021_CASES / rate / 3600})
            print(f"{stage:<10} workers={w}  {n} cases in {r['seconds']:.1f} s = {rate:.3f} cases/s  peak RSS {r['peak_rss_mib']:.0f} MiB  "
                  f"→ 1,251 cases in {BRATS2021_CASES / rate / 3600:.2f} h at the same peak (streamed)", flush=True)
    print()
    print("| stage | workers | cases | s | cases/s | peak RSS (MiB, process tree) | 1,251 cases (h) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['workers']} | {r['cases']} | {r['seconds']:.1f} | {r['cases_per_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['hours_for_1251']:.2f} |")
    print(f"(cores: {os.cpu_count()}; load average at the end: {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
