"""Ultrasound simulator: closed forms, attenuation law, shadowing, gradients, determinism."""
from __future__ import annotations

import math

import pytest
import torch

from trifuse import keys
from trifuse.physics.acoustic import DiffUSMapper, ImpedanceMapper, db_to_intensity_nepers
from trifuse.physics.transforms import SimulateUltrasound
from trifuse.physics.ultrasound import (
    SALINE_IMPEDANCE,
    ProbeConfig,
    ProbeGeometry,
    place_probe,
    ray_image,
    render_ultrasound,
    simulate_ultrasound,
    trace_rays,
)

SP1 = torch.ones(1, 3)


def _axis_probe(origin=(0.0, 8.0, 8.0)) -> ProbeGeometry:
    """Probe at ``origin`` (mm) looking along +D, lateral +H, elevation +W."""
    return ProbeGeometry(torch.tensor([origin]), torch.eye(3)[None], torch.tensor([origin]))


def _linear(**kw) -> ProbeConfig:
    base = dict(geometry="linear", resolution_mm=None, psf_sigma_mm=(0.0, 0.0, 0.0), gain_db=0.0)
    base.update(kw)
    return ProbeConfig(**base)


def test_reflection_closed_form_two_layers():
    z1, z2 = 1.5, 1.7
    z = torch.tensor([[z1] * 6 + [z2] * 6])
    tr = trace_rays(z, torch.zeros_like(z), torch.zeros_like(z), dz_mm=0.5, frequency_mhz=7.0, z0=z1)
    r_closed = ((z2 - z1) / (z2 + z1)) ** 2
    assert tr["reflection"][0, 6].item() == pytest.approx(r_closed, rel=1e-6)
    assert tr["echo"][0, 6].item() == pytest.approx(r_closed, rel=1e-6)  # nothing attenuates before it
    assert torch.all(tr["reflection"][0, :6] == 0) and torch.all(tr["reflection"][0, 7:] == 0)
    # energy beyond the interface is what was transmitted
    assert tr["transmission"][0, 7].item() == pytest.approx(1 - r_closed, rel=1e-6)


def test_reflection_closed_form_through_ray_sampling(layered_maps):
    """A grid-aligned two-layer volume, sampled by the full ray path, gives R exactly."""
    z2 = 6.0  # soft tissue to bone-like
    maps = layered_maps((24, 17, 17), [(10, SALINE_IMPEDANCE), (24, z2)])
    cfg = _linear(depth_mm=20.0, width_mm=4.0, elevation_mm=4.0, n_rays=(3, 3))
    _, rays = ray_image(maps, SP1, _axis_probe(), cfg, seeds=[0])
    r_closed = ((z2 - SALINE_IMPEDANCE) / (z2 + SALINE_IMPEDANCE)) ** 2
    torch.testing.assert_close(rays["echo"][..., 10], torch.full((1, 3, 3), r_closed), rtol=1e-5, atol=1e-7)
    assert rays["echo"][..., :10].abs().max() < 1e-9


def test_attenuation_log_slope_homogeneous(layered_maps):
    alpha, f = 0.5, 5.0  # dB/(cm MHz), MHz
    expected = -2 * db_to_intensity_nepers(alpha) * f  # per cm, intensity round trip
    # the closed form in dB: a round trip through z cm loses 2·α·f·z dB
    assert 10 * math.log10(math.exp(expected)) == pytest.approx(-2 * alpha * f, rel=1e-9)
    maps = layered_maps((46, 36, 36), [(46, 1.6)], scatter=1e-4, alpha=alpha)
    cfg = _linear(depth_mm=40.0, width_mm=30.0, elevation_mm=30.0, n_rays=(31, 31), frequency_mhz=f,
                  speckle_contrast=1.0, tgc_fraction=0.0, psf_sigma_mm=(0.4, 0.7, 1.2))
    _, rays = ray_image(maps, SP1, _axis_probe((0.0, 17.5, 17.5)), cfg, seeds=[1])
    z_cm = torch.linspace(0, 4.0, rays["attenuation"].shape[-1])
    log_att = torch.log(rays["attenuation"][0, 0, 0])
    slope = ((log_att[1:] - log_att[:-1]) / (z_cm[1:] - z_cm[:-1])).mean().item()
    assert slope == pytest.approx(expected, rel=1e-4)
    # the simulated echo energy (speckle + PSF, averaged over rays) follows the same law
    energy = rays["intensity"][0, 0].mean((0, 1))  # mean over rays, per depth
    sel = slice(3, -3)
    zz, ll = z_cm[sel], torch.log(energy[sel])
    fit = ((zz - zz.mean()) * (ll - ll.mean())).sum() / ((zz - zz.mean()) ** 2).sum()
    assert fit.item() == pytest.approx(expected, rel=0.05)


