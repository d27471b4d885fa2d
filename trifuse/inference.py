"""Prediction as a library: :class:`Predictor` (the ``trifuse predict`` stage is a thin CLI over it).

Like nnU-Net's ``nnUNetPredictor``, a :class:`Predictor` is usable from Python::

    from trifuse.inference import Predictor
    pred = Predictor.from_checkpoint("runs/student/full/checkpoints/best.ckpt", tta=True)
    labels = pred.predict_case_dir("/data/BraTS2021_00000")   # (240, 240, 155) uint8, 2021 labels
    pred.predict_folder("/data/brats2021_val", "preds/")        # <case_id>.nii.gz per case

For one case it

1. validates the four MRI files (:func:`trifuse.io.validate.decode_case`) and prepares the
   input exactly as the cache does (:func:`prepare_case`: brain mask, brain box plus margin,
   per-channel z-score, float16 storage precision);
2. resamples the cropped input to the voxel spacing the model was trained at (recorded in
   the checkpoint, ``checkpoint["trifuse"]["spacing"]``; trilinear for images, nearest for
   the brain mask), logging cases whose spacing differs by more than ``spacing_tolerance``;
3. derives non-MRI inputs (US, CT) with the pixel tier, and for a student its priors;
4. runs MONAI sliding-window inference, averaged over the 8 mirrorings when ``tta``
   (nnU-Net's test-time mirroring);
5. resamples the region *probabilities* back to the input grid (trilinear) before
   thresholding, as nnU-Net does;
6. applies the post-processing stored in the checkpoint (:mod:`trifuse.postprocess`:
   connected-component filtering, small ET → NCR), unless ``postprocess=False``;
7. returns labels in the input year's convention on the input grid (pasted back).
"""
from __future__ import annotations

import importlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys

log = logging.getLogger(__name__)

