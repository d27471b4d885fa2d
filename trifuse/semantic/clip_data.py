"""(slice, text) pairs for CLIP training, prompts, and the slice ↔ square-image mapping.

Pairs come from the preprocessed cache and the describe stage's :class:`Description`
records; labels are never read. For every case and view (axial, coronal, sagittal):

* **lesion slices** — slices through the abnormality that the describers located from
  the images alone (:func:`trifuse.semantic.slices.find_abnormality`), whose
  cross-section is at least ``min_area_fraction`` of the largest one, paired with
  ``to_text(description, view)``;
* **normal slices** — brain slices at least ``margin_mm`` away from the abnormality,
  paired with the canonical "no focal abnormality" sentence of that view (the same
  words the describers use for a view without a lesion).

This slice-level "through vs away from the lesion" contrast is what makes the image
tower's *patch* embeddings localise the abnormality (the multiple-instance / class
activation map argument: the pooled embedding is a mean of patch embeddings, so the
only patches that can move a slice's embedding toward its lesion text are the lesion's
own; Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).

A second, patch-level term makes the dense similarity *calibrated* (0 = as likely
region as normal tissue): a slice described as normal is a negative bag (no patch may
look like a region), a lesion slice a positive bag for the regions its description
supports (some patches must). This is multiple-instance learning (Dietterich et al.,
Artif Intell 1997; Ilse et al., ICML 2018), label-free like the rest; see
:func:`trifuse.semantic.clip.mil_patch_loss`.

Each image may match several texts (its description, and the region prompts that its
description supports: the WT prompt for any lesion slice, TC when the view reports
enhancement or necrosis, ET when it reports enhancement, the background prompt for a
normal slice). Training samples one of them per image and counts every allowed text as
a positive (multi-positive InfoNCE, see :func:`trifuse.semantic.clip.clip_loss`), so
the prompts used for the priors are trained text, not zero-shot guesses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trifuse import keys
from trifuse.semantic.schema import VIEWS, Description, ViewDescription, to_text, view_text

log = logging.getLogger(__name__)

#: region prompts (WT, TC, ET order of :data:`trifuse.keys.REGIONS`): what each BraTS
#: region looks like, in the contrasts that define it (BraTS annotation protocol,
#: Menze et al., IEEE TMI 2015; Bakas et al., arXiv:1811.02629)
REGION_PROMPTS: dict[str, str] = {
    "WT": "whole tumour: oedema and tumour, hyperintense on FLAIR and T2",
    "TC": "tumour core: enhancing rim and necrotic core of the tumour, without the surrounding oedema",
    "ET": "enhancing tumour: hyperintense on post-contrast T1 (T1ce) relative to T1",
}
#: the background prompt that region prompts are contrasted with (zero-shot CLIP
#: classification over {region, background}; Radford et al., ICML 2021)
NORMAL_PROMPT = "normal-appearing brain tissue with no abnormality"


# --------------------------------------------------------------------------------------
# paths (stage defaults live beside the data, like the cache)
# --------------------------------------------------------------------------------------
def _sibling(data_dir: str | Path, kind: str) -> Path:
    data_dir = Path(data_dir).resolve()
    return data_dir.parent / kind / data_dir.name


def default_descriptions_dir(data_dir: str | Path) -> Path:
    """``<data_dir>/../descriptions/<name>``."""
    return _sibling(data_dir, "descriptions")


def default_priors_dir(data_dir: str | Path) -> Path:
    """``<data_dir>/../priors/<name>``."""
    return _sibling(data_dir, "priors")


def default_clip_dir(data_dir: str | Path) -> Path:
    """``runs/clip/<name>`` (relative to the working directory, like other runs)."""
    return Path("runs") / "clip" / Path(data_dir).resolve().name


def resolve_cache(data_dir: str | Path, cache_dir: str | Path | None = None, preprocess_missing: bool = True
                  ) -> tuple[Path, list[str]]:
    """The preprocessed cache of ``data_dir`` and its valid case ids.

    Runs :func:`trifuse.io.preprocess.preprocess` when the manifest is missing.

    Returns:
        ``(cache_dir, case_ids)``, ids in manifest order (invalid cases excluded).
    """
    from trifuse.io.manifest import MANIFEST_NAME, read_manifest
    from trifuse.io.preprocess import default_cache_dir, preprocess

    cache = Path(cache_dir) if cache_dir else default_cache_dir(data_dir)
    if not (cache / MANIFEST_NAME).exists():
        if not preprocess_missing:
            raise FileNotFoundError(f"{cache / MANIFEST_NAME}: no manifest (run `trifuse preprocess --data {data_dir}`)")
        log.info("no preprocessed cache for %s: running preprocess into %s", data_dir, cache)
        preprocess(data_dir, cache)
    manifest = read_manifest(cache)
    ids = [c["case_id"] for c in manifest["cases"]]
    if not ids:
        raise ValueError(f"{cache}: the manifest lists no valid cases")
    return cache, ids


# --------------------------------------------------------------------------------------
# texts
# --------------------------------------------------------------------------------------
def normal_text(view: str) -> str:
    """Canonical text of a view without abnormality (the describers' own wording)."""
    vd = ViewDescription(view=view, hemisphere="none", lobes=[], size_mm=0.0, enhancement="none", necrosis=False,
                         oedema="none", mass_effect=False, impression="No focal abnormality.")
    return view_text(vd)


def has_lesion(vd: ViewDescription) -> bool:
    """Whether a view description reports an abnormality."""
    return not (vd.hemisphere == "none" and vd.size_mm <= 0)


def region_prompts_for(vd: ViewDescription) -> tuple[str, ...]:
    """Region prompts that a lesion slice described by ``vd`` supports.

    WT for any lesion; TC when the view reports enhancement or necrosis (a tumour
    core); ET when it reports enhancement. Derived from the description, not labels.
    """
    if not has_lesion(vd):
        return (NORMAL_PROMPT,)
    out = [REGION_PROMPTS["WT"]]
    if vd.enhancement != "none" or vd.necrosis:
        out.append(REGION_PROMPTS["TC"])
    if vd.enhancement != "none":
        out.append(REGION_PROMPTS["ET"])
    return tuple(out)


# --------------------------------------------------------------------------------------
# slice ↔ square image
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SquareFit:
    """How an ``(R, C)`` display slice sits in the square model input.

    The slice is zero-padded, centred, to ``L = max(R, C)`` (keeping its aspect, so an
    anatomy looks the same in every view) and resized to ``size × size``.
    """

    rows: int
    cols: int
    size: int

    @property
    def side(self) -> int:
        return max(self.rows, self.cols)

    @property
    def offsets(self) -> tuple[int, int]:
        return (self.side - self.rows) // 2, (self.side - self.cols) // 2

    def to_square(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``(B, C, R, Cc)`` → ``(B, C, size, size)``."""
        r0, c0 = self.offsets
        L = self.side
        pad = (c0, L - self.cols - c0, r0, L - self.rows - r0)
        x = F.pad(x, pad)
        if L == self.size:
            return x
        if mode in ("nearest", "area"):
            return F.interpolate(x, size=(self.size, self.size), mode=mode)
        return F.interpolate(x, size=(self.size, self.size), mode=mode, align_corners=False, antialias=L > self.size)

    def from_square(self, m: torch.Tensor) -> torch.Tensor:
        """A map over the square input ``(B, Q, h, w)`` (any resolution) → ``(B, Q, R, C)``."""
        L = self.side
        m = F.interpolate(m, size=(L, L), mode="bilinear", align_corners=False)
        r0, c0 = self.offsets
        return m[..., r0:r0 + self.rows, c0:c0 + self.cols]


def prepare_slices(raw: torch.Tensor | np.ndarray, brain: torch.Tensor | np.ndarray, size: int,
                   clip_z: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, SquareFit]:
    """Display slices → square model inputs.

    Args:
        raw: (B, 4, R, C) or (4, R, C) z-scored slices (0 outside the brain).
        brain: (B, R, C) or (R, C) brain mask.
        size: model input side in pixels.
        clip_z: intensities are clipped to ±clip_z (outliers would dominate a small CNN).

    Returns:
        ``(images (B, 4, size, size) float32, brain (B, 1, size, size) float32 in [0, 1], fit)``.
    """
    x = torch.as_tensor(np.asarray(raw) if isinstance(raw, np.ndarray) else raw, dtype=torch.float32)
    b = torch.as_tensor(np.asarray(brain) if isinstance(brain, np.ndarray) else brain).float()
    if x.ndim == 3:
        x, b = x[None], b[None]
    fit = SquareFit(int(x.shape[-2]), int(x.shape[-1]), int(size))
    img = fit.to_square(x.clamp(-clip_z, clip_z))
    m = fit.to_square(b[:, None], mode="area" if fit.side > size else "bilinear").clamp(0, 1)
    return img, m, fit


# --------------------------------------------------------------------------------------
# pair records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceRecord:
    """One training/evaluation image and the texts it matches.

    Attributes:
        case_id, view: where the slice comes from.
        index: slice index along the view's slice axis (cropped cache grid).
        kind: ``"lesion"`` or ``"normal"``.
        text: its description text (``to_text`` of the view, or the normal sentence).
        prompts: further allowed texts (region prompts / background prompt).
        described: the slice the describer saw (the abnormality's centre slice).
        case_text: the view's description text (also for normal slices: the priors
            fuse it into every query of the view).
        lesion_fraction: share of the slice's brain pixels inside the describers'
            (image-derived) abnormality.
    """

    case_id: str
    view: str
    index: int
    kind: str
    text: str
    prompts: tuple[str, ...] = ()
    described: bool = False
    case_text: str = ""
    lesion_fraction: float = 0.0

    @property
    def allowed(self) -> tuple[str, ...]:
        return (self.text,) + tuple(p for p in self.prompts if p != self.text)

    @property
    def bags(self) -> tuple[int, int, int]:
        """Multiple-instance labels (WT, TC, ET) of the slice, from its description:
        1 = some patch shows the region, 0 = no patch does."""
        if self.kind != "lesion":
            return (0, 0, 0)
        return (1, int(REGION_PROMPTS["TC"] in self.prompts), int(REGION_PROMPTS["ET"] in self.prompts))


def _spread(indices: Sequence[int], k: int, centre: float | None = None) -> list[int]:
    """At most ``k`` indices spread evenly over ``indices`` (deterministic)."""
    idx = sorted(int(i) for i in indices)
    if k <= 0 or not idx:
        return []
    if len(idx) <= k:
        return idx
    pick = np.linspace(0, len(idx) - 1, k).round().astype(int)
    return sorted({idx[i] for i in pick})


def select_slices(mask: np.ndarray, brain: np.ndarray, axis: int, spacing_mm: float, *, max_lesion: int = 8,
                  max_normal: int = 6, min_area_fraction: float = 0.25, margin_mm: float = 8.0,
                  min_brain_fraction: float = 0.4) -> tuple[list[int], list[int]]:
    """Lesion and normal slice indices along ``axis``.

    Args:
        mask: (D, H, W) bool abnormality (image-derived).
        brain: (D, H, W) bool brain mask.
        axis: slice axis.
        spacing_mm: voxel size along ``axis``.
        max_lesion, max_normal: caps (evenly spread).
        min_area_fraction: a lesion slice's abnormal area ≥ this × the largest one.
        margin_mm: normal slices are at least this far from any abnormal slice.
        min_brain_fraction: a normal slice's brain area ≥ this × the largest brain slice
            (skips the skull-cap slices that carry little anatomy).
    """
    other = tuple(a for a in range(3) if a != axis)
    area = mask.sum(axis=other)
    barea = brain.sum(axis=other)
    lesion: list[int] = []
    if area.max() > 0:
        lesion = np.flatnonzero(area >= min_area_fraction * area.max()).tolist()
    present = np.flatnonzero(area > 0)
    margin = int(np.ceil(margin_mm / max(float(spacing_mm), 1e-6)))
    far = np.ones(len(area), bool)
    for i in present:
        far[max(0, i - margin):i + margin + 1] = False
    normal = np.flatnonzero(far & (barea >= min_brain_fraction * max(barea.max(), 1))).tolist()
    return _spread(lesion, max_lesion), _spread(normal, max_normal)


def build_records(cache_dir: str | Path, descriptions: Mapping[str, Description], case_ids: Iterable[str], *,
                  views: Sequence[str] = VIEWS, max_lesion: int = 8, max_normal: int = 6,
                  min_area_fraction: float = 0.25, margin_mm: float = 8.0) -> list[SliceRecord]:
    """All :class:`SliceRecord` of ``case_ids`` (see module docstring).

    Raises:
        KeyError: a case has no description (the message says to run ``trifuse describe``).
    """
    from trifuse.io.cache import load_sample
    from trifuse.semantic.slices import find_abnormality, sample_arrays, view_geometry

    out: list[SliceRecord] = []
    for cid in case_ids:
        if cid not in descriptions:
            raise KeyError(f"no description for case {cid} (run `trifuse describe` first)")
        desc = descriptions[cid]
        sample = load_sample(cache_dir, cid)
        mri, brain, geo = sample_arrays(sample)
        abn = find_abnormality(mri, brain, geo.spacing)
        for view in views:
            vd = desc.views.get(view)
            if vd is None:
                raise KeyError(f"description of case {cid} has no {view} view")
            vg = view_geometry(geo.affine, view, geo.spacing)
            ax = vg.slice_axis
            mask = abn.mask if has_lesion(vd) else np.zeros_like(abn.mask)
            lesion, normal = select_slices(mask, brain, ax, float(geo.spacing[ax]), max_lesion=max_lesion,
                                           max_normal=max_normal, min_area_fraction=min_area_fraction,
                                           margin_mm=margin_mm)
            ref = desc.slices.get(view)
            described = ref.index if ref is not None else None
            if has_lesion(vd) and described is not None and described not in lesion:
                lesion = sorted(set(lesion) | {described})
            text = to_text(desc, view)
            prompts = region_prompts_for(vd)
            other = tuple(a for a in range(3) if a != ax)
            frac = mask.sum(axis=other) / np.maximum(brain.sum(axis=other), 1)
            for i in lesion:
                out.append(SliceRecord(cid, view, int(i), "lesion", text, prompts, described == i, text,
                                       float(frac[i])))
            ntext = normal_text(view)
            for i in normal:
                out.append(SliceRecord(cid, view, int(i), "normal", ntext, (NORMAL_PROMPT,), False, text))
    return out


def split_cases(case_ids: Sequence[str], val_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded case-level split ``(train, held_out)``; at least one case on each side when possible."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        return ids, []
    n_val = min(len(ids) - 1, max(1, int(round(val_fraction * len(ids)))))
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return [c for c in ids if c not in set(val)], val


# --------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------
class SliceReader:
    """Reads display slices of cached cases through their memory maps (one case open at a time per view)."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self._open: dict[str, tuple[dict, dict]] = {}

    def case(self, case_id: str) -> tuple[dict, dict]:
        from trifuse.io.cache import open_arrays, read_meta

        if case_id not in self._open:
            if len(self._open) > 16:
                self._open.pop(next(iter(self._open)))
            self._open[case_id] = (open_arrays(self.cache_dir, case_id), read_meta(self.cache_dir, case_id))
        return self._open[case_id]

    def read(self, case_id: str, view: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(raw (4, R, C) float32, brain (R, C) bool)`` of one display slice."""
        from trifuse.semantic.slices import view_geometry

        arrays, meta = self.case(case_id)
        vg = view_geometry(np.asarray(meta["affine"]), view, meta["spacing"])
        raw = np.ascontiguousarray(vg.slice(arrays["mri"], index), dtype=np.float32)
        brain = np.ascontiguousarray(vg.slice(arrays["brain"], index)).astype(bool)
        return raw, brain


class ClipPairDataset(Dataset):
    """Square four-contrast slices with their allowed texts.

    Items: ``{"image": (4, S, S) float32, "brain": (1, S, S) float32, "text": str,
    "allowed": tuple[str, ...], "index": int}``. ``text`` is drawn per item and epoch:
    the description with probability ``1 - prompt_prob``, else a uniformly chosen prompt.

    Args:
        records: from :func:`build_records`.
        cache_dir: the preprocessed cache.
        image_size: model input side ``S``.
        prompt_prob: probability of drawing a prompt instead of the description.
        seed: base seed (draws depend on seed, :attr:`epoch` and the item index).
        max_cache_bytes: prepared slices are kept in memory (float16) while they fit in
            this budget; beyond it they are re-read from the cache's memory maps.
    """

    def __init__(self, records: Sequence[SliceRecord], cache_dir: str | Path, image_size: int,
                 prompt_prob: float = 0.5, seed: int = 0, max_cache_bytes: int = 2 << 30):
        self.records = list(records)
        self.reader = SliceReader(cache_dir)
        self.image_size = int(image_size)
        self.prompt_prob = float(prompt_prob)
        self.seed = int(seed)
        self.epoch = 0
        self._images: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_cached = max(0, int(max_cache_bytes) // (5 * 2 * self.image_size ** 2))

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (4, S, S), brain (1, S, S))`` float32 of record ``i``."""
        if i in self._images:
            img, m = self._images[i]
            return img.float(), m.float()
        r = self.records[i]
        raw, brain = self.reader.read(r.case_id, r.view, r.index)
        img, m, _ = prepare_slices(raw, brain, self.image_size)
        if len(self._images) < self._max_cached:  # decode each slice once while memory allows
            self._images[i] = (img[0].half(), m[0].half())
        return img[0], m[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        img, m = self.image(i)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        text = r.text
        if r.prompts and rng.random() < self.prompt_prob:
            text = r.prompts[int(rng.integers(len(r.prompts)))]
        return {"image": img, "brain": m, "text": text, "allowed": r.allowed, "index": i, "view": r.view,
                "case_text": r.case_text or r.text, "bags": torch.tensor(r.bags, dtype=torch.float32),
                "lesion_fraction": float(r.lesion_fraction)}


def collate_pairs(items: list[dict]) -> dict[str, Any]:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "brain": torch.stack([it["brain"] for it in items]),
        "text": [it["text"] for it in items],
        "allowed": [it["allowed"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
        "view": [it["view"] for it in items],
        "case_text": [it["case_text"] for it in items],
        "bags": torch.stack([it["bags"] for it in items]),
        "lesion_fraction": torch.tensor([it["lesion_fraction"] for it in items], dtype=torch.float32),
    }


@dataclass
class PairBatchTexts:
    """Unique texts of a batch and the (B, T) positive matrix (image i allows text t)."""

    texts: list[str]
    positives: torch.Tensor = field(repr=False)


def batch_texts(texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> PairBatchTexts:
    """Deduplicate the drawn texts and mark every allowed (image, text) as positive."""
    uniq = list(dict.fromkeys(texts))
    pos = torch.tensor([[t in set(a) for t in uniq] for a in allowed], dtype=torch.bool)
    return PairBatchTexts(uniq, pos)
