from lightning_app.cli import main


def test_figures_cohort_and_physics(synthetic_cohort, tmp_path):
    data, _ = synthetic_cohort
    out = tmp_path / "cohort.png"
    assert main(["figures", "cohort", "--data", str(data), "--out", str(out)]) == 0
    assert out.stat().st_size > 20_000  # a real picture, not an empty canvas
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05
    assert main(["figures", "cohort", "--data", str(data), "--case", "nope", "--out", str(out)]) == 1
