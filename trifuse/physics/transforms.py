"""Pixel-tier sample transforms: :class:`SimulateUltrasound` and :class:`SynthesizeCT`.

Both are small callables on a sample dict (``keys.MRI`` (4, D, H, W)) or on a batch
(``keys.MRI`` (B, 4, D, H, W), ``keys.META`` a list of dicts), applied after
cropping, in loader workers or on the device in ``on_after_batch_transfer``. They
follow the TorchIO pattern: random parameters (speckle seed, probe jitter, CT
sample seed) are drawn first, from a passed ``torch.Generator`` or a fixed seed,
then applied deterministically and recorded in ``sample["meta"]["applied"]`` so a
result can be replayed.

Per-item seeds make a batch reproduce per-case results exactly: with a fixed
``seed`` each item's seed is derived from ``(seed, case_id)``; with a generator one
seed per item is drawn in batch order.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from trifuse.transforms import SampleTransform
from trifuse import keys
from trifuse.physics.ct import CTMixtureModel, synthesize_ct
from trifuse.physics.tissues import HeadConfig
from trifuse.physics.ultrasound import ProbeConfig, perturb_probe, place_probe, simulate_ultrasound

__all__ = ["SimulateUltrasound", "SynthesizeCT"]

_MAX_SEED = 2**31 - 1


def _split(data: dict) -> tuple[bool, int, list[dict], list[str | None]]:
    """(batched, B, per-item meta dicts (copied), per-item case ids)."""
    mri = data[keys.MRI]
    if mri.dim() not in (4, 5):
        raise ValueError(f"{keys.MRI} must be (4, D, H, W) or (B, 4, D, H, W), got shape {tuple(mri.shape)}")
    batched = mri.dim() == 5
    b = mri.shape[0] if batched else 1
    meta = data.get(keys.META)
    if batched:
        if isinstance(meta, (list, tuple)):
            metas = [dict(m) for m in meta]
        elif isinstance(meta, dict):  # default_collate style: dict of per-key batches
            metas = [{k: _index(v, i) for k, v in meta.items()} for i in range(b)]
        else:
            metas = [{} for _ in range(b)]
        ids = data.get(keys.CASE_ID)
        ids = list(ids) if isinstance(ids, (list, tuple)) else [None] * b
    else:
        metas = [dict(meta) if isinstance(meta, dict) else {}]
        ids = [data.get(keys.CASE_ID)]
    for m in metas:
        m["applied"] = list(m.get("applied", []))
    if len(metas) != b:
        raise ValueError(f"batch of {b} has {len(metas)} meta dicts")
    return batched, b, metas, ids


def _index(v: Any, i: int) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return v[i]
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor) and v[0].dim() == 1:
        return [t[i] for t in v]  # collated list of per-item scalars (e.g. spacing)
    if isinstance(v, (list, tuple)):
        return v[i] if len(v) > i else v
    return v


def _spacing(metas: list[dict]) -> torch.Tensor:
    sp = []
    for m in metas:
        s = m.get("spacing", (1.0, 1.0, 1.0))
        sp.append([float(x) for x in (s.tolist() if isinstance(s, torch.Tensor) else s)])
    return torch.tensor(sp, dtype=torch.float32)


def _item_seeds(b: int, ids: list[str | None], seed: int | None, generator: torch.Generator | None) -> list[int]:
    if generator is not None:
        return [int(torch.randint(0, _MAX_SEED, (1,), generator=generator).item()) for _ in range(b)]
    base = 0 if seed is None else int(seed)
    # stable per-case seed: the same case gets the same speckle alone or in any batch
    return [(base * 1_000_003 + (zlib.crc32(str(cid).encode()) if cid is not None else 0)) % _MAX_SEED for cid in ids]


def _finish(data: dict, batched: bool, metas: list[dict], key: str, value: torch.Tensor) -> dict:
    out = dict(data)
    out[key] = value if batched else value[0]
    out[keys.META] = metas if batched else metas[0]
    return out


class SimulateUltrasound(SampleTransform):
    """Sample transform writing ``keys.US`` (float32 in [0, 1]).

    Args:
        config: probe settings (:class:`trifuse.physics.ultrasound.ProbeConfig`).
        mapper: θ_mapper module (default table :class:`ImpedanceMapper`).
        head: skull/scalp layers outside the craniotomy.
        seed: fixed base seed (per-case seeds derived from it and the case id).
        generator: draw per-item seeds from this generator instead (wins over seed;
            can also be passed per call).
        jitter_deg: maximum random tilt of the beam axis (0 = fixed default probe).
        jitter_mm: maximum random face shift along the lateral/elevation axes.
        differentiable: keep the autograd graph (fitting θ_mapper); default no_grad.
    """

    supports_batch = True  # also takes (B, C, D, H, W) batches: can run on the device

    def __init__(
        self,
        config: ProbeConfig = ProbeConfig(),
        mapper: nn.Module | None = None,
        head: HeadConfig = HeadConfig(),
        seed: int | None = None,
        generator: torch.Generator | None = None,
        jitter_deg: float = 0.0,
        jitter_mm: float = 0.0,
        differentiable: bool = False,
    ):
        self.config = config
        self.mapper = mapper
        self.head = head
        self.seed = seed
        self.generator = generator
        self.jitter_deg = float(jitter_deg)
        self.jitter_mm = float(jitter_mm)
        self.differentiable = differentiable

    def __call__(self, data: dict, generator: torch.Generator | None = None) -> dict:
        batched, b, metas, ids = _split(data)
        gen = generator or self.generator
        seeds = _item_seeds(b, ids, self.seed, gen)
        mri = torch.as_tensor(data[keys.MRI])
        brain = torch.as_tensor(data[keys.BRAIN])
        if not batched:
            mri, brain = mri[None], brain[None]
        dev = mri.device
        sp = _spacing(metas).to(dev)
        mapper = self.mapper
        if mapper is not None:
            mapper = mapper.to(dev)
        ctx = torch.enable_grad() if self.differentiable else torch.no_grad()
        with ctx:
            geom = place_probe(mri.float(), brain.bool(), sp, self.config)
            jit = None
            if self.jitter_deg > 0 or self.jitter_mm > 0:
                # per-item draws from the item's own seed: batch == per case
                draws = []
                for s in seeds:
                    g = torch.Generator().manual_seed(s + 1)
                    draws.append(torch.rand(4, generator=g))
                u = torch.stack(draws).to(dev)
                jit = (u[:, 0] * self.jitter_deg, u[:, 1] * 2 * torch.pi, (u[:, 2:] * 2 - 1) * self.jitter_mm)
                geom = perturb_probe(geom, *jit)
            us = simulate_ultrasound(mri.float(), brain.bool(), sp, self.config, mapper, seeds, self.head, geometry=geom)
        us = us.float() if self.differentiable else us.detach().float()
        nl, ne, nd = self.config.resolve(sp[0].tolist())
        for i, m in enumerate(metas):
            rec = {"name": "SimulateUltrasound", "seed": seeds[i], "geometry": self.config.geometry,
                   "frequency_mhz": self.config.frequency_mhz, "depth_mm": self.config.depth_mm,
                   "width_mm": self.config.width_mm, "elevation_mm": self.config.elevation_mm,
                   "angle_deg": self.config.angle_deg, "elevation_angle_deg": self.config.elevation_angle_deg,
                   "n_rays": [nl, ne], "samples_per_ray": nd,
                   "mapper": type(self.mapper).__name__ if self.mapper is not None else "ImpedanceMapper"}
            rec.update(geom.item(i))
            if jit is not None:
                rec.update({"tilt_deg": float(jit[0][i]), "tilt_azimuth_rad": float(jit[1][i]),
                            "shift_mm": [float(v) for v in jit[2][i]]})
            m["applied"].append(rec)
        return _finish(data, batched, metas, keys.US, us)

    def __repr__(self) -> str:
        return f"SimulateUltrasound(config={self.config}, seed={self.seed}, jitter_deg={self.jitter_deg}, jitter_mm={self.jitter_mm})"


class SynthesizeCT(SampleTransform):
    """Sample transform writing ``keys.CT`` (float32, HU/1000 clipped to [-1, 1]).

    Args:
        model_or_path: :class:`CTMixtureModel`, a path to one saved with
            :meth:`CTMixtureModel.save`, or ``None`` for the unfitted tissue-table
            default. A path is loaded lazily, once per process (worker-safe).
        mode: ``"expectation"`` (deterministic) or ``"sample"``.
        head: skull/scalp layer thicknesses.
        seed: fixed base seed for ``"sample"`` mode (per-case seeds as for the US).
        generator: draw per-item seeds from this generator instead.
    """

    supports_batch = True  # also takes (B, C, D, H, W) batches: can run on the device

    def __init__(
        self,
        model_or_path: CTMixtureModel | str | os.PathLike | None = None,
        mode: str = "expectation",
        head: HeadConfig = HeadConfig(),
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if mode not in ("expectation", "sample"):
            raise ValueError(f"mode must be 'expectation' or 'sample', got {mode!r}")
        self.auto = isinstance(model_or_path, str) and model_or_path == "auto"
        if self.auto:
            model_or_path = None  # resolved by bind_dataset (the DataModule calls it in setup)
        self._path = None if model_or_path is None or isinstance(model_or_path, CTMixtureModel) else Path(model_or_path)
        self._model = model_or_path if isinstance(model_or_path, CTMixtureModel) else None
        self.mode = mode
        self.head = head
        self.seed = seed
        self.generator = generator

    def bind_dataset(self, data_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
        """With ``model_or_path="auto"``: use the dataset's fitted mixture (``trifuse physics
        fit-ct`` writes ``<cache>/ct_mixture.json``), else the unfitted tissue-table default."""
        if not self.auto:
            return
        p = Path(cache_dir) / "ct_mixture.json"
        if p.exists():
            self._path, self._model = p, None
        else:
            import logging

            logging.getLogger(__name__).warning(
                "SynthesizeCT: no fitted CT mixture at %s (run `trifuse physics fit-ct --data %s`); using the tissue-table default", p, data_dir
            )

    @property
    def model(self) -> CTMixtureModel:
        if self._model is None:
            self._model = CTMixtureModel.load(self._path) if self._path is not None else CTMixtureModel.from_tissue_model()
        return self._model

    def __call__(self, data: dict, generator: torch.Generator | None = None) -> dict:
        batched, b, metas, ids = _split(data)
        gen = generator or self.generator
        mri = torch.as_tensor(data[keys.MRI])
        brain = torch.as_tensor(data[keys.BRAIN])
        if not batched:
            mri, brain = mri[None], brain[None]
        sp = _spacing(metas)
        seeds = _item_seeds(b, ids, self.seed, gen) if self.mode == "sample" else [None] * b
        with torch.no_grad():
            if self.mode == "expectation" and torch.allclose(sp, sp[:1].expand_as(sp)):
                ct = synthesize_ct(mri.float(), brain.bool(), self.model, "expectation", spacing=sp[0].tolist(), head=self.head)
            else:  # per item: own seed / own spacing (a loop over batch items only)
                outs = []
                for i in range(b):
                    g = None
                    if seeds[i] is not None:
                        g = torch.Generator(device=mri.device).manual_seed(seeds[i])
                    outs.append(synthesize_ct(mri[i : i + 1].float(), brain[i : i + 1].bool(), self.model, self.mode, g,
                                              spacing=sp[i].tolist(), head=self.head))
                ct = torch.cat(outs)
        source = str(self._path) if self._path is not None else self.model.meta.get("form", "tissue_table")
        for i, m in enumerate(metas):
            rec = {"name": "SynthesizeCT", "mode": self.mode, "model": source,
                   "n_components": self.model.n_components, "head": asdict(self.head)}
            if seeds[i] is not None:
                rec["seed"] = seeds[i]
            m["applied"].append(rec)
        return _finish(data, batched, metas, keys.CT, ct.float())

    def __repr__(self) -> str:
        return f"SynthesizeCT(model={self._path or 'in-memory'}, mode={self.mode!r})"
