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

**Case frame.** A training patch carries ``meta["case_frame"]`` (set by the loader,
:data:`CASE_FRAME`) and ``meta["patch_box"]``: the probe is then placed, and the rays
are cast, in the frame of the whole cached case (its brain mask and crop), and the
patch receives its crop of the whole-case simulation for the same probe and seed
(:func:`trifuse.physics.ultrasound.simulate_fov`); the CT's skull shell likewise comes
from the whole case's brain mask. The teacher sees in training what it sees on whole
cases in validation and prediction, whether or not the patch holds the brain surface.
A sample without a case frame is its own frame (whole cases, or bare tensors).
"""
from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from trifuse.transforms import SampleTransform
from trifuse import keys
from trifuse.physics.acoustic import ImpedanceMapper
from trifuse.physics.ct import CTMixtureModel, encode_ct, outside_hu_map, synthesize_ct_hu
from trifuse.physics.tissues import TISSUES, HeadConfig, coarse_factors
from trifuse.physics.ultrasound import ProbeConfig, ProbeGeometry, perturb_probe, place_probe, simulate_fov, simulate_ultrasound

__all__ = ["SimulateUltrasound", "SynthesizeCT", "CASE_FRAME", "CaseFrame", "case_frame"]

_MAX_SEED = 2**31 - 1

#: ``sample["meta"]`` key of a patch's whole-case frame: ``{"cache_dir": str}`` (the case is
#: ``meta["case_id"]`` in that cache, the patch ``meta["patch_box"]`` of its cropped volume), or
#: in memory ``{"mri": (4, D, H, W), "brain": (1, D, H, W)}`` (tests, notebooks).
CASE_FRAME = "case_frame"


@dataclass
class CaseFrame:
    """The whole case a patch was cut from.

    Attributes:
        mri: (4, D, H, W) array-like (a read-only ``np.memmap`` of the cache, or a tensor),
            read by crop only.
        brain: (1, 1, D, H, W) bool brain mask of the whole case.
        box: the patch ``[[d0, d1], [h0, h1], [w0, w1]]`` (half-open) in the case.
        pad: front zero-padding of the patch per axis (a case smaller than the patch).
        key: identity of the case (caches of per-case work).
    """

    mri: Any
    brain: torch.Tensor
    box: list[list[int]]
    pad: list[int]
    key: tuple

    def read(self, sl: tuple) -> torch.Tensor:
        """(1, 4, d, h, w) float32 MRI of the crop ``sl`` (three slices) of the case."""
        x = self.mri[(slice(None),) + tuple(sl)]
        x = torch.from_numpy(np.array(x, copy=True)) if not isinstance(x, torch.Tensor) else x
        return x.to(torch.float32)[None]  # float16 -> float32 in torch (vectorised)

    def paste(self, dst: torch.Tensor, src: torch.Tensor, src_box: list[list[int]]) -> torch.Tensor:
        """Copy the part of ``src`` (1, C, crop of the case at ``src_box``) that falls in the patch into ``dst`` (1, C, patch)."""
        lo = [max(a, p) for (a, _), (p, _) in zip(src_box, self.box)]
        hi = [min(b, q) for (_, b), (_, q) in zip(src_box, self.box)]
        if any(l >= h for l, h in zip(lo, hi)):
            return dst
        d = tuple(slice(l - p + o, h - p + o) for l, h, (p, _), o in zip(lo, hi, self.box, self.pad))
        sidx = tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, src_box))
        dst[(slice(None), slice(None)) + d] = src[(slice(None), slice(None)) + sidx].to(dst)
        return dst


_CASES: "OrderedDict[tuple, tuple]" = OrderedDict()  # per process: the last few opened cached cases
_MAX_OPEN_CASES = 8


def _open_cached(cache_dir: str, case_id: str) -> tuple[Any, torch.Tensor]:
    key = (str(cache_dir), str(case_id))
    if key not in _CASES:
        from trifuse.io import cache as cache_mod

        arrays = cache_mod.open_arrays(cache_dir, case_id)
        brain = torch.from_numpy(np.array(arrays["brain"], copy=True)).bool()[None, None]
        _CASES[key] = (arrays["mri"], brain)
        while len(_CASES) > _MAX_OPEN_CASES:
            _CASES.popitem(last=False)
    _CASES.move_to_end(key)
    return _CASES[key]


def case_frame(meta: dict, case_id: str | None, patch_shape) -> CaseFrame | None:
    """The :class:`CaseFrame` of a patch from its meta dict, or ``None`` (the sample is its own frame).

    Args:
        meta: the sample's meta (``CASE_FRAME`` and ``patch_box`` entries).
        case_id: the sample's case id (names the case in the cache).
        patch_shape: (D, H, W) of the patch tensors (after any padding).
    """
    fr = meta.get(CASE_FRAME) if isinstance(meta, dict) else None
    box = meta.get("patch_box") if isinstance(meta, dict) else None
    if not fr or box is None:
        return None
    if "cache_dir" in fr:
        mri, brain = _open_cached(fr["cache_dir"], case_id)
        key = (str(fr["cache_dir"]), str(case_id))
    else:
        mri = fr["mri"]
        brain = torch.as_tensor(fr["brain"]).bool()
        brain = brain[None] if brain.dim() == 4 else brain.view(1, 1, *brain.shape[-3:])
        key = ("memory", id(fr["brain"]), str(case_id))
    box = [[int(a), int(b)] for a, b in box]
    pad = [max(0, (int(n) - (b - a)) // 2) for (a, b), n in zip(box, patch_shape)]
    return CaseFrame(mri, brain, box, pad, key)


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
        mapper: θ_mapper module (default table :class:`ImpedanceMapper`), or a path to a
            fitted mapper file (``trifuse physics fit-us --paired`` writes one,
            :func:`trifuse.physics.paired.load_us_mapper`), or ``"auto"``: the dataset's
            ``<cache>/us_mapper.json`` if it exists, else the table. Paths load lazily.
        head: skull/scalp layers outside the craniotomy.
        seed: fixed base seed (per-case seeds derived from it and the case id).
        generator: draw per-item seeds from this generator instead (wins over seed;
            can also be passed per call).
        jitter_deg: maximum random tilt of the beam axis (0 = fixed default probe).
        jitter_mm: maximum random face shift along the lateral/elevation axes.
        differentiable: keep the autograd graph (fitting θ_mapper); default no_grad.
    """

    supports_batch = True  # also takes (B, C, D, H, W) batches: can run on the device
    provides = (keys.US,)

    def __init__(
        self,
        config: ProbeConfig = ProbeConfig(),
        mapper: nn.Module | str | os.PathLike | None = None,
        head: HeadConfig = HeadConfig(),
        seed: int | None = None,
        generator: torch.Generator | None = None,
        jitter_deg: float = 0.0,
        jitter_mm: float = 0.0,
        differentiable: bool = False,
    ):
        self.config = config
        self.auto = isinstance(mapper, str) and mapper == "auto"
        self._mapper_path = Path(mapper) if isinstance(mapper, (str, os.PathLike)) and not self.auto else None
        if isinstance(mapper, (str, os.PathLike)):
            mapper = None
        self.mapper = mapper
        self.head = head
        self.seed = seed
        self.generator = generator
        self.jitter_deg = float(jitter_deg)
        self.jitter_mm = float(jitter_mm)
        self.differentiable = differentiable

    #: uses the whole-case frame of a patch: the loader runs it before spatial augmentation
    #: (its output is then augmented with the MRI)
    needs_case_frame = True

    def bind_dataset(self, data_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
        """With ``mapper="auto"``: use ``<cache>/us_mapper.json`` (``trifuse physics fit-us --paired --out``) if present."""
        if self.auto and self.mapper is None:
            p = Path(cache_dir) / "us_mapper.json"
            if p.exists():
                self._mapper_path = p

    def _resolved_mapper(self) -> nn.Module | None:
        if self.mapper is None and self._mapper_path is not None:
            from trifuse.physics.paired import load_us_mapper

            self.mapper = load_us_mapper(self._mapper_path)
        return self.mapper

    def _case_probe(self, frame: CaseFrame, sp: torch.Tensor) -> ProbeGeometry:
        """Default probe of a whole case, once per case and process (placement is deterministic)."""
        if not hasattr(self, "_probes"):
            self._probes: dict = {}
        key = frame.key + (tuple(sp[0].tolist()),)
        if key not in self._probes:
            full = frame.read((slice(None),) * 3)
            self._probes[key] = place_probe(full, frame.brain, sp.cpu(), self.config)
            if len(self._probes) > 4096:
                self._probes.pop(next(iter(self._probes)))
        return self._probes[key]

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
        frames = [case_frame(m, ids[i], mri.shape[2:]) for i, m in enumerate(metas)]
        mapper = self._resolved_mapper()
        if mapper is None and any(frames):
            if getattr(self, "_table_mapper", None) is None:
                self._table_mapper = ImpedanceMapper()
            mapper = self._table_mapper
        if mapper is not None:
            mapper = mapper.to(dev)
        ctx = torch.enable_grad() if self.differentiable else torch.no_grad()
        with ctx:
            if not any(frames):
                geom = place_probe(mri.float(), brain.bool(), sp, self.config)
            else:  # per item: whole-case probes (cached per case) or the sample's own
                parts = [self._case_probe(f, sp[i : i + 1]) if f is not None
                         else place_probe(mri[i : i + 1].float(), brain[i : i + 1].bool(), sp[i : i + 1], self.config)
                         for i, f in enumerate(frames)]
                geom = ProbeGeometry(*(torch.cat([getattr(p, n).to(dev) for p in parts]) for n in ("origin", "axes", "target")))
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
            if not any(frames):
                us = simulate_ultrasound(mri.float(), brain.bool(), sp, self.config, mapper, seeds, self.head, geometry=geom)
            else:
                outs = []
                for i, f in enumerate(frames):
                    if f is None:
                        outs.append(simulate_ultrasound(mri[i : i + 1].float(), brain[i : i + 1].bool(), sp[i : i + 1], self.config,
                                                        mapper, seeds[i : i + 1], self.head, geometry=geom.select(i)))
                        continue
                    out = torch.zeros((1, 1, *mri.shape[2:]), device=dev, dtype=torch.float32)
                    us_n, info = simulate_fov(lambda sl, f=f: f.read(sl).to(dev), f.brain.to(dev), sp[i : i + 1], geom.select(i),
                                              self.config, mapper, seeds[i], self.head)
                    outs.append(out if us_n is None else f.paste(out, us_n, info["crop_box"]))
                us = torch.cat(outs)
        us = us.float() if self.differentiable else us.detach().float()
        nl, ne, nd = self.config.resolve(sp[0].tolist())
        for i, m in enumerate(metas):
            rec = {"name": "SimulateUltrasound", "seed": seeds[i], "geometry": self.config.geometry,
                   "frequency_mhz": self.config.frequency_mhz, "depth_mm": self.config.depth_mm,
                   "width_mm": self.config.width_mm, "elevation_mm": self.config.elevation_mm,
                   "angle_deg": self.config.angle_deg, "elevation_angle_deg": self.config.elevation_angle_deg,
                   "n_rays": [nl, ne], "samples_per_ray": nd, "frame": "case" if frames[i] is not None else "sample",
                   "mapper": str(self._mapper_path) if self._mapper_path is not None
                   else (type(self.mapper).__name__ if self.mapper is not None else "ImpedanceMapper")}
            rec.update(geom.item(i))
            if jit is not None:
                rec.update({"tilt_deg": float(jit[0][i]), "tilt_azimuth_rad": float(jit[1][i]),
                            "shift_mm": [float(v) for v in jit[2][i]]})
            m["applied"].append(rec)
        return _finish(data, batched, metas, keys.US, us)

    def __repr__(self) -> str:
        return f"SimulateUltrasound(config={self.config}, seed={self.seed}, jitter_deg={self.jitter_deg}, jitter_mm={self.jitter_mm})"

    # --- what a checkpoint keeps, so that prediction simulates as training did ----------------
    def record(self) -> dict:
        """The settings prediction must reproduce, as plain data (a teacher checkpoint stores it).

        The fitted mapper's weights are stored inline (not its path), so a checkpoint moved to
        another machine still simulates with the mapper its teacher was trained on. Training's
        random probe jitter is not kept: prediction images the default probe of each case.
        """
        from trifuse.physics.paired import us_mapper_to_dict

        mapper = self._resolved_mapper()
        state = None
        if mapper is not None:
            try:
                state = us_mapper_to_dict(mapper)
            except TypeError:
                import logging

                logging.getLogger(__name__).warning(
                    "SimulateUltrasound: a %s mapper cannot be stored in a checkpoint; prediction will use the tissue table", type(mapper).__name__)
        return {"transform": "SimulateUltrasound", "config": asdict(self.config), "head": asdict(self.head),
                "seed": self.seed, "mapper": state,
                "mapper_source": str(self._mapper_path) if self._mapper_path is not None else ("in-memory" if state else "table")}

    @classmethod
    def from_record(cls, rec: dict) -> "SimulateUltrasound":
        """The prediction-time transform of :meth:`record`: same probe, head, mapper and seed, no jitter."""
        from trifuse.physics.paired import us_mapper_from_dict

        mapper = us_mapper_from_dict(rec["mapper"], source="checkpoint pixel_tier") if rec.get("mapper") else None
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["config"].items()}  # JSON/YAML lists
        return cls(config=ProbeConfig(**config), mapper=mapper, head=HeadConfig(**rec["head"]),
                   seed=0 if rec.get("seed") is None else int(rec["seed"]))


