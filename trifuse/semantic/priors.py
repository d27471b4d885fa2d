"""Multi-view semantic priors: ``F_3D = (1/3) Σ_d F^d`` from CLIP patch–text similarity.

For a case and each view ``d`` ∈ (axial, coronal, sagittal), every slice along that
view goes through the image tower; its patch embeddings ``e_p`` are compared (cosine)
with one text query per region ``r`` ∈ (WT, TC, ET) and a background query:

* ``q_r = normalise(T(prompt_r) + w · T(description text of view d))`` — the region
  prompt (:data:`~trifuse.semantic.clip_data.REGION_PROMPTS`) with the case's own
  description fused in (weight ``w = description_weight``);
* ``q_0 = normalise(T(background prompt) + w · T("<View> view: no focal abnormality."))``.

The per-pixel similarity is calibrated the way CLIP classifies zero-shot, with the
learned temperature and the background as the alternative class (MaskCLIP-style dense
zero-shot maps; Zhou et al., ECCV 2022):

    F^d_r(x) = exp(s) · (cos(e_p(x), q_r) − cos(e_p(x), q_0))

so ``σ(F^d_r)`` is the two-way softmax probability "region r rather than normal
tissue" (training makes 0 the decision boundary: see
:func:`trifuse.semantic.clip.mil_patch_loss`). Each view's maps are brought back from the display grid to the volume grid
(:meth:`~trifuse.semantic.slices.ViewGeometry.from_display`) and averaged onto a
common grid reduced ``factor`` times (``adaptive_avg_pool``); the three views are
averaged, ``F_3D = (1/3) Σ_d F^d``, and mapped to [0, 1] with the logistic function:

    prior_r = σ(F_3D,r) · brain fraction of the reduced cell

(nothing outside the brain; the brain fraction keeps the border soft). The result is
float16 ``(3, ⌈D/f⌉, ⌈H/f⌉, ⌈W/f⌉)`` over the CROPPED case grid of the cache (the
``crop_box`` in ``meta``): reduced cell ``k`` along an axis of length ``N`` covers
voxels ``[k·N/n, (k+1)·N/n)``.

Per case, ``<out>/<case_id>.npz`` holds ``prior`` (3, d, h, w) float16, ``text`` (E,)
float32 — the normalised mean of the three views' description embeddings, the pooled
text embedding the student's FiLM consumes — and ``meta`` (JSON: shapes, crop box,
factor, checkpoint hash, fingerprint). Files are written atomically; a case whose
fingerprint (checkpoint, description, cache, settings) is unchanged is skipped. A case
that fails is listed and the others go on, except on a full disk: the run stops at once
with :class:`~trifuse.io.nifti.OutOfSpaceError` naming the folder (nothing partial kept).
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.semantic.clip_data import NORMAL_PROMPT, REGION_PROMPTS, normal_text, prepare_slices
from trifuse.semantic.schema import VIEWS, Description, to_text

log = logging.getLogger(__name__)

PRIORS_VERSION = 1
SUMMARY_NAME = "priors_summary.json"


@dataclass
class PriorConfig:
    """Settings of ``trifuse semantic``.

    Attributes:
        factor: reduction of the prior grid relative to the cropped case (per axis).
        description_weight: weight ``w`` of the case's description in each query
            (``None``: the value the checkpoint was trained with).
        slice_step: use every ``slice_step``-th slice per view (1: all), the one nearest each
            stride's centre; the reduced grid averages the used slices. The default 2 halves
            the image-tower passes at no measurable AUC cost on the reduced (``factor`` 4)
            grid (``bench/bench_prior_speed.py``: held-out WT/TC/ET AUC within 0.01 of
            stride 1, at 2 mm and 1 mm).
        batch_size: slices per forward pass.
        views: views averaged into ``F_3D``.
        device: where the encoder runs (``"auto"``: CUDA when available).
    """

    factor: int = 4
    description_weight: float | None = None
    slice_step: int = 2
    batch_size: int = 64
    views: tuple[str, ...] = VIEWS
    device: str = "auto"


def reduced_shape(shape: Sequence[int], factor: int) -> tuple[int, int, int]:
    """``⌈s / factor⌉`` per axis."""
    return tuple(int(math.ceil(int(s) / max(1, int(factor)))) for s in shape)  # type: ignore[return-value]


def _resample3d(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(C, D, H, W) → (C, *size): cell averages where shrinking, trilinear where growing."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-3:]) == size:
        return x
    if all(a >= b for a, b in zip(x.shape[-3:], size)):
        return F.adaptive_avg_pool3d(x[None], size)[0]
    return F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]


@torch.no_grad()
def region_queries(model, description: Description | None, view: str, description_weight: float = 0.5) -> torch.Tensor:
    """(4, E) normalised queries: WT, TC, ET, background (see module docstring).

    The same construction as in training (:func:`trifuse.semantic.clip.fuse_queries`).
    """
    from trifuse.semantic.clip import fuse_queries

    texts = [REGION_PROMPTS[r] for r in keys.REGIONS] + [NORMAL_PROMPT]
    q = model.encode_text(texts)
    if description is not None and description_weight > 0 and view in description.views:
        d = model.encode_text([to_text(description, view), normal_text(view)])
        return torch.cat([fuse_queries(q[:3], d[0:1], description_weight),
                          fuse_queries(q[3:], d[1:2], description_weight)])
    return F.normalize(q, dim=-1)


@torch.no_grad()
def view_similarity(model, mri: np.ndarray | torch.Tensor, brain: np.ndarray | torch.Tensor, affine, spacing,
                    view: str, queries: torch.Tensor, out_shape: Sequence[int], batch_size: int = 64,
                    slice_step: int = 1) -> torch.Tensor:
    """Calibrated similarity volume ``F^d`` of one view on the reduced grid.

    Args:
        model: a :class:`~trifuse.semantic.clip.DualEncoder`.
        mri: (4, D, H, W) z-scored contrasts (cropped case).
        brain: (D, H, W) bool.
        affine, spacing: of the case (``meta``), for the view geometry.
        view: view name.
        queries: (4, E) from :func:`region_queries` (last row: background).
        out_shape: reduced grid ``(d, h, w)``.
        batch_size, slice_step: see :class:`PriorConfig`.

    Returns:
        (3, d, h, w) float32 ``exp(s)·(cos(e, q_r) − cos(e, q_0))`` for WT, TC, ET.
    """
    from trifuse.semantic.slices import view_geometry

    vg = view_geometry(np.asarray(affine, dtype=np.float64), view, spacing)
    mri_t = torch.as_tensor(np.asarray(mri, dtype=np.float32))
    brain_t = torch.as_tensor(np.asarray(brain, dtype=bool))
    disp = vg.to_display(mri_t)  # (4, N, R, C)
    bdisp = vg.to_display(brain_t)  # (N, R, C)
    n_slices = disp.shape[1]
    target = (int(out_shape[vg.row_axis]), int(out_shape[vg.col_axis]))
    from trifuse.semantic.clip import model_device, patch_contrast

    device = model_device(model)
    scale = model.scale()
    step = max(1, int(slice_step))
    idx = list(range((step - 1) // 2, n_slices, step))  # near the centre of each stride (a reduced cell)
    maps = []
    for i0 in range(0, len(idx), batch_size):
        sel = idx[i0:i0 + batch_size]
        raw = disp[:, sel].permute(1, 0, 2, 3)
        img, m, fit = prepare_slices(raw, bdisp[sel], model.image_size)
        _, patches = model.encode_image(img.to(device), m.to(device))  # (B, E, h, w) normalised
        q = queries.to(device=device, dtype=patches.dtype)
        contrast = patch_contrast(patches, q[:3], q[3], scale).float().cpu()
        full = fit.from_square(contrast)  # (B, 3, R, C)
        maps.append(F.adaptive_avg_pool2d(full, target))
    vol = torch.cat(maps).permute(1, 0, 2, 3).contiguous()  # (3, N', r, c) display order
    vol = vg.from_display(vol)  # (3, D', H', W') with the slice axis at (sub-sampled) full length
    return _resample3d(vol.float(), out_shape)


@dataclass
class PriorResult:
    """Priors of one case.

    Attributes:
        prior: (3, d, h, w) float16 in [0, 1].
        text: (E,) float32 pooled (normalised) description embedding.
        views: view → (3, d, h, w) float32 ``F^d`` (calibrated similarity, before σ).
        fused: (3, d, h, w) float32 ``F_3D``.
    """

    prior: torch.Tensor
    text: torch.Tensor
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    fused: torch.Tensor | None = None


@torch.no_grad()
def compute_prior(model, sample: Mapping[str, Any], description: Description | None,
                  config: PriorConfig | None = None) -> PriorResult:
    """Priors and pooled text embedding of one (cropped) case sample.

    Args:
        model: trained dual encoder (eval mode).
        sample: sample dict (``mri``, ``brain``, ``meta`` with affine and spacing).
        description: the case's :class:`Description` (``None``: prompts only).
        config: settings.
    """
    from trifuse.semantic.slices import sample_arrays

    config = config or PriorConfig()
    model.eval()
    mri, brain, geo = sample_arrays(sample)
    out_shape = reduced_shape(brain.shape, config.factor)
    w = config.description_weight
    if w is None:
        w = float(getattr(model.config, "description_weight", 0.5)) if model.config is not None else 0.5
    views = {}
    for view in config.views:
        q = region_queries(model, description, view, w)
        views[view] = view_similarity(model, mri, brain, geo.affine, geo.spacing, view, q, out_shape,
                                      config.batch_size, config.slice_step)
    fused = torch.stack(list(views.values())).mean(0)  # F_3D = (1/3) Σ_d F^d
    bfrac = _resample3d(torch.as_tensor(brain, dtype=torch.float32)[None], out_shape)
    prior = (torch.sigmoid(fused) * bfrac).clamp(0, 1).to(torch.float16)
    if description is not None:
        t = model.encode_text([to_text(description, v) for v in config.views if v in description.views])
    else:
        t = model.encode_text([REGION_PROMPTS["WT"]])
    text = F.normalize(t.mean(0), dim=0).float().cpu()
    return PriorResult(prior, text, views, fused)


# --------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------
def prior_path(priors_dir: str | Path, case_id: str) -> Path:
    return Path(priors_dir) / f"{case_id}.npz"


def save_prior(path: str | Path, prior: torch.Tensor | np.ndarray, text: torch.Tensor | np.ndarray,
               meta: Mapping[str, Any]) -> Path:
    """Write ``prior`` (float16), ``text`` (float32) and ``meta`` (JSON) atomically."""
    from trifuse.io.nifti import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, prior=np.asarray(prior, dtype=np.float16), text=np.asarray(text, dtype=np.float32),
             meta=np.array(json.dumps(dict(meta), sort_keys=True)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_prior(path: str | Path) -> dict[str, Any]:
    """``{"prior": (3, d, h, w) float16, "text": (E,) float32, "meta": dict}``."""
    with np.load(path, allow_pickle=False) as z:
        return {"prior": z["prior"], "text": z["text"], "meta": json.loads(str(z["meta"]))}


def prior_auc(prior: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray,
              within: torch.Tensor | np.ndarray | None = None) -> float:
    """ROC AUC of one region's prior against a voxel mask (e.g. the true WT).

    The reduced prior is upsampled (trilinear) to the mask's grid; voxels are counted
    only ``within`` (e.g. the brain: outside it the prior is 0 by construction and would
    inflate the AUC). Uses torchmetrics' exact binary AUROC.

    Args:
        prior: (d, h, w) region prior.
        mask: (D, H, W) bool target.
        within: (D, H, W) bool domain (default everything).

    Returns:
        AUC in [0, 1], or NaN when the domain holds only one class.
    """
    from torchmetrics.functional.classification import binary_auroc

    m = torch.as_tensor(np.asarray(mask)).bool()
    p = torch.as_tensor(np.asarray(prior, dtype=np.float32))
    up = F.interpolate(p[None, None], size=tuple(m.shape), mode="trilinear", align_corners=False)[0, 0]
    dom = torch.ones_like(m) if within is None else torch.as_tensor(np.asarray(within)).bool()
    y = m[dom]
    if y.all() or not y.any():
        return float("nan")
    return float(binary_auroc(up[dom], y.long()))


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------
@dataclass
class PriorsReport:
    """What :func:`compute_priors` did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    auc_wt: dict[str, float] = field(default_factory=dict)

    @property
    def seconds_per_case(self) -> float:
        return float(np.mean(list(self.seconds.values()))) if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        aucs = [v for v in self.auc_wt.values() if v == v]
        return {"out_dir": str(self.out_dir), "written": self.written, "skipped": self.skipped, "failed": self.failed,
                "seconds_per_case": round(self.seconds_per_case, 3), "auc_wt": self.auc_wt,
                "mean_auc_wt": float(np.mean(aucs)) if aucs else None}


