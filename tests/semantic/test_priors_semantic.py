"""Multi-view priors (geometry closed form, shape/range, WT localisation) and LoadPriors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trifuse import keys
from trifuse.semantic.clip import ClipConfig, DualEncoder, data_fingerprint, load_clip, save_clip, train_clip
from trifuse.semantic.clip_data import NORMAL_PROMPT, REGION_PROMPTS
from trifuse.semantic.prior_transforms import LoadPriors, crop_prior
from trifuse.semantic.priors import (
    PriorConfig,
    compute_prior,
    compute_priors,
    load_prior,
    prior_auc,
    prior_path,
    reduced_shape,
    save_prior,
    view_similarity,
)



@pytest.fixture(scope="module")
def priors(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("priors")
    report = compute_priors(setup["cache"], setup["descriptions"], setup["ckpt"], out)
    return out, report


# --------------------------------------------------------------------------------------
# geometry: a transparent encoder whose patch map is a function of FLAIR
# --------------------------------------------------------------------------------------
class FlairEncoder(DualEncoder):
    """Patch embedding ``normalise(softplus(FLAIR), 1)`` at full resolution; region prompts
    embed as e1, the background prompt as e2. So ``cos(e, q_r) − cos(e, q_0) =
    (softplus(f) − 1) / sqrt(softplus(f)² + 1)`` per pixel (scale 1)."""

    backend = "test"

    def __init__(self, size: int):
        super().__init__()
        self.image_size = size
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def encode_image(self, images, brain=None):
        f = F.softplus(images[:, keys.FLAIR:keys.FLAIR + 1])
        patches = F.normalize(torch.cat([f, torch.ones_like(f)], 1), dim=1)
        return F.normalize(patches.mean((2, 3)), dim=-1), patches

    def encode_text(self, texts):
        rows = [[0.0, 1.0] if t == NORMAL_PROMPT else [1.0, 0.0] if t in REGION_PROMPTS.values() else [0.6, 0.8]
                for t in texts]
        return torch.tensor(rows)


@pytest.mark.parametrize("affine", [
    np.diag([-2.0, -2.0, 2.0, 1.0]),  # BraTS storage (x and y flipped)
    np.array([[0, 0, 2.0, 0], [0, -2.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]]),  # axes permuted: axial normal is axis 0
])
def test_every_view_maps_back_to_the_same_volume(affine):
    g = torch.Generator().manual_seed(0)
    n = 24
    mri = torch.randn(4, n, n, n, generator=g)
    mri[keys.FLAIR, 3:9, 14:22, 10:13] += 4.0  # an anisotropic bright block: orientation errors would move it
    brain = np.ones((n, n, n), bool)
    model = FlairEncoder(n)  # square slices of side n: no resampling, so the maps are exact
    q = model.encode_text([REGION_PROMPTS[r] for r in keys.REGIONS] + [NORMAL_PROMPT])
    out_shape = reduced_shape((n, n, n), 4)
    f = F.softplus(mri[keys.FLAIR].clamp(-5, 5))
    expected = F.adaptive_avg_pool3d(((f - 1) / torch.sqrt(f ** 2 + 1))[None, None], out_shape)[0, 0]
    for view in ("axial", "coronal", "sagittal"):
        vol = view_similarity(model, mri.numpy(), brain, affine, [2.0] * 3, view, q, out_shape, batch_size=7)
        assert vol.shape == (3,) + out_shape
        for r in range(3):
            assert torch.allclose(vol[r], expected, atol=1e-5), view


def test_fused_prior_is_sigmoid_of_the_view_mean_inside_the_brain():
    n = 16
    mri = torch.zeros(4, n, n, n)
    mri[keys.FLAIR, 4:8, 4:8, 4:8] = 3.0
    brain = torch.zeros(1, n, n, n, dtype=torch.bool)
    brain[0, 2:14, 2:14, 2:14] = True
    mri = mri * brain
    sample = {keys.MRI: mri, keys.BRAIN: brain, keys.CASE_ID: "cube",
              keys.META: {"affine": np.diag([-1.0, -1.0, 1.0, 1.0]).tolist(), "spacing": [1.0] * 3,
                          "crop_box": [[0, n]] * 3}}
    res = compute_prior(FlairEncoder(n), sample, None, PriorConfig(factor=4))
    assert res.prior.dtype == torch.float16 and res.prior.shape == (3, 4, 4, 4)
    assert torch.allclose(res.fused, torch.stack(list(res.views.values())).mean(0))  # F_3D = (1/3) Σ_d F^d
    bfrac = F.adaptive_avg_pool3d(brain.float()[None], (4, 4, 4))[0]
    assert torch.allclose(res.prior.float(), torch.sigmoid(res.fused) * bfrac, atol=1e-3)
    assert float(res.prior[0, 1, 1, 1]) > float(res.prior[0, 2, 2, 2])  # the bright block is higher
    assert res.text.shape == (2,) and float(res.text.norm()) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------
# trained CLIP on the synthetic cohort
# --------------------------------------------------------------------------------------
def test_priors_shape_dtype_range_and_text(setup, priors):
    from trifuse.io.cache import read_meta

    out, report = priors
    assert sorted(report.written) == sorted(setup["ids"]) and not report.failed
    for cid in setup["ids"]:
        stored = load_prior(prior_path(out, cid))
        meta = read_meta(setup["cache"], cid)
        p = stored["prior"]
        assert p.dtype == np.float16 and p.shape == (3,) + reduced_shape(meta["cropped_shape"], 4)
        assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
        assert stored["text"].dtype == np.float32 and stored["text"].shape == (setup["config"].embed_dim,)
        assert np.linalg.norm(stored["text"]) == pytest.approx(1.0, abs=1e-4)
        assert stored["meta"]["crop_box"] == meta["crop_box"] and stored["meta"]["factor"] == 4


def test_wt_prior_is_higher_inside_the_true_whole_tumour(setup, priors):
    from trifuse.io.cache import load_sample

    out, report = priors
    heldout = load_clip(setup["ckpt"]).metrics["heldout_cases"]
    for cid in setup["ids"]:
        s = load_sample(setup["cache"], cid)
        wt, brain = s[keys.LABEL][keys.WT].bool(), s[keys.BRAIN][0].bool()
        p = torch.from_numpy(load_prior(prior_path(out, cid))["prior"][keys.WT].astype(np.float32))
        up = F.interpolate(p[None, None], size=tuple(wt.shape), mode="trilinear", align_corners=False)[0, 0]
        inside, outside = float(up[wt].mean()), float(up[brain & ~wt].mean())
        assert inside > outside + 0.2, (cid, inside, outside)
        auc = prior_auc(p, wt, brain)
        assert auc == pytest.approx(report.auc_wt[cid], abs=1e-4)
        assert auc > (0.85 if cid in heldout else 0.8), (cid, auc)


def test_compute_priors_resumes_and_recomputes_what_changed(setup, priors, tmp_path):
    out, _ = priors
    cid = setup["ids"][0]
    stamp = os.stat(prior_path(out, cid)).st_mtime_ns
    again = compute_priors(setup["cache"], setup["descriptions"], setup["ckpt"], out)
    assert again.written == [] and sorted(again.skipped) == sorted(setup["ids"])
    assert os.stat(prior_path(out, cid)).st_mtime_ns == stamp
    summary = json.loads((out / "priors_summary.json").read_text())
    assert set(summary["auc_wt"]) == set(setup["ids"])  # kept from the run that computed them
    prior_path(out, cid).write_bytes(b"truncated")  # a corrupt file is recomputed, the rest kept
    third = compute_priors(setup["cache"], setup["descriptions"], setup["ckpt"], out)
    assert third.written == [cid] and len(third.skipped) == len(setup["ids"]) - 1
    with pytest.raises(KeyError, match="trifuse describe"):
        compute_priors(setup["cache"], {}, setup["ckpt"], tmp_path / "p")


# --------------------------------------------------------------------------------------
# LoadPriors
# --------------------------------------------------------------------------------------
def _ramp_prior(case_shape, factor=4):
    """A prior whose value is the case coordinate (voxels) of its cell centre along axis 0, 1, 2."""
    red = reduced_shape(case_shape, factor)
    chans = []
    for ax in range(3):
        centres = (torch.arange(red[ax]) + 0.5) * case_shape[ax] / red[ax] - 0.5
        shape = [1, 1, 1]
        shape[ax] = red[ax]
        chans.append(centres.view(shape).expand(red))
    return torch.stack(chans)


def test_crop_prior_samples_the_patch_box_and_zeroes_padding():
    case = (40, 48, 36)
    prior = _ramp_prior(case)
    box = [[8, 24], [16, 32], [4, 20]]
    out = crop_prior(prior, case, box, (16, 16, 16), (4, 4, 4))
    assert out.shape == (3, 4, 4, 4)
    # output voxel j covers patch voxels 4j..4j+3: centre 4j + 1.5 in the patch, box start + that in the case
    for ax in range(3):
        centre = box[ax][0] + 4 * torch.arange(4) + 1.5
        got = out[ax].movedim(ax, 0)[:, 1, 1]
        assert torch.allclose(got, centre, atol=1e-4), ax
    # a case smaller than the patch is zero-padded (split evenly) by the loader: so is the prior
    small = crop_prior(_ramp_prior((8, 48, 36)), (8, 48, 36), [[0, 8], [16, 32], [4, 20]], (16, 16, 16), (4, 4, 4))
    assert torch.all(small[:, 0] == 0) and torch.all(small[:, 3] == 0)
    assert torch.allclose(small[0, 1:3, 1, 1], torch.tensor([1.5, 5.5]), atol=1e-4)


def test_load_priors_whole_case_patch_and_flip_replay(tmp_path):
    case = (40, 48, 36)
    prior = _ramp_prior(case) / 50.0  # into [0, 1]
    text = np.arange(8, dtype=np.float32)
    save_prior(prior_path(tmp_path, "c1"), prior, text, {"cropped_shape": list(case)})
    t = LoadPriors(tmp_path)
    whole = {keys.CASE_ID: "c1", keys.MRI: torch.zeros(4, *case), keys.META: {"patch_box": None, "applied": []}}
    whole = t(whole)
    assert whole[keys.PRIOR].dtype == torch.float16 and whole[keys.PRIOR].shape == (3, 10, 12, 9)
    assert torch.equal(whole[keys.PRIOR], prior.half())
    assert torch.equal(whole[keys.TEXT], torch.from_numpy(text))
    assert whole[keys.META]["applied"][-1]["name"] == "LoadPriors"
    box = [[8, 24], [16, 32], [4, 20]]
    patch = {keys.CASE_ID: "c1", keys.MRI: torch.zeros(4, 16, 16, 16), keys.META: {"patch_box": box, "applied": []}}
    plain = t(dict(patch, **{keys.META: {"patch_box": box, "applied": []}}))[keys.PRIOR]
    assert plain.shape == (3, 4, 4, 4) and plain.dtype == torch.float16
    flipped = t(dict(patch, **{keys.META: {"patch_box": box, "applied": [
        {"name": "RandomPatch", "box": box}, {"name": "RandomAugment", "flip_axes": [0, 2]}]}}))[keys.PRIOR]
    assert torch.equal(flipped, plain.flip([1, 3]))
    with pytest.raises(ValueError, match="re-run"):
        t({keys.CASE_ID: "c1", keys.MRI: torch.zeros(4, 8, 8, 8), keys.META: {"patch_box": None}})
    with pytest.raises(FileNotFoundError, match=r"case c2 .*" + str(tmp_path.name)):
        t({keys.CASE_ID: "c2", keys.MRI: torch.zeros(4, 8, 8, 8), keys.META: {}})


def test_load_priors_auto_binds_to_the_dataset_default(tmp_path):
    data = tmp_path / "data" / "brats"
    case = (8, 8, 8)
    save_prior(prior_path(tmp_path / "data" / "priors" / "brats", "c1"), torch.zeros(3, 2, 2, 2), np.zeros(4),
               {"cropped_shape": list(case)})
    t = LoadPriors()  # priors_dir="auto"
    sample = {keys.CASE_ID: "c1", keys.MRI: torch.zeros(4, *case), keys.META: {"patch_box": None}}
    with pytest.raises(RuntimeError, match="not bound"):
        t(dict(sample))
    t.bind_dataset(data, tmp_path / "data" / "cache" / "brats")
    assert t(sample)[keys.PRIOR].shape == (3, 2, 2, 2)


def test_load_priors_in_the_patch_loader_gives_batchable_shapes(setup, priors):
    from trifuse.lightning.data import CaseDataset, PatchDataset, collate_samples
    from trifuse.transforms import RandomAugment

    out, _ = priors
    ds = PatchDataset(setup["cache"], setup["ids"], patch_size=(24, 24, 24), samples_per_epoch=3,
                      augment=RandomAugment(rotate_prob=0.0), sample_transforms=[LoadPriors(out)])
    batch = collate_samples([ds[i] for i in range(3)])
    assert batch[keys.PRIOR].shape == (3, 3, 6, 6, 6) and batch[keys.PRIOR].dtype == torch.float16
    assert batch[keys.TEXT].shape == (3, setup["config"].embed_dim)
    whole = CaseDataset(setup["cache"], setup["ids"][:1], [LoadPriors(out)])[0]
    stored = load_prior(prior_path(out, setup["ids"][0]))["prior"]
    assert torch.equal(whole[keys.PRIOR], torch.from_numpy(stored))
