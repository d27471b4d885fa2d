"""The pipeline of the kill-and-rerun tests on a tiny synthetic cohort: one uninterrupted
reference run of every stage (in this process), and, per stage, the command line that
writes into a fresh output folder from the reference's inputs."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from lightning_app.cli import main

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs"
N_CASES = 3
SEED = 1


def fit_overlay(path: Path, run_dir: Path, data: Path, cache: Path, max_epochs: int = 2, fast: bool = False) -> Path:
    """The MRI teacher recipe shrunk to a few optimiser steps on the tiny cohort, CSV log only.

    ``fast``: the two 20×24×16 cases of the fast set as a plain BraTS folder (two folds, so one
    case trains and one validates), one patch per step, two steps per epoch, a two-level net.
    """
    data_args = {
        "data_dir": str(data), "cache_dir": str(cache), "n_cases": N_CASES, "cohort_seed": SEED, "size": "tiny",
        "n_folds": 3, "patch_size": [16, 16, 16], "batch_size": 2, "num_workers": 0, "samples_per_epoch": 4,
        "limit_val_cases": 1,
    }
    net = {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}
    overlay = {
        "run_dir": str(run_dir),
        "trainer": {
            "max_epochs": max_epochs,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "set by run_dir", "name": "csv"}}],
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 1,
            "plugins": [{"class_path": "trifuse.lightning.checkpoint_io.AtomicCheckpointIO"}],
        },
        "model": {"init_args": {"overlap": 0.25, "net": {"init_args": net}}},
        "data": {"init_args": data_args},
    }
    if fast:
        for k in ("n_cases", "cohort_seed", "size"):
            del data_args[k]
        data_args.update(n_folds=2, batch_size=1, samples_per_epoch=2)
        overlay["data"]["class_path"] = "trifuse.lightning.data.BratsDataModule"
        net.update(blocks_down=[1, 1], blocks_up=[1])
    path.write_text(yaml.safe_dump(overlay))
    return path


@dataclass
class Stage:
    """One stage under test.

    ``argv(ref, out)`` is its command line writing into ``out`` (a fresh folder) from the
    reference pipeline ``ref``'s inputs; ``deterministic`` says whether outputs must be byte-identical (``volatile`` lists
    the files that carry run times or paths and are compared as readable only);
    ``rewritten`` lists summary files a rerun rewrites by design (not "skipped work").
    The reference output compared with is ``ref["snapshot"][name]``.
    """

    name: str
    argv: Callable[[dict, Path], list[str]]
    deterministic: bool = True
    volatile: tuple[str, ...] = ()
    rewritten: tuple[str, ...] = ()
    per_case: str | None = None  #: glob of per-case outputs (for the n-th-output kill point)
    #: glob of the files compared with the uninterrupted run (default all); fit's logs differ by
    #: design (a resumed run logs into a new CSV version), its checkpoints must not
    compared: str | None = None
    #: the stage rewrites finished per-case outputs on a rerun (identically, from its own cache)
    rewrites_finished: bool = False
    #: folders (relative to the output) whose dead writers' temporaries a rerun sweeps
    sweeps: tuple[str, ...] = ("",)


def write_paired_us(root: Path, shape=(24, 28, 24), spacing: float = 2.0) -> Path:
    """One co-registered MR/US case for ``physics fit-us --paired``: a head phantom's four contrasts
    and, as the "real" US, the simulation of the CLI's default probe with white matter 3 dB brighter
    than the tissue table, kept on the brain."""
    import nibabel as nib
    import numpy as np
    import torch

    from trifuse import keys
    from trifuse.physics.acoustic import ImpedanceMapper
    from trifuse.physics.phantom import make_head_phantom
    from trifuse.physics.tissues import HEAD_TISSUES
    from trifuse.physics.ultrasound import ProbeConfig, simulate_ultrasound

    def write(path, data):
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([spacing] * 3 + [1.0])), str(path))

    s = make_head_phantom(shape, spacing=(spacing,) * 3, seed=0, margin_mm=12.0)
    d = Path(root) / "p0"
    d.mkdir(parents=True, exist_ok=True)
    for i, suf in enumerate(("t1", "t1ce", "t2", "flair")):
        write(d / f"p0_{suf}.nii.gz", s[keys.MRI][i].numpy())
    real = ImpedanceMapper()
    with torch.no_grad():
        real.scatter_db[HEAD_TISSUES.index("white_matter")] += 3.0
        us = simulate_ultrasound(s[keys.MRI][None], s[keys.BRAIN][None], (spacing,) * 3, ProbeConfig(resolution_mm=spacing),
                                 real, [0])
    write(d / "p0_us.nii.gz", (us[0, 0] * s[keys.BRAIN][0]).numpy())
    return Path(root)


#: the fast set's CLIP: one epoch of a narrow encoder on two tiny cases (seconds)
FAST_CLIP = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--width", "8", "--embed-dim", "32"]


def _fit_argv(ref, out):
    fast = bool(ref.get("fast"))  # the fast set's data is not a synthetic cohort: its own cache per run
    cache = out.parent / f"{out.name}.cache" if fast else ref["cache"]
    overlay = fit_overlay(out.parent / f"{out.name}.overlay.yaml", out, ref["data"], cache, fast=fast)
    return ["fit", "-c", str(CFG / "trainer" / "cpu.yaml"), "-c", str(CFG / "data" / "synthetic.yaml"),
            "-c", str(CFG / "teacher_mri.yaml"), "-c", str(overlay), "--ckpt_path=last"]


STAGES = {
    s.name: s
    for s in (
        Stage("synth", lambda r, o: ["synth", "--out", str(o), "--n", str(r.get("n", N_CASES)), "--seed", str(SEED), "--size", "tiny"],
              per_case="BraTS2021_*/*_seg.nii.gz"),
        Stage("preprocess", lambda r, o: ["preprocess", "--data", str(r["data"]), "--cache", str(o)],
              rewritten=("manifest.json",), per_case="*/meta.json"),
        Stage("fit-ct", lambda r, o: ["physics", "fit-ct", "--data", str(r["data"]), "--cache", str(r["cache"]),
                                      "--out", str(o / "ct_mixture.json"), "--components", "3", "--max-voxels", "20000"]),
        Stage("fit-us", lambda r, o: ["physics", "fit-us", "--paired", str(r["paired"]), "--out", str(o / "us_mapper.json"),
                                      "--steps", "3"]),
        Stage("describe", lambda r, o: ["describe", "--data", str(r["data"]), "--cache", str(r["cache"]), "--backend",
                                        "offline", "--no-progress", "--out", str(o)],
              volatile=("describe_summary.json", "cache/*.json", "describe_manifest.json"),
              rewritten=("describe_summary.json", "describe_manifest.json"), per_case="BraTS2021_*.json",
              rewrites_finished=True, sweeps=("", "cache", "failures")),
        Stage("clip", lambda r, o: ["clip", "--data", str(r["data"]), "--cache", str(r["cache"]), "--descriptions",
                                    str(r["desc"]), "--out", str(o),
                                    *(FAST_CLIP if r.get("fast") else ["--epochs", "3", "--batch-size", "8"])],
              deterministic=False),  # CPU training is not bit-reproducible run to run here (clip.pt bytes differ)
        Stage("semantic", lambda r, o: ["semantic", "--data", str(r["data"]), "--cache", str(r["cache"]), "--descriptions",
                                        str(r["desc"]), "--clip", str(r["clip"] / "clip.pt"), "--out", str(o),
                                        "--slice-step", "4"],
              volatile=("priors_summary.json",), rewritten=("priors_summary.json",),
              per_case="BraTS2021_*.npz"),
        Stage("fit", _fit_argv, deterministic=False, per_case="checkpoints/*.ckpt", compared="checkpoints/*",
              sweeps=("checkpoints", "media")),
        Stage("predict", lambda r, o: ["predict", "--ckpt", str(r["ckpt"]), "--input", str(r["data"]), "--output", str(o),
                                       "--device", "cpu", "--no-tta"],
              per_case="BraTS2021_*.nii.gz"),
        Stage("evaluate", lambda r, o: ["evaluate", "--pred", str(r["pred"]), "--data", str(r["data"]), "--out", str(o)]),
    )
}


def build_fast_inputs(root: Path) -> dict:
    """Inputs of the fast kill tests, made in-process in seconds: two 20×24×16 cases, their cache,
    offline descriptions, a one-epoch CLIP, a constant-output teacher checkpoint and its predictions.

    ``snapshot`` holds a copy of each of these stage outputs as it was written: the fast tests
    compare a killed-and-rerun stage with it instead of running the stage uninterrupted again.
    """
    from tests.app.test_predict_evaluate import constant_model_ckpt
    from tests.conftest import write_tiny_case

    root = Path(root)
    r = {"root": root, "n": 1, "fast": True, "data": root / "data", "cache": root / "cache", "desc": root / "desc",
         "clip": root / "clip", "pred": root / "pred", "snapshot": {}}
    for i in range(2):
        write_tiny_case(r["data"], 2021, i)
    r["paired"] = write_paired_us(root / "paired")
    r["ckpt"] = Path(constant_model_ckpt(root / "m.ckpt", (9.0, -9.0, 9.0)))
    for name, key in (("preprocess", "cache"), ("describe", "desc"), ("clip", "clip"), ("predict", "pred")):
        assert main(STAGES[name].argv(r, r[key])) == 0, f"fast input {name} failed"
        r["snapshot"][name] = root / "snapshot" / name
        shutil.copytree(r[key], r["snapshot"][name], symlinks=True)
    return r


def build_reference(root: Path, upto: str = "evaluate") -> dict:
    """Run every stage (up to ``upto``) once, uninterrupted, in this process.

    Returns the folders by name, ``seconds`` per stage and ``snapshot``: a copy of each
    stage's output taken right after it ran (what the kill tests compare with).
    """
    root = Path(root)
    ref = {
        "root": root, "data": root / "data" / "syn", "cache": root / "data" / "cache" / "syn", "ct": root / "ct",
        "desc": root / "desc", "clip": root / "clip", "priors": root / "priors", "run": root / "run",
        "pred": root / "pred", "eval": root / "eval", "us": root / "us",
    }
    ref["paired"] = write_paired_us(root / "paired")
    ref["ckpt"] = ref["run"] / "checkpoints" / "last.ckpt"
    order = [("synth", "data"), ("preprocess", "cache"), ("fit-ct", "ct"), ("fit-us", "us"), ("describe", "desc"), ("clip", "clip"),
             ("semantic", "priors"), ("fit", "run"), ("predict", "pred"), ("evaluate", "eval")]
    ref["seconds"], ref["snapshot"] = {}, {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name, key in order[: order.index(next(o for o in order if o[0] == upto)) + 1]:
            ref[key].parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            rc = main(STAGES[name].argv(ref, ref[key]))
            ref["seconds"][name] = time.perf_counter() - t0
            assert rc == 0, f"reference run of {name} failed"
            # the stage's output as it left it (later stages may rewrite e.g. the cache manifest)
            ref["snapshot"][name] = root / "snapshot" / name
            shutil.copytree(ref[key], ref["snapshot"][name], symlinks=True)
    finally:
        os.chdir(cwd)
    return ref
