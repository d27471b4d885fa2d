"""The three teacher recipes (configs/teacher_{mri,us,ct}.yaml) train for real with fast_dev_run
on the tiny cohort, composed as `make teachers` composes them."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_app.lightning_cli import TrifuseCLI

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs"


def tiny(tmp_path: Path, data: Path, cache: Path) -> Path:
    doc = {
        "run_dir": str(tmp_path / "run"),
        "trainer": {"enable_progress_bar": False, "enable_model_summary": False},
        "model": {"init_args": {"overlap": 0.25, "net": {"init_args": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}}}},
        "data": {
            "init_args": {
                "data_dir": str(data), "cache_dir": str(cache), "n_cases": 6, "cohort_seed": 3, "size": "tiny", "n_folds": 3,
                "patch_size": [16, 16, 16], "batch_size": 2, "num_workers": 0, "samples_per_epoch": 2, "limit_val_cases": 1,
            }
        },
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("modality", ["mri", "us", "ct"])
def test_teacher_recipe_trains_with_fast_dev_run(modality, synthetic_cohort, tmp_path, monkeypatch):
    import lightning as L

    monkeypatch.chdir(tmp_path)
    files = [CFG / "trainer" / "cpu.yaml", CFG / "data" / "synthetic.yaml", CFG / f"teacher_{modality}.yaml", tiny(tmp_path, *synthetic_cohort)]
    cli = TrifuseCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=["fit"] + [a for f in files for a in ("-c", str(f))] + ["--trainer.fast_dev_run=true"],
        auto_configure_optimizers=False,
    )
    model, trainer = cli.model, cli.trainer
    assert model.modality == modality and model.inputs == (modality,)
    assert trainer.state.finished and trainer.global_step == 1
    # the validation pass ran on a whole case, through the modality's own input
    assert {"val/dice_mean", "val/hd95_mean"} <= set(trainer.callback_metrics)
    assert model.val_example is not None and model.val_example["modality"] == modality
