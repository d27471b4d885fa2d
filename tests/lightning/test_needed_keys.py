"""The data module runs only the sample transforms whose output the student reads: the MRI-only
student and the student with cached teacher targets do not simulate US/CT in the loader workers,
while the teacher-target cache still gets every teacher's inputs."""
from __future__ import annotations

import lightning as L
import torch

from trifuse import keys
from trifuse.lightning.data import BratsDataModule
from trifuse.lightning.distill import AsyncTeacherDistillation
from trifuse.lightning.student import StudentModule
from trifuse.transforms import SampleTransform
from tests.lightning.test_student_distill import _teacher_dir


class Spy(SampleTransform):
    """Writes a constant image under ``key`` and counts its calls (by caller: cache build or patches)."""

    def __init__(self, key: str, provides=None):
        self.key = key
        self.provides = (key,) if provides is None else tuple(provides)
        self.calls = 0

    def __call__(self, sample, generator=None):
        self.calls += 1
        sample[self.key] = torch.zeros((1, *sample[keys.MRI].shape[1:]))
        return sample


def _dm(synthetic_cohort, transforms, steps=3):
    data, cache = synthetic_cohort
    return BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0, samples_per_epoch=2 * steps,
                           n_folds=3, limit_val_cases=1, augment=False, sample_transforms=transforms)


def test_the_filter_keeps_needed_and_unknown_transforms(synthetic_cohort):
    us, ct, unknown = Spy(keys.US), Spy(keys.CT), Spy("extra", provides=())
    dm = _dm(synthetic_cohort, [us, ct, unknown])
    dm.setup("fit")
    assert dm._worker_transforms() == [us, ct, unknown]  # needed_keys None: everything runs
    dm.needed_keys = {keys.CT}
    assert dm._worker_transforms() == [ct, unknown]
    dm.needed_keys = set()
    assert dm._worker_transforms() == [unknown]
    assert dm._worker_transforms(every=True) == [us, ct, unknown]
    sample = dm.train_dataset()[0]
    assert keys.US not in sample and keys.CT not in sample and "extra" in sample
    assert us.calls == 0 and ct.calls == 0 and unknown.calls == 1


def test_sample_keys_of_the_distiller_follow_its_mode(tmp_path):
    teachers = {"mri": str(_teacher_dir(tmp_path))}
    online = AsyncTeacherDistillation(teachers, asynchronous=False, watch=False, mode="online")
    cached = AsyncTeacherDistillation(teachers, asynchronous=False, watch=False, mode="cached", cache_dir=str(tmp_path / "c"))
    for cb in (online, cached):
        cb._load_all(torch.device("cpu"))
    assert online.sample_keys == [keys.MRI]
    assert cached.sample_keys == []


def _fit(tmp_path, dm, callbacks, **student):
    model = StudentModule(init_filters=8, teacher_channels=128, fusion_width=16, fusion_heads=2, fusion_window=2, use_semantic=False,
                          warmup_steps=0, roi_size=(16, 16, 16), compute_hd95=False, **student)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    return trainer


def test_cached_student_skips_the_us_transform_but_the_cache_build_runs_it(synthetic_cohort, tmp_path):
    """In Trainer.fit with cached targets the US transform runs once per training case for the cache
    build and never for a training patch; the student still gets its targets from the cache."""

    class Seeing(AsyncTeacherDistillation):
        seen: list = []

        def targets(self, batch):
            self.seen.append(sorted(k for k in batch if k in keys.IMAGE_KEYS))
            return super().targets(batch)

    us = Spy(keys.US)
    dm = _dm(synthetic_cohort, [us])
    cb = Seeing({"mri": str(_teacher_dir(tmp_path))}, asynchronous=True, watch=False, mode="cached", cache_dir=str(tmp_path / "cache"),
                cache_roi=(32, 32, 32))
    trainer = _fit(tmp_path, dm, [cb], teacher_modalities=("mri",))
    assert trainer.global_step == 3 and cb.stats["cached"] == 3 and cb.stats["fallback"] == 0
    assert dm.needed_keys == set()
    assert us.calls == len(dm.train_ids), "the cache build reads every training case with all transforms, patches none"
    assert cb.seen == [[keys.MRI]] * 3


def test_mri_only_student_skips_the_us_transform(synthetic_cohort, tmp_path):
    us = Spy(keys.US)
    dm = _dm(synthetic_cohort, [us])
    trainer = _fit(tmp_path, dm, [], teacher_modalities=(), use_response=False, use_feature=False)
    assert trainer.global_step == 3 and us.calls == 0 and dm.needed_keys == set()


def test_without_a_student_the_data_module_runs_every_transform(synthetic_cohort):
    us = Spy(keys.US)
    dm = _dm(synthetic_cohort, [us], steps=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert us.calls == 2 and keys.US in batch
