import numpy as np
import pytest
import torch

from trifuse import keys
from trifuse.io.preprocess import preprocess
from trifuse.lightning.data import BratsDataModule, PatchDataset, SyntheticDataModule
from trifuse.transforms import RandomAugment


def _dm(data, cache, **kw):
    args = dict(data_dir=str(data), cache_dir=str(cache), patch_size=(32, 32, 32), batch_size=2, num_workers=0, samples_per_epoch=4, n_folds=3)
    args.update(kw)
    dm = BratsDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_train_batch_keys_shapes_dtypes(synthetic_cohort):
    dm = _dm(*synthetic_cohort)
    batch = next(iter(dm.train_dataloader()))
    assert batch[keys.MRI].shape == (2, 4, 32, 32, 32) and batch[keys.MRI].dtype == torch.float32
    assert batch[keys.LABEL].shape == (2, 3, 32, 32, 32) and batch[keys.LABEL].dtype == torch.uint8
    assert batch[keys.SEG].shape == (2, 1, 32, 32, 32) and batch[keys.SEG].dtype == torch.uint8
    assert batch[keys.BRAIN].shape == (2, 1, 32, 32, 32) and batch[keys.BRAIN].dtype == torch.bool
    assert len(batch[keys.CASE_ID]) == 2 and all(c in dm.train_ids for c in batch[keys.CASE_ID])
    meta = batch[keys.META][0]
    assert meta["year"] == 2021 and len(meta["spacing"]) == 3 and np.asarray(meta["affine"]).shape == (4, 4)
    names = [a["name"] for a in meta["applied"]]
    assert names[0] == "RandomPatch" and "RandomAugment" in names
    # labels stay nested through augmentation
    lab = batch[keys.LABEL]
    assert torch.all(lab[:, 2] <= lab[:, 1]) and torch.all(lab[:, 1] <= lab[:, 0])


def test_validation_batches_are_whole_cases(synthetic_cohort):
    data, cache = synthetic_cohort
    dm = _dm(data, cache)
    batches = list(dm.val_dataloader())
    assert [b[keys.CASE_ID][0] for b in batches] == dm.val_ids
    b = batches[0]
    shape = tuple(b[keys.META][0]["cropped_shape"])
    assert b[keys.MRI].shape == (1, 4) + shape and b[keys.LABEL].shape == (1, 3) + shape
    assert not set(dm.train_ids) & set(dm.val_ids)


def test_foreground_oversampling(synthetic_cohort):
    data, cache = synthetic_cohort
    ids = [f"BraTS2021_{i:05d}" for i in range(6)]
    always = PatchDataset(cache, ids, patch_size=(16, 16, 16), samples_per_epoch=12, fg_prob=1.0)
    assert all(always[i][keys.LABEL][0].any() for i in range(12))
    never = PatchDataset(cache, ids, patch_size=(16, 16, 16), samples_per_epoch=30, fg_prob=0.0)
    frac_never = np.mean([bool(never[i][keys.LABEL][0].any()) for i in range(30)])
    assert frac_never < 1.0


def test_patch_padding_when_volume_is_small(synthetic_cohort):
    _, cache = synthetic_cohort
    ds = PatchDataset(cache, ["BraTS2021_00000"], patch_size=(96, 96, 96), samples_per_epoch=1)
    assert ds[0][keys.MRI].shape == (4, 96, 96, 96)


def test_augment_records_and_replays():
    gen = torch.Generator().manual_seed(0)
    aug = RandomAugment(flip_prob=1.0, rotate_prob=0.0, gamma_prob=1.0, intensity_prob=0.0)
    mri = torch.randn(4, 8, 8, 8)
    label = (torch.rand(3, 8, 8, 8) > 0.5).to(torch.uint8)
    s = aug({keys.MRI: mri.clone(), keys.LABEL: label.clone(), keys.META: {}}, gen)
    (applied,) = s[keys.META]["applied"]
    assert applied["flip_axes"] == [0, 1, 2] and 0.8 <= applied["gamma"] <= 1.2
    torch.testing.assert_close(s[keys.LABEL], label.flip(1, 2, 3))
    replay = aug.apply({keys.MRI: mri.clone(), keys.LABEL: label.clone(), keys.META: {}}, {k: v for k, v in applied.items() if k != "name"})
    torch.testing.assert_close(replay[keys.MRI], s[keys.MRI])


