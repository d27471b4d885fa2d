"""Folder evaluation: ``trifuse evaluate --pred PRED_DIR --data DATA_DIR [--out OUT_DIR]``.

Matches ``PRED_DIR/<case_id>.nii.gz`` (BraTS submission naming) with the reference cases that
:func:`trifuse.io.discovery.discover_cases` finds under ``DATA_DIR``, scores WT/TC/ET Dice and
HD95 (mm, from the NIfTI zooms) with :func:`trifuse.metrics.functional.region_dice_hd95`, and
writes, atomically:

* ``OUT_DIR/per_case.csv``: columns ``case_id,region,dice,hd95``, one row per case and region;
* ``OUT_DIR/summary.json``: mean and std per region and over regions, case counts, the
  missing predictions (scored as empty predictions, as BraTS does), and the conventions used;
* ``OUT_DIR/per_case_lesionwise.csv`` when ``lesion_wise=True``.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trifuse import keys
from trifuse.io.discovery import discover_cases
from trifuse.io.labels import convention, labels_to_regions
from trifuse.io.nifti import DataError, atomic_write_text, read_nifti, sweep_dead_temps
from trifuse.metrics.functional import HD95Mode, region_dice_hd95

__all__ = ["evaluate_folder", "format_table", "summarize"]

_PRED_EXTS = (".nii.gz", ".nii")
#: affine entries may differ by float32 round-off between writers; 1e-3 mm is far below a voxel
_AFFINE_ATOL = 1e-3


def _find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    for ext in _PRED_EXTS:
        p = pred_dir / f"{case_id}{ext}"
        if p.is_file():
            return p
    return None


def _prediction_ids(pred_dir: Path) -> set[str]:
    ids = set()
    for p in pred_dir.iterdir():
        for ext in _PRED_EXTS:
            if p.is_file() and p.name.endswith(ext) and not p.name.startswith("."):
                ids.add(p.name[: -len(ext)])
    return ids


def _label_map(path: Path, year: int, what: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    vol = read_nifti(path, dtype=None)
    data = np.asarray(vol.data)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise DataError(f"{path}: {what} contains NaN/Inf")
        if not np.all(data == np.round(data)):
            raise DataError(f"{path}: {what} has non-integer values; expected a label map")
    legal = convention(year).values
    found = np.unique(data)
    bad = [v for v in found.tolist() if v not in legal]
    if bad:
        raise DataError(f"{path}: {what} has unexpected label values {bad}; BraTS {year} uses {list(legal)}")
    return data.astype(np.uint8), vol.affine, vol.spacing


def _checked_prediction(path: Path, rec, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The label map at ``path``, or :class:`DataError` naming the file if it cannot be scored."""
    pred, pred_affine, _ = _label_map(path, rec.year, "prediction")
    if pred.shape != shape:
        raise DataError(f"{path}: shape {pred.shape} differs from the reference {rec.seg} shape {shape}")
    if not np.allclose(pred_affine, affine, atol=_AFFINE_ATOL):
        raise DataError(
            f"{path}: affine differs from the reference {rec.seg} "
            f"(max abs difference {np.abs(pred_affine - affine).max():.4g}); predictions must be on the input grid"
        )
    return pred


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "median": None}
    # std with ddof=1, as pandas (and so brats-evaluation's parser) reports it
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "median": float(np.median(arr)),
    }


def summarize(rows: Sequence[dict], regions: Sequence[str] = keys.REGIONS) -> dict:
    """Mean/std/median per region and over regions from per-case rows.

    Args:
        rows: dicts with ``case_id``, ``region``, ``dice``, ``hd95``.
        regions: region order.

    Returns:
        ``{"regions": {R: {"dice": {mean,std,median}, "hd95": {...}}}, "overall": {...},
        "dice_<R>": mean, "hd95_<R>": mean, "dice_mean": .., "hd95_mean": ..}``. "Over regions"
        statistics are taken over the per-case averages of the three regions (their mean
        equals the mean of the region means).
    """
    by_case: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], {})[r["region"]] = r
    out: dict = {"regions": {}}
    for metric in ("dice", "hd95"):
        for reg in regions:
            vals = [c[reg][metric] for c in by_case.values() if reg in c]
            out["regions"].setdefault(reg, {})[metric] = _stats(vals)
            out[f"{metric}_{reg}"] = out["regions"][reg][metric]["mean"]
        case_means = [float(np.mean([c[reg][metric] for reg in regions])) for c in by_case.values() if all(reg in c for reg in regions)]
        out.setdefault("overall", {})[metric] = _stats(case_means)
        out[f"{metric}_mean"] = out["overall"][metric]["mean"]
    return out


