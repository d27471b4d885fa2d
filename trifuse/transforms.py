"""Sample transforms: small callables on sample dicts (TorchIO style).

Each random transform first *samples* its parameters from a passed-in
``torch.Generator`` and then applies a deterministic operation, recording what it
applied in ``sample["meta"]["applied"]`` so runs can be replayed and inverted.
Deterministic work is delegated to MONAI array transforms where they exist.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from trifuse import keys


class SampleTransform:
    """Base class: ``__call__(sample, generator=None) -> sample``.

    Subclasses used on batches (``(B, C, D, H, W)`` tensors, ``meta`` a list) set
    ``supports_batch = True``; the DataModules apply those on the device in
    ``on_after_batch_transfer`` when configured to.
    """

    supports_batch = False

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:  # pragma: no cover
        raise NotImplementedError


def record(sample: dict, name: str, **params) -> None:
    """Append ``{"name": name, **params}`` to the sample's (or every batch item's) applied list."""
    meta = sample.get(keys.META)
    if meta is None:
        meta = sample[keys.META] = {}
    metas = meta if isinstance(meta, list) else [meta]
    for m in metas:
        m.setdefault("applied", []).append({"name": name, **params})


def _uniform(gen, lo, hi) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=gen))


class RandomAugment(SampleTransform):
    """Spatial and intensity augmentation of a training patch.

    Defaults follow the method's paper: flips p = 0.5 per axis, rotation ±15° p = 0.3,
    gamma 0.8–1.2 p = 0.3; plus intensity scale/shift p = 0.3.

    Spatial parts go through MONAI's deterministic ``Flip``/``Rotate`` (bilinear for
    images, nearest for labels); gamma is applied inside the brain only because the
    images are z-scored (negative values, zero background).
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        rotate_prob: float = 0.3,
        rotate_deg: float = 15.0,
        gamma_prob: float = 0.3,
        gamma_range: Sequence[float] = (0.8, 1.2),
        intensity_prob: float = 0.3,
        scale_range: float = 0.1,
        shift_range: float = 0.1,
    ):
        self.flip_prob = flip_prob
        self.rotate_prob = rotate_prob
        self.rotate_deg = rotate_deg
        self.gamma_prob = gamma_prob
        self.gamma_range = tuple(gamma_range)
        self.intensity_prob = intensity_prob
        self.scale_range = scale_range
        self.shift_range = shift_range

    def sample_params(self, gen: torch.Generator | None) -> dict:
        p = {"flip_axes": [ax for ax in range(3) if torch.rand((), generator=gen) < self.flip_prob]}
        if torch.rand((), generator=gen) < self.rotate_prob:
            p["rotate_rad"] = [math.radians(_uniform(gen, -self.rotate_deg, self.rotate_deg)) for _ in range(3)]
        if torch.rand((), generator=gen) < self.gamma_prob:
            p["gamma"] = _uniform(gen, *self.gamma_range)
        if torch.rand((), generator=gen) < self.intensity_prob:
            p["scale"] = [1 + _uniform(gen, -self.scale_range, self.scale_range) for _ in range(4)]
            p["shift"] = [_uniform(gen, -self.shift_range, self.shift_range) for _ in range(4)]
        return p

    def apply(self, sample: dict, p: dict) -> dict:
        from monai.data import set_track_meta
        from monai.transforms import Flip, Rotate

        set_track_meta(False)  # plain tensors: no per-op metadata in the hot path
        images = [k for k in keys.IMAGE_KEYS if k in sample]
        labels = [k for k in keys.LABEL_KEYS if k in sample]
        if p["flip_axes"]:
            flip = Flip(spatial_axis=p["flip_axes"])
            for k in images + labels:
                sample[k] = flip(sample[k])
        if "rotate_rad" in p:
            for k in images:
                sample[k] = Rotate(p["rotate_rad"], keep_size=True, mode="bilinear", padding_mode="zeros")(sample[k].float())
            for k in labels:
                dtype = sample[k].dtype
                rot = Rotate(p["rotate_rad"], keep_size=True, mode="nearest", padding_mode="zeros")
                sample[k] = rot(sample[k].to(torch.float32)).round().to(dtype)
        mri = sample[keys.MRI]
        brain = sample[keys.BRAIN].bool() if keys.BRAIN in sample else (mri != 0).any(0, keepdim=True)
        if "gamma" in p:
            lo = mri.amin(dim=(1, 2, 3), keepdim=True)
            hi = mri.amax(dim=(1, 2, 3), keepdim=True)
            rng = (hi - lo).clamp_min(1e-6)
            adj = ((mri - lo) / rng).clamp(0, 1) ** p["gamma"] * rng + lo
            mri = torch.where(brain, adj, mri)
        if "scale" in p:
            s = torch.tensor(p["scale"], dtype=mri.dtype)[:, None, None, None]
            b = torch.tensor(p["shift"], dtype=mri.dtype)[:, None, None, None]
            mri = torch.where(brain, mri * s + b, mri)
        sample[keys.MRI] = mri.contiguous()
        for k in images + labels:
            if isinstance(sample[k], torch.Tensor):
                sample[k] = sample[k].contiguous()
        return sample

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        p = self.sample_params(generator)
        sample = self.apply(sample, p)
        record(sample, "RandomAugment", **p)
        return sample
