"""trifuse.inference.Predictor: spacing-aware prediction and test-time mirroring."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from trifuse import keys
from trifuse.inference import Predictor, mirror_axes, resample_sample
from trifuse.io.discovery import case_file_name, discover_cases
from trifuse.io.validate import decode_case
from trifuse.lightning.teacher import TeacherModule
from trifuse.nets import SegResNetBackbone


class SmoothFlair(nn.Module):
    """A fixed network: WT/TC/ET logits from a 5³ box filter of the FLAIR (scale dependent).

    Records the spatial shape of every input it sees, so a test can tell which grid the
    model ran on.
    """

    in_channels = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 3, 5, padding=2, bias=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, keys.MODALITIES.index("flair")] = 1.0 / 125
            self.conv.bias.copy_(torch.tensor([-0.8, -1.6, -2.4]))
            self.conv.weight.mul_(torch.tensor([8.0, 8.0, 8.0])[:, None, None, None, None])
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        return self.conv(x)


def write_case(root, case_id, spacing, shape_mm=(64, 72, 56)):
    """A 2021-layout case on a grid of ``spacing`` mm: an ellipsoid brain with a bright FLAIR lesion."""
    shape = [int(round(e / s)) for e, s in zip(shape_mm, spacing)]
    axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, shape_mm)]
    zz = np.stack(np.meshgrid(*axes, indexing="ij"))
    brain = ((zz / (np.array(shape_mm)[:, None, None, None] * 0.42)) ** 2).sum(0) < 1
    lesion = (((zz - np.array([6.0, -5.0, 3.0])[:, None, None, None]) ** 2).sum(0) < 11.0**2) & brain
    d = root / case_id
    d.mkdir(parents=True)
    affine = np.diag([*spacing, 1.0])
    rng = np.random.default_rng(0)
    for m in keys.MODALITIES:
        img = (100.0 + 3 * rng.standard_normal(shape)) * brain
        if m == "flair":
            img[lesion] += 150.0
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(d / case_file_name(case_id, 2021, m)))
    return d


def _teacher(net, roi=(32, 32, 32)):
    model = TeacherModule(modality="mri", net=net, roi_size=roi, overlap=0.25)
    model.trifuse_meta = {"spacing": [2.0, 2.0, 2.0]}
    return model


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_a_1mm_case_is_predicted_at_the_training_spacing_and_pasted_back(tmp_path, caplog):
    one = write_case(tmp_path / "one", "BraTS2021_00001", (1.0, 1.0, 1.0))
    two = write_case(tmp_path / "two", "BraTS2021_00001", (2.0, 2.0, 2.0))
    net = SmoothFlair()
    pred = Predictor(_teacher(net), tta=False, postprocess=False)
    rec1 = discover_cases(one)[0]
    case1 = decode_case(rec1)
    with caplog.at_level("WARNING", logger="trifuse.inference"):
        lab1 = pred.predict_case(case1)
    assert "differs from the training spacing" in caplog.text
    assert lab1.shape == case1.reference.data.shape and lab1.dtype == np.uint8
    # the network ran on the 2 mm grid: about half the 1 mm cropped size along each axis
    from trifuse.inference import prepare_case

    crop1 = prepare_case(case1)[keys.MRI].shape[1:]
    assert all(abs(s - c / 2) <= 1 for s, c in zip(net.seen[-1], crop1)) or max(net.seen[-1]) <= 32
    # the same case at 2 mm, predicted there, upsampled to 1 mm: the masks agree
    lab2 = pred.predict_case(decode_case(discover_cases(two)[0]))
    up = np.repeat(np.repeat(np.repeat(lab2, 2, 0), 2, 1), 2, 2)[: lab1.shape[0], : lab1.shape[1], : lab1.shape[2]]
    wt1, wt2 = lab1 > 0, up > 0
    assert wt1.sum() > 500 and _dice(wt1, wt2) >= 0.95
    # without resampling (tolerance huge) the 1 mm case is segmented at the wrong scale and differs
    raw = Predictor(_teacher(SmoothFlair()), tta=False, postprocess=False, spacing_tolerance=10.0).predict_case(case1)
    assert _dice(raw > 0, wt2) < _dice(wt1, wt2)


def test_written_file_keeps_the_input_grid_affine_and_header(tmp_path):
    one = write_case(tmp_path / "one", "BraTS2021_00002", (1.0, 1.0, 1.0))
    pred = Predictor(_teacher(SmoothFlair()), tta=False)
    res = pred.predict_folder(one, tmp_path / "out")
    assert res["written"] == ["BraTS2021_00002"]
    src = nib.load(str(next(one.glob("*flair.nii.gz"))))
    out = nib.load(str(tmp_path / "out" / "BraTS2021_00002.nii.gz"))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.header.get_zooms() == src.header.get_zooms()
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_resample_sample_keeps_the_extent():
    s = {keys.MRI: torch.randn(4, 40, 30, 20), keys.BRAIN: torch.ones(1, 40, 30, 20, dtype=torch.bool), keys.META: {"spacing": [1.0, 1.0, 2.0]}}
    r = resample_sample(s, [2.0, 2.0, 2.0])
    assert tuple(r[keys.MRI].shape) == (4, 20, 15, 20) and r[keys.BRAIN].dtype == torch.bool
    assert r[keys.META]["spacing"] == [2.0, 2.0, 2.0] and r[keys.META]["resampled_from"]["shape"] == [40, 30, 20]


def test_mirroring_of_a_symmetric_input_gives_a_symmetric_output():
    torch.manual_seed(0)
    net = SegResNetBackbone(in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    model = TeacherModule(modality="mri", net=net, roi_size=(12, 12, 12), overlap=0.25)
    x = torch.randn(4, 16, 12, 10)
    x = x + x.flip(-1)  # symmetric in the last axis
    sample = {keys.MRI: x, keys.BRAIN: torch.ones(1, 16, 12, 10, dtype=torch.bool), keys.META: {"spacing": [1.0, 1.0, 1.0], "case_id": "sym"}}
    assert len(mirror_axes(3)) == 8
    p_tta = Predictor(model, tta=True).predict_probabilities(sample)
    torch.testing.assert_close(p_tta, p_tta.flip(-1), atol=1e-5, rtol=0)
    p_one = Predictor(model, tta=False).predict_probabilities(sample)
    assert float((p_one - p_one.flip(-1)).abs().max()) > 1e-3  # a plain pass is not symmetric: the check can fail
