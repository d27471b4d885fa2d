"""``trifuse predict --ckpt C --input CASE_DIR_OR_DATASET_DIR --output OUT_DIR``: segment BraTS cases.

For every case found under ``--input`` (a case folder, or a dataset folder in any BraTS
layout), this stage

1. validates the four MRI files (:func:`trifuse.io.validate.decode_case`): a missing
   modality, a shape/affine mismatch, NaN/Inf, a corrupt or 4-D file fails the case with a
   message naming the file and the problem, and *no* output is written for it;
2. prepares the network input exactly as the cache does (:mod:`trifuse.io.cache`): brain
   mask = any contrast non-zero, crop to the brain box plus margin, per-channel z-score
   over the brain, float16 storage precision;
3. runs MONAI sliding-window inference (the model's ROI; ``--overlap`` to change it);
4. turns regions into labels in the *input* year's convention
   (:func:`trifuse.io.labels.regions_to_labels`: 1/2/4 for 2020/2021, 1/2/3 for 2023),
   pastes them back into the original grid and writes ``OUT_DIR/<case_id>.nii.gz``
   (uint8, the input's affine and header) atomically.

Cases whose output exists are skipped (``--overwrite`` to redo them); failed cases are
listed and the command exits 1 after the others are done.

Models: any LightningModule checkpoint of this package whose module has ``inputs`` (sample
keys) and ``predict_regions(x) -> (B, 3, D, H, W) bool`` (or ``infer(x)`` logits), e.g.
:class:`trifuse.lightning.teacher.TeacherModule`. Only the four MRI files are needed: a
US or CT teacher gets its input from the pixel tier on the fly (``SimulateUltrasound`` with
a fixed seed and the default probe; ``SynthesizeCT`` with ``--ct-model`` or the tissue-table
default), which matches training only as far as those settings do.
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from lightning_app.stages import StageError, progress

NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --- library part (also used by tests and the inference server) ----------------------------
def load_model(ckpt: str | Path, device: str = "cpu"):
    """Load a trifuse LightningModule checkpoint for inference (eval mode, on ``device``).

    The module class comes from the checkpoint (``hyper_parameters._class_path``, written
    by LightningCLI); checkpoints made in Python default to
    :class:`~trifuse.lightning.teacher.TeacherModule`. Only classes of this package are
    imported from a checkpoint.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: a class outside ``trifuse``, or a module without ``inputs``.
    """
    import torch

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
    return model.to(device).eval()


def prepare_case(case, margin_mm: float | None = None) -> dict:
    """A validated case as a sample dict, prepared exactly like the cache does.

    Args:
        case: :class:`trifuse.io.validate.DecodedCase`.
        margin_mm: brain-box margin; default the cache's (:data:`trifuse.io.cache.DEFAULT_MARGIN_MM`).

    Returns:
        sample with ``mri`` ``(4, d, h, w)`` float32, ``brain`` ``(1, d, h, w)`` bool, ``case_id``
        and ``meta`` (``affine``, ``spacing``, ``shape``, ``crop_box``, ``year``, ``applied``).
    """
    import numpy as np
    import torch

    from trifuse import keys
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
        "spacing": list(ref.spacing),
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


def input_transforms(inputs, ct_model: str | None = None) -> list:
    """Pixel-tier transforms that derive the model's non-MRI inputs from the MRI."""
    from trifuse import keys

    out = []
    for k in inputs:
        if k == keys.MRI:
            continue
        if k == keys.US:
            from trifuse.physics.transforms import SimulateUltrasound

            out.append(SimulateUltrasound(seed=0))
        elif k == keys.CT:
            from trifuse.physics.transforms import SynthesizeCT

            out.append(SynthesizeCT(ct_model))
        else:
            raise ValueError(f"the model needs input {k!r}, which cannot be made from the four MRI files")
    return out


def predict_sample(model, sample: dict, transforms=()) -> "np.ndarray":
    """Binary region masks ``(3, d, h, w)`` (uint8) of a prepared sample."""
    import torch

    for t in transforms:
        sample = t(sample)
    if hasattr(model, "predict_sample_regions"):  # the student: MRI → priors → student
        return model.predict_sample_regions(sample)[0].to(torch.uint8).cpu().numpy()
    device = next(model.parameters()).device
    x = torch.cat([sample[k].float()[None] for k in model.inputs], dim=1).to(device)
    with torch.inference_mode():
        if hasattr(model, "predict_regions"):
            regions = model.predict_regions(x)
        else:
            regions = torch.sigmoid(model.infer(x).float()) > 0.5
    return regions[0].to(torch.uint8).cpu().numpy()


