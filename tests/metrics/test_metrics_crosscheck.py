"""Agreement with the official brats-evaluation package (runs only where .venv-brats exists).

Create the separate environment with::

    python3 -m venv .venv-brats && .venv-brats/bin/pip install brats-evaluation
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trifuse import keys

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-brats"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (VENV / "bin" / "brats-evaluate").exists(), reason="no .venv-brats with brats-evaluation"),
]


def _crosscheck_module():
    spec = importlib.util.spec_from_file_location("crosscheck_brats_eval", REPO / "bench" / "crosscheck_brats_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_agrees_with_brats_evaluation(tmp_path):
    mod = _crosscheck_module()
    s = mod.crosscheck(tmp_path, VENV, verbose=False)
    assert s["n_comparable"] >= 20
    assert s["max_abs_diff_dice"] <= 1e-4
    assert s["max_abs_diff_hd95_mm"] <= 0.01
    # anisotropic spacing: same Dice; official HD95 is in voxel units, ours in mm
    assert s["anisotropic_max_abs_diff_dice"] <= 1e-4
    assert s["anisotropic_max_abs_diff_hd95_at_unit_spacing"] <= 0.01
    # the documented convention differences are exactly these
    for r in s["conventions"]:
        cat = r["category"]
        if cat == "both_empty":
            assert (r["ours_dice"], r["ours_hd95"]) == (1.0, 0.0)
            assert r["official_dice"] != r["official_dice"]  # NaN in brats-evaluation
        elif cat in ("one_empty", "missing"):
            assert r["ours_dice"] == r["official_dice"] == 0.0
            assert r["ours_hd95"] == pytest.approx(keys.HD95_EMPTY_MM) and r["official_hd95"] == 373.0
        elif cat == "disjoint":
            assert r["ours_dice"] == r["official_dice"] == 0.0
            assert r["ours_hd95"] < 373.0 and r["official_hd95"] == 373.0
        else:
            assert cat == "anisotropic"
    assert s["ok"]
