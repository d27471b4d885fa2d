import numpy as np
import pytest

from trifuse.io.discovery import discover_cases
from trifuse.io.labels import convention, labels_to_regions
from trifuse.io.validate import decode_case
from trifuse.synth import generate_case, synthesize_cohort
from trifuse.synth.cohort import TISSUES, brats_affine, case_params, case_seed


@pytest.fixture(scope="module")
def cases():
    return [generate_case(case_seed(0, i), size="tiny", year=2021, return_tissue=True) for i in range(6)]


def test_deterministic_by_seed():
    a = generate_case(11, size="tiny")
    b = generate_case(11, size="tiny")
    c = generate_case(12, size="tiny")
    for k in ("t1", "t1ce", "t2", "flair", "seg"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["params"] == b["params"]
    assert not np.array_equal(a["flair"], c["flair"])


def test_geometry_and_dtypes():
    c = generate_case(1, size="small", year=2023)
    assert c["t1"].shape == (120, 120, 78) and c["t1"].dtype == np.int16
    assert c["seg"].dtype == np.uint8 and set(np.unique(c["seg"])) <= {0, 1, 2, 3}
    np.testing.assert_allclose(c["affine"], brats_affine((120, 120, 78), 2.0))
    assert c["affine"][0, 0] == -2.0 and c["affine"][1, 1] == -2.0  # BraTS-style flips


def test_labels_nested_and_inside_brain(cases):
    for c in cases:
        reg = labels_to_regions(c["seg"], 2021)
        assert reg[0].sum() > 0
        assert np.all(reg[2] <= reg[1]) and np.all(reg[1] <= reg[0])
        assert np.all(c["t1"][c["seg"] > 0] > 0)  # tumour only inside the (skull-stripped) brain


def _mean(c, contrast, tissue_mask):
    return float(c[contrast][tissue_mask].mean())


def test_intensity_order_per_contrast(cases):
    conv = convention(2021)
    checked_et = 0
    for c in cases:
        seg, tissue = c["seg"], c["tissue"]
        wm = (tissue == 1 + TISSUES.index("wm")) & (seg == 0)
        csf = (tissue == 1 + TISSUES.index("csf")) & (seg == 0)
        ed = seg == conv.ed
        # FLAIR: oedema > white matter > CSF; T2: CSF > white matter
        assert _mean(c, "flair", ed) > _mean(c, "flair", wm) > _mean(c, "flair", csf)
        assert _mean(c, "t2", csf) > _mean(c, "t2", wm)
        assert _mean(c, "t2", ed) > _mean(c, "t2", wm)
        # T1: white matter > CSF
        assert _mean(c, "t1", wm) > _mean(c, "t1", csf)
        et, ncr = seg == conv.et, seg == conv.ncr
        if et.sum() > 5 and ncr.sum() > 5:
            assert _mean(c, "t1ce", et) > _mean(c, "t1ce", ncr)
            assert _mean(c, "t1ce", et) > _mean(c, "t1ce", wm)
            checked_et += 1
    assert checked_et >= 1


def test_cohort_variety():
    from dataclasses import asdict

    params = [asdict(case_params(case_seed(0, i), "tiny")) for i in range(30)]
    assert params[3] == generate_case(case_seed(0, 3), size="tiny")["params"]  # what the case is built from
    assert {p["enhancement"] for p in params} == {"ring", "solid", "none"}  # enhancing and non-enhancing cases
    assert any(p["n_lesions"] > 1 for p in params)  # multifocal cases
    assert min(r for p in params for r in p["radius_mm"]) < 8  # small lesions
    assert max(r for p in params for r in p["radius_mm"]) > 20


@pytest.mark.parametrize("layout", [2020, 2021, 2023])
def test_cohort_written_in_brats_layout_and_resumable(tmp_path, layout):
    out = tmp_path / "syn"
    synthesize_cohort(out, 2, seed=0, layout=layout, size="tiny")
    cases = discover_cases(out)
    assert [c.year for c in cases] == [layout, layout]
    decoded = decode_case(cases[0], require_seg=True)  # passes validation as real BraTS would
    assert decoded.seg.data.max() == convention(layout).et or decoded.seg.data.max() <= convention(layout).et
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    statuses = []
    synthesize_cohort(out, 3, seed=0, layout=layout, size="tiny", progress=lambda i, n, cid, s: statuses.append(s))
    assert statuses == ["exists", "exists", "written"]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