__all__ = [
    "NIFTI_SUFFIXES",
    "Predictor",
    "load_model",
    "prepare_case",
    "input_transforms",
    "resample_sample",
    "mirror_axes",
    "output_path",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --- model loading ---------------------------------------------------------------------------
def load_model(ckpt: str | Path, device: str = "cpu"):
    """Load a trifuse LightningModule checkpoint for inference (eval mode, on ``device``).

    The module class comes from the checkpoint (``hyper_parameters._class_path``, written
    by LightningCLI); checkpoints made in Python default to
    :class:`~trifuse.lightning.teacher.TeacherModule`. Only classes of this package are
    imported from a checkpoint. The checkpoint's ``trifuse`` block (training spacing,
    post-processing decision) is kept on the model as ``model.trifuse_meta``.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: a class outside ``trifuse``, or a module without ``inputs``.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found")
    try:
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{ckpt}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    class_path = (
        (meta.get("hyper_parameters") or {}).get("_class_path")
        or (meta.get("trifuse") or {}).get("class_path")
        or "trifuse.lightning.teacher.TeacherModule"
    )
    if not class_path.startswith("trifuse."):
        raise ValueError(f"{ckpt}: module class {class_path!r} is not part of trifuse; refusing to import it")
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        model = cls.load_from_checkpoint(ckpt, map_location="cpu")
    except RuntimeError as exc:  # state-dict mismatch: hparams that do not describe the network
        raise ValueError(
            f"{ckpt}: cannot rebuild {cls_name} from the checkpoint ({str(exc).splitlines()[0]}); "
            "checkpoints written by `trifuse fit` carry their config"
        ) from None
    if not hasattr(model, "inputs"):
        raise ValueError(f"{ckpt}: {class_path} declares no `inputs`; cannot build its input from MRI files")
    model.trifuse_meta = dict(meta.get("trifuse") or {})
    return model.to(device).eval()


# --- case preparation ----------------------------------------------------------------------------
def prepare_case(case, margin_mm: float | None = None) -> dict:
    """A validated case as a sample dict, prepared exactly like the cache does.

    Args:
        case: :class:`trifuse.io.validate.DecodedCase`.
        margin_mm: brain-box margin; default the cache's (:data:`trifuse.io.cache.DEFAULT_MARGIN_MM`).

    Returns:
        sample with ``mri`` ``(4, d, h, w)`` float32, ``brain`` ``(1, d, h, w)`` bool, ``case_id``
        and ``meta`` (``affine``, ``spacing``, ``shape``, ``crop_box``, ``year``, ``applied``).
    """
    from trifuse.io.cache import DEFAULT_MARGIN_MM, brain_box, zscore

    ref = case.reference
    stack = np.stack([v.data for v in case.images]).astype(np.float32)  # (4, X, Y, Z)
    brain = np.any(stack != 0, axis=0)
    box = brain_box(brain, ref.spacing, DEFAULT_MARGIN_MM if margin_mm is None else margin_mm)
    sl = tuple(slice(a, b) for a, b in box)
    brain_c = brain[sl]
    mri = np.zeros((len(keys.MODALITIES),) + brain_c.shape, dtype=np.float32)
    for c in range(len(keys.MODALITIES)):
        z, _, _ = zscore(stack[c][sl], brain_c)
        mri[c] = z.astype(np.float16)  # the cache stores float16: the model was trained on these values
    meta = {
        "case_id": case.record.case_id,
        "year": case.record.year,
        "affine": ref.affine.tolist(),
        "spacing": [float(s) for s in ref.spacing],
        "shape": list(ref.data.shape),
        "crop_box": box,
        "cropped_shape": list(brain_c.shape),
        "applied": [],
    }
    return {
        keys.MRI: torch.from_numpy(mri),
        keys.BRAIN: torch.from_numpy(brain_c)[None],
        keys.CASE_ID: case.record.case_id,
        keys.META: meta,
    }


def input_transforms(inputs, ct_model: str | None = None, pixel_tier: dict | None = None) -> list:
    """Pixel-tier transforms that derive the model's non-MRI inputs from the MRI.

    Args:
        inputs: the model's input keys.
        ct_model: a fitted CT mixture file; overrides the checkpoint's.
        pixel_tier: the checkpoint's ``trifuse.pixel_tier`` (records of the training
            transforms: the fitted US mapper, the CT mixture, probe and head settings). Without
            it (older checkpoints) the defaults are used, which a teacher trained with a fitted
            mapper or mixture never saw.
    """
    from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT

    pixel_tier = pixel_tier or {}
    out = []
    for k in inputs:
        if k == keys.MRI:
            continue
        if k == keys.US:
            rec = pixel_tier.get("SimulateUltrasound")
            out.append(SimulateUltrasound.from_record(rec) if rec else SimulateUltrasound(seed=0))
        elif k == keys.CT:
            rec = pixel_tier.get("SynthesizeCT")
            out.append(SynthesizeCT.from_record(rec) if rec and ct_model is None else SynthesizeCT(ct_model))
        else:
            raise ValueError(f"the model needs input {k!r}, which cannot be made from the four MRI files")
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Voxel counts of ``shape`` at ``spacing`` (mm) resampled to ``target`` (mm), at least 1."""
    return [max(1, int(round(n * float(s) / float(t)))) for n, s, t in zip(shape, spacing, target)]