def test_refuses_invalid_cases_unless_skipped(tiny_dataset, tmp_path):
    root = tiny_dataset(2021, 4)
    (root / "BraTS2021_00003" / "BraTS2021_00003_t1.nii.gz").write_bytes(b"corrupt")
    cache = tmp_path / "cache"
    dm = BratsDataModule(str(root), str(cache), num_workers=0, n_folds=3, patch_size=(16, 16, 16))
    dm.prepare_data()
    with pytest.raises(RuntimeError, match="(?s)1 invalid case.*skip_invalid.*BraTS2021_00003"):
        dm.setup("fit")
    dm = BratsDataModule(str(root), str(cache), num_workers=0, n_folds=3, skip_invalid=True, patch_size=(16, 16, 16))
    dm.setup("fit")
    assert "BraTS2021_00003" not in dm.train_ids + dm.val_ids


def test_synthetic_datamodule_generates_when_missing(tmp_path):
    dm = SyntheticDataModule(
        data_dir=str(tmp_path / "syn"), n_cases=3, size="tiny", cache_dir=str(tmp_path / "cache"), n_folds=3, num_workers=0, patch_size=(16, 16, 16), samples_per_epoch=2
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_ids) + len(dm.val_ids) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch[keys.MRI].shape == (2, 4, 16, 16, 16)


def test_case_shard_sampler_never_repeats_cases(monkeypatch):
    from trifuse.lightning.data import CaseShardSampler

    assert list(CaseShardSampler(3)) == [0, 1, 2]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        shards.append(list(CaseShardSampler(3)))
    assert shards == [[0, 2], [1]]  # uneven, but every case exactly once (no padding repeats)


def test_class_ratio_sampling_centres_patches_on_the_chosen_region(synthetic_cohort):
    from trifuse.io.manifest import read_manifest
    from trifuse.lightning.data import PatchDataset

    data, cache = synthetic_cohort
    ids = [c["case_id"] for c in read_manifest(cache)["cases"]]
    with_et = [cid for cid in ids if int(np.load(cache / cid / "label.npy")[2].sum()) > 0]
    assert with_et, "the tiny cohort has enhancing tumour"
    ds = PatchDataset(cache, with_et, patch_size=(8, 8, 8), samples_per_epoch=12, class_ratios=[0, 0, 0, 1], seed=1)
    hits = [bool(ds[i][keys.LABEL][2].any()) for i in range(12)]
    assert all(hits)  # every patch holds ET (a small region in a large case)
    uniform = PatchDataset(cache, with_et, patch_size=(8, 8, 8), samples_per_epoch=24, class_ratios=[1, 0, 0, 0], seed=1)
    assert sum(bool(uniform[i][keys.LABEL][2].any()) for i in range(24)) < 24
    how = [ds[i][keys.META]["applied"][0]["foreground"] for i in range(3)]
    assert all(how)


def test_nnunet_augmentation_through_the_loader_keeps_patch_size_and_labels(synthetic_cohort):
    from trifuse.io.manifest import read_manifest
    from trifuse.lightning.data import PatchDataset
    from trifuse.transforms import NNUNetAugment

    data, cache = synthetic_cohort
    ids = [c["case_id"] for c in read_manifest(cache)["cases"]]
    aug = NNUNetAugment(patch_size=(16, 16, 16), rotate_prob=1.0, scale_prob=1.0)
    ds = PatchDataset(cache, ids, patch_size=(16, 16, 16), samples_per_epoch=4, augment=aug, class_ratios=[1, 1, 1, 1])
    for i in range(4):
        s = ds[i]
        assert tuple(s[keys.MRI].shape) == (4, 16, 16, 16) and tuple(s[keys.LABEL].shape) == (3, 16, 16, 16)
        lab = s[keys.LABEL]
        assert bool((lab[2] <= lab[1]).all()) and bool((lab[1] <= lab[0]).all())
        names = [a["name"] for a in s[keys.META]["applied"]]
        assert names[:2] == ["RandomPatch", "NNUNetAugment"]
        read = s[keys.META]["applied"][0]["box"]
        assert any(b - a > 16 for a, b in read)  # a larger crop was read for the rotation