def test_shadow_behind_strong_reflector_from_transmission_only(layered_maps):
    """High-impedance slab, no attenuation anywhere: the shadow comes from Π(1 − R) alone."""
    maps = layered_maps((60, 40, 40), [(60, 1.6)], scatter=1e-4, alpha=0.0)
    maps[:, 0, 20:24, 8:22, :] = 20.0  # bone-like slab (R ≈ 0.73 per face) under part of the probe
    cfg = _linear(depth_mm=55.0, width_mm=30.0, elevation_mm=30.0, tgc_fraction=0.0, gain_db=30.0,
                  psf_sigma_mm=(0.4, 0.7, 1.2))
    us, rays = render_ultrasound(maps, SP1, _axis_probe((0.0, 19.5, 19.5)), cfg, seeds=[0], return_rays=True)
    # linear echo energy (ray j at H = 4.5 + j mm, sample k at depth k mm)
    e = rays["intensity"][0, 0]  # (Ne, Nl, Nd)
    r_slab = ((20.0 - 1.6) / (20.0 + 1.6)) ** 2
    below, beside = e[4:27, 5:16, 30:50].mean(), e[4:27, 22:28, 30:50].mean()
    assert (below / beside).item() == pytest.approx((1 - r_slab) ** 4, rel=0.3)  # two faces, round trip
    assert below < 0.01 * beside
    # and on the display: a slab reflecting ~94 % per face leaves black below
    maps[:, 0, 20:24, 8:22, :] = 100.0
    us = render_ultrasound(maps, SP1, _axis_probe((0.0, 19.5, 19.5)), cfg, seeds=[0])[0, 0]
    below = us[30:50, 11:19, 8:32].mean()
    beside = us[30:50, 26:33, 8:32].mean()
    above = us[8:18, 11:19, 8:32].mean()
    assert beside > 0.3 and above > 0.3
    assert below < 0.2 * beside and below < 0.2 * above
    assert us[19:22, 11:19, 8:32].mean() > above  # the slab's top surface is a bright interface


def test_air_blanks_everything_below(layered_maps):
    air = 343.0 * 1.2 / 1e6
    maps = layered_maps((50, 20, 20), [(25, 1.6), (50, air)], scatter=1e-4, alpha=0.5)
    cfg = _linear(depth_mm=45.0, width_mm=12.0, elevation_mm=12.0, gain_db=20.0)
    us = render_ultrasound(maps, SP1, _axis_probe((0.0, 9.5, 9.5)), cfg, seeds=[0])[0, 0]
    assert us[5:22, 6:14, 6:14].mean() > 0.3
    assert us[28:45, 6:14, 6:14].max() < 1e-3


def test_output_zero_outside_fov_and_in_range(phantom):
    us = simulate_ultrasound(phantom[keys.MRI], phantom[keys.BRAIN], (1, 1, 1), ProbeConfig(resolution_mm=None)).detach()
    assert us.shape == (1, *phantom[keys.MRI].shape[1:]) and us.dtype == torch.float32
    assert us.min() >= 0 and us.max() <= 1
    frac = (us > 0).float().mean().item()
    assert 0.05 < frac < 0.95  # a fan, not the whole volume


