"""Student + asynchronous distillation callback, on tiny data with real (small) teachers."""
import os
import time

import lightning as L
import pytest
import torch

from trifuse import keys
from trifuse.lightning.data import BratsDataModule
import trifuse.lightning.distill as trifuse_distill
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


def _teacher_dir(tmp_path, name="best.ckpt", seed=0):
    """``tmp_path/teachers/mri`` holding one saved (random) MRI teacher."""
    d = tmp_path / "teachers" / "mri"
    d.mkdir(parents=True, exist_ok=True)
    _save_teacher(d / name, seed=seed)
    return d


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        keys.MRI: torch.randn(2, 4, 16, 16, 16, generator=g),
        keys.LABEL: (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.7).to(torch.uint8),
        keys.CASE_ID: ["a", "b"],
        keys.META: [{"patch_box": [[0, 16]] * 3, "applied": []}, {"patch_box": [[1, 17]] * 3, "applied": []}],
    }


class RecordingDistillation(AsyncTeacherDistillation):
    """The real callback, keeping a copy of every batch's inputs and the targets it handed out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = []

    def targets(self, batch):
        out = super().targets(batch)
        inputs = {k: v.detach().clone() for k, v in self._inputs_of(batch).items()}
        self.record.append((inputs, {m: {k: v.clone() for k, v in d.items()} for m, d in out.items()}))
        return out


def _fit(tmp_path, synthetic_cohort, cb, steps=8, dm_cls=BratsDataModule, **trainer_kw):
    data, cache = synthetic_cohort
    dm = dm_cls(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0, samples_per_epoch=2 * steps, n_folds=3, limit_val_cases=1)
    model = StudentModule(init_filters=8, teacher_modalities=("mri",), teacher_channels=128, fusion_width=16, fusion_heads=2, fusion_window=2,
                          use_semantic=False, warmup_steps=0, roi_size=(16, 16, 16), compute_hd95=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, **trainer_kw)
    trainer.fit(model, dm)
    return trainer, model


def test_lookahead_really_overlaps_inside_trainer_fit(synthetic_cohort, tmp_path):
    ckpt_dir = _teacher_dir(tmp_path)
    cb = RecordingDistillation({"mri": str(ckpt_dir)}, asynchronous=True, lookahead=True, watch=False)
    trainer, _ = _fit(tmp_path, synthetic_cohort, cb, steps=8)
    assert trainer.global_step == 8 and cb.stats["steps"] == 8 and len(cb.record) == 8
    # every batch but the first of the epoch had its targets started while the student was on the one before
    assert cb.lookahead_share >= 0.85, cb.stats
    assert 0.0 <= cb.wait_share < 1.0 and cb.stats["step_s"] > 0
    # and asynchrony changed nothing: the targets equal the synchronous ones of the same inputs
    for inputs, got in cb.record:
        want = cb.compute_targets(inputs)
        torch.testing.assert_close(got["mri"]["logits"], want["mri"]["logits"])
        torch.testing.assert_close(got["mri"]["bottleneck"], want["mri"]["bottleneck"])
    # the patches differ from step to step (a stale look-ahead would repeat one)
    assert not torch.equal(cb.record[0][0][keys.MRI], cb.record[1][0][keys.MRI])


def test_without_lookahead_targets_start_with_the_batch(synthetic_cohort, tmp_path):
    ckpt_dir = _teacher_dir(tmp_path)
    cb = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=True, lookahead=False, watch=False)
    trainer, _ = _fit(tmp_path, synthetic_cohort, cb, steps=3)
    assert trainer.global_step == 3 and cb.stats["steps"] == 3 and cb.stats["started_ahead"] == 0


def test_hot_swap_never_reads_a_partial_or_vanished_checkpoint(tmp_path):
    ckpt_dir = _teacher_dir(tmp_path, "last.ckpt")
    ckpt = ckpt_dir / "last.ckpt"
    assert resolve_checkpoint(ckpt_dir) == ckpt
    cb = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=False)
    cb._load_all(torch.device("cpu"))
    batch = _batch()
    s0 = cb.compute_targets(batch)["mri"]["logits"]
    assert cb.refresh(torch.device("cpu")) == 0
    # a newer checkpoint being written in place (no atomic rename): truncated → skipped, no error
    good = tmp_path / "new.ckpt"
    _save_teacher(good, seed=1)
    data = good.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert cb.refresh(torch.device("cpu")) == 0 and cb.swaps == 0
    torch.testing.assert_close(cb.compute_targets(batch)["mri"]["logits"], s0)
    # it vanishes (rotated away): not an error either
    ckpt.unlink()
    assert resolve_checkpoint(ckpt_dir) is None
    assert cb.refresh(torch.device("cpu")) == 0
    # a file that changes while it is being read is not accepted
    ckpt.write_bytes(data)

    class Growing(AsyncTeacherDistillation):
        def _load_stable(self, path, device):
            real = trifuse_distill.load_teacher

            def load_and_touch(p, d):
                t = real(p, d)
                with open(path, "ab") as fh:  # the writer appends while we read
                    fh.write(b"x")
                return t

            trifuse_distill.load_teacher = load_and_touch
            try:
                return super()._load_stable(path, device)
            finally:
                trifuse_distill.load_teacher = real

    g = Growing({"mri": str(ckpt_dir)}, asynchronous=False)
    g.teachers, g.loaded = dict(cb.teachers), {"mri": ("old", 0, 0)}
    assert g.refresh(torch.device("cpu")) == 0 and g.swaps == 0
    # the complete file, written atomically, is swapped in
    from trifuse.lightning.checkpoint_io import atomic_torch_save

    atomic_torch_save(torch.load(good, weights_only=False), ckpt)
    assert not list(ckpt_dir.glob(".*.tmp"))
    assert cb.refresh(torch.device("cpu")) == 1 and cb.swaps == 1 and cb.swap_log[-1][1] == "mri"
    assert not torch.allclose(cb.compute_targets(batch)["mri"]["logits"], s0)


def test_atomic_checkpoint_io_leaves_the_old_file_on_failure(tmp_path):
    from trifuse.lightning.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "best.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)
    torch.testing.assert_close(torch.load(path)["a"], torch.ones(3))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(3), "b": Unpicklable()}, path)
    torch.testing.assert_close(torch.load(path)["a"], torch.ones(3))  # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]  # no temporary file left


def test_missing_teacher_is_a_clear_error(tmp_path):
    cb = AsyncTeacherDistillation({"us": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="teacher 'us': no checkpoint.*make teachers"):
        cb._load_all(torch.device("cpu"))


def test_student_trains_with_teacher_and_checkpoint_has_no_teacher_weights(synthetic_cohort, tmp_path):
    data, cache = synthetic_cohort
    ckpt_dir = _teacher_dir(tmp_path)
    dm = BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0, samples_per_epoch=4, n_folds=3, limit_val_cases=1)
    model = StudentModule(init_filters=8, teacher_modalities=("mri",), teacher_channels=128, use_semantic=False, warmup_steps=0, roi_size=(16, 16, 16), compute_hd95=False)
    cb = AsyncTeacherDistillation({"mri": str(ckpt_dir)})
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0
    )
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss_resp"]) and torch.isfinite(trainer.callback_metrics["train/loss_feat"])
    assert cb.stats["steps"] == 2 and cb.stats["started_ahead"] == 1  # batch 2's targets were started during step 1
    out = tmp_path / "student.ckpt"
    trainer.save_checkpoint(out)
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert not any(k.startswith(("teacher", "distiller")) for k in ckpt["state_dict"])
    assert all(k.split(".")[0] in {"student", "fusion", "student_proj", "fusion_head", "criterion", "val_metrics"} for k in ckpt["state_dict"])
    # no tensor of the teacher inside: none has the shape of the teacher's first conv
    t_shapes = {tuple(p.shape) for p in cb.teachers["mri"].parameters() if p.ndim == 5}
    s_shapes = {tuple(v.shape) for v in ckpt["state_dict"].values()}
    first = tuple(next(cb.teachers["mri"].net.parameters()).shape)
    assert first in t_shapes and first not in s_shapes
    ours = [st for name, st in ckpt["callbacks"].items() if "AsyncTeacherDistillation" in name]
    assert len(ours) == 1 and not any(torch.is_tensor(v) for v in ours[0].values())
    reloaded = StudentModule.load_from_checkpoint(out, map_location="cpu")
    x = torch.randn(1, 4, 16, 16, 16)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x), model(x))
    # like a teacher's, the checkpoint records the training spacing and the post-processing
    # decided on the validation cases, and the Predictor takes both from it
    meta = ckpt["trifuse"]
    assert dm.target_spacing is not None and meta["spacing"] == pytest.approx(dm.target_spacing)
    decision = meta["postprocessing"]
    assert set(decision["min_component_mm3"]) == {"WT", "TC", "ET"} and "et_min_mm3" in decision
    assert decision["n_cases"] == len(dm.val_ids) == 1
    assert reloaded.postprocessing_decision == decision and reloaded.train_spacing == pytest.approx(dm.target_spacing)
    from trifuse.inference import load_model, Predictor

    pred = Predictor(load_model(out, "cpu"))
    assert pred.decision == decision and pred.target_spacing == pytest.approx(dm.target_spacing)


def test_student_predict_needs_only_the_mri(synthetic_cohort, tmp_path):
    """`trifuse predict` with a student checkpoint needs the four MRI files only (no teachers)."""
    import shutil

    data, _ = synthetic_cohort
    torch.manual_seed(0)
    model = StudentModule(init_filters=8, teacher_modalities=("mri",), teacher_channels=128, use_semantic=False, roi_size=(32, 32, 32), compute_hd95=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(model)
    out = tmp_path / "student.ckpt"
    trainer.save_checkpoint(out)

    from lightning_app.cli import main

    src = data / "BraTS2021_00001"
    case = tmp_path / "in" / "BraTS2021_00001"
    case.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith("_seg.nii.gz"):
            shutil.copy(f, case / f.name)
    # no test-time mirroring: 8× the windows, and the mirroring has its own tests
    assert main(["predict", "--ckpt", str(out), "--input", str(case), "--output", str(tmp_path / "pred"), "--no-tta"]) == 0
    import nibabel as nib
    import numpy as np

    pred = nib.load(str(tmp_path / "pred" / "BraTS2021_00001.nii.gz"))
    ref = nib.load(str(src / "BraTS2021_00001_t1.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}


def test_cached_mode_gives_the_online_loss_and_refuses_a_stale_cache(synthetic_cohort, tmp_path):
    """Unaugmented patches covering the whole (tiny) case: cached targets = online ones up to float16 storage."""
    from trifuse.lightning.target_cache import StaleTargetCache

    data, cache = synthetic_cohort
    ckpt_dir = _teacher_dir(tmp_path)
    dm = BratsDataModule(str(data), str(cache), patch_size=(64, 64, 48), batch_size=2, num_workers=0, samples_per_epoch=2, n_folds=3, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert all(m["patch_box"] is not None for m in batch[keys.META])
    online = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=False)
    cached = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=False, mode="cached", cache_dir=str(tmp_path / "cache"), cache_roi=(64, 64, 48))
    for cb in (online, cached):
        cb._load_all(torch.device("cpu"))
    assert cached.prepare_cache(dm, torch.device("cpu")) == len(dm.train_ids)
    assert cached.prepare_cache(dm, torch.device("cpu")) == 0  # resumable: nothing redone
    t_on, t_ca = online.targets(batch), cached.targets(batch)
    assert cached.stats["cached"] == 1
    scale = t_on["mri"]["logits"].abs().max()
    torch.testing.assert_close(t_ca["mri"]["logits"], t_on["mri"]["logits"], atol=2e-3 * float(scale), rtol=0)
    torch.testing.assert_close(t_ca["mri"]["bottleneck"], t_on["mri"]["bottleneck"], atol=2e-3 * float(t_on["mri"]["bottleneck"].abs().max()), rtol=0)
    # the student's loss with either: equal within 1e-3 (relative; float16 storage of the targets)
    model = StudentModule(init_filters=8, teacher_modalities=("mri",), teacher_channels=128, fusion_width=16, fusion_heads=2, fusion_window=2,
                          use_semantic=False, warmup_steps=0, roi_size=(64, 64, 48), compute_hd95=False)
    losses = []
    for cb in (online, cached):
        torch.manual_seed(0)
        model.distiller = cb
        losses.append(float(model.training_step(batch, 0)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    # a flipped patch is flipped in the cache too
    flipped = {k: (v.flip(2) if torch.is_tensor(v) and v.ndim == 5 else v) for k, v in batch.items()}
    flipped[keys.META] = [{**m, "applied": [{"name": "RandomAugment", "flip_axes": [0]}]} for m in batch[keys.META]]
    torch.testing.assert_close(cached.targets(flipped)["mri"]["logits"], t_ca["mri"]["logits"].flip(2))
    # a newer teacher checkpoint: the cache is refused
    _save_teacher(ckpt_dir / "best.ckpt", seed=1)
    stale = AsyncTeacherDistillation({"mri": str(ckpt_dir)}, asynchronous=False, mode="cached", cache_dir=str(tmp_path / "cache"), cache_roi=(64, 64, 48))
    stale._load_all(torch.device("cpu"))
    with pytest.raises(StaleTargetCache, match="another teacher checkpoint"):
        stale.prepare_cache(dm, torch.device("cpu"))


def test_teacher_precision_follows_the_trainer_and_the_hardware():
    from trifuse.lightning.distill import resolve_teacher_dtype as r

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert r("auto", "bf16-mixed", cpu, bf16_supported=True) is None  # CPU: fp32 always
    assert r("auto", "16-mixed", gpu, bf16_supported=True) == torch.float16
    assert r("auto", "bf16-mixed", gpu, bf16_supported=True) == torch.bfloat16
    assert r("auto", "bf16-mixed", gpu, bf16_supported=False) == torch.float16  # V100/T4
    assert r("auto", "32-true", gpu, bf16_supported=True) is None
    assert r("reduced", "32-true", gpu, bf16_supported=True) == torch.bfloat16
    assert r("reduced", "32-true", gpu, bf16_supported=False) == torch.float16
    assert r("bf16", None, gpu, bf16_supported=False) == torch.float16
    with pytest.raises(ValueError, match="precision must be"):
        AsyncTeacherDistillation({"mri": "x"}, precision="half")
