"""Shared fixtures: tiny BraTS-layout folders written on the fly (never the network)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from trifuse import keys
from trifuse.io.discovery import case_file_name, case_id_for
from trifuse.io.labels import convention

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside the block: on a shared 2-core machine, 2-thread OpenMP kernels spin and run far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def write_tiny_case(
    root: Path,
    year: int,
    index: int = 0,
    shape=(20, 24, 16),
    with_seg: bool = True,
    ext: str = ".nii.gz",
    seed: int = 0,
    case_id: str | None = None,
) -> Path:
    """A small case with a brain blob and a nested tumour, in ``year``'s layout and labels."""
    rng = np.random.default_rng(seed + index)
    case_id = case_id or case_id_for(year, index)
    d = Path(root) / case_id
    d.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    zz = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((zz**2).sum(0))
    brain = r < 0.9
    conv = convention(year)
    seg = np.zeros(shape, np.uint8)
    c = np.array([0.25, 0.1, 0.0])[:, None, None, None]
    rt = np.sqrt(((zz - c) ** 2).sum(0))
    seg[(rt < 0.45) & brain] = conv.ed
    seg[(rt < 0.3) & brain] = conv.et
    seg[(rt < 0.15) & brain] = conv.ncr
    base = (100.0, 120.0, 80.0, 90.0)
    for m, b in zip(keys.MODALITIES, base):
        img = (b + 10 * rng.standard_normal(shape)) * brain
        img[seg == conv.ed] += 60 if m in ("t2", "flair") else 0
        img[seg == conv.et] += 80 if m == "t1ce" else 0
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(d / case_file_name(case_id, year, m, ext)))
    if with_seg:
        nib.save(nib.Nifti1Image(seg, affine), str(d / case_file_name(case_id, year, "seg", ext)))
    return d


@pytest.fixture
def tiny_dataset(tmp_path):
    """Factory: ``tiny_dataset(year, n)`` → dataset folder with ``n`` tiny cases."""

    def make(year: int = 2021, n: int = 3, **kw) -> Path:
        root = tmp_path / f"brats{year}"
        for i in range(n):
            write_tiny_case(root, year, i, **kw)
        return root

    return make


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """Six tiny synthetic cases (2021 layout) and their preprocessed cache, made once per session."""
    from trifuse.io.preprocess import preprocess
    from trifuse.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("synthetic")
    data = root / "synthetic"
    synthesize_cohort(data, 6, seed=3, layout=2021, size="tiny")
    cache = root / "cache"
    preprocess(data, cache, n_folds=3)
    return data, cache
