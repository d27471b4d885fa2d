"""LightningDataModules that yield the four-modal BraTS sample dicts of DESIGN.md.

``BratsDataModule`` reads a preprocessed cache (running ``preprocess`` itself when
needed); ``SyntheticDataModule`` first generates the synthetic cohort. Both yield
identical samples:

* training: random patches with foreground oversampling (read straight from the
  ``.npy`` memmaps, so only the patch is touched) and augmentation;
* validation/test/predict: whole cropped cases (batch size 1).

Extension points: ``sample_transforms`` run per sample in the loader workers (the
pixel tier's ``SimulateUltrasound``/``SynthesizeCT``, priors and text); with
``transforms_on_device=True`` those that support batches run on the device in
``on_after_batch_transfer`` instead.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from trifuse import keys
from trifuse.io import cache as cache_mod
from trifuse.io.manifest import read_manifest
from trifuse.io.preprocess import default_cache_dir, preprocess
from trifuse.transforms import NNUNetAugment, RandomAugment, SampleTransform, record

log = logging.getLogger(__name__)

#: voxels kept per class and case for class-ratio sampling (a uniform subsample)
MAX_CLASS_POINTS = 20000


def collate_samples(samples: list[dict]) -> dict:
    """Stack tensors; keep ``case_id`` and ``meta`` as lists (their contents differ per case)."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def _pad_to(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    pad = []
    for have, want in zip(reversed(t.shape[-3:]), reversed(size)):
        extra = max(0, want - have)
        pad += [extra // 2, extra - extra // 2]
    return torch.nn.functional.pad(t, pad) if any(pad) else t


class CaseShardSampler(torch.utils.data.Sampler):
    """Whole cases split over DDP ranks without padding (``rank::world_size``).

    Lightning's default ``DistributedSampler`` pads uneven splits by repeating cases, which
    would count those cases twice in the (synced) validation metrics. Outside DDP it is a
    plain sequential sampler.
    """

    def __init__(self, n: int):
        self.n = n

    def _shard(self) -> range:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return range(torch.distributed.get_rank(), self.n, torch.distributed.get_world_size())
        return range(self.n)

    def __iter__(self):
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._shard())


