import json

from lightning_app.cli import main


def test_compare_reads_csv_and_summary(tmp_path, capsys):
    a = tmp_path / "full" / "csv" / "version_0"
    a.mkdir(parents=True)
    (a / "metrics.csv").write_text(
        "epoch,step,train/loss,val/dice_WT,val/dice_TC,val/dice_ET,val/dice_mean,val/hd95_WT,val/hd95_TC,val/hd95_ET,val/hd95_mean\n"
        "0,4,0.9,,,,,,,,\n"
        "0,4,,0.5,0.4,0.3,0.4,10,20,30,20\n"
        "1,9,,0.8,0.7,0.6,0.7,5,6,7,6\n"
    )
    b = tmp_path / "baseline"
    b.mkdir()
    (b / "summary.json").write_text(json.dumps({"WT": {"dice": {"mean": 0.75}, "hd95": {"mean": 8.0}}, "TC": {"dice": {"mean": 0.6}, "hd95": {"mean": 9.0}}, "ET": {"dice": {"mean": 0.5}, "hd95": {"mean": 10.0}}, "overall": {"dice": {"mean": 0.6167}, "hd95": {"mean": 9.0}}}))
    rc = main(["compare", str(tmp_path / "full"), str(b), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| full | 0.8000 | 0.7000 | 0.6000 | 0.7000 | 5.00 | 6.00 | 7.00 | 6.00 |" in out  # the last validation row
    assert "| baseline | 0.7500 | 0.6000 | 0.5000 | 0.6167 |" in out
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 1


def test_compare_shows_dice_with_and_without_postprocessing(tmp_path, capsys):
    a = tmp_path / "student" / "csv" / "version_0"
    a.mkdir(parents=True)
    (a / "metrics.csv").write_text(
        "epoch,step,val/dice_WT,val/dice_TC,val/dice_ET,val/dice_mean,val/hd95_WT,val/hd95_TC,val/hd95_ET,val/hd95_mean,val/post_dice_mean\n"
        "1,9,0.8,0.7,0.6,0.7,5,6,7,6,0.7321\n"
    )
    b = tmp_path / "old" / "csv" / "version_0"
    b.mkdir(parents=True)
    (b / "metrics.csv").write_text("epoch,step,val/dice_WT,val/dice_TC,val/dice_ET,val/dice_mean\n1,9,0.5,0.4,0.3,0.4\n")
    assert main(["compare", str(tmp_path / "student"), str(tmp_path / "old"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| HD95 mean | Dice mean post-processed |" in out
    assert "| student | 0.8000 | 0.7000 | 0.6000 | 0.7000 | 5.00 | 6.00 | 7.00 | 6.00 | 0.7321 |" in out
    assert "| old | 0.5000 | 0.4000 | 0.3000 | 0.4000 | – | – | – | – | – |" in out
