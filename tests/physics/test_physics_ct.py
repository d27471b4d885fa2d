"""Gaussian-mixture synthetic CT: EM recovery, tissue HU ranges, persistence, transforms."""
from __future__ import annotations

import json

import pytest
import torch

from trifuse import keys
from trifuse.physics.ct import (
    CTMixtureModel,
    decode_ct,
    encode_ct,
    fit_ct_from_samples,
    fit_ct_gmr,
    fit_ct_mixture,
    fit_gmm,
    synthesize_ct,
    synthesize_ct_hu,
)
from trifuse.physics.phantom import TISSUE_CODE, make_head_phantom
from trifuse.physics.tissues import BRAIN_TISSUES, TISSUES
from trifuse.physics.transforms import SynthesizeCT


def _two_tissue(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a CSF-like profile (T1 dark, T2 bright, FLAIR dark) and an oedema-like one (FLAIR bright)
    m1, m2 = torch.tensor([-1.8, -1.5, 2.5, -1.5]), torch.tensor([-0.4, -0.2, 1.0, 1.7])
    x = torch.cat([m1 + 0.3 * torch.randn(n, 4, generator=g), m2 + 0.4 * torch.randn(2 * n, 4, generator=g)])
    return x, m1, m2


def test_em_recovers_component_means_and_weights():
    x, m1, m2 = _two_tissue()
    for cov in ("full", "diag"):
        fit = fit_gmm(x, 2, covariance_type=cov, seed=0)
        order = fit.means[:, 3].argsort()
        torch.testing.assert_close(fit.means[order].float(), torch.stack([m1, m2]), atol=0.05, rtol=0)
        torch.testing.assert_close(fit.weights[order].float(), torch.tensor([1 / 3, 2 / 3]), atol=0.02, rtol=0)
        assert fit.converged


def _phantom_features(names, n=3000, seed=0, shift=0.3, scale=0.8):
    """Brain-voxel features of K_true tissues whose cluster means are NOT the profile means
    (shifted and scaled, as a real scanner's contrast would be), so naming is not circular."""
    from trifuse.physics.tissues import DEFAULT_TISSUE_MODEL as TM

    g = torch.Generator().manual_seed(seed)
    xs = []
    for i, nme in enumerate(names):
        mu = torch.tensor(TM.means[TM.names.index(nme)]) * scale + shift * torch.tensor([1.0, -1.0, 0.5, -0.5])
        xs.append(mu + 0.35 * torch.randn(n * (2 if i == 0 else 1), 4, generator=g))
    return torch.cat(xs)


@pytest.mark.parametrize("init", ["tissue", "kmeans++"])
def test_em_ends_with_live_uniquely_named_components(init):
    true = ("csf", "grey_matter", "white_matter")  # a lesion-free phantom: K_true = 3
    x = _phantom_features(true)
    model = fit_ct_mixture(x, n_components=6, init=init, seed=0, min_weight=0.02)
    assert float(model.weights.min()) >= 0.02  # no dead component left
    assert len(set(model.tissues)) == len(model.tissues)  # one to one
    for t in true:  # each true tissue is named, by the component that holds most of its voxels
        assert t in model.tissues
    # no lesion tissue claimed on a lesion-free phantom by a heavy component
    lesion = {"oedema", "enhancing", "necrosis"}
    assert sum(float(w) for w, n in zip(model.weights, model.tissues) if n in lesion) < 0.1
    if init == "tissue":  # three profiles had no data: their components died and were re-seeded or pruned
        assert any(e[0] in ("reseed", "prune") for e in model.meta["events"])


def test_fit_gmm_prunes_what_stays_dead():
    x = _phantom_features(("white_matter",), n=2000)  # one cluster, four components asked
    fit = fit_gmm(x, 4, seed=0, min_weight=0.3, n_reseed=1)
    assert float(fit.weights.min()) >= 0.3 and len(fit.weights) < 4
    assert [e[0] for e in fit.events].count("prune") == 4 - len(fit.weights)


def test_synthetic_ct_per_tissue_in_table_hu_ranges():
    s = make_head_phantom((40, 44, 40), seed=0, noise=0.05, margin_mm=8.0)
    tissue = s["tissue"][0]
    for model in (None, fit_ct_from_samples([s], n_components=6, seed=0)):
        ct = synthesize_ct(s[keys.MRI], s[keys.BRAIN], model, spacing=(1, 1, 1))
        assert ct.shape == (keys.CT_CHANNELS, 40, 44, 40) and ct.dtype == torch.float32
        hu = synthesize_ct_hu(s[keys.MRI], s[keys.BRAIN], model, spacing=(1, 1, 1))[0]
        torch.testing.assert_close(encode_ct(hu[None]), ct)
        for name in BRAIN_TISSUES:
            m = tissue == TISSUE_CODE[name]
            if m.sum() < 20:
                continue
            lo, hi = TISSUES[name].hu_range
            med = hu[m].median().item()
            assert lo - 1 <= med <= hi + 1, (name, med)
    hu = synthesize_ct_hu(s[keys.MRI], s[keys.BRAIN], None, spacing=(1, 1, 1))[0]
    brain = s[keys.BRAIN][0]
    # a bright skull ring a few mm outside the brain, air further out
    assert hu[0, 0, 0] == -1000.0 and hu.min() == -1000.0
    ring = hu[~brain & (hu > 600)]
    assert ring.numel() > 0.05 * brain.sum()
    # a radial profile with room for every layer: air, scalp, skull, CSF gap, brain
    s = make_head_phantom((60, 64, 60), seed=0, noise=0.05, margin_mm=14.0)
    hu = synthesize_ct_hu(s[keys.MRI], s[keys.BRAIN], None, spacing=(1, 1, 1))[0, 30, 32, :30]
    first = int(s[keys.BRAIN][0, 30, 32, :30].nonzero()[0])  # first brain voxel
    assert hu[0] == -1000  # air
    assert ((hu[:first] > 20) & (hu[:first] < 60)).any()  # scalp
    assert (hu[:first] >= 700).sum() >= 4  # a skull several mm thick
    assert 0 <= hu[first - 1] <= 15  # CSF gap between skull and brain


def test_sample_mode_seeded_and_different_from_expectation(phantom):
    e = synthesize_ct(phantom[keys.MRI], phantom[keys.BRAIN])
    a = synthesize_ct(phantom[keys.MRI], phantom[keys.BRAIN], mode="sample", generator=torch.Generator().manual_seed(0))
    b = synthesize_ct(phantom[keys.MRI], phantom[keys.BRAIN], mode="sample", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, e)
    assert a.min() >= 0 and a.max() <= 1 and a.shape[0] == keys.CT_CHANNELS
    brain = phantom[keys.BRAIN][0]
    hu_a, hu_e = decode_ct(a)[0], decode_ct(e)[0]
    assert abs((hu_a[brain] - hu_e[brain]).mean().item()) < 5.0  # unbiased around the expectation (HU)


def test_ct_windows_give_brain_contrast_and_unsaturated_bone():
    s = make_head_phantom((60, 64, 60), seed=0, noise=0.25, margin_mm=14.0)
    brain, tissue = s[keys.BRAIN][0], s["tissue"][0]
    ct = synthesize_ct(s[keys.MRI], s[keys.BRAIN], fit_ct_from_samples([s], n_components=6, seed=0), spacing=(1, 1, 1))
    names = [n for n, _, _ in keys.CT_WINDOWS]
    bw, bone = ct[names.index("brain")], ct[names.index("bone")]
    # brain tissues span at least 20 % of the brain-window channel (1st to 99th percentile of brain voxels)
    q = torch.quantile(bw[brain].float(), torch.tensor([0.01, 0.99]))
    assert float(q[1] - q[0]) >= 0.2
    per_tissue = [float(bw[tissue == TISSUE_CODE[t]].median()) for t in ("csf", "white_matter", "grey_matter")]
    assert per_tissue == sorted(per_tissue) and per_tissue[-1] - per_tissue[0] >= 0.2
    # bone not saturated in the bone window over more than 5 % of the skull, in both modes
    hu = synthesize_ct_hu(s[keys.MRI], s[keys.BRAIN], None, spacing=(1, 1, 1))[0]
    skull = ~brain & (hu > 600)
    assert skull.sum() > 1000
    assert float((bone[skull] >= 1.0).float().mean()) <= 0.05
    sample = synthesize_ct(s[keys.MRI], s[keys.BRAIN], None, "sample", torch.Generator().manual_seed(0))
    assert float((sample[names.index("bone")][skull] >= 1.0).float().mean()) <= 0.05
    # the encoding is stated once: decode(encode(HU)) is exact inside the windows
    x = torch.tensor([-1000.0, -200.0, 5.0, 40.0, 79.0, 900.0, 1800.0]).view(1, 1, 7, 1, 1)
    torch.testing.assert_close(decode_ct(encode_ct(x)), x, atol=1e-3, rtol=0)


def test_save_load_roundtrip_atomic_and_validated(tmp_path):
    x, _, _ = _two_tissue(1000)
    model = fit_ct_mixture(x, n_components=3, seed=0)
    p = model.save(tmp_path / "ct_mixture.json")
    assert [f.name for f in tmp_path.iterdir()] == ["ct_mixture.json"]  # no temp file left
    d = json.loads(p.read_text())
    assert d["format"] == "trifuse.ct_mixture" and d["version"] == 1 and len(d["tissues"]) == 3
    back = CTMixtureModel.load(p)
    assert back.summary().count("HU") == 3 and back.tissues[0] in back.summary()
    torch.testing.assert_close(back.means, model.means)
    torch.testing.assert_close(back.responsibilities(x.T[None].float()), model.responsibilities(x.T[None].float()))
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a CT mixture"):
        CTMixtureModel.load(tmp_path / "bad.json")
    (tmp_path / "corrupt.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt"):
        CTMixtureModel.load(tmp_path / "corrupt.json")
    d["version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="newer"):
        CTMixtureModel.load(tmp_path / "new.json")


def test_gmr_with_paired_ct_learns_the_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 4, generator=g) * 0.5
    x[:3000, 2] += 2.0  # a CSF-like cluster and a parenchyma-like one
    ct = torch.where(torch.arange(6000) < 3000, 8.0 + 2.0 * x[:, 0], 35.0 + 10.0 * x[:, 3])
    model = fit_ct_gmr(x, ct, n_components=2, seed=0)
    pred = model.predict_hu(x.T[None].float())[0]
    assert (pred - ct).abs().mean() < 1.5
    assert model.meta["form"] == "gmr"


def test_transform_dict_batch_and_path(tmp_path, phantom_pair):
    s = phantom_pair[0]
    model = fit_ct_from_samples(phantom_pair, n_components=4, max_voxels=5000, seed=0)
    assert model.meta["n_cases"] == 2 and model.meta["n_voxels"] == 5000
    path = model.save(tmp_path / "m.json")
    out = SynthesizeCT(path)(s)
    assert out[keys.CT].shape == (keys.CT_CHANNELS, 32, 32, 32) and out[keys.CT].dtype == torch.float32
    rec = out[keys.META]["applied"][-1]
    assert rec["name"] == "SynthesizeCT" and rec["mode"] == "expectation" and rec["model"] == str(path)
    batch = {keys.MRI: torch.stack([p[keys.MRI] for p in phantom_pair]),
             keys.BRAIN: torch.stack([p[keys.BRAIN] for p in phantom_pair]),
             keys.CASE_ID: [p[keys.CASE_ID] for p in phantom_pair],
             keys.META: [p[keys.META] for p in phantom_pair]}
    for mode in ("expectation", "sample"):
        t = SynthesizeCT(model, mode=mode, seed=5)
        bo = t(batch)
        assert bo[keys.CT].shape == (2, keys.CT_CHANNELS, 32, 32, 32)
        for i, p in enumerate(phantom_pair):
            torch.testing.assert_close(bo[keys.CT][i], t(p)[keys.CT])
    with pytest.raises(FileNotFoundError):
        SynthesizeCT(tmp_path / "missing.json")(s)
