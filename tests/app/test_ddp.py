"""DDP on CPU: two gloo processes train a teacher for 2 steps; validation metrics gather all cases."""
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
    assert ckpt["global_step"] == 2  # 8 patches / (2 ranks × batch 2)
    # each rank validated one case; the per-case table holds both, and the logged mean is over both
    rows = list(csv.DictReader(open(tmp_path / "run" / "media" / "val_per_case.csv")))
    ids = {r["case_id"] for r in rows}
    assert len(ids) == 2 and len(rows) == 6
    metrics = [m for m in csv.DictReader(open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv")))) if m.get("val/dice_mean")]
    assert float(metrics[-1]["val/dice_mean"]) == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-6)