def resample_sample(sample: dict, target_spacing: Sequence[float]) -> dict:
    """The sample's ``mri`` (trilinear) and ``brain`` (nearest) resampled to ``target_spacing`` mm.

    Only the cropped box is resampled: the output covers the same physical extent, with
    ``meta["spacing"]`` set to the spacing actually reached (extent / voxels) and
    ``meta["resampled_from"]`` holding the original spacing and shape. A sample already at
    the target spacing is returned unchanged. MONAI ``Resize`` does the interpolation.
    """
    from monai.transforms import Resize

    meta = dict(sample[keys.META])
    shape = list(sample[keys.MRI].shape[1:])
    spacing = [float(s) for s in meta["spacing"]]
    new_shape = resampled_shape(shape, spacing, target_spacing)
    if new_shape == shape:
        return sample
    out = dict(sample)
    out[keys.MRI] = torch.as_tensor(Resize(new_shape, mode="trilinear")(sample[keys.MRI].float()))
    if keys.BRAIN in sample:
        b = Resize(new_shape, mode="nearest")(sample[keys.BRAIN].float())
        out[keys.BRAIN] = torch.as_tensor(b) > 0.5
    meta["resampled_from"] = {"spacing": spacing, "shape": shape}
    meta["spacing"] = [s * n / m for s, n, m in zip(spacing, shape, new_shape)]
    meta["cropped_shape"] = new_shape
    out[keys.META] = meta
    return out


def mirror_axes(ndim: int = 3) -> list[tuple[int, ...]]:
    """All ``2**ndim`` mirrorings as tuples of spatial axes (``()`` is the identity)."""
    return [c for r in range(ndim + 1) for c in itertools.combinations(range(ndim), r)]


def output_path(output: Path, case_id: str, single: bool) -> Path:
    """``OUT_DIR/<case_id>.nii.gz``, or ``output`` itself when it names a file and there is one case."""
    if single and output.name.endswith(NIFTI_SUFFIXES):
        return output
    return output / f"{case_id}.nii.gz"


