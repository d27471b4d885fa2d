"""Every YAML in configs/ parses (with --print_config, composed as users compose them); links hold;
the demo config trains for real on tiny data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs"
CPU, SYNTH, MRI_T = CFG / "trainer" / "cpu.yaml", CFG / "data" / "synthetic.yaml", CFG / "teacher_mri.yaml"
SECRET = "sk-trifuse-test-0000-not-a-real-key"


def _standalone(path: Path) -> bool:
    doc = yaml.safe_load(path.read_text()) or {}
    return "model" in doc and isinstance(doc.get("data"), dict) and "class_path" in doc["data"]


def compositions() -> list[tuple[str, list[Path]]]:
    """How each YAML is used: ``trifuse fit -c trainer -c data -c model`` (later files win)."""
    out = []
    for p in sorted(CFG.rglob("*.yaml")):
        rel = p.relative_to(CFG)
        if rel.parent == Path("."):
            out.append((str(rel), [p] if _standalone(p) else [CPU, SYNTH, p]))
        elif rel.parts[0] == "data":
            out.append((str(rel), [CPU, p, MRI_T]))
        elif rel.parts[0] == "trainer":
            out.append((str(rel), [p, SYNTH, MRI_T]))
        else:  # other folders hold overlays: ablations of the student, the rest of a teacher
            student = rel.parts[0] == "ablations" or rel.name.startswith("student")
            base = CFG / "student.yaml" if student else MRI_T
            out.append((str(rel), [CPU, SYNTH, base, p]))
    return out


def _cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lightning_app.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=600, env=env
    )


def print_config(files, *extra) -> dict:
    """``trifuse fit -c ... --print_config`` in-process (parsing only; no import cost per config)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from lightning_app.lightning_cli import run

    args = ["fit"] + [a for f in files for a in ("-c", str(f))] + list(extra) + ["--print_config"]
    buf, err = io.StringIO(), io.StringIO()
    with redirect_stdout(buf), redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run(args)
    assert exc.value.code in (0, None), err.getvalue()[-3000:]
    return yaml.safe_load(buf.getvalue())


@pytest.mark.parametrize("name,files", compositions(), ids=[c[0] for c in compositions()])
def test_every_config_parses(name, files):
    cfg = print_config(files)
    assert "class_path" in cfg["model"] and "class_path" in cfg["data"]
    if name.startswith("teacher_"):
        modality = name[len("teacher_") : -len(".yaml")]
        args = cfg["model"]["init_args"]
        assert args["modality"] == modality
        assert args["net"]["init_args"]["in_channels"] == {"mri": 4, "us": 1, "ct": 2}[modality]
        assert cfg["trainer"]["default_root_dir"] == f"runs/teachers/{modality}"
        ckpt = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
        assert ckpt["init_args"]["dirpath"] == f"runs/teachers/{modality}/checkpoints" and ckpt["init_args"]["save_last"]
        transforms = [t["class_path"].rsplit(".", 1)[1] for t in cfg["data"]["init_args"].get("sample_transforms") or []]
        assert transforms == {"mri": [], "us": ["SimulateUltrasound"], "ct": ["SynthesizeCT"]}[modality]
    if name.startswith("data/brats"):
        assert cfg["data"]["init_args"]["year"] == int(name[len("data/brats") : len("data/brats") + 4])


def test_the_real_entry_point_prints_a_composed_config():
    r = _cli("fit", "-c", str(CPU), "-c", str(SYNTH), "-c", str(MRI_T), "--print_config")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trifuse.lightning.teacher.TeacherModule" in r.stdout


def _cli_instance(tmp_path, monkeypatch, *args):
    import lightning as L

    from lightning_app.lightning_cli import TrifuseCLI

    monkeypatch.chdir(tmp_path)  # relative run folders of the configs land here
    return TrifuseCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=list(args) + ["--trainer.logger=false"],
        run=False,
        auto_configure_optimizers=False,
    )


def test_patch_size_links_to_roi(tmp_path, monkeypatch):
    cli = _cli_instance(tmp_path, monkeypatch, "--config", str(ROOT / "configs" / "demo_mri.yaml"), "--data.init_args.patch_size=[48,40,32]")
    assert tuple(cli.model.hparams.roi_size) == (48, 40, 32) == tuple(cli.datamodule.patch_size) == cli.model.roi_size


def test_in_channels_follow_the_inputs(tmp_path, monkeypatch):
    cli = _cli_instance(tmp_path, monkeypatch, "-c", str(CPU), "-c", str(SYNTH), "-c", str(MRI_T), "--model.init_args.inputs=[mri,ct]")
    assert cli.model.inputs == ("mri", "ct") and cli.model.net.in_channels == 6
    # the checkpoint's hparams are the config, with the linked value
    assert cli.model.hparams["net"]["init_args"]["in_channels"] == 6


def test_demo_config_trains_on_tiny_data(tmp_path):
    out = tmp_path / "runs" / "demo_mri"
    r = _cli(
        "fit",
        "--config",
        str(ROOT / "configs" / "demo_mri.yaml"),
        "--data.init_args.n_cases=3",
        "--data.init_args.n_folds=3",
        "--data.init_args.size=tiny",
        "--data.init_args.patch_size=[16,16,16]",
        "--data.init_args.num_workers=0",
        "--data.init_args.samples_per_epoch=2",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        cwd=tmp_path,  # the config's relative paths (data/, runs/) land in tmp_path
        env={**os.environ, "OPENAI_API_KEY": SECRET, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "TriFuse summary" in r.stdout and "| WT |" in r.stdout
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "csv").rglob("metrics.csv"))  # a CSV log is always written
    runs = list((out / "wandb").glob("offline-run-*"))  # and an offline W&B run
    assert runs
    # with the overlay image and the per-case table, in W&B and as files
    assert list(runs[0].rglob("media/images/**/*.png")) and list(runs[0].rglob("media/table/**/*.table.json"))
    assert list((out / "media").glob("val_overlay_epoch000.png")) and (out / "media" / "val_per_case.csv").exists()
    # keys come from the environment only and never reach logs, configs, checkpoints or W&B
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_stage_error_is_one_line_last_on_stderr(tmp_path):
    r = _cli("preprocess", "--data", str(tmp_path / "missing"))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("trifuse preprocess: error:") and "does not exist" in last


def test_run_dir_moves_the_whole_run(tmp_path, monkeypatch):
    cli = _cli_instance(tmp_path, monkeypatch, "-c", str(CPU), "-c", str(SYNTH), "-c", str(MRI_T), "--run_dir=elsewhere/mri")
    assert cli.trainer.default_root_dir == "elsewhere/mri"
    assert cli.trainer.checkpoint_callback.dirpath.endswith("elsewhere/mri/checkpoints")