def test_default_probe_is_a_craniotomy_over_the_lesion(phantom):
    mri, brain = phantom[keys.MRI][None], phantom[keys.BRAIN][None]
    g = place_probe(mri, brain, SP1, ProbeConfig())
    tgt = g.target[0].round().long()
    assert phantom[keys.SEG][0][tuple(tgt)] > 0  # the FLAIR-abnormal centroid lies in the lesion
    o = g.origin[0].round().long().clamp(min=0)
    assert not brain[0, 0][tuple(o)]  # the face is outside the brain (in the saline window)
    to_target = g.target[0] - g.origin[0]
    assert torch.dot(to_target / to_target.norm(), g.axes[0, 0]) > 0.99  # beam points at the target
    # the face sits on the brain surface nearest the target: its distance to the target is the
    # smallest target-to-surface distance plus the standoff (placement runs on a ~2 mm grid)
    from trifuse.physics.ultrasound import _surface

    surf = _surface(brain[:, 0])[0].nonzero().float()  # 1 mm voxels: index = mm
    nearest = (surf - g.target[0]).norm(dim=1).min()
    assert abs(float(to_target.norm() - nearest - ProbeConfig().standoff_mm)) < 2.0


def test_gradients_reach_mapper_parameters(phantom):
    cfg = ProbeConfig(resolution_mm=None, n_rays=(12, 12), samples_per_ray=30, depth_mm=30.0)
    for mapper in (ImpedanceMapper(), DiffUSMapper()):
        us = simulate_ultrasound(phantom[keys.MRI], phantom[keys.BRAIN], (1, 1, 1), cfg, mapper=mapper, seeds=[0])
        us.mean().backward()
        grads = [p.grad for p in mapper.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    m = ImpedanceMapper()
    us = simulate_ultrasound(phantom[keys.MRI], phantom[keys.BRAIN], (1, 1, 1), cfg, mapper=m, seeds=[0])
    us.mean().backward()
    assert m.log_rho.grad[:6].abs().sum() > 0  # brain tissues, not only geometric ones


def test_same_seed_same_output_and_seed_matters(phantom):
    t = SimulateUltrasound(seed=3)
    a, b = t(phantom)[keys.US], t(phantom)[keys.US]
    assert torch.equal(a, b)
    c = SimulateUltrasound(seed=4)(phantom)[keys.US]
    assert not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(SimulateUltrasound(generator=g1)(phantom)[keys.US], SimulateUltrasound(generator=g2)(phantom)[keys.US])


def test_batch_equals_per_case(phantom_pair):
    t = SimulateUltrasound(seed=0)
    batch = {keys.MRI: torch.stack([p[keys.MRI] for p in phantom_pair]),
             keys.BRAIN: torch.stack([p[keys.BRAIN] for p in phantom_pair]),
             keys.CASE_ID: [p[keys.CASE_ID] for p in phantom_pair],
             keys.META: [p[keys.META] for p in phantom_pair]}
    out = t(batch)
    assert out[keys.US].shape == (2, 1, 32, 32, 32) and out[keys.US].dtype == torch.float32
    for i, p in enumerate(phantom_pair):
        single = t(p)
        torch.testing.assert_close(out[keys.US][i], single[keys.US], atol=1e-5, rtol=1e-5)
        assert out[keys.META][i]["applied"][-1] == single[keys.META]["applied"][-1]


def test_transform_records_and_does_not_mutate(phantom):
    before = list(phantom[keys.META]["applied"])
    out = SimulateUltrasound(seed=1, jitter_deg=10.0, jitter_mm=3.0)(phantom)
    assert phantom[keys.META]["applied"] == before and keys.US not in phantom
    rec = out[keys.META]["applied"][-1]
    assert rec["name"] == "SimulateUltrasound" and rec["seed"] == SimulateUltrasound(seed=1)(phantom)[keys.META]["applied"][-1]["seed"]
    for k in ("geometry", "frequency_mhz", "centre_mm", "direction", "target_mm", "tilt_deg", "shift_mm"):
        assert k in rec
    assert 0 <= rec["tilt_deg"] <= 10.0
    assert out[keys.US].shape == (1, *phantom[keys.MRI].shape[1:])


def test_sector_and_linear_geometry_fan_angle_depth_and_apex(layered_maps):
    """Homogeneous scatterer: the imaged region is exactly the slab / the fan of the probe."""
    maps = layered_maps((70, 70, 70), [(70, 1.6)], scatter=1e-3, alpha=0.0)
    origin = (2.0, 35.0, 35.0)
    g = _axis_probe(origin)
    d, h, w = torch.meshgrid(*(torch.arange(70.0),) * 3, indexing="ij")
    u, v, e = d - origin[0], h - origin[1], w - origin[2]  # probe coordinates (axial, lateral, elevation)
    for geo in ("linear", "sector"):
        cfg = ProbeConfig(geometry=geo, depth_mm=50.0, width_mm=20.0, elevation_mm=10.0, angle_deg=50.0, elevation_angle_deg=30.0,
                          resolution_mm=None, speckle_contrast=0.0, gain_db=40.0)
        us = render_ultrasound(maps, SP1, g, cfg, seeds=[0])[0, 0]
        if geo == "linear":
            inside = (u >= 0) & (u <= 50) & (v.abs() <= 10) & (e.abs() <= 5)
            inner = (u >= 1) & (u <= 49) & (v.abs() <= 9) & (e.abs() <= 4)
        else:
            a = cfg.apex_offset_mm  # the virtual apex sits a behind the face centre
            assert a == pytest.approx(10.0 / math.sin(math.radians(25.0)))
            ua = u + a
            r = torch.sqrt(ua**2 + v**2 + e**2)
            lat, ele = torch.atan2(v, ua).abs(), torch.atan2(e, ua).abs()
            inside = (ua > 0) & (r >= a) & (r <= a + 50) & (lat <= math.radians(25.0)) & (ele <= math.radians(15.0))
            inner = (ua > 0) & (r >= a + 1) & (r <= a + 49) & (lat <= math.radians(24.0)) & (ele <= math.radians(14.0))
            # fan angle: at 40 mm below the face the imaged lateral half-width is (a + 40)·tan(25°)
            row = us[42, :, 35]
            half = float((row > 0).sum()) / 2
            assert half == pytest.approx(math.hypot(a + 40, 0) * math.tan(math.radians(25.0)), abs=1.5)
        # the half-sample fade of the scan conversion, at the corners of the fan up to ~1.5 voxels
        grown = torch.nn.functional.max_pool3d(inside[None, None].float(), 5, 1, 2)[0, 0].bool()
        assert bool((us[inner] > 0).all())  # everything inside the slab / fan is imaged
        assert float(us[~grown].abs().max()) == 0.0  # nothing outside it
        # depth: the image ends 50 mm from the face along the beam axis
        axis = us[:, 35, 35]
        assert int((axis > 0).nonzero().max()) == pytest.approx(origin[0] + 50, abs=1)


def test_psf_scales_with_frequency_and_survives_a_psf_pitch():
    from trifuse.physics.tissues import coarse_factors
    from trifuse.physics.ultrasound import psf_samples

    def grain_mm(f: float) -> float:  # lateral speckle correlation length of a homogeneous scatterer
        maps = torch.zeros(1, 3, 60, 48, 16)
        maps[:, 0], maps[:, 2] = 1.6, 1e-4
        sp = torch.full((1, 3), 0.2)
        cfg = ProbeConfig(geometry="linear", frequency_mhz=f, depth_mm=10.0, width_mm=8.0, elevation_mm=2.0, resolution_mm=None,
                          speckle_contrast=1.0, tgc_fraction=0.0)
        g = ProbeGeometry(torch.tensor([[0.0, 4.8, 1.6]]), torch.eye(3)[None], torch.tensor([[5.0, 4.8, 1.6]]))
        _, rays = ray_image(maps, sp, g, cfg, [0])
        x = rays["intensity"][0, 0, :, :, 5:-5].log()
        x = x - x.mean(1, keepdim=True)
        nl = x.shape[1]
        ac = [float((x[:, : nl - k] * x[:, k:]).mean() / (x * x).mean()) for k in range(nl // 2)]
        return next(k for k, c in enumerate(ac) if c < 0.5) * cfg.width_mm / (nl - 1)

    assert ProbeConfig(frequency_mhz=14.0).psf_mm == pytest.approx(tuple(v / 2 for v in ProbeConfig().psf_sigma_mm))
    assert grain_mm(5.0) >= 1.5 * grain_mm(10.0)  # the speckle grain follows the wavelength
    for f in (5.0, 7.0, 10.0):
        cfg = ProbeConfig(frequency_mhz=f, resolution_mm="psf")
        fac = coarse_factors((0.5, 0.5, 0.5), cfg.working_mm)
        n = cfg.resolve([0.5 * k for k in fac])
        assert min(psf_samples(cfg, *n)) >= 0.5 - 1e-6  # the PSF is not below the sampling on any axis
    # at the default 2 mm the axial PSF is below the pitch (floored at half a sample): stated, not hidden
    cfg = ProbeConfig()
    assert psf_samples(cfg, *cfg.resolve([2.0, 2.0, 2.0]))[2] < 0.5
    with pytest.raises(ValueError, match="psf"):
        ProbeConfig(resolution_mm="fine")


def test_rays_start_in_coupling_medium_never_in_air(phantom):
    """Default craniotomy: no ray meets air (or bone) near the face; outside it, bone does."""
    from trifuse.physics.acoustic import geometry_labels
    from trifuse.physics.tissues import head_layers
    from trifuse.physics.ultrasound import craniotomy_window

    mri, brain = phantom[keys.MRI][None], phantom[keys.BRAIN][None]
    cfg = ProbeConfig(resolution_mm=None, depth_mm=30.0)
    g = place_probe(mri, brain, SP1, cfg)
    lay = head_layers(brain, (1, 1, 1))
    window = craniotomy_window(mri.shape[2:], SP1, g, cfg)
    labels = geometry_labels(brain, lay, window)
    with torch.no_grad():
        maps = ImpedanceMapper()(mri, brain, labels).stack()
        _, rays = ray_image(maps, SP1, g, cfg, seeds=[0])
    near = rays["reflection"][..., :6]  # first 6 mm of every ray
    assert near.max() < 0.05  # saline -> brain only: no bone (R ~ 0.3) or air (R ~ 1) at the face
    assert rays["transmission"][..., 6].min() > 0.95
    # without the craniotomy the same probe would sit on bone: strong echoes at the face
    labels_closed = geometry_labels(brain, lay, None)
    with torch.no_grad():
        maps = ImpedanceMapper()(mri, brain, labels_closed).stack()
        _, rays = ray_image(maps, SP1, g, cfg, seeds=[0])
    assert rays["reflection"][..., :6].amax(-1).median() > 0.2


def test_zero_scatter_has_finite_gradients(layered_maps):
    """√s of an anechoic (s = 0) sample: d√s/ds is infinite there; the field must stay NaN-free."""
    maps = layered_maps((30, 12, 12), [(10, 1.5), (30, 1.6)], scatter=0.0, alpha=0.5).clone().requires_grad_(True)
    cfg = _linear(depth_mm=25.0, width_mm=6.0, elevation_mm=6.0, n_rays=(4, 4))
    img, _ = ray_image(maps, SP1, _axis_probe((0.0, 5.5, 5.5)), cfg, seeds=[0])
    img.sum().backward()
    assert torch.isfinite(maps.grad).all() and maps.grad[:, 0].abs().sum() > 0


def test_probe_walk_always_ends_outside_the_brain():
    """The outward walk from the surface voxel must end outside the brain: with a beam forced to
    point out of a brain that fills the volume, the walk crosses the whole brain (the old short
    walk never left it, and argmax of an all-False walk put the face on the surface voxel, inside)."""
    mri = torch.zeros(1, 4, 24, 24, 24)
    mri[:, keys.FLAIR, 4:8, 10:14, 10:14] = 3.0  # lesion near the D = 0 border
    brain = torch.ones(1, 1, 24, 24, 24, dtype=torch.bool)
    cfg = ProbeConfig(direction=(-1.0, 0.0, 0.0))
    g = place_probe(mri, brain, SP1, cfg)
    o = g.origin[0]
    assert float(o[0]) > 23.0 + cfg.standoff_mm - 0.6  # beyond the far border, then the standoff
    idx = o.round().long()
    assert bool(((idx < 0) | (idx > 23)).any())  # the face is outside the brain (here: the volume)
