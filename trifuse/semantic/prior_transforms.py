"""``LoadPriors``: put a case's semantic prior and text embedding into its sample.

The stored prior (``trifuse semantic``; see :mod:`trifuse.semantic.priors`) covers the
cropped case on a grid reduced ``f`` times. A whole-case sample gets it as stored. A
training patch (``meta["patch_box"]``, the patch's box inside the cropped case) gets
the matching sub-box, resampled to the patch grid divided by ``factor`` (or to
``size``), so every patch of a batch has the same prior shape:

* output voxel ``j`` along an axis of a patch of ``p`` voxels (``q`` output voxels)
  sits at patch coordinate ``u = (j + ½)·p/q − ½``; with the zero padding the patch
  loader adds to volumes smaller than a patch (``pad = (p − n)//2`` before), that is
  case coordinate ``x = box_start − pad + u``, read from the prior by trilinear
  sampling (``grid_sample``, ``align_corners=False``: ``g = 2(x + ½)/N − 1`` for a case
  axis of ``N`` voxels) and set to 0 in the padding, like the image;
* every spatial step recorded in ``meta["applied"]`` is followed as the label and image
  followed it: :func:`trifuse.geometry.patch_geometry` (the map the teacher-target cache
  uses) composes the crop and its padding, :class:`~trifuse.transforms.RandomAugment`'s
  flips and rotation and :class:`~trifuse.transforms.NNUNetAugment`'s rotation and scaling
  of its larger crop, centre crop and flips into "patch voxel ``o`` read case voxel
  ``M o + t``"; output cell ``j`` (centre at patch voxel ``s j + (s − 1)/2``, ``s = p/q``)
  reads the prior at that case voxel (:func:`~trifuse.geometry.regrid`), trilinearly, and is 0
  where it lies outside the patch box (the image is 0 there). A crop with flips only (no
  rotation or scaling) takes the exact path above and flips its cells, bit-identical to
  earlier versions.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.semantic.priors import load_prior, prior_path
from trifuse.transforms import SampleTransform, record


def crop_prior(prior: torch.Tensor, case_shape: Sequence[int], box: Sequence[Sequence[int]],
               patch_shape: Sequence[int], out_shape: Sequence[int]) -> torch.Tensor:
    """The part of a case prior under a (padded) patch, on an ``out_shape`` grid.

    Args:
        prior: (C, d, h, w) prior over the whole cropped case.
        case_shape: (D, H, W) voxels of the cropped case.
        box: patch box ``[[d0, d1], [h0, h1], [w0, w1]]`` inside the cropped case.
        patch_shape: (p_D, p_H, p_W) of the patch after padding (≥ the box size).
        out_shape: output grid.

    Returns:
        (C, *out_shape) float32; 0 where the patch is padding.
    """
    coords, inside = [], []
    for (a, b), n, p, q in zip(box, case_shape, patch_shape, out_shape):
        pad = max(0, int(p) - (int(b) - int(a))) // 2
        u = (torch.arange(int(q), dtype=torch.float32) + 0.5) * float(p) / float(q) - 0.5
        x = float(a) - pad + u
        coords.append(2.0 * (x + 0.5) / float(n) - 1.0)
        inside.append((x > float(a) - 0.5 - 1e-6) & (x < float(b) - 0.5 + 1e-6))
    gd, gh, gw = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack([gw, gh, gd], dim=-1)[None]  # grid_sample wants (x=W, y=H, z=D)
    out = F.grid_sample(prior[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return out * mask


def patch_prior(prior: torch.Tensor, case_shape: Sequence[int], meta: dict, patch_shape: Sequence[int],
                out_shape: Sequence[int]) -> torch.Tensor:
    """The case prior as the patch of ``meta`` sees it, on an ``out_shape`` grid.

    Args:
        prior: (C, d, h, w) prior over the whole cropped case.
        case_shape: (D, H, W) voxels of the cropped case.
        meta: the patch's meta (``patch_box`` and the ``applied`` steps).
        patch_shape: (p_D, p_H, p_W) of the (augmented) patch.
        out_shape: output grid.

    Returns:
        (C, *out_shape) float32: output cell ``j`` is the prior at case voxel
        ``M (s j + (s − 1)/2) + t`` (:func:`~trifuse.geometry.patch_geometry`, ``s = p/q``);
        0 outside the patch box.
    """
    from trifuse.geometry import patch_geometry, regrid, sample_affine

    box = [[int(a), int(b)] for a, b in meta["patch_box"]]
    geo = patch_geometry(meta, patch_shape)
    m, t = geo.matrix, geo.offset
    cell_out = np.asarray(patch_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    flips = [1 + i for i in range(3) if m[i, i] < 0]
    start = [t[i] - (int(p) - 1 if m[i, i] < 0 else 0) for i, p in enumerate(patch_shape)]
    if np.allclose(np.abs(m), np.eye(3)) and np.allclose(start, [a - max(0, int(p) - (b - a)) // 2 for (a, b), p in zip(box, patch_shape)]):
        # a crop with flips only: crop_prior's own arithmetic (as before), cells flipped exactly
        out = crop_prior(prior, case_shape, box, patch_shape, out_shape)
        return out.flip(flips) if flips else out
    cell_in = np.asarray(case_shape, dtype=np.float64) / np.asarray(prior.shape[1:], dtype=np.float64)
    m_c, t_c = regrid(m, t, cell_out, cell_in)  # output cell -> prior cell
    out = sample_affine(prior.float(), m_c, t_c, out_shape, padding_mode="border")
    m_x, t_x = regrid(m, t, cell_out, 1.0)  # output cell -> case voxel
    j = np.stack(np.meshgrid(*[np.arange(int(q), dtype=np.float64) for q in out_shape], indexing="ij")).reshape(3, -1)
    x = m_x @ j + t_x[:, None]
    lo = np.asarray([a for a, _ in box], dtype=np.float64)[:, None] - 0.5 - 1e-6
    hi = np.asarray([b for _, b in box], dtype=np.float64)[:, None] - 0.5 + 1e-6
    inside = torch.from_numpy(((x > lo) & (x < hi)).all(0).reshape(tuple(int(q) for q in out_shape)))
    return out * inside


class LoadPriors(SampleTransform):
    """Fill ``sample[PRIOR]`` (float16) and ``sample[TEXT]`` (float32) from ``trifuse semantic``'s files.

    Args:
        priors_dir: folder of ``<case_id>.npz`` files, or ``"auto"``: the dataset's
            default ``<data>/../priors/<name>``, bound by the DataModule in ``setup``
            (:meth:`bind_dataset`).
        factor: patch prior grid = patch grid / ``factor`` (rounded up).
        size: fixed patch prior grid ``(d, h, w)`` instead (overrides ``factor``).
        load_text: also set ``sample[TEXT]``.
        max_cached: priors kept in memory per worker (they are small).

    Raises:
        FileNotFoundError: no prior for the sample's case (the message names the case
            and the folder).
    """

    provides = (keys.PRIOR, keys.TEXT)

    def __init__(self, priors_dir: str | Path = "auto", factor: int = 4, size: Sequence[int] | None = None,
                 load_text: bool = True, max_cached: int = 64):
        self.auto = str(priors_dir) == "auto"
        self.priors_dir: Path | None = None if self.auto else Path(priors_dir)
        self.factor = int(factor)
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.load_text = bool(load_text)
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def bind_dataset(self, data_dir: str | Path, cache_dir: str | Path | None = None) -> None:
        """With ``priors_dir="auto"``: use ``trifuse semantic``'s default folder for ``data_dir``."""
        if self.auto:
            from trifuse.semantic.clip_data import default_priors_dir

            self.priors_dir = default_priors_dir(data_dir)
            self._cache.clear()

    def _load(self, case_id: str) -> dict[str, Any]:
        if self.priors_dir is None:
            raise RuntimeError('LoadPriors(priors_dir="auto") is not bound to a dataset: give priors_dir, or use it '
                               "inside a BratsDataModule/SyntheticDataModule (which binds it in setup)")
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        path = prior_path(self.priors_dir, case_id)
        if not path.exists():
            raise FileNotFoundError(f"no semantic prior for case {case_id} in {self.priors_dir} "
                                    f"(expected {path.name}; run `trifuse semantic --data DIR --out {self.priors_dir}`)")
        data = load_prior(path)
        self._cache[case_id] = data
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return data

    def out_shape(self, patch_shape: Sequence[int]) -> tuple[int, int, int]:
        if self.size is not None:
            return self.size  # type: ignore[return-value]
        return tuple(int(np.ceil(int(p) / self.factor)) for p in patch_shape)  # type: ignore[return-value]

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        case_id = str(sample[keys.CASE_ID])
        data = self._load(case_id)
        meta = sample.get(keys.META) or {}
        prior = torch.from_numpy(np.array(data["prior"], dtype=np.float16, copy=True))
        box = meta.get("patch_box")
        params: dict[str, Any] = {"priors_dir": str(self.priors_dir)}
        if box is not None:
            case_shape = data["meta"].get("cropped_shape") or meta.get("cropped_shape")
            patch_shape = tuple(sample[keys.MRI].shape[-3:])
            out = self.out_shape(patch_shape)
            prior = patch_prior(prior, case_shape, meta, patch_shape, out)
            prior = prior.clamp(0, 1).to(torch.float16)
            params.update(patch_box=[list(b) for b in box], size=list(out))
        else:
            stored = data["meta"].get("cropped_shape")
            have = list(sample[keys.MRI].shape[-3:]) if keys.MRI in sample else stored
            if stored is not None and list(stored) != list(have):
                raise ValueError(f"semantic prior of case {case_id} in {self.priors_dir} was made for a case of "
                                 f"{stored} voxels, the sample has {have} (re-run `trifuse semantic`)")
            params["size"] = list(prior.shape[1:])
        sample[keys.PRIOR] = prior.contiguous()
        if self.load_text:
            sample[keys.TEXT] = torch.from_numpy(np.array(data["text"], dtype=np.float32, copy=True))
        record(sample, "LoadPriors", **params)
        return sample
