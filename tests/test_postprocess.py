"""BraTS post-processing: component filtering and ET → NCR, decided on validation, kept in checkpoints."""
from __future__ import annotations

import torch

from trifuse.postprocess import PostprocessingSearch, apply_postprocessing, et_to_ncr, remove_small_components

SP = (1.0, 1.0, 1.0)


def _case(et_blob: int, with_big: bool = True):
    """Regions (3, 32, 32, 32): a 10³ WT/TC block; ET either a ``et_blob``-voxel blob or a big one."""
    r = torch.zeros(3, 32, 32, 32, dtype=torch.bool)
    r[0, 4:14, 4:14, 4:14] = True
    r[1, 4:14, 4:14, 4:14] = True
    if with_big:
        r[2, 5:13, 5:13, 5:13] = True  # 512 voxels
    else:
        n = 0
        for z in range(5, 13):
            for y in range(5, 13):
                for x in range(5, 13):
                    if n < et_blob:
                        r[2, z, y, x] = True
                        n += 1
    return r


def test_small_et_becomes_ncr_and_large_stays():
    small = _case(20, with_big=False)
    assert int(small[2].sum()) == 20
    out = et_to_ncr(small, et_min_mm3=100.0, spacing=SP)
    assert int(out[2].sum()) == 0  # ET cleared ...
    assert torch.equal(out[1], small[1])  # ... its voxels stay tumour core (NCR)
    assert torch.equal(out[0], small[0])
    big = _case(0, with_big=True)
    assert torch.equal(et_to_ncr(big, 100.0, SP), big)


def test_threshold_is_a_volume_in_mm3():
    small = _case(20, with_big=False)  # 20 voxels of 2 mm = 160 mm^3
    assert int(et_to_ncr(small, 100.0, (2.0, 2.0, 2.0))[2].sum()) == 20
    assert int(et_to_ncr(small, 200.0, (2.0, 2.0, 2.0))[2].sum()) == 0


def test_component_filter_removes_only_small_components_and_keeps_nesting():
    r = _case(0)
    r[0, 25:27, 25:27, 25:27] = True  # an 8-voxel WT island
    r[1, 25:27, 25:27, 25:27] = True
    out = apply_postprocessing(r, {"min_component_mm3": {"WT": 50.0}, "et_min_mm3": 0.0}, SP)
    assert int(out[0].sum()) == 1000 and int(out[1].sum()) == 1000  # TC island removed with its WT parent
    assert not out[0, 25:27, 25:27, 25:27].any() and not out[1, 25:27, 25:27, 25:27].any()
    assert int(remove_small_components(r[0], 5.0, SP).sum()) == 1008


def test_search_picks_et_threshold_that_helps_and_nothing_when_nothing_helps():
    # two cases without ET where the model predicts a 20-voxel false positive; one with a real ET
    s = PostprocessingSearch()
    fp = _case(20, with_big=False)
    truth_no_et = fp.clone()
    truth_no_et[2] = False
    s.update(fp, truth_no_et, SP)
    s.update(fp, truth_no_et, SP)
    big = _case(0)
    s.update(big, big, SP)
    d = s.decide()
    assert d["et_min_mm3"] > 20.0 and d["et_min_mm3"] <= 512.0  # clears the FP, keeps the real ET
    assert d["val_dice"]["ET"]["none"] < 0.34 and d["val_dice"]["ET"]["post"] == 1.0
    # perfect predictions, nnU-Net's rule (no tie-break): nothing to gain, so nothing is switched on
    s2 = PostprocessingSearch(et_tie_margin=None)
    s2.update(big, big, SP)
    d2 = s2.decide()
    assert d2["et_min_mm3"] == 0.0 and all(v == 0.0 for v in d2["min_component_mm3"].values())
    assert torch.equal(apply_postprocessing(big, d2, SP), big)


def test_tie_break_takes_the_largest_harmless_et_threshold_below_the_smallest_real_et():
    # validation: one case with a real 512 mm³ ET, predicted perfectly; no ET-free case, so no
    # threshold helps. The tie-break takes the largest candidate ≤ 0.5 × 512 mm³ (200 mm³)
    big = _case(0)
    s = PostprocessingSearch()
    s.update(big, big, SP)
    d = s.decide()
    assert d["et_min_mm3"] == 200.0 and d.get("et_tie_break") is True
    assert all(v == 0.0 for v in d["min_component_mm3"].values())  # component filters keep nnU-Net's rule
    assert d["val_dice"]["ET"]["post"] == d["val_dice"]["ET"]["none"] == 1.0  # harmless on validation
    assert torch.equal(apply_postprocessing(big, d, SP), big)  # the real ET stays
    # an unseen ET-free case with a 20-voxel false-positive ET: it becomes NCR (TC keeps it)
    fp = _case(20, with_big=False)
    out = apply_postprocessing(fp, d, SP)
    assert not out[2].any() and torch.equal(out[1], fp[1])
    # a threshold that would cut a real validation ET is never taken: smallest real ET 20 mm³
    s3 = PostprocessingSearch()
    s3.update(fp, fp, SP)
    assert s3.decide()["et_min_mm3"] == 0.0
