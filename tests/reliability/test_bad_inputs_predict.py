"""Bad-input sweep of `trifuse predict`: every broken copy of a case fails alone with a message
naming its file and problem and leaves no output; the valid cases of the same folder (and the
valid-but-unusual ones: upper-case extensions, a 4-D singleton) are predicted."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lightning_app.cli import main
from tests.app.test_predict_evaluate import constant_model_ckpt
from tests.reliability.badcases import broken_dataset

#: label-only breakers do not concern predict (it needs only the four MRI files)
LABEL_ONLY = {"bad_labels"}


def test_predict_bad_inputs_named_and_valid_cases_predicted(tmp_path, capsys):
    data = tmp_path / "brats2021"
    broken, valid = broken_dataset(data, n_valid=1)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", (9.0, 9.0, 9.0))
    out = tmp_path / "pred"
    rc = main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(out), "--device", "cpu", "--no-tta"])
    err = capsys.readouterr().err
    assert rc == 1
    bad = {c: v for c, v in broken.items() if v[2] is not None and v[0] not in LABEL_ONLY}
    ok = sorted(valid + [c for c, v in broken.items() if v[2] is None or v[0] in LABEL_ONLY])
    assert sorted(p.name for p in out.iterdir()) == [f"{c}.nii.gz" for c in ok]  # nothing, not even a temp, for bad ones
    for cid, (name, target, words) in bad.items():
        block = err.split(f"FAILED {cid}:")[1].split("FAILED ")[0]
        assert str(target) in block, (name, block)
        for w in words:
            assert w in block, (name, w, block)
    assert err.strip().splitlines()[-1].startswith(f"trifuse predict: error: {len(bad)} case(s) failed")
    for cid in ok:  # written in the input's convention on its grid
        img = nib.load(str(out / f"{cid}.nii.gz"))
        lab = np.asanyarray(img.dataobj)
        assert lab.dtype == np.uint8 and lab.shape == (20, 24, 16) and set(np.unique(lab)) <= {0, 4}
        assert (lab == 4).any()


@pytest.mark.slow
def test_predict_workers_write_the_same_files(tmp_path):
    """`--workers 2`: the same label maps, byte for byte, as one process (slow: two spawned
    processes each import torch and load the model)."""
    from tests.conftest import write_tiny_case

    data = tmp_path / "d"
    for i in range(3):
        write_tiny_case(data, 2021, i)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", (9.0, -9.0, 9.0))
    outs = {}
    for w in (1, 2):
        outs[w] = tmp_path / f"p{w}"
        assert main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(outs[w]), "--device", "cpu",
                     "--no-tta", "--workers", str(w)]) == 0
    names = sorted(p.name for p in outs[1].iterdir())
    assert names == sorted(p.name for p in outs[2].iterdir()) and len(names) == 3
    for n in names:
        assert (outs[1] / n).read_bytes() == (outs[2] / n).read_bytes()
