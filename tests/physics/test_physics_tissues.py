"""Tissue table, image-only posteriors, head layers, mappers, figure."""
from __future__ import annotations

import math

import torch

from trifuse import keys
from trifuse.physics.acoustic import DiffUSMapper, ImpedanceMapper, db_to_intensity_nepers, geometry_labels
from trifuse.physics.phantom import TISSUE_CODE
from trifuse.physics.tissues import (
    BRAIN_TISSUES,
    DEFAULT_TISSUE_MODEL,
    HEAD_TISSUES,
    TISSUES,
    head_layers,
    head_posteriors,
    outside_distance_mm,
    tissue_posteriors,
)


def test_table_values_and_units():
    assert TISSUES["grey_matter"].impedance == 1560 * 1047 / 1e6  # MRayl
    assert 1.45 < TISSUES["saline"].impedance < 1.56  # coupling medium, Z ≈ 1.5 MRayl
    assert TISSUES["air"].impedance < 1e-3 and TISSUES["skull"].impedance > 5
    r_air = ((TISSUES["air"].impedance - 1.6) / (TISSUES["air"].impedance + 1.6)) ** 2
    assert r_air > 0.998  # an air-tissue interface reflects ~99.9 %
    for name in BRAIN_TISSUES:
        lo, hi = TISSUES[name].hu_range
        assert lo <= TISSUES[name].hu_mean <= hi
    # 1 dB/cm = ln(10)/10 per cm in intensity, i.e. twice the amplitude rate in nepers
    assert abs(db_to_intensity_nepers(20 / math.log(10)) - 2.0) < 1e-9


def test_posteriors_classify_profiles_and_sum_to_one(phantom):
    mri, brain = phantom[keys.MRI], phantom[keys.BRAIN]
    p = tissue_posteriors(mri, brain)
    assert p.shape == (len(BRAIN_TISSUES), *mri.shape[1:])
    torch.testing.assert_close(p.sum(0)[brain[0]], torch.ones(int(brain.sum())), atol=1e-5, rtol=0)
    assert p[:, ~brain[0]].abs().max() == 0
    # pure profile vectors are classified as their own tissue
    m = torch.tensor(DEFAULT_TISSUE_MODEL.means).T[None, :, :, None, None]  # (1, 4, 6, 1, 1)
    pp = tissue_posteriors(m, torch.ones(1, 1, 6, 1, 1, dtype=torch.bool))[0, :, :, 0, 0]
    assert torch.equal(pp.argmax(0), torch.arange(6))
    # on the (noisy, z-scored) phantom, the majority class per tissue is right
    tissue = phantom["tissue"][0]
    for name in ("grey_matter", "white_matter", "oedema", "enhancing"):
        sel = tissue == TISSUE_CODE[name]
        assert p[:, sel].mean(1).argmax().item() == BRAIN_TISSUES.index(name)


def test_distance_and_layers_on_a_sphere():
    z, y, x = torch.meshgrid(*[torch.arange(48.0)] * 3, indexing="ij")
    r = ((z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2).sqrt()
    brain = (r <= 10)[None, None]
    for coarse in (None, 2.0):
        d = outside_distance_mm(brain, (1, 1, 1), 12.0, coarse)
        sel = ~brain & torch.isfinite(d)
        assert (d[sel] - (r[None, None][sel] - 10)).abs().mean() < 1.0
        assert torch.isinf(d[0, 0, 0, 0, 0]) and d[brain].abs().max() == 0
    lay = head_layers(brain, (1, 1, 1))
    shell = lay["skull"][0, 0]
    assert shell[24, 24, 10 - 4] and not shell[24, 24, 24] and lay["air"][0, 0, 0, 0, 0]
    # anisotropic voxels: the shell is thick in mm, not in voxels
    d2 = outside_distance_mm(brain[..., ::2], (1, 1, 2), 12.0, None)
    assert abs(d2[0, 0, 24, 24, 3].item() - 8.0) <= 1.0  # voxel 3 is at x = 6 mm: 8 mm outside r = 10


def test_head_posteriors_and_mappers(phantom):
    mri, brain = phantom[keys.MRI][None], phantom[keys.BRAIN][None]
    lay = head_layers(brain, (1, 1, 1))
    window = torch.zeros_like(brain)
    window[..., :8, :, :] = True
    hp = head_posteriors(mri, brain, (1, 1, 1), window=window, layers=lay)
    assert hp.shape[1] == len(HEAD_TISSUES)
    torch.testing.assert_close(hp.sum(1), torch.ones_like(hp.sum(1)), atol=1e-5, rtol=0)
    labels = geometry_labels(brain, lay, window)
    assert set(labels.unique().tolist()) <= set(range(6))
    for mapper in (ImpedanceMapper(), DiffUSMapper()):
        maps = mapper(mri, brain, labels)
        z = maps.impedance
        assert z.shape == brain.shape
        assert torch.allclose(z[labels == 4], torch.tensor(TISSUES["air"].impedance))
        assert torch.allclose(z[labels == 5], torch.tensor(TISSUES["saline"].impedance))
        assert ((z[brain] > 1.4) & (z[brain] < 1.8)).all()  # brain soft tissue, MRayl
    # Z = Σ_k p_k ρ_k c_k with the table θ
    p = tissue_posteriors(mri, brain)
    zk = torch.tensor([TISSUES[n].impedance for n in BRAIN_TISSUES])
    torch.testing.assert_close(ImpedanceMapper()(mri, brain, labels).impedance[brain],
                               torch.einsum("bkdhw,k->bdhw", p, zk)[brain[:, 0]], rtol=1e-5, atol=1e-5)


def test_figure_shows_the_training_view_beside_native(tmp_path, phantom):
    from matplotlib.image import imread

    from trifuse.physics import render_physics_figure
    from trifuse.physics.figure import physics_panels
    from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT
    from trifuse.physics.ultrasound import ProbeConfig

    p = physics_panels(phantom, seed=2)
    titles = [c[0] for c in p["columns"]]
    assert titles[2].startswith("US as trained (2 mm") and titles[3] == "US native resolution"
    # the training column is exactly what a teacher gets from the configs' transform; the native one differs
    train = SimulateUltrasound(ProbeConfig(), seed=2)(phantom)[keys.US][0].numpy()
    native = SimulateUltrasound(ProbeConfig(resolution_mm=None), seed=2)(phantom)[keys.US][0].numpy()
    assert (p["columns"][2][1] == train).all() and (p["columns"][3][1] == native).all()
    assert not (train == native).all()
    ct = SynthesizeCT()(phantom)[keys.CT].numpy()
    for c in range(keys.CT_CHANNELS):  # one column per CT window, as the network receives it
        assert (p["columns"][4 + c][1] == ct[c]).all() and keys.CT_WINDOWS[c][0] in titles[4 + c]
    out = render_physics_figure(phantom, tmp_path / "fig" / "physics.png", seed=2)
    assert [q.name for q in (tmp_path / "fig").iterdir()] == ["physics.png"]  # atomic: no temp file left
    img = imread(out)
    assert img.shape[1] > 1.8 * img.shape[0]  # a 3 x 6 grid: wider than tall
    assert img[..., :3].std() > 0.05  # not a blank canvas
