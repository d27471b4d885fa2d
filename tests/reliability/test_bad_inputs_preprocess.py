"""Bad-input sweep of `trifuse preprocess`: every broken copy of a case is named with its
file and problem, the valid cases of the same folder are still cached, and `--allow`
turns a content check into a warning."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_app.cli import main
from tests.reliability.badcases import BREAKERS, broken_dataset
from trifuse.io.cache import load_sample
from trifuse.io.manifest import read_manifest


@pytest.fixture
def sweep(tmp_path):
    return broken_dataset(tmp_path / "brats2021")


def test_every_bad_case_is_named_and_valid_ones_are_cached(sweep, tmp_path, capsys):
    broken, valid = sweep
    data, cache = tmp_path / "brats2021", tmp_path / "cache"
    rc = main(["preprocess", "--data", str(data), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == 1
    invalid = read_manifest(cache)["invalid"]
    bad_ids = {cid for cid, (_, _, words) in broken.items() if words is not None}
    assert set(invalid) == bad_ids
    for cid, (name, target, words) in broken.items():
        if words is None:
            continue
        text = " | ".join(invalid[cid])
        assert str(target) in text, (name, text)
        for w in words:
            assert w in text, (name, w, text)
        assert f"INVALID {cid}" in err
    assert err.strip().splitlines()[-1].startswith(f"trifuse preprocess: error: {len(bad_ids)} invalid case(s)")
    # valid cases and the valid-but-unusual ones (upper-case extension, 4-D singleton) are cached
    cached = sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    ok = sorted(valid + [cid for cid, (_, _, w) in broken.items() if w is None])
    assert cached == ok
    for cid in ok:
        s = load_sample(cache, cid)
        assert s["mri"].shape[0] == 4 and float(s["mri"].abs().sum()) > 0
    # the squeezed 4-D singleton is reported (stderr and manifest), naming the file
    (sq_id,) = [cid for cid, (n, _, _) in broken.items() if n == "four_d_singleton"]
    sq_file = broken[sq_id][1]
    warn = read_manifest(cache)["warnings"][sq_id]
    assert any(str(sq_file) in w and "squeezed" in w for w in warn)
    assert f"WARNING {sq_id}: {sq_file}: 4-D file of shape (20, 24, 16, 1)" in err


def test_allow_turns_a_content_check_into_a_warning(tmp_path, capsys):
    broken, valid = broken_dataset(tmp_path / "brats2021", names=("zero_flair", "scaled_t2"))
    data, cache = tmp_path / "brats2021", tmp_path / "cache"
    (zero_id,) = [c for c, (n, _, _) in broken.items() if n == "zero_flair"]
    (scaled_id,) = [c for c, (n, _, _) in broken.items() if n == "scaled_t2"]
    rc = main(["preprocess", "--data", str(data), "--cache", str(cache), "--allow", "constant"])
    err = capsys.readouterr().err
    assert rc == 1  # the scaled T2 is still an error: only `constant` was allowed
    manifest = read_manifest(cache)
    assert set(manifest["invalid"]) == {scaled_id}
    (w,) = manifest["warnings"][zero_id]
    assert str(broken[zero_id][1]) in w and "all zeros" in w and "[allowed: constant]" in w
    assert f"WARNING {zero_id}:" in err
    flair = load_sample(cache, zero_id)["mri"][3]
    assert float(flair.abs().max()) == 0.0  # the blank FLAIR is cached as zeros, not NaN
    # a rerun without --allow does not trust the case cached under it
    rc = main(["preprocess", "--data", str(data), "--cache", str(cache)])
    capsys.readouterr()
    assert rc == 1 and set(read_manifest(cache)["invalid"]) == {zero_id, scaled_id}
    assert not (cache / zero_id).exists()


def test_unknown_allow_is_refused(tmp_path, capsys):
    broken_dataset(tmp_path / "d", names=(), n_valid=1)
    with pytest.raises(SystemExit):
        main(["preprocess", "--data", str(tmp_path / "d"), "--allow", "everything"])
    assert "invalid choice" in capsys.readouterr().err