def format_table(summary: dict, regions: Sequence[str] = keys.REGIONS) -> str:
    """Plain-text table of mean ± std Dice and HD95 per region and overall."""

    def cell(s: dict, digits: int) -> str:
        if s["mean"] is None:
            return "n/a"
        std = "" if s["std"] is None else f" ± {s['std']:.{digits}f}"
        return f"{s['mean']:.{digits}f}{std}"

    lines = [f"{'region':<8}{'Dice':>20}{'HD95 (mm)':>22}"]
    for reg in regions:
        s = summary["regions"][reg]
        lines.append(f"{reg:<8}{cell(s['dice'], 4):>20}{cell(s['hd95'], 2):>22}")
    lines.append(f"{'mean':<8}{cell(summary['overall']['dice'], 4):>20}{cell(summary['overall']['hd95'], 2):>22}")
    n, miss = summary.get("n_cases", 0), summary.get("n_missing", 0)
    bad = summary.get("n_invalid", 0)
    lines.append(
        f"{n} cases"
        + (f", {miss} missing predictions scored as empty" if miss else "")
        + (f", {bad} invalid predictions scored as missing" if bad else "")
    )
    return "\n".join(lines)


def _csv_text(header: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})
    return buf.getvalue()


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_folder(
    pred_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    year: int | str | None = "auto",
    hd95_mode: HD95Mode = "pooled",
    empty_hd95: float = keys.HD95_EMPTY_MM,
    lesion_wise: bool = False,
    lesion_kwargs: dict | None = None,
    print_table: bool = True,
) -> dict:
    """Score a folder of predictions against BraTS references, with BraTS conventions.

    Args:
        pred_dir: folder of ``<case_id>.nii.gz`` (or ``.nii``) uint8 label maps in the data's
            label convention, on the reference grid.
        data_dir: BraTS data folder (any layout :func:`~trifuse.io.discovery.discover_cases`
            accepts). Cases without a ``seg`` file are skipped and listed.
        out_dir: where ``per_case.csv`` and ``summary.json`` go; default ``pred_dir``.
        year: BraTS release, or ``"auto"`` to detect from the folder names.
        hd95_mode: ``"pooled"`` (agrees with brats-evaluation) or ``"max_directed"`` (MONAI).
        empty_hd95: HD95 in mm when exactly one mask is empty.
        lesion_wise: also compute BraTS 2023 lesion-wise Dice/HD95.
        lesion_kwargs: options of :func:`trifuse.metrics.functional.lesion_wise_dice_hd95`.
        print_table: print the summary table to stdout.

    Returns:
        the summary dict written to ``summary.json``.

    A bad file fails its own case only, and every case is accounted for in the summary:

    * missing prediction: scored as an empty one (Dice 0 / HD95 373.13 mm where the
      reference is not empty), listed in ``missing_predictions``;
    * unreadable or truncated prediction, wrong shape or affine, labels outside the year's
      convention: scored as missing, listed with the reason (naming the file) in
      ``invalid_predictions``;
    * empty reference: scored by the BraTS empty rules, listed in ``empty_references``;
    * unreadable reference or one with bad labels: not scored, listed in ``invalid_references``.

    Cases are read one at a time, so memory does not grow with the number of cases.

    Raises:
        FileNotFoundError: ``pred_dir`` or ``data_dir`` does not exist.
        ValueError: no case with a reference segmentation.
    """
    pred_dir, data_dir = Path(pred_dir), Path(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else pred_dir
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder does not exist")
    records = discover_cases(data_dir, year=year)
    scored = [r for r in records if r.seg is not None]
    no_reference = [r.case_id for r in records if r.seg is None]
    if not scored:
        raise ValueError(f"{data_dir}: no case has a reference segmentation (seg file); nothing to evaluate")

    rows: list[dict] = []
    lesion_rows: list[dict] = []
    missing: list[str] = []
    invalid_pred: dict[str, str] = {}
    invalid_ref: dict[str, str] = {}
    empty_ref: list[str] = []
    for rec in scored:
        # one case at a time (stream): a bad file fails its case, named, never the folder
        try:
            gt, gt_affine, spacing = _label_map(rec.seg, rec.year, "reference")
        except DataError as exc:
            invalid_ref[rec.case_id] = str(exc)  # nothing to score against: listed, not scored
            continue
        if not gt.any():
            empty_ref.append(rec.case_id)  # scored by the BraTS empty rules (both empty → 1 / 0 mm)
        pred_path = _find_prediction(pred_dir, rec.case_id)
        pred = None
        if pred_path is None:
            missing.append(rec.case_id)
        else:
            try:
                pred = _checked_prediction(pred_path, rec, gt.shape, gt_affine)
            except DataError as exc:
                invalid_pred[rec.case_id] = str(exc)
        if pred is None:
            pred = np.zeros_like(gt)  # BraTS scores a missing (or unusable) prediction as an empty one
        res = region_dice_hd95(
            labels_to_regions(pred, rec.year),
            labels_to_regions(gt, rec.year),
            spacing,
            hd95_mode=hd95_mode,
            empty_hd95=empty_hd95,
            lesion_wise=lesion_wise,
            lesion_kwargs=lesion_kwargs,
        )
        for reg in keys.REGIONS:
            rows.append({"case_id": rec.case_id, "region": reg, "dice": res[f"dice_{reg}"], "hd95": res[f"hd95_{reg}"]})
            if lesion_wise:
                lesion_rows.append(
                    {
                        "case_id": rec.case_id,
                        "region": reg,
                        "dice": res[f"lesion_dice_{reg}"],
                        "hd95": res[f"lesion_hd95_{reg}"],
                        "tp": int(res[f"lesion_tp_{reg}"]),
                        "fp": int(res[f"lesion_fp_{reg}"]),
                        "fn": int(res[f"lesion_fn_{reg}"]),
                    }
                )

    known = {r.case_id for r in records}
    summary = summarize(rows)
    summary.update(
        {
            "n_cases": len(scored) - len(invalid_ref),
            "n_evaluated": len(scored) - len(invalid_ref) - len(missing) - len(invalid_pred),
            "n_missing": len(missing),
            "missing_predictions": missing,
            "n_invalid": len(invalid_pred),
            "invalid_predictions": invalid_pred,
            "invalid_references": invalid_ref,
            "empty_references": empty_ref,
            "unmatched_predictions": sorted(_prediction_ids(pred_dir) - known),
            "cases_without_reference": no_reference,
            "year": scored[0].year,
            "pred_dir": str(pred_dir),
            "data_dir": str(data_dir),
            "conventions": {
                "both_empty": {"dice": 1.0, "hd95": 0.0},
                "one_empty": {"dice": 0.0, "hd95": float(empty_hd95)},
                "missing_prediction": "scored as an empty prediction",
                "invalid_prediction": "unreadable, wrong shape/affine or labels outside the convention: scored as missing and listed",
                "invalid_reference": "not scored, listed",
                "hd95_mode": hd95_mode,
                "hd95_units": "mm (NIfTI zooms)",
                "std": "sample standard deviation (ddof=1)",
            },
        }
    )
    if lesion_wise:
        summary["lesion_wise"] = summarize(lesion_rows)

    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(out_dir)  # what a killed earlier run left (never a live writer's)
    atomic_write_text(out_dir / "per_case.csv", _csv_text(("case_id", "region", "dice", "hd95"), rows))
    if lesion_wise:
        atomic_write_text(
            out_dir / "per_case_lesionwise.csv",
            _csv_text(("case_id", "region", "dice", "hd95", "tp", "fp", "fn"), lesion_rows),
        )
    summary = _json_safe(summary)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if print_table:
        print(format_table(summary))
        if missing:
            print("missing predictions (scored as empty): " + ", ".join(missing))
        for cid, why in invalid_pred.items():
            print(f"invalid prediction of {cid} (scored as missing): {why}")
        for cid, why in invalid_ref.items():
            print(f"invalid reference of {cid} (not scored): {why}")
    return summary
