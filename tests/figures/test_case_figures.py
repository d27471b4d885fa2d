"""``trifuse figures cases`` and ``trifuse figures attention``: what the panels show, read back from the arrays
drawn and from the PNG itself."""
from __future__ import annotations

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_app.cli import main
from tests.conftest import one_thread, write_tiny_case
from trifuse import keys
from trifuse.figures.common import take_view
from trifuse.io.discovery import discover_cases
from trifuse.io.labels import convention

YELLOW_MINUS_BLUE = 0.5 * 1.0  # ET overlay: alpha 0.5 × (R − B of (1.0, 0.9, 0.0))


def coloured(rgb: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Pixels that are not grey (an overlay colour is blended in)."""
    return (rgb[..., :3].max(-1) - rgb[..., :3].min(-1)) > tol


def png_crop(png: np.ndarray, box, inset: int = 2) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return png[y0 + inset : y1 - inset, x0 + inset : x1 - inset, :3]


def nearest_resize(img: np.ndarray, box, inset: int = 2) -> np.ndarray:
    """``img`` (R, C, …) as drawn into ``box`` by nearest-neighbour, cropped like :func:`png_crop`."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    h, w = y1 - y0, x1 - x0
    r = np.minimum(((np.arange(h) + 0.5) * img.shape[0] / h).astype(int), img.shape[0] - 1)
    c = np.minimum(((np.arange(w) + 0.5) * img.shape[1] / w).astype(int), img.shape[1] - 1)
    return img[r][:, c][inset : h - inset, inset : w - inset]


# --- the cases figure -------------------------------------------------------------------------
@pytest.fixture
def predicted_cohort(tmp_path):
    """Three tiny cases and predictions: perfect, empty, and the truth without its enhancing tumour."""
    data = tmp_path / "data"
    for i in range(3):
        write_tiny_case(data, 2021, i)
    pred = tmp_path / "pred"
    pred.mkdir()
    conv = convention(2021)
    for i, rec in enumerate(discover_cases(data)):
        img = nib.load(str(rec.seg))
        seg = np.asarray(img.dataobj).astype(np.uint8)
        out = [seg, np.zeros_like(seg), np.where(seg == conv.et, conv.ncr, seg).astype(np.uint8)][i]
        nib.save(nib.Nifti1Image(out, img.affine), str(pred / f"{rec.case_id}.nii.gz"))
    return data, pred, [r.case_id for r in discover_cases(data)]


def test_cases_figure_rows_dice_and_prediction_pixels(predicted_cohort, tmp_path):
    from trifuse.figures.cases import COLUMNS, cases_figure_from_folders
    from trifuse.metrics.report import evaluate_folder

    data, pred, ids = predicted_cohort
    out = tmp_path / "cases.png"
    assert main(["figures", "cases", "--data", str(data), "--pred", str(pred), "--out", str(out)]) == 0
    lay = cases_figure_from_folders(data, pred, out)
    assert lay["rows"] == ids  # one row per case, in the data's order
    assert set(lay["panels"]) == {(c, v, k) for c in ids for v, k in COLUMNS}
    # the row titles' Dice are trifuse evaluate's
    summary = evaluate_folder(pred, data, tmp_path / "eval", print_table=False)
    import csv

    per_case = {(r["case_id"], r["region"]): float(r["dice"]) for r in csv.DictReader(open(tmp_path / "eval" / "per_case.csv"))}
    assert summary["n_cases"] == 3
    for row in lay["cases"]:
        for reg in keys.REGIONS:
            assert row.dice[reg] == pytest.approx(per_case[(row.case_id, reg)], abs=1e-9)
            assert f"{reg} {per_case[(row.case_id, reg)]:.3f}" in row.title()
    perfect, empty, no_et = lay["cases"]
    assert perfect.dice == {"WT": 1.0, "TC": 1.0, "ET": 1.0} and empty.dice["WT"] == 0.0 and no_et.dice["ET"] == 0.0

    png = mpimg.imread(out)
    for row in lay["cases"]:
        # the slices pass through the true tumour where it is widest
        assert row.truth[keys.WT].sum(axis=(1, 2))[row.centre[0]] == row.truth[keys.WT].sum(axis=(1, 2)).max()
        for view, kind in COLUMNS:
            key = (row.case_id, view, kind)
            rgb = lay["panels"][key]
            regions = row.truth if kind == "truth" else row.pred
            want = take_view(regions[keys.WT], view, row.centre, row.affine).astype(bool)
            # the overlay colour is exactly where the (predicted) tumour is
            np.testing.assert_array_equal(coloured(rgb), want)
            et = take_view(regions[keys.ET], view, row.centre, row.affine).astype(bool)
            assert np.allclose((rgb[..., 0] - rgb[..., 2])[et], YELLOW_MINUS_BLUE, atol=1e-5)  # ET yellow
            ed = want & ~take_view(regions[keys.TC], view, row.centre, row.affine).astype(bool)
            assert np.all(rgb[..., 1][ed] > rgb[..., 0][ed] + 0.3)  # oedema green
            # and the PNG shows that panel: its coloured share matches the drawn array's
            crop = png_crop(png, lay["boxes"][key])
            shown = coloured(crop, tol=0.1).mean()
            drawn = coloured(nearest_resize(rgb, lay["boxes"][key]), tol=0.1).mean()
            assert abs(shown - drawn) < 0.03, (key, shown, drawn)
            if row is empty and kind == "prediction":
                assert not want.any() and shown == 0.0  # an empty prediction has no prediction colour
            else:
                assert want.any() and shown > 0.02
        assert not (row is no_et) or not row.pred[keys.ET].any()

    few = cases_figure_from_folders(data, pred, tmp_path / "two.png", max_cases=2)
    assert few["rows"] == ids[:2]
    assert mpimg.imread(tmp_path / "two.png").shape[0] < png.shape[0] * 0.8  # fewer rows, a shorter figure


def test_cases_figure_missing_prediction_and_cli_errors(predicted_cohort, tmp_path, capsys):
    from trifuse.figures.cases import cases_figure_from_folders

    data, pred, ids = predicted_cohort
    (pred / f"{ids[0]}.nii.gz").unlink()
    lay = cases_figure_from_folders(data, pred, tmp_path / "c.png", case=ids[0])
    row = lay["cases"][0]
    assert lay["rows"] == [ids[0]] and not row.pred.any() and row.dice["WT"] == 0.0
    assert "no prediction file" in row.title()
    assert main(["figures", "cases", "--data", str(data), "--out", str(tmp_path / "x.png")]) == 1
    assert "--pred" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x.png").exists()


# --- the attention figure ---------------------------------------------------------------------
def tiny_student(**kw):
    from trifuse.lightning.student import StudentModule

    torch.manual_seed(0)
    model = StudentModule(init_filters=8, use_response=False, use_feature=False, warmup_steps=0,
                          roi_size=(16, 16, 16), compute_hd95=False, **kw)
    if model.student.use_semantic_attention:
        for gate in model.student.gates.values():  # a gate that varies (a fresh one is σ(4) everywhere)
            torch.nn.init.normal_(gate.net[-1].weight, std=2.0)
            torch.nn.init.zeros_(gate.net[-1].bias)
    return model.eval()


def save_checkpoint(model, path):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def prepared(data, index=0):
    from trifuse.inference import prepare_case
    from trifuse.io.labels import labels_to_regions
    from trifuse.io.validate import decode_case

    rec = discover_cases(data)[index]
    case = decode_case(rec)
    sample = prepare_case(case)
    sl = (slice(None),) + tuple(slice(a, b) for a, b in sample[keys.META]["crop_box"])
    return sample, labels_to_regions(np.asarray(case.seg.data), rec.year)[sl]


def test_attention_panels_are_the_hooked_gates(tmp_path):
    from trifuse.figures.attention import capture_attention, render_attention_figure
    from trifuse.inference import Predictor

    data = tmp_path / "data"
    write_tiny_case(data, 2021, 0, shape=(16, 16, 16))
    model = tiny_student()
    sample, truth = prepared(data)
    assert tuple(sample[keys.MRI].shape[1:]) == (16, 16, 16)  # one sliding window: the hooked gate is the case's
    g = torch.Generator().manual_seed(1)
    sample[keys.PRIOR] = torch.rand(3, 4, 4, 4, generator=g)
    sample[keys.TEXT] = torch.randn(128, generator=g)

    seen = {}

    def spy(region):
        def hook(_m, args, out):
            seen.setdefault(region, []).append((out[1].detach().clone(), args[2].detach().clone()))

        return hook

    handles = [model.student.gates[r].register_forward_hook(spy(r)) for r in ("TC", "ET")]
    predictor = Predictor(model, device="cpu", tta=False)
    with one_thread():
        row = capture_attention(predictor, sample, truth)
        for h in handles:
            h.remove()
        x = sample[keys.MRI].float()[None]
        with torch.no_grad():  # the student's own prediction, without any hook
            plain = torch.sigmoid(model.infer(x, sample[keys.PRIOR][None], sample[keys.TEXT][None]))[0] > 0.5
    assert row.windows == 1 and all(len(v) == 1 for v in seen.values())
    np.testing.assert_array_equal(row.pred, plain.numpy())  # recording the gates changes no prediction
    lay = render_attention_figure([row], tmp_path / "att.png")
    centre = lay["centres"][row.case_id]
    assert row.truth[keys.WT].sum(axis=(0, 1))[centre[2]] == row.truth[keys.WT].sum(axis=(0, 1)).max()
    png = mpimg.imread(tmp_path / "att.png")
    import matplotlib

    for r in ("TC", "ET"):
        gate, prior_in = seen[r][0]
        gate = gate[0, 0].numpy()
        assert gate.std() > 0.05  # a map worth comparing
        np.testing.assert_allclose(row.maps[f"gate_{r}"], gate, atol=1e-5)
        panel = lay["panels"][(row.case_id, f"attention {r}")]
        np.testing.assert_allclose(panel, take_view(gate, "axial", centre, row.affine), atol=1e-5)
        # the prior panel is the prior the gate was fed (on the gate's grid)
        prior = torch.nn.functional.interpolate(prior_in[:, [keys.REGIONS.index(r)]], size=gate.shape, mode="trilinear",
                                                align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(lay["panels"][(row.case_id, f"prior {r}")], take_view(prior, "axial", centre, row.affine),
                                   atol=1e-5)
        # the PNG shows the gate values through the attention colour scale
        low, high = lay["attention_scale"]
        assert low <= gate[row.brain].min() and high == 1.0
        cmap = matplotlib.colormaps["viridis"]
        want = cmap(np.clip((panel - low) / (high - low), 0, 1))[..., :3]
        want[~take_view(row.brain, "axial", centre, row.affine)] = 0.0
        box = lay["boxes"][(row.case_id, f"attention {r}")]
        diff = np.abs(png_crop(png, box) - nearest_resize(want, box)).max(-1)
        assert np.mean(diff < 0.05) > 0.9, np.mean(diff < 0.05)  # all but the outline of the true region
    pred_panel = lay["panels"][(row.case_id, "prediction")]
    # an untrained student's regions need not nest: any predicted region is coloured, nothing else
    np.testing.assert_array_equal(coloured(pred_panel), take_view(row.pred.any(0), "axial", centre, row.affine))


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """An untrained (tiny) CLIP export: enough for a student to derive priors from the MRI alone."""
    from trifuse.semantic.clip import ClipConfig, build_model, save_clip

    torch.manual_seed(0)
    return save_clip(tmp_path_factory.mktemp("clip") / "clip.pt", build_model(ClipConfig(image_size=32, width=8)))


def test_attention_cli_derives_priors_and_draws_every_case(tmp_path, clip_file, monkeypatch):
    import trifuse.figures.attention as att

    data = tmp_path / "data"
    for i in range(3):
        write_tiny_case(data, 2021, i, shape=(16, 16, 16))
    ckpt = save_checkpoint(tiny_student(use_semantic=True, clip_ckpt=str(clip_file)), tmp_path / "student.ckpt")
    drawn = {}
    real = att.render_attention_figure

    def spy(rows, out_png, title=""):
        drawn["lay"] = real(rows, out_png, title)
        return drawn["lay"]

    monkeypatch.setattr(att, "render_attention_figure", spy)
    out = tmp_path / "attention.png"
    with one_thread():
        assert main(["figures", "attention", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out),
                     "--cases", "2", "--device", "cpu"]) == 0
    lay = drawn["lay"]
    ids = [r.case_id for r in discover_cases(data)]
    assert lay["rows"] == ids[:2] and out.is_file()
    for row in lay["cases"]:
        assert row.truth is not None and row.maps["gate_TC"].shape == row.flair.shape
        assert row.maps["prior_TC"].max() > row.maps["prior_TC"].min()  # priors derived from the MRI by CLIP
        assert lay["panels"][(row.case_id, "attention ET")].shape == lay["panels"][(row.case_id, "FLAIR")].shape[:2]


def test_attention_cli_without_semantic_tier_says_so(tmp_path, capsys):
    data = tmp_path / "data"
    write_tiny_case(data, 2021, 0, shape=(16, 16, 16))
    ckpt = save_checkpoint(tiny_student(use_semantic=False), tmp_path / "no_semantic.ckpt")
    out = tmp_path / "attention.png"
    assert main(["figures", "attention", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "without semantic priors" in err and "no figure written" in err and "use_semantic: false" in err
    assert not out.exists()
    assert main(["figures", "attention", "--data", str(data), "--out", str(out)]) == 1
    assert "--ckpt" in capsys.readouterr().err.strip().splitlines()[-1]
