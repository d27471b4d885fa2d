"""Kill-and-rerun: every stage, SIGKILLed as a subprocess while it writes, reruns to the
outputs of an uninterrupted run (byte-identical where the stage is deterministic), skips the
work it had finished, sweeps the temporaries killed writers left, and never leaves a
half-written file under a final name.

Fast set (`make test`), every stage on two 20×24×16 cases: synth, preprocess, physics fit-ct,
physics fit-us (three steps on one 24×28×24 MR/US pair), describe, clip (one epoch of a narrow
encoder), semantic, predict and evaluate killed at the first write seen in the output folder
(a temporary, or the first output file); fit (two
epochs of two one-patch steps) killed at the second validation's checkpoint write, while it
replaces the first's ``last.ckpt``, and resumed from it.
Slow set: every stage on a three-case synthetic pipeline, killed at the first temporary and
after the first and second per-case output.

Before each rerun a writer SIGKILLed mid-write leaves a half-written temporary in every folder
the stage writes; the rerun must sweep it.
"""
from __future__ import annotations

import csv
import io
import signal
from pathlib import Path

import pytest
import torch

from lightning_app.cli import main
from tests.reliability.harness import (assert_all_readable, differing, finals, first_temp, first_write, leftovers,
                                       n_outputs, plant_dead_temps, run_and_kill, stamps, temp_beside)
from tests.reliability.stages import STAGES


def kill_and_rerun(name, ref, tmp_path, monkeypatch, when=first_temp, reference=None, server=None) -> dict:
    """Kill stage ``name`` at ``when``, check what it left, rerun it in-process, check the result
    against ``reference`` (default: the reference pipeline's snapshot of the stage). ``server``:
    fork the stage process from this warm interpreter (default: a fresh one)."""
    reference = reference or ref["snapshot"][name]
    st = STAGES[name]
    out = tmp_path / "out"
    argv = st.argv(ref, out)
    res = run_and_kill(argv, [out], when, cwd=tmp_path, server=server)
    assert res.killed, f"{name}: finished (rc {res.rc}) before the kill point {getattr(when, '__name__', when)}: {res.stderr}"
    assert res.rc == -signal.SIGKILL
    n_left = assert_all_readable(out)  # nothing half-written under a final name
    before = stamps(out)
    before_bytes = {rel: p.read_bytes() for rel, p in finals(out).items()}
    planted = plant_dead_temps([out / d for d in st.sweeps])  # a killed writer's debris in every folder it writes
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0, f"{name}: rerun after the kill failed"
    after = stamps(out)
    assert_all_readable(out)
    # finished work is skipped: per-case outputs complete before the rerun are not rewritten
    kept = [rel for rel in before if st.per_case and Path(rel).match(st.per_case)]
    if st.rewrites_finished:  # describe writes finished cases again from its cache: same bytes, no new requests
        assert all(finals(out)[rel].read_bytes() == before_bytes[rel] for rel in kept), f"{name}: finished outputs changed"
    elif name != "fit":  # fit resumes from last.ckpt and writes it again by design
        assert all(after[rel] == before[rel] for rel in kept), f"{name}: the rerun rewrote finished outputs"
    assert not [p for p in planted if p.exists()], f"{name}: a killed writer's temporary was not swept"
    assert leftovers(out) == [], f"{name}: temporaries of the killed run remain"
    pick = (lambda d: {k for k in finals(d) if Path(k).match(st.compared)}) if st.compared else (lambda d: set(finals(d)))
    assert pick(out) == pick(reference)  # the same files as an uninterrupted run ...
    if st.deterministic:  # ... byte for byte where the stage is deterministic
        assert differing(out, reference, ignore=st.volatile) == []
    return {"killed_after_s": res.seconds, "temp_at_kill": res.temp_at_kill, "finals_at_kill": n_left, "kept": kept,
            "out": out, "before": before_bytes}


FAST = ("synth", "preprocess", "fit-ct", "fit-us", "describe", "clip", "semantic", "predict", "evaluate")