class PatchDataset(Dataset):
    """Random training patches from cached cases, with foreground oversampling.

    Args:
        cache_dir: cache written by ``trifuse preprocess``.
        case_ids: cases to draw from.
        patch_size: ``(D, H, W)`` voxels; volumes smaller than a patch are zero-padded.
        samples_per_epoch: dataset length (each item draws a case uniformly).
        fg_prob: probability that a patch is centred on a random tumour voxel
            (nnU-Net uses 1/3; we default to 0.5 for the small regions TC/ET).
        augment: optional :class:`~trifuse.transforms.RandomAugment`.
        sample_transforms: further per-sample transforms (pixel tier, priors).
        seed: base seed; each item's generator is ``seed + epoch-free index + worker seed``.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int] = (128, 128, 128),
        samples_per_epoch: int = 100,
        fg_prob: float = 0.5,
        augment: Optional[SampleTransform] = None,
        sample_transforms: Sequence[SampleTransform] = (),
        seed: int = 0,
        class_ratios: Optional[Sequence[float]] = None,
    ):
        if not case_ids:
            raise ValueError(f"{cache_dir}: no cases to train on")
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.fg_prob = fg_prob
        self.augment = augment
        self.sample_transforms = list(sample_transforms)
        self.seed = seed
        self.class_ratios = [float(r) for r in class_ratios] if class_ratios is not None else None
        if self.class_ratios is not None and (len(self.class_ratios) != 1 + len(keys.REGIONS) or min(self.class_ratios) < 0):
            raise ValueError(f"class_ratios needs {1 + len(keys.REGIONS)} non-negative weights (random, WT, TC, ET), got {class_ratios}")
        self._arrays: dict[str, dict] = {}
        self._meta: dict[str, dict] = {}
        self._class_idx: dict[str, list[np.ndarray]] = {}
        self._draws = 0

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _open(self, case_id: str):
        if case_id not in self._arrays:  # opened lazily, once per worker
            self._arrays[case_id] = cache_mod.open_arrays(self.cache_dir, case_id)
            self._meta[case_id] = cache_mod.read_meta(self.cache_dir, case_id)
        return self._arrays[case_id], self._meta[case_id]

    def _generator(self, index: int) -> torch.Generator:
        # torch.initial_seed() differs per worker and per epoch (DataLoader reseeds
        # workers from the global RNG, which seed_everything fixes); the draw counter
        # makes successive items in one worker differ.
        info = get_worker_info()
        base = info.seed if info is not None else torch.initial_seed()
        self._draws += 1
        return torch.Generator().manual_seed((base + 7919 * index + 104729 * self._draws + self.seed) % (2**63))

    def class_indices(self, case_id: str, arrays: dict) -> list[np.ndarray]:
        """Flat voxel indices of each class (WT, TC, ET) of a case, at most ``MAX_CLASS_POINTS`` each.

        Computed once per case and worker from the cached region masks (``label.npy``).
        """
        if case_id not in self._class_idx:
            rng = np.random.default_rng(abs(hash(case_id)) % (2**32))
            out = []
            for c in range(len(keys.REGIONS)):
                idx = np.flatnonzero(np.asarray(arrays["label"][c]))
                if len(idx) > MAX_CLASS_POINTS:
                    idx = np.sort(rng.choice(idx, MAX_CLASS_POINTS, replace=False))
                out.append(idx)
            self._class_idx[case_id] = out
        return self._class_idx[case_id]

    def sample_centre(self, shape, fg: np.ndarray, gen: torch.Generator, case_id: str | None = None, arrays: dict | None = None):
        """Patch centre and how it was chosen (``"random"``, ``"fg"`` or a region name).

        With ``class_ratios`` (weights of random, WT, TC, ET centres; nnU-Net forces 1/3
        foreground patches, MONAI ``RandCropByLabelClasses`` samples by class ratios) the
        class is drawn first among those present in the case, then a voxel of it; otherwise
        a foreground voxel with probability ``fg_prob``, else a uniform voxel.
        """
        if self.class_ratios is not None and arrays is not None:
            idx = self.class_indices(case_id, arrays)
            w = torch.tensor([self.class_ratios[0]] + [r if len(i) else 0.0 for r, i in zip(self.class_ratios[1:], idx)])
            if float(w.sum()) > 0:
                k = int(torch.multinomial(w / w.sum(), 1, generator=gen))
                if k > 0:
                    flat = idx[k - 1][int(torch.randint(len(idx[k - 1]), (1,), generator=gen))]
                    return [int(v) for v in np.unravel_index(int(flat), shape)], keys.REGIONS[k - 1]
            return [int(torch.randint(max(s, 1), (1,), generator=gen)) for s in shape], "random"
        use_fg = len(fg) > 0 and float(torch.rand((), generator=gen)) < self.fg_prob
        if use_fg:
            return [int(v) for v in fg[int(torch.randint(len(fg), (1,), generator=gen))]], "fg"
        return [int(torch.randint(max(s, 1), (1,), generator=gen)) for s in shape], "random"

    @staticmethod
    def box_around(centre, shape, size) -> list[list[int]]:
        """Box of ``size`` around ``centre``, shifted inside ``shape`` (the whole axis if smaller)."""
        box = []
        for c, s, p in zip(centre, shape, size):
            if s <= p:
                box.append([0, s])
            else:
                start = int(np.clip(c - p // 2, 0, s - p))
                box.append([start, start + p])
        return box

    def sample_box(self, shape, fg: np.ndarray, gen: torch.Generator, size=None, case_id=None, arrays=None) -> tuple[list[list[int]], bool]:
        """Patch box (of ``size``, default the patch size) inside ``shape`` and whether it is foreground-centred."""
        centre, how = self.sample_centre(shape, fg, gen, case_id, arrays)
        return self.box_around(centre, shape, size or self.patch_size), how != "random"

    def __getitem__(self, index: int) -> dict:
        gen = self._generator(index)
        case_id = self.case_ids[int(torch.randint(len(self.case_ids), (1,), generator=gen))]
        arrays, meta = self._open(case_id)
        shape = arrays["seg"].shape
        # an augmentation with a spatial part reads a larger crop (rotation/scaling without
        # zero corners) and cuts the patch from its centre; its parameters are drawn first
        params, size = None, self.patch_size
        if self.augment is not None and hasattr(self.augment, "input_size"):
            params = self.augment.sample_params(gen, channels=int(arrays["mri"].shape[0]))
            size = self.augment.input_size(self.patch_size, params)
        box, used_fg = self.sample_box(shape, arrays["fg"], gen, size=size, case_id=case_id, arrays=arrays)
        sample = cache_mod.make_sample(arrays, meta, box)
        for k in (keys.MRI, keys.LABEL, keys.SEG, keys.BRAIN):
            sample[k] = _pad_to(sample[k], size)
        record(sample, "RandomPatch", box=box, foreground=used_fg, size=list(size))  # size: the crop (padded), before augmentation
        # the pixel tier simulates in the frame of the whole cached case (trifuse.physics.transforms),
        # before spatial augmentation, so that its output is augmented together with the MRI
        sample[keys.META]["case_frame"] = {"cache_dir": str(self.cache_dir)}
        framed = [t for t in self.sample_transforms if getattr(t, "needs_case_frame", False)]
        for t in framed:
            sample = t(sample, gen)
        if self.augment is not None:
            sample = self.augment(sample, gen, params=params) if params is not None else self.augment(sample, gen)
        for t in self.sample_transforms:
            if not any(t is f for f in framed):
                sample = t(sample, gen)
        return sample


class CaseDataset(Dataset):
    """Whole cropped cases (validation, test, predict)."""

    def __init__(self, cache_dir: str | Path, case_ids: Sequence[str], sample_transforms: Sequence[SampleTransform] = (), seed: int = 0):
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.sample_transforms = list(sample_transforms)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict:
        sample = cache_mod.load_sample(self.cache_dir, self.case_ids[index])
        gen = torch.Generator().manual_seed(self.seed + index)  # fixed per case: stable validation
        for t in self.sample_transforms:
            sample = t(sample, gen)
        return sample


class BratsDataModule(L.LightningDataModule):
    """BraTS 2020/2021/2023 (or any folder in their layout) as four-modal sample dicts.

    Args:
        data_dir: dataset folder (BraTS layout; the release is detected).
        cache_dir: preprocessed cache; default ``<data_dir>/../cache/<name>``.
        year: ``"auto"`` or 2020/2021/2023 to enforce.
        fold: k-fold split index from the manifest (``n_folds`` folds, ``split_seed``).
        patch_size: training patch ``(D, H, W)`` in voxels.
        batch_size: training batch size (validation uses 1: whole cases differ in size).
        num_workers: loader worker processes.
        samples_per_epoch: training patches per epoch *per rank* (DDP: each of N ranks draws
            this many, so N GPUs see N× the patches of one, at the same steps per epoch).
        steps_per_epoch: optimizer steps per epoch per rank (nnU-Net: 250); when set it wins
            over ``samples_per_epoch`` (= ``steps_per_epoch × batch_size × accumulate_grad_batches``).
        fg_prob: foreground oversampling probability (when ``class_ratios`` is not set).
        class_ratios: weights of patch centres drawn uniformly, in WT, in TC and in ET
            (e.g. ``[1, 1, 1, 1]``: a quarter each, so small ET is seen); classes absent from a
            case are skipped. ``None``: the ``fg_prob`` rule.
        augment: training augmentation: ``"nnunet"`` (:class:`~trifuse.transforms.NNUNetAugment`,
            rotation/scaling on a larger crop, mirroring, noise, blur, brightness, contrast,
            low resolution, gamma), ``"basic"`` or ``True``
            (:class:`~trifuse.transforms.RandomAugment`: the method paper's flips, rotation,
            gamma), or ``False``.
        sample_transforms: extra per-sample transforms (e.g. the pixel tier).
        transforms_on_device: run batch-capable ``sample_transforms`` in
            ``on_after_batch_transfer`` on the device instead of in workers.
        skip_invalid: train without the cases preprocessing found invalid (else refuse).
        limit_val_cases: use at most this many validation cases (quick runs).
        seed: base seed of patch sampling and augmentation.
    """

    def __init__(
        self,
        data_dir: str = "data/brats2021",
        cache_dir: Optional[str] = None,
        year: str | int = "auto",
        fold: int = 0,
        n_folds: int = 5,
        split_seed: int = 0,
        patch_size: tuple[int, int, int] = (128, 128, 128),
        batch_size: int = 2,
        num_workers: int = 2,
        samples_per_epoch: int = 250,
        steps_per_epoch: Optional[int] = None,
        fg_prob: float = 0.5,
        class_ratios: Optional[list[float]] = None,
        augment: bool | str = True,
        sample_transforms: Optional[list[SampleTransform]] = None,
        transforms_on_device: bool = False,
        skip_invalid: bool = False,
        limit_val_cases: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.year = year
        self.fold = fold
        self.n_folds = n_folds
        self.split_seed = split_seed
        self.patch_size = tuple(patch_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.steps_per_epoch = steps_per_epoch
        #: set by AsyncTeacherDistillation: sees each training batch one step ahead (LookaheadDataLoader)
        self.train_lookahead = None
        self.fg_prob = fg_prob
        self.class_ratios = class_ratios
        if augment not in (True, False, "basic", "nnunet", "none"):
            raise ValueError(f"augment must be 'nnunet', 'basic', true or false, got {augment!r}")
        self.augment = False if augment == "none" else augment
        self.sample_transforms = list(sample_transforms or [])
        self.transforms_on_device = transforms_on_device
        self.skip_invalid = skip_invalid
        self.limit_val_cases = limit_val_cases
        self.seed = seed
        self.manifest: dict | None = None
        #: sample keys the LightningModule reads, set in its ``setup`` (None: run every sample
        #: transform). A transform whose ``provides`` are all outside it is skipped: the
        #: MRI-only student, or the student with cached teacher targets, then no longer
        #: simulates US and CT in the loader workers (about 0.5 s of CPU a 48³ patch here).
        self.needed_keys: Optional[set[str]] = None

    # --- data preparation ------------------------------------------------------------
    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir(self.data_dir)

    def prepare_data(self) -> None:
        """Validate and cache the dataset (resumable: unchanged cases are skipped)."""
        report = preprocess(self.data_dir, self.resolved_cache_dir, year=self.year, n_folds=self.n_folds, seed=self.split_seed)
        if report.written:
            log.info("cached %d case(s) in %s", len(report.written), report.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        self.manifest = read_manifest(self.resolved_cache_dir)
        for t in self.sample_transforms:  # transforms that read dataset files ("auto" paths)
            if hasattr(t, "bind_dataset"):
                t.bind_dataset(self.data_dir, self.resolved_cache_dir)
        invalid = self.manifest.get("invalid", {})
        if invalid and not self.skip_invalid:
            lines = [f"  {cid}: {'; '.join(p)}" for cid, p in sorted(invalid.items())]
            raise RuntimeError(
                f"{len(invalid)} invalid case(s) in {self.data_dir}; fix them or pass --data.skip_invalid=true:\n" + "\n".join(lines)
            )
        splits = self.manifest["folds"]["splits"]
        if not splits:
            self.train_ids, self.val_ids = [], []
        else:
            if not 0 <= self.fold < len(splits):
                raise ValueError(f"fold {self.fold} out of range: the manifest has {len(splits)} folds")
            self.train_ids = splits[self.fold]["train"]
            self.val_ids = splits[self.fold]["val"]
        if self.limit_val_cases:
            self.val_ids = self.val_ids[: self.limit_val_cases]
        self.all_ids = [c["case_id"] for c in self.manifest["cases"]]

    @property
    def year_detected(self) -> int:
        return int(self.manifest["year"]) if self.manifest else None

    # --- transforms ------------------------------------------------------------------
    def _on_device(self, t: SampleTransform) -> bool:
        # case-frame transforms (pixel tier) must run before spatial augmentation: with
        # augmentation on they stay in the workers
        return getattr(t, "supports_batch", False) and not (self.augment and getattr(t, "needs_case_frame", False))

    def _needed(self, t: SampleTransform) -> bool:
        provides = getattr(t, "provides", ())
        return self.needed_keys is None or not provides or any(k in self.needed_keys for k in provides)

    def _worker_transforms(self, every: bool = False) -> list[SampleTransform]:
        """The sample transforms run in the loader workers. ``every``: all of them, whatever
        ``needed_keys`` and ``transforms_on_device`` say (the teacher-target cache reads whole
        cases with each teacher's inputs, whatever the student reads)."""
        if every:
            return list(self.sample_transforms)
        out = [t for t in self.sample_transforms if self._needed(t)]
        if self.transforms_on_device:
            return [t for t in out if not self._on_device(t)]
        return out

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.transforms_on_device and isinstance(batch, dict):
            for t in self.sample_transforms:
                if self._on_device(t) and self._needed(t):
                    batch = t(batch)
        return batch

    def build_augment(self) -> Optional[SampleTransform]:
        """The training augmentation named by ``augment``."""
        if self.augment == "nnunet":
            return NNUNetAugment(patch_size=self.patch_size)
        return RandomAugment() if self.augment else None

    @property
    def target_spacing(self) -> Optional[list[float]]:
        """Median voxel spacing (mm) of the training cases (nnU-Net's target spacing), from the cache."""
        ids = getattr(self, "train_ids", None) or [c["case_id"] for c in (self.manifest or {}).get("cases", [])]
        spacings = []
        for cid in ids:
            try:
                spacings.append([float(v) for v in cache_mod.read_meta(self.resolved_cache_dir, cid)["spacing"]])
            except (OSError, KeyError, ValueError):
                continue
        return [float(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None

    # --- loaders ---------------------------------------------------------------------
    def patches_per_rank(self) -> int:
        """Training patches each rank draws per epoch (see ``samples_per_epoch``/``steps_per_epoch``)."""
        if self.steps_per_epoch:
            accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1) if self.trainer is not None else 1
            return int(self.steps_per_epoch) * int(self.batch_size) * accumulate
        return int(self.samples_per_epoch)

    def train_dataset(self) -> PatchDataset:
        # the dataset holds every rank's patches: Lightning's DistributedSampler gives each
        # rank 1/world_size of them, i.e. patches_per_rank()
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        return PatchDataset(
            self.resolved_cache_dir,
            self.train_ids,
            patch_size=self.patch_size,
            samples_per_epoch=self.patches_per_rank() * world,
            fg_prob=self.fg_prob,
            augment=self.build_augment(),
            class_ratios=self.class_ratios,
            sample_transforms=self._worker_transforms(),
            seed=self.seed,
        )

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool = False, sampler=None, loader_cls=DataLoader, **extra) -> DataLoader:
        return loader_cls(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_lookahead is not None:  # one batch ahead for the distillation callback
            from trifuse.lightning.distill import LookaheadDataLoader

            return self._loader(self.train_dataset(), self.batch_size, loader_cls=LookaheadDataLoader, on_fetch=self.train_lookahead)
        return self._loader(self.train_dataset(), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        ds = CaseDataset(self.resolved_cache_dir, self.val_ids, self._worker_transforms())
        return self._loader(ds, 1, sampler=CaseShardSampler(len(ds)))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        ds = CaseDataset(self.resolved_cache_dir, self.all_ids, self._worker_transforms())
        return self._loader(ds, 1, sampler=CaseShardSampler(len(ds)))


class SyntheticDataModule(BratsDataModule):
    """The built-in synthetic cohort (generated when missing), then exactly like BraTS.

    Args:
        n_cases: cohort size.
        cohort_seed: seed of the cohort (case ``i`` is reproducible on its own).
        layout: BraTS naming and label convention to write (2020, 2021 or 2023).
        size: ``"small"`` (~2 mm, 120×120×78; CPU demos and tests) or ``"full"`` (BraTS grid).
        **kwargs: as :class:`BratsDataModule`.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        n_cases: int = 16,
        cohort_seed: int = 0,
        layout: int = 2021,
        size: str = "small",
        **kwargs,
    ):
        super().__init__(data_dir=data_dir, **kwargs)
        self.n_cases = n_cases
        self.cohort_seed = cohort_seed
        self.layout = layout
        self.size = size

    def prepare_data(self) -> None:
        from trifuse.synth import synthesize_cohort

        synthesize_cohort(self.data_dir, self.n_cases, seed=self.cohort_seed, layout=self.layout, size=self.size)
        super().prepare_data()
