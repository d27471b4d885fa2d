"""Dataset manifest: the cases, their release, bad cases and seeded k-fold splits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trifuse.io.nifti import atomic_write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def kfold_splits(case_ids: list[str], n_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Seeded k-fold splits: ``[{"train": [...], "val": [...]}, ...]``, each id validated once.

    With fewer cases than folds, every fold still gets at least one validation case
    when possible (folds cycle over the shuffled ids).
    """
    ids = sorted(case_ids)
    if not ids:
        return []
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    folds = []
    for k in range(n_folds):
        val = shuffled[k::n_folds] or [shuffled[k % len(shuffled)]]
        train = [c for c in shuffled if c not in set(val)] or list(val)
        folds.append({"train": sorted(train), "val": sorted(val)})
    return folds


def write_manifest(cache_dir: str | Path, manifest: dict) -> Path:
    path = Path(cache_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=1))
    return path


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (run `trifuse preprocess --data DIR` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')} != {MANIFEST_VERSION}; re-run preprocess")
    return manifest
