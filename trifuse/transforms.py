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

    ``provides`` names the sample keys a transform writes. A DataModule whose
    ``needed_keys`` is set (the LightningModule sets it in ``setup``) skips the
    transforms that provide only keys nobody reads; ``()`` means "unknown: always run".
    """

    supports_batch = False
    provides: tuple[str, ...] = ()

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


# --- nnU-Net-level augmentation -------------------------------------------------------------------
def affine_matrix(rotate_rad: Sequence[float] | None = None, scale: Sequence[float] | None = None) -> torch.Tensor:
    """The 3×3 matrix (float64) that MONAI's ``Rotate``/``Affine`` use for these angles (rad) and
    scale factors: an output voxel ``o`` reads input voxel ``A (o − c_out) + c_in`` (``c`` the
    centres, ``(n − 1)/2``). Taken from MONAI's ``create_rotate`` so it is the rotation the
    resampling really applies (its axis order included)."""
    from monai.transforms.utils import create_rotate

    rot = torch.as_tensor(create_rotate(3, list(rotate_rad) if rotate_rad is not None else [0.0, 0.0, 0.0]), dtype=torch.float64)[:3, :3]
    return rot @ torch.diag(torch.tensor(list(scale) if scale is not None else [1.0, 1.0, 1.0], dtype=torch.float64))


class NNUNetAugment(SampleTransform):
    """nnU-Net's training augmentation (Isensee et al., Nat. Methods 2021, suppl. "data
    augmentation"), sampled-then-applied and recorded.

    Spatial (one resampling, MONAI ``Affine``): rotation ±``rotate_deg`` per axis
    (p = ``rotate_prob``) and scaling ``scale_range`` (p = ``scale_prob``; MONAI's convention:
    a factor > 1 samples a larger region, so structures look smaller), about the centre of an
    input crop that is larger than the patch: :meth:`input_size` gives the crop that the
    rotated and scaled patch needs, so the patch has no zero-filled corners (the data module
    reads that crop from the cache). The output is the centred ``patch_size`` patch; labels
    are resampled with nearest neighbour (binary and nested stay so), images trilinearly.
    Then mirroring per axis (p = ``flip_prob``).

    Intensity (MRI channels; the z-scored background stays 0 where the operation is
    multiplicative): Gaussian noise (p 0.1, variance U(0, 0.1)), Gaussian blur (p 0.2, per
    channel p 0.5, σ U(0.5, 1) voxels, MONAI ``GaussianSmooth``), brightness ×U(0.75, 1.25)
    (p 0.15), contrast ×U(0.75, 1.25) about the brain mean, clipped to the former range
    (p 0.15), simulated low resolution (p 0.25, per channel p 0.5: nearest down to U(0.5, 1)
    of the size, trilinear back up), gamma U(0.7, 1.5) inside the brain (p 0.3; inverted
    p 0.1). Written here rather than with MONAI/TorchIO random transforms because those draw
    from their own numpy/global generators: our convention is a passed-in
    ``torch.Generator`` with the parameters recorded in ``meta["applied"]`` and replayable
    through :meth:`apply` (TorchIO's ``get_params`` / deterministic-transform split).

    Augmentation runs per sample in the loader workers (so CPU training overlaps it with
    the step); batching it on the device is left to a later change.

    Args:
        patch_size: output patch ``(D, H, W)``; default: the input's size.
        rotate_prob, rotate_deg, scale_prob, scale_range, flip_prob, noise_prob, noise_var,
        blur_prob, blur_sigma, brightness_prob, brightness_range, contrast_prob,
        contrast_range, lowres_prob, lowres_zoom, gamma_prob, gamma_range, gamma_invert_prob:
            probabilities and ranges as above (nnU-Net's defaults).
    """

    def __init__(
        self,
        patch_size: Sequence[int] | None = None,
        rotate_prob: float = 0.2,
        rotate_deg: float = 30.0,
        scale_prob: float = 0.2,
        scale_range: Sequence[float] = (0.7, 1.4),
        flip_prob: float = 0.5,
        noise_prob: float = 0.1,
        noise_var: Sequence[float] = (0.0, 0.1),
        blur_prob: float = 0.2,
        blur_sigma: Sequence[float] = (0.5, 1.0),
        brightness_prob: float = 0.15,
        brightness_range: Sequence[float] = (0.75, 1.25),
        contrast_prob: float = 0.15,
        contrast_range: Sequence[float] = (0.75, 1.25),
        lowres_prob: float = 0.25,
        lowres_zoom: Sequence[float] = (0.5, 1.0),
        gamma_prob: float = 0.3,
        gamma_range: Sequence[float] = (0.7, 1.5),
        gamma_invert_prob: float = 0.1,
    ):
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None
        self.rotate_prob, self.rotate_deg = rotate_prob, rotate_deg
        self.scale_prob, self.scale_range = scale_prob, tuple(scale_range)
        self.flip_prob = flip_prob
        self.noise_prob, self.noise_var = noise_prob, tuple(noise_var)
        self.blur_prob, self.blur_sigma = blur_prob, tuple(blur_sigma)
        self.brightness_prob, self.brightness_range = brightness_prob, tuple(brightness_range)
        self.contrast_prob, self.contrast_range = contrast_prob, tuple(contrast_range)
        self.lowres_prob, self.lowres_zoom = lowres_prob, tuple(lowres_zoom)
        self.gamma_prob, self.gamma_range, self.gamma_invert_prob = gamma_prob, tuple(gamma_range), gamma_invert_prob

    # --- parameters ---------------------------------------------------------------------------
    def sample_params(self, gen: torch.Generator | None, channels: int = len(keys.MODALITIES)) -> dict:
        """Draw every parameter of one application (see the class docstring)."""
        r = lambda: float(torch.rand((), generator=gen))  # noqa: E731
        p: dict = {}
        if r() < self.rotate_prob:
            p["rotate_rad"] = [math.radians(_uniform(gen, -self.rotate_deg, self.rotate_deg)) for _ in range(3)]
        if r() < self.scale_prob:
            s = _uniform(gen, *self.scale_range)
            p["scale"] = [s, s, s]
        p["flip_axes"] = [ax for ax in range(3) if r() < self.flip_prob]
        if r() < self.noise_prob:
            p["noise_std"] = math.sqrt(_uniform(gen, *self.noise_var))
            p["noise_seed"] = int(torch.randint(2**31 - 1, (1,), generator=gen))
        if r() < self.blur_prob:
            p["blur_sigma"] = [(_uniform(gen, *self.blur_sigma) if r() < 0.5 else 0.0) for _ in range(channels)]
        if r() < self.brightness_prob:
            p["brightness"] = _uniform(gen, *self.brightness_range)
        if r() < self.contrast_prob:
            p["contrast"] = _uniform(gen, *self.contrast_range)
        if r() < self.lowres_prob:
            p["lowres_zoom"] = [(_uniform(gen, *self.lowres_zoom) if r() < 0.5 else 1.0) for _ in range(channels)]
        if r() < self.gamma_prob:
            p["gamma"] = _uniform(gen, *self.gamma_range)
            p["gamma_invert"] = r() < self.gamma_invert_prob
        return p

    def _affine(self, p: dict) -> torch.Tensor:
        return affine_matrix(p.get("rotate_rad"), p.get("scale"))

    def input_size(self, patch_size: Sequence[int], p: dict) -> tuple[int, ...]:
        """Crop size (voxels) whose centre region covers the rotated and scaled patch (no corners left empty)."""
        if "rotate_rad" not in p and "scale" not in p:
            return tuple(int(s) for s in patch_size)
        a = self._affine(p).abs()
        half = torch.tensor([(s - 1) / 2 for s in patch_size], dtype=torch.float64)
        extent = a @ half  # the furthest input coordinate along each axis that any output voxel samples
        return tuple(max(int(s), 2 * int(math.ceil(float(e))) + 3) for s, e in zip(patch_size, extent))

    # --- application --------------------------------------------------------------------------
    def apply(self, sample: dict, p: dict) -> dict:
        """Apply parameters ``p`` (from :meth:`sample_params`) deterministically."""
        from monai.data import set_track_meta
        from monai.transforms import Affine, GaussianSmooth

        set_track_meta(False)  # plain tensors: no per-op metadata in the hot path
        images = [k for k in keys.IMAGE_KEYS if k in sample]
        labels = [k for k in keys.LABEL_KEYS if k in sample]
        size = self.patch_size or tuple(sample[keys.MRI].shape[1:])
        spatial = "rotate_rad" in p or "scale" in p
        if spatial or tuple(sample[keys.MRI].shape[1:]) != tuple(size):
            rotate = p.get("rotate_rad", [0.0, 0.0, 0.0])
            scale = p.get("scale", [1.0, 1.0, 1.0])
            for k in images + labels:
                t = sample[k]
                if spatial:
                    mode = "bilinear" if k in images else "nearest"
                    aff = Affine(rotate_params=rotate, scale_params=scale, spatial_size=size, mode=mode, padding_mode="zeros", image_only=True)
                    out = torch.as_tensor(aff(t.to(torch.float32)))
                    sample[k] = out if k in images else out.round().to(t.dtype)
                else:  # centre crop of the larger input
                    sl = [slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(t.shape[1:], size)]
                    sample[k] = t[(slice(None), *sl)]
        if p.get("flip_axes"):
            dims = [1 + a for a in p["flip_axes"]]
            for k in images + labels:
                sample[k] = sample[k].flip(dims)
        mri = sample[keys.MRI].float()
        brain = sample[keys.BRAIN].bool() if keys.BRAIN in sample else (mri != 0).any(0, keepdim=True)
        if "noise_std" in p:
            g = torch.Generator().manual_seed(p["noise_seed"])
            mri = mri + p["noise_std"] * torch.randn(mri.shape, generator=g)
        if "blur_sigma" in p:
            mri = torch.stack([torch.as_tensor(GaussianSmooth(s)(c[None]))[0] if s > 0 else c for c, s in zip(mri, p["blur_sigma"])])
        if "brightness" in p:
            mri = mri * p["brightness"]
        if "contrast" in p:
            chans = []
            for c in mri:
                vals = c[brain[0]] if bool(brain.any()) else c.flatten()
                mean, lo, hi = vals.mean(), vals.min(), vals.max()
                chans.append(torch.where(brain[0], ((c - mean) * p["contrast"] + mean).clamp(lo, hi), c))
            mri = torch.stack(chans)
        if "lowres_zoom" in p:
            shape = mri.shape[1:]
            chans = []
            for c, z in zip(mri, p["lowres_zoom"]):
                if z < 1.0:
                    small = [max(1, int(round(n * z))) for n in shape]
                    lo_c = torch.nn.functional.interpolate(c[None, None], size=small, mode="nearest")
                    c = torch.nn.functional.interpolate(lo_c, size=shape, mode="trilinear", align_corners=False)[0, 0]
                chans.append(c)
            mri = torch.stack(chans)
        if "gamma" in p:
            lo = mri.amin(dim=(1, 2, 3), keepdim=True)
            hi = mri.amax(dim=(1, 2, 3), keepdim=True)
            rng = (hi - lo).clamp_min(1e-6)
            u = ((mri - lo) / rng).clamp(0, 1)
            adj = (1 - (1 - u) ** p["gamma"]) if p.get("gamma_invert") else u ** p["gamma"]
            mri = torch.where(brain, adj * rng + lo, mri)
        sample[keys.MRI] = mri.contiguous()
        for k in images + labels:
            if isinstance(sample[k], torch.Tensor):
                sample[k] = sample[k].contiguous()
        return sample

    def __call__(self, sample: dict, generator: torch.Generator | None = None, params: dict | None = None) -> dict:
        p = params if params is not None else self.sample_params(generator, channels=int(sample[keys.MRI].shape[0]))
        sample = self.apply(sample, p)
        record(sample, "NNUNetAugment", **p)
        return sample
