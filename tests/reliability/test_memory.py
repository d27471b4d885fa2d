"""Bounded memory: `trifuse predict` streams a dataset, so its peak memory on 10 cases is
within 10 % of its peak on 2 (same case size). Slow: two model loads and 12 predictions."""
from __future__ import annotations

import os
import sys

import pytest

from bench.bench_scale import make_checkpoint, measure
from tests.conftest import write_tiny_case
from trifuse import keys
from trifuse.io.discovery import case_file_name, case_id_for

ENTRY = [sys.executable, "-c", "import sys; from lightning_app.cli import main; sys.exit(main(sys.argv[1:]))"]


def _dataset(root, src, n):
    """``n`` case folders hard-linking the files of the cases in ``src`` (cycled)."""
    srcs = sorted(src.iterdir())
    for i in range(n):
        cid, s = case_id_for(2021, i), srcs[i % len(srcs)]
        (root / cid).mkdir(parents=True)
        for m in list(keys.MODALITIES) + ["seg"]:
            os.link(s / case_file_name(s.name, 2021, m), root / cid / case_file_name(cid, 2021, m))
    return root


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_predict_peak_memory_does_not_grow_with_cases(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        write_tiny_case(src, 2021, i, shape=(112, 128, 80))  # ~1.1 M voxels: per-case arrays show in RSS
    # one sliding window covers the brain box: the run is decode + prepare + one forward + write per case
    ckpt = make_checkpoint(tmp_path / "m.ckpt", roi=(112, 128, 80))
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="2")
    peaks = {}
    for n in (2, 10):
        data = _dataset(tmp_path / f"d{n}", src, n)
        r = measure(ENTRY + ["predict", "--ckpt", str(ckpt), "--input", str(data), "--output", str(tmp_path / f"p{n}"),
                             "--device", "cpu", "--no-tta", "--no-postprocess"], env=env)
        assert r["rc"] == 0, r["tail"]
        assert len(list((tmp_path / f"p{n}").glob("*.nii.gz"))) == n
        peaks[n] = r["peak_rss_mib"]
    print(f"predict peak RSS: 2 cases {peaks[2]:.0f} MiB, 10 cases {peaks[10]:.0f} MiB")
    assert peaks[10] <= 1.10 * peaks[2], peaks
