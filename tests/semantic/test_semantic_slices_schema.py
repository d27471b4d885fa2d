"""Slice geometry, abnormality finding, rendering/hashing, schema and canonical text."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from trifuse import keys
from trifuse.semantic.schema import (
    VIEWS,
    Description,
    ViewDescription,
    openai_response_format,
    strict_json_schema,
    to_text,
)
from trifuse.semantic.slices import (
    extract_view_slices,
    find_abnormality,
    iter_view_slices,
    sample_arrays,
    view_geometry,
)

AFFINES = {
    "brats": np.diag([-1.0, -1.0, 1.0, 1.0]),
    "ras_aniso": np.diag([1.0, 2.0, 3.0, 1.0]),
    "permuted": np.array([[0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]]),  # axes shuffled
}


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("view", VIEWS)
def test_display_is_radiological_and_invertible(name, view):
    aff = AFFINES[name]
    shape = (5, 6, 7)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]  # (D, H, W, 3) RAS+ mm
    vg = view_geometry(aff, view)
    disp = vg.to_display(np.moveaxis(world, -1, 0))  # (3, N, R, C)
    normal, row_w, col_w = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}[view]
    # the slice index walks along the view normal; rows and columns run in descending world coordinate:
    # top = superior (anterior for axial); left = subject's right (anterior for sagittal)
    n, r, c = disp[normal], disp[row_w], disp[col_w]  # each (N, R, C)
    assert np.all(np.diff(n, axis=0) != 0) and np.all(np.diff(n, axis=1) == 0) and np.all(np.diff(n, axis=2) == 0)
    assert np.all(np.diff(r, axis=1) < 0) and np.all(np.diff(r, axis=0) == 0) and np.all(np.diff(r, axis=2) == 0)
    assert np.all(np.diff(c, axis=2) < 0) and np.all(np.diff(c, axis=0) == 0) and np.all(np.diff(c, axis=1) == 0)
    x = np.random.default_rng(0).random((2,) + shape)
    assert np.array_equal(vg.from_display(vg.to_display(x)), x)
    sp = np.linalg.norm(aff[:3, :3], axis=0)
    assert (vg.row_mm, vg.col_mm) == (sp[vg.row_axis], sp[vg.col_axis])


def test_display_works_on_torch():
    torch = pytest.importorskip("torch")
    vg = view_geometry(AFFINES["brats"], "coronal")
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    d = vg.to_display(x)
    assert isinstance(d, torch.Tensor)
    assert np.array_equal(d.numpy(), vg.to_display(x.numpy()))
    assert torch.equal(vg.from_display(d), x)


def test_find_abnormality_centroid(phantom):
    centre = (13.0, 25.0, 20.0)
    s = phantom(centre=centre, radius=5.0)
    mri, brain, _ = sample_arrays(s)
    abn = find_abnormality(mri, brain)
    assert abn.found and np.allclose(abn.centroid, centre, atol=0.5)
    assert abn.mask[13, 25, 20]  # the necrotic centre is inside the (hole-filled) component
    s0 = phantom(lesion=False)
    mri0, brain0, _ = sample_arrays(s0)
    none = find_abnormality(mri0, brain0)
    assert not none.found and none.n_voxels == 0
    assert np.allclose(none.centroid, np.argwhere(brain0).mean(0))


def test_extract_view_slices(phantom):
    centre = (13.0, 25.0, 20.0)
    s = phantom(centre=centre, radius=5.0)
    sl = extract_view_slices(s)
    assert set(sl) == set(VIEWS)
    for vs in sl.values():
        assert vs.index == int(centre[vs.geometry.slice_axis])
        assert vs.raw.shape[0] == 4 and vs.raw.dtype == np.float32 and vs.brain.shape == vs.raw.shape[1:]
        img = Image.open(io.BytesIO(vs.png))
        assert img.size == vs.size_px == (512, 512) and img.mode == "L"
        # raw slice is exactly the volume slice, re-oriented
        assert np.array_equal(vs.raw, vs.geometry.slice(s[keys.MRI], vs.index))
        assert vs.mm_per_px == pytest.approx(max(vs.raw.shape[1:]) * 4.0 / 256)
    again = extract_view_slices(phantom(centre=centre, radius=5.0))
    assert all(again[v].image_hash == sl[v].image_hash and again[v].png == sl[v].png for v in VIEWS)
    other = extract_view_slices(phantom(centre=centre, radius=5.0, seed=1))
    assert all(other[v].image_hash != sl[v].image_hash for v in VIEWS)


def test_crop_offset_maps_to_original_index(phantom):
    s = phantom(centre=(13.0, 25.0, 20.0))
    s[keys.META]["crop_box"] = [[10, 50], [3, 47], [7, 43]]
    sl = extract_view_slices(s)
    off = {0: 10, 1: 3, 2: 7}
    assert all(vs.index_original == vs.index + off[vs.geometry.slice_axis] for vs in sl.values())


def test_iter_view_slices_covers_the_volume(phantom):
    s = phantom()
    got = list(iter_view_slices(s, "sagittal"))
    vg = view_geometry(np.asarray(s[keys.META]["affine"]), "sagittal")
    assert [n for n, _, _ in got] == list(range(s[keys.MRI].shape[1 + vg.slice_axis]))
    stack = np.stack([raw for _, raw, _ in got], axis=1)  # (4, N, R, C)
    assert np.array_equal(vg.from_display(stack), s[keys.MRI])
    some = list(iter_view_slices(s, "axial", step=4, min_brain_fraction=0.3))
    assert 0 < len(some) < s[keys.MRI].shape[3] / 4 + 1 and all(b.mean() >= 0.3 for _, _, b in some)


# ---------------------------------------------------------------------------------------------
def _vd(view="axial", **kw):
    d = dict(view=view, hemisphere="left", lobes=["frontal", "insular"], size_mm=42.4, enhancement="ring",
             necrosis=True, oedema="moderate", mass_effect=True, impression="Left frontal glioblastoma.")
    d.update(kw)
    return ViewDescription(**d)


def test_strict_schema_is_openai_compatible():
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node["additionalProperties"] is False
                assert sorted(node["required"]) == sorted(node["properties"])
            for bad in ("minimum", "maximum", "minLength", "maxLength", "default", "title"):
                assert bad not in node or isinstance(node.get(bad), dict)
            for k, v in node.items():
                walk(v) if k != "properties" else [walk(x) for x in v.values()]
        elif isinstance(node, list):
            [walk(x) for x in node]

    schema = strict_json_schema()
    walk(schema)
    assert set(schema["properties"]) == set(ViewDescription.model_fields)
    rf = openai_response_format("coronal")
    assert rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["properties"]["view"]["enum"] == ["coronal"]
    with pytest.raises(ValueError):
        openai_response_format("oblique")


def test_validation_rules():
    with pytest.raises(ValidationError):
        _vd(size_mm=-1.0)
    with pytest.raises(ValidationError):
        _vd(enhancement="spiky")
    with pytest.raises(ValidationError):
        ViewDescription.model_validate({**_vd().model_dump(), "grade": "IV"})  # extra field
    assert _vd(lobes=["frontal", "frontal", "deep"]).lobes == ["frontal", "deep"]
    with pytest.raises(ValidationError, match="describes view"):
        Description(case_id="c", views={"axial": _vd(view="coronal")}, source="openai", model="m", prompt_version="v1")


def test_to_text_is_canonical():
    d = Description(case_id="c", views={v: _vd(view=v) for v in reversed(VIEWS)}, source="offline", model="m",
                    prompt_version="v")
    s = "a 42 mm left frontal and insular lesion with ring enhancement, necrosis, moderate oedema and mass effect."
    assert to_text(d.views["axial"]) == "Axial view: " + s
    assert to_text(d, "coronal") == "Coronal view: " + s
    assert to_text(d) == " ".join(f"{v.capitalize()} view: {s}" for v in VIEWS)  # canonical order
    assert to_text(_vd(lobes=["deep"], necrosis=False, oedema="none", mass_effect=False, enhancement="none",
                       hemisphere="midline")) == \
        "Axial view: a 42 mm midline deep grey matter lesion with no enhancement, no oedema and no mass effect."
    assert to_text(d, "axial", include_impression=True).endswith("Left frontal glioblastoma.")


def test_fill_holes_matches_scipy():
    from scipy import ndimage

    from trifuse.semantic.slices import fill_holes

    rng = np.random.default_rng(0)
    for _ in range(10):
        m = ndimage.binary_dilation(rng.random((14, 16, 12)) > 0.93)
        assert np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m))
        for axis in range(3):  # planar structures: slice-by-slice filling
            plane = np.zeros((3, 3, 3), bool)
            idx = [slice(None)] * 3
            idx[axis] = 1
            plane[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
            assert np.array_equal(fill_holes(m, plane), ndimage.binary_fill_holes(m, plane))