def output_path(output: Path, case_id: str, single: bool) -> Path:
    """``OUT_DIR/<case_id>.nii.gz``, or ``output`` itself when it names a file and there is one case."""
    if single and output.name.endswith(NIFTI_SUFFIXES):
        return output
    return output / f"{case_id}.nii.gz"


def predict_cases(
    ckpt,
    input_dir,
    output,
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    overwrite: bool = False,
    ct_model: str | None = None,
    report=None,
) -> dict:
    """Segment every case under ``input_dir`` (see the module docstring).

    Returns:
        ``{"written": [...], "skipped": [...], "failed": {case_id: [problems]}}``.

    Raises:
        FileNotFoundError / ValueError: no input, no checkpoint, no BraTS case found.
    """
    import numpy as np
    import torch

    from trifuse.io.cache import paste_back
    from trifuse.io.discovery import discover_cases
    from trifuse.io.labels import regions_to_labels
    from trifuse.io.nifti import DataError, write_nifti
    from trifuse.io.validate import CaseValidationError, decode_case

    records = discover_cases(input_dir)
    output = Path(output)
    single = len(records) == 1
    if output.name.endswith(NIFTI_SUFFIXES) and not single:
        raise ValueError(f"{output}: a file name needs a single input case, but {input_dir} holds {len(records)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    result = {"written": [], "skipped": [], "failed": {}}
    todo = [r for r in records if overwrite or not output_path(output, r.case_id, single).exists()]
    result["skipped"] = [r.case_id for r in records if r not in todo]
    if not todo:
        return result
    model = load_model(ckpt, device)
    if overlap is not None:
        model.overlap = float(overlap)
    if sw_batch_size is not None:
        model.sw_batch_size = int(sw_batch_size)
    transforms = input_transforms(model.inputs, ct_model)
    for i, rec in enumerate(records):
        dest = output_path(output, rec.case_id, single)
        if rec not in todo:
            if report:
                report(i + 1, len(records), rec.case_id, f"exists, skipped ({dest})")
            continue
        t0 = time.perf_counter()
        try:
            case = decode_case(rec)
        except CaseValidationError as exc:
            result["failed"][rec.case_id] = exc.problems
            if report:
                report(i + 1, len(records), rec.case_id, "INVALID: " + "; ".join(exc.problems))
            continue
        try:
            sample = prepare_case(case)
            regions = predict_sample(model, sample, transforms)
            labels = regions_to_labels(regions, rec.year)
            full = paste_back(labels, sample["meta"]).astype(np.uint8)
            ref = case.reference
            write_nifti(dest, full, ref.affine, header=ref.header)
        except (DataError, ValueError, RuntimeError) as exc:
            result["failed"][rec.case_id] = [f"{type(exc).__name__}: {exc}"]
            if report:
                report(i + 1, len(records), rec.case_id, f"FAILED: {exc}")
            continue
        result["written"].append(rec.case_id)
        if report:
            report(i + 1, len(records), rec.case_id, f"{dest} ({time.perf_counter() - t0:.1f} s)")
    return result


# --- the stage ------------------------------------------------------------------------------
def run(args) -> int:
    res = predict_cases(
        args.ckpt,
        args.input,
        args.output,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        overwrite=args.overwrite,
        ct_model=args.ct_model,
        report=progress("predict"),
    )
    n = len(res["written"]) + len(res["skipped"]) + len(res["failed"])
    print(f"predict: {len(res['written'])} written, {len(res['skipped'])} existing skipped, {len(res['failed'])} failed of {n} case(s) → {args.output}")
    if res["failed"]:
        for case_id, problems in sorted(res["failed"].items()):
            print(f"FAILED {case_id}:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        first = next(iter(sorted(res["failed"].items())))
        raise StageError(
            f"{len(res['failed'])} case(s) failed, no output written for them: {first[0]}: {first[1][0]}"
            + (f" (and {len(res['failed']) - 1} more, see above)" if len(res["failed"]) > 1 else "")
        )
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "predict",
        help="segment BraTS cases: --ckpt C --input CASE_OR_DATASET --output OUT_DIR (without --input: LightningCLI predict)",
    )
    s.add_argument("--ckpt", required=True, help="model checkpoint (e.g. runs/teachers/mri/checkpoints/best.ckpt)")
    s.add_argument("--input", required=True, help="a case folder or a dataset folder (BraTS 2020/2021/2023 layout); only the four MRI files are needed")
    s.add_argument("--output", required=True, help="output folder (<case_id>.nii.gz per case), or a .nii.gz file for a single case")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    s.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    s.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: the model's)")
    s.add_argument("--overwrite", action="store_true", help="redo cases whose output exists (default: skip them)")
    s.add_argument("--ct-model", default=None, help="fitted CT mixture for a CT teacher (default: tissue-table CT)")
    s.set_defaults(func=run)
