"""Fitting the pixel tier to paired data: fit-ct --paired (GMR) and fit-us --paired (1 - SSIM + L1)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_app.cli import main
from trifuse import keys
from trifuse.physics.acoustic import ImpedanceMapper
from trifuse.physics.ct import CTMixtureModel
from trifuse.physics.paired import PairedCase, fit_us_paired, load_us_mapper, read_paired_cases, save_us_mapper
from trifuse.physics.phantom import make_head_phantom
from trifuse.physics.tissues import HEAD_TISSUES
from trifuse.physics.transforms import SimulateUltrasound
from trifuse.physics.ultrasound import ProbeConfig, simulate_ultrasound

SP = 2.0
#: the known linear MR -> HU relation of the CT pairs (z-scored T2 and FLAIR)
CT_A, CT_T2, CT_FLAIR = 30.0, 8.0, -5.0


def _write(path: Path, data: np.ndarray, spacing=SP) -> None:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([spacing, spacing, spacing, 1.0])), str(path))


def _pair(root: Path, name: str, seed: int, target: str, shape=(32, 36, 32)) -> dict:
    s = make_head_phantom(shape, spacing=(SP,) * 3, seed=seed, margin_mm=12.0)
    d = root / name
    d.mkdir(parents=True)
    mri = s[keys.MRI].numpy()
    for i, suf in enumerate(("t1", "t1ce", "t2", "flair")):
        _write(d / f"{name}_{suf}.nii.gz", mri[i])
    brain = s[keys.BRAIN][0].numpy()
    if target == "ct":
        ct = np.where(brain, CT_A + CT_T2 * mri[keys.T2] + CT_FLAIR * mri[keys.FLAIR], -1000.0)
        _write(d / f"{name}_ct.nii.gz", ct)
    return s


def test_fit_ct_paired_recovers_a_linear_relation_resumes_and_refuses_bad_pairs(tmp_path, capsys):
    root = tmp_path / "pairs"
    root.mkdir()
    for i in range(2):
        _pair(root, f"case{i}", i, "ct")
    out = tmp_path / "ct.json"
    assert main(["physics", "fit-ct", "--paired", str(root), "--out", str(out), "--components", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 MR/CT pair(s)" in printed and "log-likelihood" in printed
    model = CTMixtureModel.load(out)  # the same file format SynthesizeCT reads
    assert model.meta["form"] == "gmr" and model.meta["paired"]
    for c in read_paired_cases(root, "ct"):
        b = c.brain[0]
        x = c.mri[:, b]
        truth = CT_A + CT_T2 * x[keys.T2] + CT_FLAIR * x[keys.FLAIR]
        err = (model.predict_hu(x[None])[0] - truth).abs()
        assert float(torch.quantile(err, 0.99)) < 5.0  # within 5 HU
    # a second run is up to date; another seed refits
    assert main(["physics", "fit-ct", "--paired", str(root), "--out", str(out), "--components", "3"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["physics", "fit-ct", "--paired", str(root), "--out", str(out), "--components", "3", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    # mismatched grid: refused, naming both files
    bad = tmp_path / "bad"
    bad.mkdir()
    _pair(bad, "c0", 0, "ct")
    ct = nib.load(str(bad / "c0" / "c0_ct.nii.gz")).get_fdata()
    _write(bad / "c0" / "c0_ct.nii.gz", ct[:-2])
    assert main(["physics", "fit-ct", "--paired", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "c0_ct.nii.gz" in err and "c0_t1.nii.gz" in err and "shapes differ" in err
    # misregistered: the CT shifted by 1 cm puts air into the brain
    _write(bad / "c0" / "c0_ct.nii.gz", np.roll(ct, 5, axis=0) * 0 - 1000.0)
    assert main(["physics", "fit-ct", "--paired", str(bad)]) == 1
    assert "misregistered" in capsys.readouterr().err


def _us_case(seed: int = 0):
    s = make_head_phantom((32, 36, 32), spacing=(SP,) * 3, seed=seed, margin_mm=12.0)
    true = ImpedanceMapper()
    with torch.no_grad():
        for t, dv in TRUE_SHIFT_DB.items():
            true.scatter_db[HEAD_TISSUES.index(t)] += dv
    cfg = ProbeConfig(depth_mm=60.0)
    with torch.no_grad():
        real = simulate_ultrasound(s[keys.MRI][None], s[keys.BRAIN][None], (SP,) * 3, cfg, true, [0])
    return PairedCase("p0", s[keys.MRI], s[keys.BRAIN], real[0], (SP,) * 3, {"target": "p0_us.nii.gz"}), true, cfg


#: echogenicity of the "real" renderer relative to the table (dB)
TRUE_SHIFT_DB = {"white_matter": 6.0, "oedema": 5.0, "grey_matter": -5.0}


def _db_error(m, true, names):
    return {t: abs(float(m.scatter_db[HEAD_TISSUES.index(t)].detach() - true.scatter_db[HEAD_TISSUES.index(t)])) for t in names}


def test_fit_us_paired_moves_echogenicity_toward_the_truth_and_resumes_exactly(tmp_path):
    case, true, cfg = _us_case()
    state = tmp_path / "m.state.pt"
    lines: list[str] = []
    m, hist = fit_us_paired([case], ImpedanceMapper(), cfg, steps=2, state_path=state, log_every=1, print_fn=lines.append)
    m, hist = fit_us_paired([case], m, cfg, steps=4, state_path=state, log_every=1, print_fn=lines.append)
    assert any("resumed at step 2" in ln for ln in lines) and "loss" in lines[-1]
    assert hist[-1]["one_minus_ssim"] < 0.7 * hist[0]["one_minus_ssim"]  # 1 - SSIM lowered
    err = _db_error(m, true, ("white_matter", "oedema"))
    assert all(e < TRUE_SHIFT_DB[t] - 1.0 for t, e in err.items()), err  # at least 1 dB closer after 4 steps
    straight, _ = fit_us_paired([case], ImpedanceMapper(), cfg, steps=4, print_fn=lambda *_: None)
    torch.testing.assert_close(straight.scatter_db, m.scatter_db)  # the resumed run is the same run
    # the versioned file round-trips and SimulateUltrasound loads it by path
    p = save_us_mapper(m, tmp_path / "us_mapper.json", {"note": "test"})
    assert json.loads(p.read_text())["format"] == "trifuse.us_mapper"
    back = load_us_mapper(p)
    torch.testing.assert_close(back.scatter_db, m.scatter_db.detach())
    s = case.sample()
    a = SimulateUltrasound(cfg, mapper=str(p), seed=1)(s)[keys.US]
    b = SimulateUltrasound(cfg, mapper=m, seed=1)(s)[keys.US]
    torch.testing.assert_close(a, b)
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="not a US mapper"):
        load_us_mapper(tmp_path / "bad.json")


@pytest.mark.slow
def test_fit_us_paired_recovers_echogenicity_within_3_db():
    case, true, cfg = _us_case()
    m, hist = fit_us_paired([case], ImpedanceMapper(), cfg, steps=30, print_fn=lambda *_: None)
    assert all(e < 3.0 for e in _db_error(m, true, tuple(TRUE_SHIFT_DB)).values())
    assert hist[-1]["one_minus_ssim"] < 0.1 * hist[0]["one_minus_ssim"]


def test_fit_us_paired_cli_refuses_a_misregistered_sweep(tmp_path, capsys):
    root = tmp_path / "pairs"
    root.mkdir()
    s = _pair(root, "c0", 0, "us")
    us = np.zeros(s[keys.BRAIN][0].shape, np.float32)
    us[:6] = 0.5  # a "sweep" in the air above the head
    _write(root / "c0" / "c0_us.nii.gz", us)
    assert main(["physics", "fit-us", "--paired", str(root), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "c0_us.nii.gz" in err and "misregistered" in err


def test_fit_ct_up_to_date_check_is_keyed_on_seed_and_max_voxels(tiny_dataset, tmp_path, capsys):
    data = tiny_dataset(2021, n=2)
    base = ["physics", "fit-ct", "--data", str(data), "--cache", str(tmp_path / "cache"), "--components", "2",
            "--max-voxels", "3000"]
    assert main(base) == 0 and "wrote" in capsys.readouterr().out
    assert main(base) == 0 and "up to date" in capsys.readouterr().out
    for extra in (["--seed", "1"], ["--max-voxels", "2000"]):  # each changes the fit: refitted, not "up to date"
        assert main(base + extra) == 0
        assert "wrote" in capsys.readouterr().out
