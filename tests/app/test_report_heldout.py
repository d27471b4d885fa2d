"""`trifuse report --eval`: one evaluation folder, or several (NAME=DIR) side by side."""
import json

from lightning_app.cli import main


def _summary(d, dice, hd, n=4):
    d.mkdir(parents=True)
    regions = {r: {"dice": {"mean": v, "std": 0.1}, "hd95": {"mean": h, "std": 1.0}} for r, v, h in zip(("WT", "TC", "ET"), dice, hd)}
    overall = {"dice": {"mean": sum(dice) / 3, "std": 0.2}, "hd95": {"mean": sum(hd) / 3, "std": 2.0}}
    (d / "summary.json").write_text(json.dumps({"regions": regions, "overall": overall, "n_cases": n}))


def test_two_models_side_by_side_with_values_from_their_summaries(tmp_path):
    _summary(tmp_path / "a", (0.91, 0.82, 0.73), (3.0, 4.0, 5.0))
    _summary(tmp_path / "b", (0.61, 0.52, 0.43), (13.0, 14.0, 15.0), n=5)
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--eval", f"student={tmp_path / 'a'}", f"mri_only={tmp_path / 'b'}"]) == 0
    text = (out / "report.md").read_text()
    assert "| region | student Dice | mri_only Dice | student HD95 mm | mri_only HD95 mm |" in text
    assert "| WT | 0.9100 ± 0.1000 | 0.6100 ± 0.1000 | 3.00 ± 1.00 | 13.00 ± 1.00 |" in text
    assert "| mean | 0.8200 ± 0.2000 | 0.5200 ± 0.2000 | 4.00 ± 2.00 | 14.00 ± 2.00 |" in text
    assert "- student: 4 cases" in text and "- mri_only: 5 cases" in text


def test_one_folder_keeps_the_single_table(tmp_path):
    _summary(tmp_path / "a", (0.91, 0.82, 0.73), (3.0, 4.0, 5.0))
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--eval", str(tmp_path / "a")]) == 0
    text = (out / "report.md").read_text()
    assert "| region | Dice mean ± std | HD95 mm mean ± std |" in text
    assert "| ET | 0.7300 ± 0.1000 | 5.00 ± 1.00 |" in text
