"""The semantic figure picks its slices from the image, not from the labels."""
import numpy as np

from trifuse import keys
from trifuse.figures.semantic import _centre
from trifuse.semantic.slices import find_abnormality, sample_arrays


def test_figure_slices_follow_the_image_derived_abnormality(phantom):
    s = phantom(shape=(40, 44, 36), side="left")
    mri, brain, geo = sample_arrays(s)
    abn = find_abnormality(mri, brain, geo.spacing)
    assert abn.found
    label = np.zeros((3,) + brain.shape, np.uint8)
    label[:, 30:34, 5:9, 5:9] = 1  # a "label" far from the lesion: must not move the slices
    s[keys.LABEL] = label
    prior = np.zeros((3,) + brain.shape, np.float32)
    c = _centre(s, prior)
    assert c == tuple(int(round(float(v))) for v in abn.slice_centre)
    assert abs(c[1] - 6.5) > 5  # not the label's centroid