# --- the predictor ---------------------------------------------------------------------------------
class Predictor:
    """Whole-case prediction from a trifuse checkpoint (see the module docstring).

    Args:
        model: a loaded module (:func:`load_model`): a teacher (``inputs``, ``infer(x)``) or a
            student (``semantic_for_sample``, ``infer(x, prior, text)``).
        device: where the model runs (the model is moved there).
        tta: average the logits of the 8 mirrorings (nnU-Net test-time mirroring).
        postprocess: apply the checkpoint's post-processing decision.
        overlap, sw_batch_size: sliding-window overrides (default: the model's).
        ct_model: fitted CT mixture for a CT teacher (default: the one in the checkpoint's pixel tier, else the tissue table).
        spacing_tolerance: relative spacing difference above which a case is resampled *and*
            reported in the log (below it, the case is used at its own spacing).
        target_spacing: override of the training spacing (mm) recorded in the checkpoint.
    """

    def __init__(
        self,
        model,
        device: str = "cpu",
        tta: bool = True,
        postprocess: bool = True,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        ct_model: str | None = None,
        spacing_tolerance: float = 0.05,
        target_spacing: Optional[Sequence[float]] = None,
    ):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.tta = bool(tta)
        self.postprocess = bool(postprocess)
        if overlap is not None:
            self.model.overlap = float(overlap)
            if hasattr(self.model, "hparams") and "overlap" in self.model.hparams:
                self.model.hparams.overlap = float(overlap)
        if sw_batch_size is not None:
            self.model.sw_batch_size = int(sw_batch_size)
            if hasattr(self.model, "hparams") and "sw_batch_size" in self.model.hparams:
                self.model.hparams.sw_batch_size = int(sw_batch_size)
        self.meta = dict(getattr(model, "trifuse_meta", {}) or {})
        spacing = target_spacing if target_spacing is not None else self.meta.get("spacing")
        self.target_spacing = [float(s) for s in spacing] if spacing else None
        self.spacing_tolerance = float(spacing_tolerance)
        self.decision = self.meta.get("postprocessing") or {}
        self.transforms = input_transforms(model.inputs, ct_model, (getattr(model, "trifuse_meta", None) or {}).get("pixel_tier"))
        self.threshold = float(getattr(model, "threshold", 0.5))

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, device: str = "auto", **kwargs) -> "Predictor":
        """Load ``ckpt`` (:func:`load_model`) on ``device`` (``"auto"``: CUDA when available)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
        return cls(load_model(ckpt, device), device=device, **kwargs)

    # --- one prepared sample ---------------------------------------------------------------
    def needs_resampling(self, spacing: Sequence[float]) -> bool:
        """True when ``spacing`` differs from the training spacing by more than the tolerance."""
        if not self.target_spacing:
            return False
        return any(abs(float(s) - t) > self.spacing_tolerance * t for s, t in zip(spacing, self.target_spacing))

    def _logits_fn(self, sample: dict) -> Callable[[tuple[int, ...]], torch.Tensor]:
        """``f(mirror_axes) -> (1, 3, d, h, w)`` logits of the (mirrored, then unmirrored) sample."""
        model = self.model
        if hasattr(model, "semantic_for_sample"):  # the student: MRI → priors → student
            prior, text = model.semantic_for_sample(sample)
            x = torch.as_tensor(sample[keys.MRI]).float()[None].to(self.device)

            def f(axes):
                dims = [2 + a for a in axes]
                xf = x.flip(dims) if dims else x
                pf = None if prior is None else (prior.flip(dims) if dims else prior)
                out = model.infer(xf, pf, text).float()
                return out.flip(dims) if dims else out

            return f
        x = torch.cat([torch.as_tensor(sample[k]).float()[None] for k in model.inputs], dim=1).to(self.device)

        def g(axes):
            dims = [2 + a for a in axes]
            out = model.infer(x.flip(dims) if dims else x).float()
            return out.flip(dims) if dims else out

        return g

    @torch.no_grad()
    def predict_probabilities(self, sample: dict) -> torch.Tensor:
        """Region probabilities ``(3, d, h, w)`` float32 on the sample's own (cropped) grid.

        The sample is resampled to the training spacing when needed and the probabilities
        are resampled back (trilinear) before any thresholding.
        """
        meta = sample[keys.META]
        shape = list(sample[keys.MRI].shape[1:])
        work = sample
        if self.needs_resampling(meta["spacing"]):
            log.warning(
                "%s: spacing %s mm differs from the training spacing %s mm; resampling to it and back",
                meta.get("case_id", "?"),
                [round(float(s), 3) for s in meta["spacing"]],
                self.target_spacing,
            )
            work = resample_sample(sample, self.target_spacing)
        for t in self.transforms:
            work = t(work)
        f = self._logits_fn(work)
        axes_list = mirror_axes(3) if self.tta else [()]
        with torch.inference_mode():
            logits = sum(f(a) for a in axes_list) / len(axes_list)
            probs = torch.sigmoid(logits)
        if list(probs.shape[2:]) != shape:
            probs = F.interpolate(probs, size=shape, mode="trilinear", align_corners=False)
        return probs[0].cpu()

    def predict_regions(self, sample: dict) -> torch.Tensor:
        """Binary region masks ``(3, d, h, w)`` (bool) on the sample's grid, post-processed."""
        regions = self.predict_probabilities(sample) > self.threshold
        if self.postprocess and self.decision:
            regions = apply_decision(regions, self.decision, sample[keys.META]["spacing"])
        return regions

    # --- cases and folders -------------------------------------------------------------------
    def predict_case(self, case) -> np.ndarray:
        """Labels of a :class:`~trifuse.io.validate.DecodedCase` on its own grid (uint8, its year's convention)."""
        from trifuse.io.cache import paste_back
        from trifuse.io.labels import regions_to_labels

        sample = prepare_case(case)
        regions = self.predict_regions(sample).to(torch.uint8).numpy()
        labels = regions_to_labels(regions, case.record.year)
        return paste_back(labels, sample[keys.META]).astype(np.uint8)

    def predict_case_dir(self, case_dir: str | Path) -> np.ndarray:
        """Labels of the single BraTS case in ``case_dir`` (see :meth:`predict_case`)."""
        from trifuse.io.discovery import discover_cases
        from trifuse.io.validate import decode_case

        records = discover_cases(case_dir)
        if len(records) != 1:
            raise ValueError(f"{case_dir}: expected one case, found {len(records)}")
        return self.predict_case(decode_case(records[0]))

    def predict_folder(self, input_dir, output, overwrite: bool = False, report=None, shard: tuple[int, int] = (0, 1)) -> dict:
        """Segment every case under ``input_dir`` into ``output`` (``<case_id>.nii.gz``, atomic).

        Cases whose output exists are skipped unless ``overwrite``; an invalid or failing case
        is listed with its problems and the others go on. ``shard=(k, n)`` takes every n-th case
        from the k-th (``trifuse predict --workers n`` runs n such processes). Cases stream:
        one decoded case in memory at a time.

        Returns:
            ``{"written": [...], "skipped": [...], "failed": {case_id: [problems]}, "seconds": {case_id: s},
            "cases": {case_id: record}}``, a record per written case: its ``input_shape`` and
            ``input_spacing`` (mm, the reference image's), the ``model_spacing`` it was predicted
            at (the checkpoint's training spacing, ``None`` when not recorded), ``resampled``,
            ``tta`` and ``seconds``.
        """
        from trifuse.io.discovery import discover_cases
        from trifuse.io.nifti import DataError, sweep_dead_temps, write_nifti
        from trifuse.io.validate import CaseValidationError, check_prediction, decode_case

        records = discover_cases(input_dir)
        output = Path(output)
        single = len(records) == 1
        if output.name.endswith(NIFTI_SUFFIXES) and not single:
            raise ValueError(f"{output}: a file name needs a single input case, but {input_dir} holds {len(records)}")
        result: dict = {"written": [], "skipped": [], "failed": {}, "seconds": {}, "cases": {}}
        sweep_dead_temps(output_path(output, records[0].case_id, single).parent)  # a killed run's temporaries
        for i, rec in enumerate(records):
            if i % shard[1] != shard[0]:
                continue
            dest = output_path(output, rec.case_id, single)
            if dest.exists() and not overwrite:
                result["skipped"].append(rec.case_id)
                if report:
                    report(i + 1, len(records), rec.case_id, f"exists, skipped ({dest})")
                continue
            t0 = time.perf_counter()
            try:
                case = decode_case(rec, with_seg=False)  # prediction needs only the four MRI files
            except CaseValidationError as exc:
                result["failed"][rec.case_id] = exc.problems
                if report:
                    report(i + 1, len(records), rec.case_id, "INVALID: " + "; ".join(exc.problems))
                continue
            try:
                full = self.predict_case(case)
                ref = case.reference
                check_prediction(dest, full, ref, rec.year)  # never write what evaluate could not score
                write_nifti(dest, full, ref.affine, header=ref.header)
            except (DataError, ValueError, RuntimeError) as exc:
                result["failed"][rec.case_id] = [f"{type(exc).__name__}: {exc}"]
                if report:
                    report(i + 1, len(records), rec.case_id, f"FAILED: {exc}")
                continue
            dt = time.perf_counter() - t0
            result["written"].append(rec.case_id)
            result["seconds"][rec.case_id] = dt
            spacing = [float(v) for v in ref.spacing]
            result["cases"][rec.case_id] = {
                "input_shape": [int(n) for n in full.shape],
                "input_spacing": spacing,
                "model_spacing": self.target_spacing,
                "resampled": self.needs_resampling(spacing),
                "tta": self.tta,
                "seconds": dt,
            }
            if report:
                report(i + 1, len(records), rec.case_id, f"{dest} ({dt:.1f} s)")
        return result


def apply_decision(regions: torch.Tensor, decision: dict, spacing: Sequence[float]) -> torch.Tensor:
    """:func:`trifuse.postprocess.apply_postprocessing` (imported lazily: scikit-image)."""
    from trifuse.postprocess import apply_postprocessing

    return apply_postprocessing(regions, decision, spacing)
