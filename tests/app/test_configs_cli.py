"""Every YAML in configs/ parses; the demo config trains for real on tiny data."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name == "configs")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lightning_app.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=600)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_full_configs_print(config):
    r = _cli("fit", "--config", str(config), "--print_config")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "class_path" in r.stdout


def test_patch_size_links_to_roi(tmp_path):
    import lightning as L

    from lightning_app.lightning_cli import TrifuseCLI

    cli = TrifuseCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=["--config", str(ROOT / "configs" / "demo_mri.yaml"), "--data.init_args.patch_size=[48,40,32]", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
        auto_configure_optimizers=False,
    )
    assert tuple(cli.model.hparams.roi_size) == (48, 40, 32) == tuple(cli.datamodule.patch_size)


def test_demo_config_trains_on_tiny_data(tmp_path):
    out = tmp_path / "runs" / "demo_mri"
    r = _cli(
        "fit",
        "--config",
        str(ROOT / "configs" / "demo_mri.yaml"),
        "--data.init_args.n_cases=3",
        "--data.init_args.n_folds=3",
        "--data.init_args.size=tiny",
        "--data.init_args.patch_size=[16,16,16]",
        "--data.init_args.num_workers=0",
        "--data.init_args.samples_per_epoch=2",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        cwd=tmp_path,  # the config's relative paths (data/, runs/) land in tmp_path
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "TriFuse summary" in r.stdout and "| WT |" in r.stdout
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "csv").rglob("metrics.csv"))  # a CSV log is always written
    assert list((out / "wandb").glob("offline-run-*"))  # and an offline W&B run


def test_stage_error_is_one_line_last_on_stderr(tmp_path):
    r = _cli("preprocess", "--data", str(tmp_path / "missing"))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("trifuse preprocess: error:") and "does not exist" in last
