"""Cross-check ``trifuse.metrics.report.evaluate_folder`` against the official ``brats-evaluation``.

The official package (PyPI ``brats-evaluation``, panoptica-based) pins old numpy/pandas/rich,
so it lives in its own virtual environment and runs here as a subprocess, through its own
console scripts ``brats-evaluate`` and ``brats-parse-metrics seg`` (the leaderboard path)::

    python3 -m venv .venv-brats && .venv-brats/bin/pip install brats-evaluation
    .venv/bin/python bench/crosscheck_brats_eval.py [--venv .venv-brats] [--workdir DIR]

It writes small synthetic cases (random blobs with nested WT ⊃ TC ⊃ ET) in the 2021 (ET = 4)
and 2023 (ET = 3) conventions, including empty-region cases, scores them both ways and prints
the maximum absolute differences of global Dice and HD95 (targets: ≤ 1e-4 Dice, ≤ 0.01 mm).

Case × region pairs where the official tool follows a different *convention* are reported
separately, with both values, and not counted in the differences:

* ``both_empty``: brats-evaluation gives NaN (left out of its means); BraTS/DESIGN: Dice 1, HD95 0.
* ``one_empty`` / ``missing``: brats-evaluation caps HD95 at 373 (its parser maps inf → 373);
  we use 373.128664 (the 240×240×155 mm diagonal, ``keys.HD95_EMPTY_MM``). Dice agrees (0).
* ``disjoint`` (both non-empty, no overlap): panoptica treats "no true positive voxel" as an
  edge case, HD95 = inf → 373; we report the real distance. Dice agrees (0).
* ``anisotropic`` spacing: panoptica's global HD95 is computed without voxel spacing (voxel
  units); ours is in mm from the NIfTI zooms. Our value at unit spacing is checked instead.

Exit status 0 when the comparable pairs meet the targets.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trifuse import keys  # noqa: E402
from trifuse.io.discovery import case_file_name, case_id_for  # noqa: E402
from trifuse.io.labels import convention, labels_to_regions, regions_to_labels  # noqa: E402
from trifuse.io.nifti import write_nifti  # noqa: E402
from trifuse.metrics.functional import region_dice_hd95  # noqa: E402
from trifuse.metrics.report import evaluate_folder  # noqa: E402

DICE_TOL = 1e-4
HD95_TOL_MM = 0.01
SHAPE = (56, 60, 44)

#: case kinds written per year; "aniso" only once (2021)
KINDS = ("normal", "no_pred_et", "no_ref_et", "no_et", "disjoint", "missing", "fp_holes", "aniso")


# ----------------------------------------------------------------------------- synthesis
def _blob(rng: np.random.Generator, shape, center, radii, roughness: float = 0.25) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    r = np.sqrt(sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3)))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=3.0)
    noise /= np.abs(noise).max() + 1e-9
    return r + roughness * noise < 1.0


def _nested(rng: np.random.Generator, shape, center, scale: float, with_et: bool = True) -> np.ndarray:
    """(3, D, H, W) WT ⊃ TC ⊃ ET masks."""
    wt = _blob(rng, shape, center, np.array([12, 14, 10]) * scale)
    tc = _blob(rng, shape, center + rng.normal(0, 1, 3), np.array([7, 8, 6]) * scale) & wt
    et = (tc & ~ndimage.binary_erosion(tc, iterations=2)) if with_et else np.zeros_like(tc)
    return np.stack([wt, tc, et])


def _perturb(rng: np.random.Generator, regions: np.ndarray) -> np.ndarray:
    out = np.empty_like(regions)
    shift = rng.integers(-2, 3, size=3)
    for c in range(regions.shape[0]):
        m = np.roll(regions[c], tuple(shift), axis=(0, 1, 2))
        m = ndimage.binary_dilation(m) if rng.random() < 0.5 else ndimage.binary_erosion(m)
        out[c] = m
    out[1] &= out[0]
    out[2] &= out[1]
    return out


def make_cohort(root: Path, year: int, seed: int) -> list[dict]:
    """Write references (case folders + a flat copy for the official tool) and predictions.

    Returns:
        one dict per case: case_id, kind, spacing.
    """
    rng = np.random.default_rng(seed)
    data_dir, pred_dir, ref_flat = root / "data", root / "pred", root / "ref_flat"
    for d in (data_dir, pred_dir, ref_flat):
        d.mkdir(parents=True, exist_ok=True)
    center = np.array(SHAPE, dtype=np.float64) / 2
    cases = []
    kinds = [k for k in KINDS if k != "aniso" or year == 2021]
    for i, kind in enumerate(kinds):
        case_id = case_id_for(year, i)
        spacing = (1.0, 1.0, 2.5) if kind == "aniso" else (1.0, 1.0, 1.0)
        ref = _nested(rng, SHAPE, center + rng.normal(0, 2, 3), 1.0, with_et=kind not in ("no_ref_et", "no_et"))
        pred = _perturb(rng, ref)
        if kind in ("no_pred_et", "no_et"):
            pred[2] = False
        if kind == "no_ref_et":
            pred[2] = pred[1] & ~ndimage.binary_erosion(pred[1], iterations=2)
        if kind == "disjoint":
            pred = _nested(rng, SHAPE, np.array([10.0, 10.0, 8.0]), 0.45)
            pred[0] |= ref[0] & (np.indices(SHAPE)[0] > center[0] + 6)  # WT still overlaps a little
        if kind == "fp_holes":
            pred[0] |= _blob(rng, SHAPE, (6, 50, 36), (3, 3, 3), 0.1)  # a false-positive lesion
            pred[:, int(center[0]) - 1 : int(center[0]) + 1] = False  # a gap through the tumour
        affine = np.diag([*spacing, 1.0])
        seg = regions_to_labels(ref, year)
        case_dir = data_dir / case_id
        write_nifti(case_dir / case_file_name(case_id, year, "seg"), seg, affine)
        write_nifti(ref_flat / f"{case_id}.nii.gz", seg, affine)
        if kind != "missing":
            write_nifti(pred_dir / f"{case_id}.nii.gz", regions_to_labels(pred, year), affine)
        cases.append({"case_id": case_id, "kind": kind, "spacing": spacing})
    return cases


def panoptica_config(year: int, out: Path, venv: Path) -> Path:
    """The bundled BraTS-GLI config (2023 labels), or its 2021 variant with ET = 4."""
    py = venv / "bin" / "python"
    src = subprocess.run(
        [str(py), "-c", "from brats_evaluation import config_path; print(config_path('gli'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    text = Path(src).read_text()
    if year == 2023:
        return Path(src)
    conv = convention(year)
    # 2021: ET is 4 and there is no resection-cavity label; only the label values change
    text = text.replace(
        "    rc: !LabelGroup\n      single_instance: false\n      value_labels: [4]\n", ""
    )
    text = text.replace("value_labels: [3]", f"value_labels: [{conv.et}]")
    text = text.replace("value_labels: [1, 3]", f"value_labels: [{conv.ncr}, {conv.et}]")
    text = text.replace("value_labels: [1, 2, 3]", f"value_labels: [{conv.ncr}, {conv.ed}, {conv.et}]")
    out.write_text(text)
    return out


def run_official(root: Path, year: int, venv: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """Run brats-evaluate + brats-parse-metrics; return {(case_id, region): (dice, hd95)}."""
    cfg = panoptica_config(year, root / "panoptica_2021.yaml", venv)
    js, out_csv = root / "official.json", root / "official.csv"
    subprocess.run(
        [
            str(venv / "bin" / "brats-evaluate"),
            "--config_path", str(cfg),
            "--ref_path", str(root / "ref_flat"),
            "--pred_path", str(root / "pred"),
            "--summary_json", str(js),
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    subprocess.run(
        [str(venv / "bin" / "brats-parse-metrics"), "seg", "--json_path", str(js), "--output_csv_path", str(out_csv)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    errors = [m for m in json.loads(js.read_text())["metrics"] if "error" in m]
    if errors:
        raise RuntimeError(f"brats-evaluate failed on {errors}")
    res = {}
    with open(out_csv) as fh:
        for row in csv.DictReader(fh):
            sid = row["subject_id"]
            if sid in ("mean", "std", "median"):
                continue
            case_id = sid.removesuffix(".nii.gz")
            for reg in keys.REGIONS:
                d, h = row.get(f"global_dsc_{reg.lower()}", ""), row.get(f"global_hd95_{reg.lower()}", "")
                res[(case_id, reg)] = (float(d) if d else float("nan"), float(h) if h else float("nan"))
    return res


def _category(kind: str, ref: np.ndarray, pred: np.ndarray | None) -> str:
    if kind == "missing":
        return "missing"
    if not ref.any() and not pred.any():
        return "both_empty"
    if ref.any() != pred.any():
        return "one_empty"
    if not (ref & pred).any():
        return "disjoint"
    if kind == "aniso":
        return "anisotropic"
    return "comparable"


def crosscheck(workdir: Path, venv: Path, verbose: bool = True) -> dict:
    """Run both evaluators on both label conventions; return differences and convention cases."""
    comparable: list[dict] = []
    conventions: list[dict] = []
    for year, seed in ((2021, 0), (2023, 1)):
        root = workdir / str(year)
        if root.exists():
            shutil.rmtree(root)
        cases = make_cohort(root, year, seed)
        ours = evaluate_folder(root / "pred", root / "data", root / "ours", print_table=False)
        ours_rows = {}
        with open(root / "ours" / "per_case.csv") as fh:
            for row in csv.DictReader(fh):
                ours_rows[(row["case_id"], row["region"])] = (float(row["dice"]), float(row["hd95"]))
        official = run_official(root, year, venv)
        for case in cases:
            cid, kind = case["case_id"], case["kind"]
            ref = labels_to_regions(np.asarray(_load(root / "ref_flat" / f"{cid}.nii.gz")), year).astype(bool)
            pred_path = root / "pred" / f"{cid}.nii.gz"
            pred = labels_to_regions(np.asarray(_load(pred_path)), year).astype(bool) if pred_path.exists() else None
            unit = region_dice_hd95(pred, ref, None) if kind == "aniso" else None
            # MONAI's own definition, to show why "pooled" is the default
            monai_hd = region_dice_hd95(pred, ref, case["spacing"], hd95_mode="max_directed") if pred is not None else None
            for i, reg in enumerate(keys.REGIONS):
                cat = _category(kind, ref[i], None if pred is None else pred[i])
                od, oh = official[(cid, reg)]
                td, th = ours_rows[(cid, reg)]
                rec = {"year": year, "case_id": cid, "kind": kind, "region": reg, "category": cat,
                       "ours_dice": td, "ours_hd95": th, "official_dice": od, "official_hd95": oh}  # fmt: skip
                if cat == "comparable":
                    rec["ours_hd95_max_directed"] = monai_hd[f"hd95_{reg}"]
                    comparable.append(rec)
                else:
                    if cat == "anisotropic":
                        rec["ours_hd95_unit_spacing"] = unit[f"hd95_{reg}"]
                    conventions.append(rec)
    dice_diff = max(abs(r["ours_dice"] - r["official_dice"]) for r in comparable)
    hd_diff = max(abs(r["ours_hd95"] - r["official_hd95"]) for r in comparable)
    monai_diff = max(abs(r["ours_hd95_max_directed"] - r["official_hd95"]) for r in comparable)
    aniso = [r for r in conventions if r["category"] == "anisotropic"]
    aniso_unit_diff = max((abs(r["ours_hd95_unit_spacing"] - r["official_hd95"]) for r in aniso), default=0.0)
    aniso_dice_diff = max((abs(r["ours_dice"] - r["official_dice"]) for r in aniso), default=0.0)
    convention_dice_diff = max(
        (abs(r["ours_dice"] - r["official_dice"]) for r in conventions if r["category"] in ("one_empty", "missing", "disjoint")),
        default=0.0,
    )
    summary = {
        "n_comparable": len(comparable),
        "max_abs_diff_dice": dice_diff,
        "max_abs_diff_hd95_mm": hd_diff,
        "max_abs_diff_hd95_mm_if_max_directed": monai_diff,
        "anisotropic_max_abs_diff_dice": aniso_dice_diff,
        "anisotropic_max_abs_diff_hd95_at_unit_spacing": aniso_unit_diff,
        "convention_cases_max_abs_diff_dice": convention_dice_diff,
        "comparable": comparable,
        "conventions": conventions,
        "ok": dice_diff <= DICE_TOL and hd_diff <= HD95_TOL_MM and aniso_unit_diff <= HD95_TOL_MM
        and aniso_dice_diff <= DICE_TOL and convention_dice_diff <= DICE_TOL,
    }
    if verbose:
        _print(summary)
    return summary


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def _print(s: dict) -> None:
    print(f"comparable case×region pairs: {s['n_comparable']}")
    print(f"max |Δ Dice|      = {s['max_abs_diff_dice']:.3g}   (target ≤ {DICE_TOL})")
    print(f"max |Δ HD95| (mm) = {s['max_abs_diff_hd95_mm']:.3g}   (target ≤ {HD95_TOL_MM})")
    print(f"(with MONAI's max-of-directed HD95 instead: max |Δ HD95| = {s['max_abs_diff_hd95_mm_if_max_directed']:.3g} mm)")
    print(f"anisotropic case: max |Δ Dice| = {s['anisotropic_max_abs_diff_dice']:.3g}, "
          f"max |Δ HD95| with our HD95 at unit spacing = {s['anisotropic_max_abs_diff_hd95_at_unit_spacing']:.3g}")  # fmt: skip
    print("convention differences (not counted above):")
    print(f"  {'year':<5}{'case':<22}{'region':<7}{'category':<12}{'ours (Dice, HD95)':>24}{'official (Dice, HD95)':>26}")
    for r in s["conventions"]:
        print(f"  {r['year']:<5}{r['case_id']:<22}{r['region']:<7}{r['category']:<12}"
              f"{r['ours_dice']:>10.4f}, {r['ours_hd95']:>10.3f}  {r['official_dice']:>12.4f}, {r['official_hd95']:>10.3f}")  # fmt: skip
    print("OK" if s["ok"] else "MISMATCH")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-brats", help="venv with brats-evaluation installed")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the cases here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the full comparison here")
    args = ap.parse_args(argv)
    if not (args.venv / "bin" / "brats-evaluate").exists():
        print(f"{args.venv}: no brats-evaluate; create it with: python3 -m venv {args.venv} && "
              f"{args.venv}/bin/pip install brats-evaluation", file=sys.stderr)  # fmt: skip
        return 2
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="crosscheck_") as tmp:
            s = crosscheck(Path(tmp), args.venv)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        s = crosscheck(args.workdir, args.venv)
    if args.json:
        args.json.write_text(json.dumps(s, indent=2, default=float))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