def case_fingerprint(ckpt_sha: str, description: Description | None, cache_meta: Mapping[str, Any],
                     config: PriorConfig) -> str:
    import hashlib

    blob = json.dumps([PRIORS_VERSION, ckpt_sha, description.model_dump(mode="json") if description else None,
                       cache_meta.get("fingerprint"), cache_meta.get("cropped_shape"),
                       {k: v for k, v in asdict(config).items() if k not in ("device", "batch_size")}],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def compute_priors(cache_dir: str | Path, descriptions: Mapping[str, Description], clip_ckpt: str | Path,
                   out_dir: str | Path, case_ids: Sequence[str] | None = None, config: PriorConfig | None = None,
                   force: bool = False, progress: Callable[[int, int, str, str], None] | None = None,
                   describer_identity: Mapping[str, Any] | None = None) -> PriorsReport:
    """Priors for every case (resumable; see module docstring).

    Args:
        cache_dir: preprocessed cache.
        descriptions: case id → :class:`Description` (every case needs one).
        clip_ckpt: checkpoint from ``trifuse clip``.
        out_dir: priors folder.
        case_ids: cases (default: all described cases in the manifest).
        config: settings.
        force: recompute even when up to date.
        progress: ``(i, n, case_id, status)``.
        describer_identity: the describer of ``descriptions`` as its describe manifest
            records it (with the server URL); recorded in every prior file and the summary.

    Returns:
        :class:`PriorsReport` (also written to ``<out_dir>/priors_summary.json``), with
        the WT-prior AUC of each labelled case as a diagnostic (labels are read only here,
        after the priors are made).

    Raises:
        KeyError: a case has no description.
        DescriberMismatchError: the descriptions mix describers, or CLIP was trained on another's.
        trifuse.io.nifti.OutOfSpaceError: ``out_dir`` is full (named in the message); the
            cases written before are complete, no partial file is left, the summary is not written.
    """
    from trifuse.io.cache import load_sample, read_meta
    from trifuse.io.manifest import read_manifest
    from trifuse.io.nifti import OutOfSpaceError, atomic_write_text, sweep_dead_temps
    from trifuse.semantic.clip import file_sha256, load_clip

    config = config or PriorConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(out)  # what a killed earlier run left half-written (never a live writer's temporaries)
    if case_ids is None:
        case_ids = [c["case_id"] for c in read_manifest(cache_dir)["cases"]]
    missing = [c for c in case_ids if c not in descriptions]
    if missing:
        raise KeyError(f"no description for {len(missing)} case(s): {', '.join(missing[:10])}"
                       f"{' …' if len(missing) > 10 else ''} (run `trifuse describe` first)")
    from trifuse.semantic.clip import read_checkpoint
    from trifuse.semantic.provenance import DescriberMismatchError, format_identity, same_describer, single_identity

    describer = single_identity({c: descriptions[c] for c in case_ids}, str(out))
    if describer_identity is not None:  # the describe manifest's identity (it also knows the server URL)
        if describer and not same_describer(describer, describer_identity):
            raise DescriberMismatchError(f"the descriptions are by {format_identity(describer)}, not by "
                                         f"{format_identity(describer_identity)}")
        describer = dict(describer_identity)
    clip_describer = read_checkpoint(clip_ckpt).get("describer")
    if describer and clip_describer and not same_describer(describer, clip_describer):
        raise DescriberMismatchError(f"{clip_ckpt} was trained on descriptions by {format_identity(clip_describer)}, "
                                     f"these are by {format_identity(describer)}: retrain CLIP on them (`trifuse clip`)")
    ckpt_sha = file_sha256(clip_ckpt)
    report = PriorsReport(out)
    previous: dict[str, Any] = {}
    if (out / SUMMARY_NAME).exists():
        try:
            previous = json.loads((out / SUMMARY_NAME).read_text())
        except (OSError, ValueError):
            previous = {}
    # what is up to date: decided before loading the model (a rerun loads nothing)
    plan: dict[str, tuple[dict, str] | None] = {}
    for cid in case_ids:
        meta = read_meta(cache_dir, cid)
        fp = case_fingerprint(ckpt_sha, descriptions[cid], meta, config)
        current = None
        path = prior_path(out, cid)
        if path.exists() and not force:
            try:
                current = load_prior(path)["meta"].get("fingerprint")
            except Exception:  # noqa: BLE001 - a corrupt or partial file is recomputed
                current = None
        plan[cid] = None if current == fp else (meta, fp)
    model = load_clip(clip_ckpt, config.device) if any(v is not None for v in plan.values()) else None
    for i, cid in enumerate(case_ids):
        todo = plan[cid]
        if todo is None:
            report.skipped.append(cid)
            auc = (previous.get("auc_wt") or {}).get(cid)
            if auc is not None:
                report.auc_wt[cid] = auc
            if progress:
                progress(i + 1, len(case_ids), cid, "up to date")
            continue
        meta, fp = todo
        try:
            t0 = time.perf_counter()
            sample = load_sample(cache_dir, cid)
            res = compute_prior(model, sample, descriptions[cid], config)
            report.seconds[cid] = time.perf_counter() - t0
            save_prior(prior_path(out, cid), res.prior, res.text, {
                "case_id": cid, "version": PRIORS_VERSION, "regions": list(keys.REGIONS),
                "factor": config.factor, "cropped_shape": list(meta["cropped_shape"]),
                "crop_box": meta["crop_box"], "shape": meta["shape"], "views": list(config.views),
                "clip_checkpoint": str(clip_ckpt), "clip_sha256": ckpt_sha, "backend": model.backend,
                "fingerprint": fp, "config": asdict(config), "describer": describer,
                "prior_mapping": "sigmoid(mean_d exp(s)(cos(e,q_r)-cos(e,q_0))) * brain fraction",
            })
            report.written.append(cid)
            status = f"written ({report.seconds[cid]:.2f} s)"
            if meta.get("has_seg"):
                report.auc_wt[cid] = prior_auc(res.prior[keys.WT].float(), sample[keys.LABEL][keys.WT].bool(),
                                               sample[keys.BRAIN][0].bool())
                status += f", WT AUC {report.auc_wt[cid]:.3f}"
        except OutOfSpaceError:  # a full disk fails every case after it: stop now, naming the folder
            raise
        except Exception as exc:  # noqa: BLE001 - one bad case must not lose the others; listed at the end
            log.debug("priors failed for %s", cid, exc_info=True)
            report.failed[cid] = f"{type(exc).__name__}: {exc}"
            status = f"FAILED: {report.failed[cid]}"
        if progress:
            progress(i + 1, len(case_ids), cid, status)
    summary = report.to_dict() | {"config": asdict(config), "clip_checkpoint": str(clip_ckpt), "clip_sha256": ckpt_sha,
                                  "describer": describer}
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=1, default=str))
    return report
