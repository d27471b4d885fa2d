"""``trifuse describe → clip → semantic → figures semantic`` end to end on a tiny cohort, twice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_app.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2-thread OpenMP kernels spin and run ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from trifuse.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("semantic_stages")
    data = root / "data" / "synthetic"
    synthesize_cohort(data, 4, seed=5, layout=2021, size="tiny")
    return root, data


def _last_err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_semantic_stages_end_to_end_and_resume(cohort, capsys, monkeypatch):
    root, data = cohort
    monkeypatch.chdir(root)  # runs/clip/<name> is relative to the working directory
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    d = str(data)

    # describe: preprocesses on the fly, then the offline describer (no key)
    assert main(["describe", "--data", d]) == 0
    out = capsys.readouterr().out
    assert "describer offline/trifuse-offline" in out and "described 12" in out and "descriptions of 4/4" in out
    assert (root / "data" / "cache" / "synthetic" / "manifest.json").exists()
    assert len(list((root / "data" / "descriptions" / "synthetic").glob("BraTS2021_*.json"))) == 4
    assert main(["describe", "--data", d]) == 0
    assert "described 0, cached 12" in capsys.readouterr().out

    clip_args = ["clip", "--data", d, "--epochs", "4", "--image-size", "32", "--width", "8", "--batch-size", "32"]
    assert main(clip_args) == 0
    out = capsys.readouterr().out
    assert "recall@1: image→text" in out and "chance" in out
    ckpt = root / "runs" / "clip" / "synthetic" / "clip.pt"
    assert ckpt.exists() and (ckpt.parent / "metrics.json").exists()
    stamp = ckpt.stat().st_mtime_ns
    assert main(clip_args) == 0
    assert "up to date" in capsys.readouterr().out and ckpt.stat().st_mtime_ns == stamp

    assert main(["semantic", "--data", d]) == 0
    out = capsys.readouterr().out
    assert "4 written, 0 up to date, 0 failed" in out and "WT prior AUC" in out
    priors = root / "data" / "priors" / "synthetic"
    assert len(list(priors.glob("*.npz"))) == 4
    assert main(["semantic", "--data", d]) == 0
    assert "0 written, 4 up to date" in capsys.readouterr().out

    png = root / "semantic.png"
    assert main(["figures", "semantic", "--data", d, "--out", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("L"))
    assert w > 1.5 * h and pixels.std() > 10  # seven columns, three rows, not blank


def test_semantic_stage_failures_are_one_line(cohort, capsys, monkeypatch, tmp_path):
    root, data = cohort
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    empty = tmp_path / "no_descriptions"
    empty.mkdir()
    assert main(["semantic", "--data", str(data), "--descriptions", str(empty)]) == 1
    line = _last_err(capsys)
    assert line.startswith("trifuse semantic: error:") and "no description" in line and "trifuse describe" in line
    assert main(["clip", "--data", str(data), "--backend", "hf", "--descriptions",
                 str(root / "data" / "descriptions" / "synthetic")]) == 1
    assert "--pretrained" in _last_err(capsys)
    assert main(["describe", "--data", str(data), "--backend", "openai", "--out", str(tmp_path / "d")]) == 1
    assert "OPENAI_API_KEY" in _last_err(capsys)
