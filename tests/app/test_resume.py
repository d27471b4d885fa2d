"""Resume: `trifuse fit --ckpt_path` continues the optimizer, the LR schedule and the epoch count."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import yaml

from lightning_app.lightning_cli import run

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs"


def tiny_overlay(tmp_path: Path, data: Path, cache: Path, **trainer) -> Path:
    """A config overlay that points the teacher recipe at the tiny cohort, CSV logging only."""
    overlay = {
        "run_dir": str(tmp_path / "run"),  # logs, checkpoints and media of the run go below it
        "trainer": {
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "set by run_dir", "name": "csv"}}],
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 1,
            **trainer,
        },
        "model": {"init_args": {"overlap": 0.25, "net": {"init_args": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}}}},
        "data": {
            "init_args": {
                "data_dir": str(data),
                "cache_dir": str(cache),
                "n_cases": 6,
                "cohort_seed": 3,
                "size": "tiny",
                "n_folds": 3,
                "patch_size": [16, 16, 16],
                "batch_size": 2,
                "num_workers": 0,
                "samples_per_epoch": 4,
                "limit_val_cases": 1,
            }
        },
    }
    p = tmp_path / "overlay.yaml"
    p.write_text(yaml.safe_dump(overlay))
    return p


def fit(tmp_path, overlay, *args):
    base = ["-c", str(CFG / "trainer" / "cpu.yaml"), "-c", str(CFG / "data" / "synthetic.yaml"), "-c", str(CFG / "teacher_mri.yaml"), "-c", str(overlay)]
    assert run(["fit", *base, *args]) == 0


def test_resume_continues_optimizer_scheduler_and_epoch(synthetic_cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative runs/teachers/mri/checkpoints land here
    overlay = tiny_overlay(tmp_path, *synthetic_cohort)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    fit(tmp_path, overlay, "--trainer.max_epochs=1")  # 2 steps (4 patches, batch 2)
    first = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2 and first["epoch"] == 0

    fit(tmp_path, overlay, "--trainer.max_epochs=2", f"--ckpt_path={ckpt_dir / 'last.ckpt'}")
    second = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert second["global_step"] == 4
    assert second["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"] == 2
    # AdamW kept its moments: its step counter went on from 2 to 4
    steps = {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert steps == {4.0}
    # the one-cycle schedule went on too (its length is the first run's: 2 steps, then it holds)
    s1, s2 = first["lr_schedulers"][0], second["lr_schedulers"][0]
    assert s1["last_epoch"] == 2 and s2["last_epoch"] == 4 and s2["total_steps"] == s1["total_steps"] == 2
    # the resumed run trained epoch 1 only (a new CSV version)
    logs = sorted((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))
    assert len(logs) == 2
    rows = [r for r in csv.DictReader(open(logs[1])) if r.get("train/loss")]
    assert {int(r["epoch"]) for r in rows} == {1} and {int(r["step"]) for r in rows} == {2, 3}


def test_checkpoint_of_a_cli_run_reloads_from_itself(synthetic_cohort, tmp_path, monkeypatch):
    """No arguments needed: the hparams are the config (class paths), so the net is rebuilt."""
    from trifuse.lightning.teacher import TeacherModule
    from trifuse.lightning.data import BratsDataModule

    monkeypatch.chdir(tmp_path)
    data, cache = synthetic_cohort
    overlay = tiny_overlay(tmp_path, data, cache)
    fit(tmp_path, overlay, "--trainer.max_epochs=1")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    model = TeacherModule.load_from_checkpoint(ckpt).eval()
    assert model.net.init_filters == 8 and model.roi_size == (16, 16, 16)
    # identical outputs to the weights in the checkpoint, loaded into a fresh copy
    twin = TeacherModule.load_from_checkpoint(ckpt).eval()
    dm = BratsDataModule(str(data), str(cache), n_folds=3, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(model.infer(model.net_input(batch)), twin.infer(twin.net_input(batch)))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
