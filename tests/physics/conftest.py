"""Fixtures of the pixel-tier tests: tiny analytic phantoms (never the network)."""
from __future__ import annotations

import pytest
import torch

from trifuse.physics.phantom import make_head_phantom


@pytest.fixture(scope="session")
def phantom():
    """A 40³ head phantom at 1 mm with a lesion (sample dict)."""
    return make_head_phantom((40, 44, 40), seed=0, margin_mm=5.0)


@pytest.fixture(scope="session")
def phantom_pair():
    """Two different 32³ phantoms (same shape) for batch tests."""
    return [make_head_phantom((32, 32, 32), seed=s, margin_mm=4.0) for s in (1, 2)]


def _layered_maps(shape, layers, scatter=1e-6, alpha=0.0):
    """(1, 3, D, H, W) maps stacked along D: ``layers`` = [(d_end, Z), ...]."""
    d, h, w = shape
    z = torch.empty(d)
    start = 0
    for end, val in layers:
        z[start:end] = val
        start = end
    imp = z.view(1, 1, d, 1, 1).expand(1, 1, d, h, w)
    return torch.cat([imp, torch.full_like(imp, alpha), torch.full_like(imp, scatter)], 1).contiguous()


@pytest.fixture
def layered_maps():
    """Factory of layered acoustic maps (impedance steps along the first spatial axis)."""
    return _layered_maps
