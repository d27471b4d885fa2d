import numpy as np
import pytest
import torch

from trifuse import keys
from trifuse.io.labels import convention, labels_to_regions, regions_to_labels


@pytest.mark.parametrize("year, et", [(2020, 4), (2021, 4), (2023, 3)])
def test_convention_table(year, et):
    c = convention(year)
    assert (c.ncr, c.ed, c.et) == (1, 2, et)


@pytest.mark.parametrize("year", keys.YEARS)
def test_round_trip_numpy_and_torch(year):
    c = convention(year)
    rng = np.random.default_rng(year)
    seg = rng.choice(np.array(c.values, np.uint8), size=(7, 6, 5))
    reg = labels_to_regions(seg, year)
    assert reg.shape == (3, 7, 6, 5) and reg.dtype == np.uint8
    # hand-checked region definitions
    np.testing.assert_array_equal(reg[keys.WT], np.isin(seg, [c.ncr, c.ed, c.et]))
    np.testing.assert_array_equal(reg[keys.TC], np.isin(seg, [c.ncr, c.et]))
    np.testing.assert_array_equal(reg[keys.ET], seg == c.et)
    # nesting
    assert np.all(reg[keys.ET] <= reg[keys.TC]) and np.all(reg[keys.TC] <= reg[keys.WT])
    np.testing.assert_array_equal(regions_to_labels(reg, year), seg)
    t = torch.from_numpy(seg)[None]
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(t, year), year).numpy(), seg)


def test_cross_year_conversion_maps_et():
    seg21 = np.array([0, 1, 2, 4], np.uint8)
    seg23 = regions_to_labels(labels_to_regions(seg21, 2021), 2023)
    np.testing.assert_array_equal(seg23, [0, 1, 2, 3])


def test_probabilities_and_non_nested_predictions():
    reg = np.zeros((3, 4), np.float32)
    reg[:, 0] = [0.9, 0.9, 0.9]  # ET
    reg[:, 1] = [0.9, 0.2, 0.1]  # ED
    reg[:, 2] = [0.1, 0.8, 0.1]  # TC without WT: nested order makes it NCR
    reg[:, 3] = [0.4, 0.4, 0.4]  # background
    np.testing.assert_array_equal(regions_to_labels(reg, 2023), [3, 2, 1, 0])


def test_unknown_year():
    with pytest.raises(ValueError, match="no BraTS label convention"):
        convention(2019)
