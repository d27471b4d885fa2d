"""Student + asynchronous distillation callback, on tiny data with real (small) teachers."""
import os
import time

import lightning as L
import pytest
import torch

from trifuse import keys
from trifuse.lightning.data import BratsDataModule
from trifuse.lightning.distill import AsyncTeacherDistillation, resolve_checkpoint
from trifuse.lightning.student import StudentModule
from trifuse.lightning.teacher import TeacherModule


def _save_teacher(path, seed=0):
    torch.manual_seed(seed)
    t = TeacherModule(modality="mri")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(t)
    trainer.save_checkpoint(path)
    return t


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        keys.MRI: torch.randn(2, 4, 16, 16, 16, generator=g),
        keys.LABEL: (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.7).to(torch.uint8),
        keys.CASE_ID: ["a", "b"],
        keys.META: [{"patch_box": [[0, 16]] * 3, "applied": []}, {"patch_box": [[1, 17]] * 3, "applied": []}],
    }


def test_async_targets_equal_sync_and_checkpoint_swap(tmp_path):
    ckpt_dir = tmp_path / "teachers" / "mri"
    ckpt_dir.mkdir(parents=True)
    _save_teacher(ckpt_dir / "last.ckpt", seed=0)
    assert resolve_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"
    sync = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=False)
    asyn = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=True)
    for cb in (sync, asyn):
        cb._load_all(torch.device("cpu"))
    import concurrent.futures as cf

    asyn._pool = cf.ThreadPoolExecutor(1)
    batch = _batch()
    asyn._pending[("x",)] = asyn._submit(batch)  # computed in the background thread
    a = asyn._pending.pop(("x",)).result()
    s = sync.targets(batch)
    torch.testing.assert_close(a["mri"]["logits"], s["mri"]["logits"])
    torch.testing.assert_close(a["mri"]["bottleneck"], s["mri"]["bottleneck"])
    assert s["mri"]["logits"].shape == (2, 3, 16, 16, 16) and s["mri"]["bottleneck"].shape[1] == 128
    # a newer checkpoint lands: the callback swaps it in
    assert sync.refresh(torch.device("cpu")) == 0
    time.sleep(0.01)
    _save_teacher(ckpt_dir / "last.ckpt", seed=1)
    os.utime(ckpt_dir / "last.ckpt", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert sync.refresh(torch.device("cpu")) == 1 and sync.swaps == 1
    s2 = sync.targets(batch)
    assert not torch.allclose(s2["mri"]["logits"], s["mri"]["logits"])
    asyn._pool.shutdown()


def test_missing_teacher_is_a_clear_error(tmp_path):
    cb = AsyncTeacherDistillation({"us": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="teacher 'us': no checkpoint.*make teachers"):
        cb._load_all(torch.device("cpu"))


def test_student_trains_with_teacher_and_checkpoint_has_no_teacher_weights(synthetic_cohort, tmp_path):
    data, cache = synthetic_cohort
    ckpt_dir = tmp_path / "teachers" / "mri"
    ckpt_dir.mkdir(parents=True)
    _save_teacher(ckpt_dir / "best.ckpt")
    dm = BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0, samples_per_epoch=4, n_folds=3, limit_val_cases=1)
    model = StudentModule(init_filters=8, teacher_modalities=("mri",), teacher_channels=128, use_semantic=False, warmup_steps=0, roi_size=(16, 16, 16), compute_hd95=False)
    cb = AsyncTeacherDistillation({"mri": str(ckpt_dir)})
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0
    )
    trainer.fit(model, dm)
    assert trainer.callback_metrics["train/loss_resp"] >= 0 and "train/loss_feat" in trainer.callback_metrics
    assert cb.stats["computed_now"] + cb.stats["lookahead_hits"] == 2
    out = tmp_path / "student.ckpt"
    trainer.save_checkpoint(out)
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert not any(k.startswith(("teacher", "distiller")) for k in ckpt["state_dict"])
    assert all(k.split(".")[0] in {"student", "fusion", "student_proj", "fusion_head", "criterion", "val_metrics"} for k in ckpt["state_dict"])
    teacher_params = sum(p.numel() for p in cb.teachers["mri"].parameters())
    student_params = sum(v.numel() for v in ckpt["state_dict"].values())
    assert student_params < teacher_params + sum(p.numel() for p in model.parameters())  # no teacher copy inside
    reloaded = StudentModule.load_from_checkpoint(out, map_location="cpu")
    x = torch.randn(1, 4, 16, 16, 16)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x), model(x))

    # `trifuse predict` with a student checkpoint needs the four MRI files only
    import shutil

    from lightning_app.cli import main

    src = data / "BraTS2021_00001"
    case = tmp_path / "in" / "BraTS2021_00001"
    case.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith("_seg.nii.gz"):
            shutil.copy(f, case / f.name)
    assert main(["predict", "--ckpt", str(out), "--input", str(case), "--output", str(tmp_path / "pred")]) == 0
    import nibabel as nib
    import numpy as np

    pred = nib.load(str(tmp_path / "pred" / "BraTS2021_00001.nii.gz"))
    ref = nib.load(str(src / "BraTS2021_00001_t1.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
