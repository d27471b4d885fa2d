"""Hand-computed checks of the BraTS region metrics (trifuse.metrics.functional)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trifuse import keys
from trifuse.metrics.functional import (
    batch_region_dice_hd95,
    compute_region_dice,
    compute_region_hd95,
    hd95_single,
    lesion_wise_dice_hd95,
    per_case_spacing,
    region_dice_hd95,
)

SHAPE = (16, 16, 16)


def regions(*masks) -> np.ndarray:
    """Stack up to three (D, H, W) masks into (3, D, H, W); missing channels are empty."""
    out = np.zeros((3, *SHAPE), dtype=bool)
    for i, m in enumerate(masks):
        out[i] = m
    return out


def cube(lo, size, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return m


def voxel(idx, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[idx] = True
    return m


# ------------------------------------------------------------------------------------- Dice
def test_dice_two_cubes_known_overlap():
    # 4³ cubes shifted by 2 voxels along D: overlap 2·4·4 = 32 → Dice = 64 / 128 = 0.5
    a, b = cube((2, 2, 2), 4), cube((4, 2, 2), 4)
    # 6³ vs 4³ nested: overlap 64 → Dice = 128 / (216 + 64)
    c, d = cube((2, 2, 2), 6), cube((3, 3, 3), 4)
    res = region_dice_hd95(regions(a, c, a), regions(b, d, a))
    assert res["dice_WT"] == pytest.approx(0.5, abs=1e-7)
    assert res["dice_TC"] == pytest.approx(128 / 280, abs=1e-7)
    assert res["dice_ET"] == pytest.approx(1.0, abs=1e-7)
    assert res["hd95_ET"] == 0.0


def test_empty_conventions():
    a = cube((2, 2, 2), 4)
    e = np.zeros(SHAPE, dtype=bool)
    # WT: both empty, TC: prediction empty, ET: reference empty
    res = region_dice_hd95(regions(e, e, a), regions(e, a, e))
    assert res["dice_WT"] == 1.0 and res["hd95_WT"] == 0.0
    assert res["dice_TC"] == 0.0 and res["hd95_TC"] == keys.HD95_EMPTY_MM
    assert res["dice_ET"] == 0.0 and res["hd95_ET"] == keys.HD95_EMPTY_MM
    assert keys.HD95_EMPTY_MM == pytest.approx(np.sqrt(240**2 + 240**2 + 155**2), abs=1e-5)
    # custom penalty
    assert hd95_single(e, a, empty_hd95=374.0) == 374.0


@pytest.mark.parametrize("mode", ["pooled", "max_directed"])
def test_hd95_single_voxels_anisotropic(mode):
    # one voxel each, 3 voxels apart along W with 2 mm spacing there → 6 mm; along D at 0.5 mm → 1.5 mm
    a = voxel((8, 8, 2))
    assert hd95_single(a, voxel((8, 8, 5)), (1.0, 1.0, 2.0), hd95_mode=mode) == pytest.approx(6.0, abs=1e-5)
    assert hd95_single(a, voxel((11, 8, 2)), (0.5, 1.0, 2.0), hd95_mode=mode) == pytest.approx(1.5, abs=1e-5)


@pytest.mark.parametrize("mode", ["pooled", "max_directed"])
def test_hd95_displaced_plane(mode):
    # an 8×8 plane moved by 2 slices along W (2.5 mm): every surface voxel is 5 mm from the other plane
    a = np.zeros(SHAPE, dtype=bool)
    b = np.zeros(SHAPE, dtype=bool)
    a[4:12, 4:12, 3] = True
    b[4:12, 4:12, 5] = True
    assert hd95_single(a, b, (1.0, 1.0, 2.5), hd95_mode=mode) == pytest.approx(5.0, abs=1e-5)


def test_hd95_pooled_vs_max_directed_closed_form():
    # ref = {p}, pred = {p, q} with |p - q| = 10 mm.
    # directed distances: ref→pred [0]; pred→ref [0, 10]
    # pooled [0, 0, 10]: 95th percentile (linear) = 0 + 0.9·10 = 9.0
    # max_directed: max(q95([0]), q95([0, 10])) = 9.5
    ref = voxel((3, 3, 3))
    pred = ref | voxel((13, 3, 3))
    assert hd95_single(pred, ref, hd95_mode="pooled") == pytest.approx(9.0, abs=1e-5)
    assert hd95_single(pred, ref, hd95_mode="max_directed") == pytest.approx(9.5, abs=1e-5)
    with pytest.raises(ValueError, match="hd95_mode"):
        hd95_single(pred, ref, hd95_mode="mean")


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    p = rng.random((3, *SHAPE)) > 0.7
    t = rng.random((3, *SHAPE)) > 0.7
    a = region_dice_hd95(p, t, (1.0, 2.0, 1.5))
    b = region_dice_hd95(torch.from_numpy(p).to(torch.uint8), torch.from_numpy(t).float(), (1.0, 2.0, 1.5))
    assert a == pytest.approx(b)


def test_batched_equals_per_case_and_per_case_spacing():
    rng = np.random.default_rng(1)
    p = rng.random((2, 3, *SHAPE)) > 0.6
    t = rng.random((2, 3, *SHAPE)) > 0.6
    t[1, 2] = False  # an empty reference region
    spacings = [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)]
    res = batch_region_dice_hd95(p, t, spacings)
    assert res["dice"].shape == (2, 3) and res["dice"].dtype == torch.float64
    for b in range(2):
        single = region_dice_hd95(p[b], t[b], spacings[b])
        for i, r in enumerate(keys.REGIONS):
            assert res["dice"][b, i].item() == pytest.approx(single[f"dice_{r}"])
            assert res["hd95"][b, i].item() == pytest.approx(single[f"hd95_{r}"])
    assert torch.equal(compute_region_dice(p, t), res["dice"])
    assert torch.equal(compute_region_hd95(p, t, torch.tensor(spacings)), res["hd95"])
    no_hd = batch_region_dice_hd95(p, t, hd95=False)
    assert torch.isnan(no_hd["hd95"]).all()


def test_per_case_spacing_forms():
    assert per_case_spacing(None, 2) == [(1.0, 1.0, 1.0)] * 2
    assert per_case_spacing(0.5, 1) == [(0.5, 0.5, 0.5)]
    assert per_case_spacing([1, 2, 3], 2) == [(1.0, 2.0, 3.0)] * 2
    assert per_case_spacing([[1, 1, 1], [2, 2, 2]], 2)[1] == (2.0, 2.0, 2.0)
    assert per_case_spacing(np.ones((3, 3)), 3) == [(1.0, 1.0, 1.0)] * 3
    with pytest.raises(ValueError):
        per_case_spacing([1, 2], 2)
    with pytest.raises(ValueError):
        per_case_spacing([1, 0, 1], 1)


def test_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        region_dice_hd95(np.zeros((3, 4, 4, 4)), np.zeros((3, 4, 4, 5)))
    with pytest.raises(ValueError, match="region channels"):
        region_dice_hd95(np.zeros((2, 4, 4, 4)), np.zeros((2, 4, 4, 4)))


# ------------------------------------------------------------------------------- lesion-wise
def test_lesion_wise_tp_fn_fp():
    shape = (32, 32, 32)
    l1, l2 = cube((2, 2, 2), 4, shape), cube((20, 20, 20), 4, shape)  # 64 mm³ each > 50
    fp = cube((2, 24, 2), 3, shape)
    gt = np.stack([l1 | l2] * 3)
    pred = np.stack([l1 | fp] * 3)
    res = lesion_wise_dice_hd95(pred, gt)
    for r in keys.REGIONS:
        out = res[r]
        assert (out["tp"], out["fn"], out["fp"]) == (1, 1, 1)
        # lesion 1 perfect (1, 0 mm); lesion 2 missed and one FP: (0, P) each; 3 terms
        assert out["dice"] == pytest.approx(1 / 3)
        assert out["hd95"] == pytest.approx(2 * keys.HD95_EMPTY_MM / 3)


def test_lesion_wise_merge_small_and_empty():
    shape = (32, 32, 32)
    # two GT blobs 2 voxels apart merge into one lesion under 3 dilations
    a, b = cube((4, 4, 4), 4, shape), cube((4, 4, 10), 4, shape)
    tiny = cube((25, 25, 25), 2, shape)  # 8 mm³ ≤ 50: not scored; its match is not an FP either
    gt = np.stack([a | b | tiny, a | b, np.zeros(shape, bool)])
    pred = np.stack([a | tiny, a | b, np.zeros(shape, bool)])
    res = lesion_wise_dice_hd95(pred, gt)
    assert (res["WT"]["tp"], res["WT"]["fn"], res["WT"]["fp"]) == (1, 0, 0)
    assert res["WT"]["dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert res["TC"]["dice"] == pytest.approx(1.0) and res["TC"]["hd95"] == pytest.approx(0.0)
    assert res["ET"] == {"dice": 1.0, "hd95": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0}  # nothing to score
    # through region_dice_hd95
    flat = region_dice_hd95(pred, gt, lesion_wise=True)
    assert flat["lesion_dice_WT"] == pytest.approx(res["WT"]["dice"])
    assert flat["lesion_fp_WT"] == 0.0