class SynthesizeCT(SampleTransform):
    """Sample transform writing ``keys.CT``: (C, D, H, W) float32 in the windows of
    :data:`trifuse.keys.CT_WINDOWS` (C = :data:`trifuse.keys.CT_CHANNELS`, each in [0, 1]).

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
    provides = (keys.CT,)

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

    #: uses the whole-case frame of a patch: the loader runs it before spatial augmentation
    needs_case_frame = True

    def _case_outside(self, frame: CaseFrame, spacing: list[float], shape) -> torch.Tensor:
        """(1, 1, *shape) head-layer HU of the patch, from the whole case's brain mask.

        The mask is read over the patch box plus the layer thickness, extended to whole
        coarse blocks of the case grid, so the result is the crop of the whole-case map;
        outside the case crop (padding) is air (the cache margin exceeds the layers).
        """
        fac = coarse_factors(spacing, self.head.coarse_mm)
        n = frame.brain.shape[2:]
        ext = []
        for (lo, hi), f, sv, nn_ in zip(frame.box, fac, spacing, n):
            m = int(math.ceil(self.head.total_mm / float(sv))) + 2 * f
            ext.append([max(0, (lo - m) // f * f), min(nn_, -(-(hi + m) // f) * f)])
        sl = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in ext)
        hu = outside_hu_map(frame.brain[sl], spacing, self.head)
        out = torch.full((1, 1, *shape), TISSUES["air"].hu_mean, dtype=torch.float32)
        return frame.paste(out, hu, ext)

    def __call__(self, data: dict, generator: torch.Generator | None = None) -> dict:
        batched, b, metas, ids = _split(data)
        gen = generator or self.generator
        mri = torch.as_tensor(data[keys.MRI])
        brain = torch.as_tensor(data[keys.BRAIN])
        if not batched:
            mri, brain = mri[None], brain[None]
        sp = _spacing(metas)
        seeds = _item_seeds(b, ids, self.seed, gen) if self.mode == "sample" else [None] * b
        frames = [case_frame(m, ids[i], mri.shape[2:]) for i, m in enumerate(metas)]
        with torch.no_grad():
            outside = None
            if any(frames):
                outside = torch.cat([self._case_outside(f, sp[i].tolist(), mri.shape[2:]) if f is not None
                                     else outside_hu_map(brain[i : i + 1].bool().cpu(), sp[i].tolist(), self.head)
                                     for i, f in enumerate(frames)]).to(mri.device)
            if self.mode == "expectation" and torch.allclose(sp, sp[:1].expand_as(sp)):
                hu = synthesize_ct_hu(mri.float(), brain.bool(), self.model, "expectation", spacing=sp[0].tolist(), head=self.head,
                                      outside=outside)
            else:  # per item: own seed / own spacing (a loop over batch items only)
                outs = []
                for i in range(b):
                    g = None
                    if seeds[i] is not None:
                        g = torch.Generator(device=mri.device).manual_seed(seeds[i])
                    outs.append(synthesize_ct_hu(mri[i : i + 1].float(), brain[i : i + 1].bool(), self.model, self.mode, g,
                                                 spacing=sp[i].tolist(), head=self.head,
                                                 outside=None if outside is None else outside[i : i + 1]))
                hu = torch.cat(outs)
            ct = encode_ct(hu)
        source = str(self._path) if self._path is not None else self.model.meta.get("form", "tissue_table")
        for i, m in enumerate(metas):
            rec = {"name": "SynthesizeCT", "mode": self.mode, "model": source,
                   "n_components": self.model.n_components, "head": asdict(self.head),
                   "encoding": [list(w) for w in keys.CT_WINDOWS], "frame": "case" if frames[i] is not None else "sample"}
            if seeds[i] is not None:
                rec["seed"] = seeds[i]
            m["applied"].append(rec)
        return _finish(data, batched, metas, keys.CT, ct.float())

    def __repr__(self) -> str:
        return f"SynthesizeCT(model={self._path or 'in-memory'}, mode={self.mode!r})"

    def record(self) -> dict:
        """The settings prediction must reproduce, as plain data: the mixture itself (inline),
        the mode, head layers and seed (see :meth:`SimulateUltrasound.record`)."""
        return {"transform": "SynthesizeCT", "model": self.model.to_dict(), "mode": self.mode, "head": asdict(self.head),
                "seed": self.seed, "model_source": str(self._path) if self._path is not None else self.model.meta.get("form", "tissue_table")}

    @classmethod
    def from_record(cls, rec: dict) -> "SynthesizeCT":
        """The prediction-time transform of :meth:`record`."""
        return cls(CTMixtureModel.from_dict(rec["model"], source="checkpoint pixel_tier"), mode=rec.get("mode", "expectation"),
                   head=HeadConfig(**rec["head"]), seed=rec.get("seed"))
