"""`trifuse report --fullsize EVAL_DIR`: the full-size case's section, every value read from files.

A real predict → evaluate run on a tiny 1 mm case with a checkpoint trained (by its record) at
2 mm, so the case goes through the spacing-aware path. That the written label map keeps the
input's shape and affine when the spacing differs is tests/test_inference.py's
``test_written_file_keeps_the_input_grid_affine_and_header``.
"""
from __future__ import annotations

import json

import torch

from lightning_app.cli import main
from tests.app.test_predict_evaluate import constant_model_ckpt


def _ckpt_trained_at(path, spacing) -> str:
    ckpt = constant_model_ckpt(path, (9.0, -9.0, -9.0))
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    blob["trifuse"] = {"spacing": list(spacing)}  # what TeacherModule.on_save_checkpoint records
    torch.save(blob, ckpt)
    return ckpt


def _report(eval_dir, out) -> str:
    assert main(["report", "--out", str(out), "--fullsize", str(eval_dir)]) == 0
    return (out / "report.md").read_text()


def test_fullsize_section_reads_the_case_the_log_and_the_summary(tiny_dataset, tmp_path):
    data = tiny_dataset(2021, n=1)  # one 20×24×16 case at 1 mm
    ckpt = _ckpt_trained_at(tmp_path / "m.ckpt", (2.0, 2.0, 2.0))
    pred, ev, rep = tmp_path / "pred", tmp_path / "eval", tmp_path / "report"
    assert main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(pred), "--no-tta"]) == 0
    assert sorted(p.name for p in pred.iterdir()) == ["BraTS2021_00000.nii.gz"]  # the log is beside the folder
    log = json.loads((tmp_path / "pred.predict.json").read_text())["cases"]["BraTS2021_00000"]
    assert log["input_shape"] == [20, 24, 16] and log["input_spacing"] == [1.0, 1.0, 1.0]
    assert log["model_spacing"] == [2.0, 2.0, 2.0] and log["resampled"] is True and log["seconds"] > 0
    assert log["ckpt"] == ckpt and log["tta"] is False
    assert main(["evaluate", "--pred", str(pred), "--data", str(data), "--out", str(ev)]) == 0

    text = _report(ev, rep)
    assert "## Full-size case (1 mm, 20×24×16)" in text
    assert f"| BraTS2021_00000 | 20×24×16 | 1 | 2 | yes | {log['seconds']:.1f} |" in text
    assert "trained on 2 mm cases; the case went through the spacing-aware path" in text
    summary = json.loads((ev / "summary.json").read_text())
    for region in ("WT", "TC", "ET"):
        d, h = summary["regions"][region]["dice"]["mean"], summary["regions"][region]["hd95"]["mean"]
        assert f"| {region} | {d:.4f} | {h:.2f} |" in text
    assert f"| mean | {summary['overall']['dice']['mean']:.4f} | {summary['overall']['hd95']['mean']:.2f} |" in text

    # the text follows the files: another summary, another table; no log, no claimed spacing or time
    summary["regions"]["WT"]["dice"]["mean"] = 0.1234
    summary["regions"]["ET"]["hd95"]["mean"] = 12.5
    summary["overall"]["dice"]["mean"] = 0.4321
    (ev / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "pred.predict.json").unlink()
    text = _report(ev, rep)
    assert "| WT | 0.1234 |" in text and "| 12.50 |" in text and "| mean | 0.4321 |" in text
    assert "| BraTS2021_00000 | 20×24×16 | 1 | not recorded | – | – |" in text
    assert "spacing-aware path" not in text and "No prediction record" in text
