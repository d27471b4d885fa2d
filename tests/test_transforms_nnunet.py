"""nnU-Net-level augmentation: replayable, labels stay binary and nested, no zero corners."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from trifuse import keys
from trifuse.transforms import NNUNetAugment

P = (16, 16, 16)


def _sample(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    mri = torch.randn((4, *size), generator=g) + 3.0  # no zeros anywhere
    wt = torch.zeros((1, *size), dtype=torch.uint8)
    c = [s // 2 for s in size]
    wt[0, c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 5 : c[2] + 5] = 1
    tc = wt.clone()
    tc[0, : c[0] - 2] = 0
    et = tc.clone()
    et[0, :, : c[1]] = 0
    label = torch.cat([wt, tc, et])
    return {keys.MRI: mri, keys.LABEL: label, keys.BRAIN: torch.ones((1, *size), dtype=torch.bool), keys.META: {"applied": []}}


def test_recorded_parameters_replay_to_the_same_output():
    aug = NNUNetAugment(patch_size=P, rotate_prob=1, scale_prob=1, noise_prob=1, blur_prob=1, brightness_prob=1,
                        contrast_prob=1, lowres_prob=1, gamma_prob=1)
    gen = torch.Generator().manual_seed(3)
    p = aug.sample_params(gen)
    size = aug.input_size(P, p)
    s = _sample(size)
    out = aug(copy.deepcopy(s), params=p)
    rec = out[keys.META]["applied"][-1]
    assert rec["name"] == "NNUNetAugment"
    replay = aug.apply(copy.deepcopy(s), {k: v for k, v in rec.items() if k != "name"})
    assert torch.equal(out[keys.MRI], replay[keys.MRI]) and torch.equal(out[keys.LABEL], replay[keys.LABEL])
    assert tuple(out[keys.MRI].shape[1:]) == P
    assert not torch.equal(out[keys.MRI][:, 0], s[keys.MRI][:, 0, : P[1], : P[2]])  # something was applied


@pytest.mark.parametrize("seed", range(6))
def test_labels_stay_binary_and_nested(seed):
    aug = NNUNetAugment(patch_size=P, rotate_prob=1, scale_prob=1)
    gen = torch.Generator().manual_seed(seed)
    p = aug.sample_params(gen)
    out = aug(_sample(aug.input_size(P, p)), params=p)
    lab = out[keys.LABEL]
    assert lab.dtype == torch.uint8 and set(lab.unique().tolist()) <= {0, 1}
    assert bool((lab[1] <= lab[0]).all()) and bool((lab[2] <= lab[1]).all())  # ET ⊂ TC ⊂ WT
    assert int(lab[0].sum()) > 0


@pytest.mark.parametrize("deg,scale", [(30.0, 1.0), (30.0, 1.4), (15.0, 0.7)])
def test_rotation_and_scaling_of_the_larger_crop_leave_no_zero_corners(deg, scale):
    aug = NNUNetAugment(patch_size=P)
    p = {"rotate_rad": [math.radians(deg)] * 3, "scale": [scale] * 3, "flip_axes": []}
    size = aug.input_size(P, p)
    out = aug.apply(_sample(size), p)
    assert tuple(out[keys.MRI].shape[1:]) == P
    assert bool((out[keys.MRI] != 0).all())  # every output voxel sampled real data
    if scale >= 1.0:
        assert all(s > q for s, q in zip(size, P))
        # the same rotation on a crop of only the patch size does zero-fill its corners
        small = aug.apply(_sample(P), p)
        assert bool((small[keys.MRI] == 0).any())


@pytest.mark.parametrize("deg", [(30.0, 30.0, 30.0), (30.0, -30.0, 30.0), (-30.0, 30.0, 30.0), (25.0, -10.0, 30.0)])
def test_the_larger_crop_covers_a_large_patch_for_any_rotation(deg):
    """At 64³ (the +3 voxel margin no longer hides it) the crop must follow the rotation MONAI's
    Affine applies, axis order included: a matrix of another order left up to 472 voxels zero."""
    big = (64, 64, 64)
    aug = NNUNetAugment(patch_size=big)
    for scale in (1.0, 1.4):
        p = {"rotate_rad": [math.radians(d) for d in deg], "scale": [scale] * 3, "flip_axes": []}
        out = aug.apply(_sample(aug.input_size(big, p)), p)
        assert int((out[keys.MRI] == 0).sum()) == 0, (deg, scale)


def test_input_size_without_spatial_parts_is_the_patch():
    assert NNUNetAugment(patch_size=P).input_size(P, {"flip_axes": [0]}) == P
