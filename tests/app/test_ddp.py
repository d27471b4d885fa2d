"""DDP on CPU (two gloo processes): a teacher (steps per rank, validation gathers all cases); a student (teacher hot-swap at one step on all ranks)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs"


def overlay(tmp_path: Path, data: Path, cache: Path) -> Path:
    doc = {
        "run_dir": str(tmp_path / "run"),  # logs, checkpoints and media of the run go below it
        "trainer": {
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "set by run_dir", "name": "csv"}}],
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 1,
        },
        "model": {"init_args": {"overlap": 0.25, "net": {"init_args": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}}}},
        "data": {
            "init_args": {
                "data_dir": str(data), "cache_dir": str(cache), "n_cases": 6, "cohort_seed": 3, "size": "tiny", "n_folds": 3,
                "patch_size": [16, 16, 16], "batch_size": 2, "num_workers": 0, "samples_per_epoch": 8, "limit_val_cases": 2,
            }
        },
    }
    p = tmp_path / "overlay.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes_train_two_steps(synthetic_cohort, tmp_path):
    data, cache = synthetic_cohort
    cmd = [
        sys.executable, "-m", "lightning_app.cli", "fit",
        "-c", str(CFG / "trainer" / "cpu.yaml"), "-c", str(CFG / "trainer" / "ddp.yaml"),
        "-c", str(CFG / "data" / "synthetic.yaml"), "-c", str(CFG / "teacher_mri.yaml"), "-c", str(overlay(tmp_path, data, cache)),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=1",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "distributed_backend=gloo" in r.stderr + r.stdout and "All distributed processes registered" in r.stderr + r.stdout
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # samples_per_epoch is per rank: 8 patches / batch 2 on each rank
    # each rank validated one case; the per-case table holds both, and the logged mean is over both
    rows = list(csv.DictReader(open(tmp_path / "run" / "media" / "val_per_case.csv")))
    ids = {r["case_id"] for r in rows}
    assert len(ids) == 2 and len(rows) == 6
    metrics = [m for m in csv.DictReader(open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv")))) if m.get("val/dice_mean")]
    assert float(metrics[-1]["val/dice_mean"]) == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-6)


def _save_teacher(path, seed):
    import lightning as L

    from trifuse.lightning.teacher import TeacherModule

    torch.manual_seed(seed)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(TeacherModule(modality="mri"))
    trainer.save_checkpoint(path)


@pytest.mark.timeout(300)
def test_ddp_student_ranks_swap_teachers_at_the_same_step_and_do_their_steps(synthetic_cohort, tmp_path):
    """2 gloo ranks: a newer teacher lands (late, on rank 0) at step 4; rank 0 decides and broadcasts."""
    import json

    data, cache = synthetic_cohort
    tdir = tmp_path / "teachers" / "mri"
    tdir.mkdir(parents=True)
    _save_teacher(tdir / "best.ckpt", seed=0)
    _save_teacher(tmp_path / "newer.ckpt", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "app" / "ddp_student_swap.py"
    r = subprocess.run([sys.executable, str(script), str(data), str(cache), str(tdir), str(tmp_path / "newer.ckpt"), str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2]
    # both ranks swapped once, at the same step (the poll of step 4)
    assert [[s[0] for s in x["swap_log"]] for x in ranks] == [[4], [4]]
    # an epoch is steps per rank: 3 steps × 2 epochs on each rank; the dataset holds both ranks' patches
    for x in ranks:
        assert x["steps"] == {"0": 3, "1": 3} and x["global_step"] == 6 and x["dataset_len"] == 6
        # looked ahead: every batch but each epoch's first and the one trained at the swap (whose
        # targets the new teacher computes then; the next batch's are restarted ahead)
        assert x["lookahead_share"] == pytest.approx(3 / 6)
    assert set(ranks[0]["patches"]).isdisjoint(ranks[1]["patches"])  # the ranks drew different patches