@pytest.mark.parametrize("name", FAST)
def test_fast_kill_at_first_write_then_rerun(name, stage_server, fast_inputs, tmp_path, monkeypatch):
    """Fast set: tiny inputs; the uninterrupted run is the fast inputs' own (snapshot) or made here, in-process."""
    monkeypatch.chdir(tmp_path)
    reference = fast_inputs["snapshot"].get(name)
    if reference is None:
        reference = tmp_path / "uninterrupted"
        assert main(STAGES[name].argv(fast_inputs, reference)) == 0
    kill_and_rerun(name, fast_inputs, tmp_path, monkeypatch, when=first_write, reference=reference, server=stage_server)


def assert_same_checkpoints(out: Path, ref: Path) -> dict:
    """fit reran to the uninterrupted run's checkpoints: same files, same epoch and step (weights
    differ run to run on CPU), no temporary left. Returns the rerun's ``last.ckpt``."""
    ck = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ck == sorted(p.name for p in (ref / "checkpoints").iterdir() if not p.name.startswith("."))
    got = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    want = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] and got["epoch"] == want["epoch"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    return got


def test_fast_fit_killed_replacing_a_checkpoint_resumes(stage_server, fast_inputs, tmp_path, monkeypatch):
    """fit, two epochs of two steps: killed while the second validation writes its checkpoints
    over the first's, `--ckpt_path=last` resumes from the first epoch's intact ``last.ckpt`` and
    ends at the uninterrupted run's checkpoints, epoch and step."""
    monkeypatch.chdir(tmp_path)
    reference = tmp_path / "uninterrupted"
    assert main(STAGES["fit"].argv(fast_inputs, reference)) == 0
    info = kill_and_rerun("fit", fast_inputs, tmp_path, monkeypatch, reference=reference, server=stage_server,
                          when=temp_beside("checkpoints/last.ckpt"))
    assert "checkpoints/last.ckpt" in info["before"], "fit: killed before its first checkpoint"
    resumed = torch.load(io.BytesIO(info["before"]["checkpoints/last.ckpt"]), weights_only=False)["global_step"]
    assert resumed > 0
    assert_same_checkpoints(info["out"], reference)
    # the rerun resumed: it logged no step before the killed run's last checkpoint (its log is csv/version_1)
    log = info["out"] / "csv" / "version_1" / "metrics.csv"
    with open(log, newline="") if log.exists() else io.StringIO() as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh) if row.get("step")]
    assert all(s >= resumed for s in steps), f"fit: the rerun started over instead of resuming at step {resumed}: {steps}"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the shared reference pipeline takes minutes on 2 shared cores
@pytest.mark.parametrize("name", [n for n in STAGES if n != "fit"])
def test_kill_at_first_write_then_rerun(name, reference_pipeline, tmp_path, monkeypatch):
    info = kill_and_rerun(name, reference_pipeline, tmp_path, monkeypatch)
    assert info["temp_at_kill"], f"{name}: the kill landed before any write"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fit_killed_at_first_checkpoint_write_resumes(reference_pipeline, tmp_path, monkeypatch):
    """fit: killed while its first checkpoint is being written, `--ckpt_path=last` reruns to the
    same checkpoints as the uninterrupted run (same files and steps; weights differ run to run)."""
    in_checkpoints = lambda paths: first_temp([p for p in paths if p.parent.name == "checkpoints"])  # noqa: E731
    info = kill_and_rerun("fit", reference_pipeline, tmp_path, monkeypatch, when=in_checkpoints)
    assert_same_checkpoints(info["out"], reference_pipeline["run"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", [n for n in STAGES if STAGES[n].per_case])
@pytest.mark.parametrize("nth", [1, 2])
def test_kill_after_nth_output_then_rerun(name, nth, reference_pipeline, tmp_path, monkeypatch):
    info = kill_and_rerun(name, reference_pipeline, tmp_path, monkeypatch, when=n_outputs(nth, STAGES[name].per_case))
    if name != "fit":
        assert len(info["kept"]) >= nth  # the rerun skipped the cases finished before the kill
