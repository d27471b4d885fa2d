"""Case-frame simulation: a training patch's US and CT are the crop of the whole-case ones."""
from __future__ import annotations

import pytest
import torch

from trifuse import keys
from trifuse.physics.ct import decode_ct
from trifuse.physics.phantom import make_head_phantom
from trifuse.physics.transforms import CASE_FRAME, SimulateUltrasound, SynthesizeCT


@pytest.fixture(scope="module")
def case():
    """A 1.5 mm head phantom with room for the head layers (the cache margin)."""
    return make_head_phantom((60, 72, 60), spacing=(1.5, 1.5, 1.5), seed=0, margin_mm=12.0)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _patch(case: dict, box, frame: bool = True, pad_to=None) -> dict:
    sl = (slice(None),) + tuple(slice(a, b) for a, b in box)
    meta = dict(case[keys.META], patch_box=box, applied=[])
    if frame:
        meta[CASE_FRAME] = {"mri": case[keys.MRI], "brain": case[keys.BRAIN]}
    mri, brain = case[keys.MRI][sl], case[keys.BRAIN][sl]
    if pad_to is not None:  # as the loader pads a case smaller than the patch (extra // 2 in front)
        p = []
        for have, want in zip(reversed(mri.shape[1:]), reversed(pad_to)):
            p += [(want - have) // 2, want - have - (want - have) // 2]
        mri, brain = torch.nn.functional.pad(mri, p), torch.nn.functional.pad(brain, p)
    return {keys.MRI: mri, keys.BRAIN: brain, keys.CASE_ID: case[keys.CASE_ID], keys.META: meta}


def _crop(t: torch.Tensor, box) -> torch.Tensor:
    return t[(slice(None),) + tuple(slice(a, b) for a, b in box)]


def _boxes(case, rec, half=8):
    """A patch around the probe face (holds the brain surface) and one deep in the brain (none)."""
    sp = case[keys.META]["spacing"]
    face = [int(round(v / s)) for v, s in zip(rec["centre_mm"], sp)]
    ax = torch.tensor(rec["direction"])
    deep = [int(round((c + 25.0 * a) / s)) for c, a, s in zip(rec["centre_mm"], ax.tolist(), sp)]
    mk = lambda c: [[max(0, v - half), v + half] for v in c]  # noqa: E731
    return mk(face), mk(deep)


@pytest.mark.parametrize("jitter", [0.0, 8.0])
def test_patch_us_is_the_crop_of_the_whole_case_us(case, jitter):
    us = SimulateUltrasound(seed=3, jitter_deg=jitter, jitter_mm=jitter / 2)
    whole = us(case)
    rec = whole[keys.META]["applied"][-1]
    surface, deep = _boxes(case, rec)
    brain = case[keys.BRAIN]
    assert not bool(_crop(brain, surface).all()) and bool(_crop(brain, surface).any())  # holds the brain surface
    assert bool(_crop(brain, deep).all())  # inside the brain: no surface in the patch
    for box in (surface, deep):
        ref = _crop(whole[keys.US], box)
        assert float(ref.mean()) > 0.05  # the patch is in the field of view
        p = us(_patch(case, box))
        assert p[keys.META]["applied"][-1]["frame"] == "case"
        assert p[keys.META]["applied"][-1]["centre_mm"] == rec["centre_mm"]  # same probe
        assert _corr(p[keys.US], ref) >= 0.98
    # the per-patch simulation this replaces: the probe lands on the patch border, inside the brain
    own = us(_patch(case, deep, frame=False))
    assert _corr(own[keys.US], _crop(whole[keys.US], deep)) < 0.9


def test_padded_patch_and_batch_keep_the_case_frame(case):
    us = SimulateUltrasound(seed=5)
    whole = us(case)[keys.US]
    box = [[0, 60], [10, 50], [5, 55]]  # all of D: the loader pads D up to the patch size
    p = us(_patch(case, box, pad_to=(64, 40, 50)))[keys.US]
    torch.testing.assert_close(p[:, 2:62], _crop(whole, box))
    assert float(p[:, :2].abs().max()) == 0.0
    # a batch of framed patches equals the patches one by one
    surface, deep = _boxes(case, us(case)[keys.META]["applied"][-1])
    items = [_patch(case, b) for b in (surface, deep)]
    batch = {keys.MRI: torch.stack([i[keys.MRI] for i in items]), keys.BRAIN: torch.stack([i[keys.BRAIN] for i in items]),
             keys.CASE_ID: [i[keys.CASE_ID] for i in items], keys.META: [i[keys.META] for i in items]}
    out = us(batch)[keys.US]
    for k, item in enumerate(items):
        torch.testing.assert_close(out[k], us(item)[keys.US])


def test_patch_ct_gets_the_skull_of_brain_outside_the_patch(case):
    ct = SynthesizeCT()
    whole = ct(case)[keys.CT]
    # a slab above the brain: no brain voxel inside, the skull comes from the brain just below it
    d0 = int(case[keys.BRAIN][0].nonzero()[:, 0].min())
    box = [[max(0, d0 - 8), d0], [10, 60], [10, 50]]
    assert not bool(_crop(case[keys.BRAIN], box).any())
    framed = ct(_patch(case, box))[keys.CT]
    torch.testing.assert_close(framed, _crop(whole, box))
    hu = decode_ct(framed)
    assert float((hu > 600).float().mean()) > 0.1  # skull is there
    own = decode_ct(ct(_patch(case, box, frame=False))[keys.CT])
    assert float((own > 600).float().mean()) == 0.0  # the per-patch CT saw no brain: no skull


def test_loader_patches_carry_the_case_frame(tiny_dataset, tmp_path):
    """Through the real loader: a cached case's training patch gets the crop of the whole-case US and CT."""
    from trifuse.io import cache as cache_mod
    from trifuse.io.manifest import read_manifest
    from trifuse.io.preprocess import preprocess
    from trifuse.lightning.data import PatchDataset
    from trifuse.physics.ultrasound import ProbeConfig, simulate_ultrasound

    data = tiny_dataset(2021, n=1, shape=(40, 44, 36))
    cache = tmp_path / "cache"
    preprocess(data, cache)
    cid = read_manifest(cache)["cases"][0]["case_id"]
    us, ct = SimulateUltrasound(ProbeConfig(depth_mm=40.0), seed=1), SynthesizeCT()
    ds = PatchDataset(cache, [cid], patch_size=(24, 24, 24), samples_per_epoch=4, fg_prob=0.0, sample_transforms=[us, ct])
    whole = ct(cache_mod.load_sample(cache, cid))
    for i in range(3):
        p = ds[i]
        box = p[keys.META]["patch_box"]
        assert [r["frame"] for r in p[keys.META]["applied"][-2:]] == ["case", "case"]
        # the loader draws the speckle seed per patch: the whole case simulated with that seed
        seed = p[keys.META]["applied"][-2]["seed"]
        full_us = simulate_ultrasound(whole[keys.MRI], whole[keys.BRAIN], whole[keys.META]["spacing"], us.config, None, [seed])
        torch.testing.assert_close(p[keys.US], _crop(full_us, box))
        torch.testing.assert_close(p[keys.CT], _crop(whole[keys.CT], box))


def test_cache_margin_holds_the_modelled_head_layers():
    """The cache crops the brain box plus a margin: it must hold the CSF gap, skull and scalp the
    pixel tier models around the brain (else the head layers are cut off at the crop)."""
    from trifuse.io.cache import DEFAULT_MARGIN_MM
    from trifuse.physics.tissues import HeadConfig

    assert DEFAULT_MARGIN_MM >= HeadConfig().total_mm
