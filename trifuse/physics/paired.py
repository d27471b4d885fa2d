"""Fitting the pixel tier to real paired data: MRI with co-registered CT or ultrasound.

Folder layout read by :func:`read_paired_cases` (one folder per case, any case name)::

    DIR/<case>/<case>_t1.nii.gz  <case>_t1ce.nii.gz  <case>_t2.nii.gz  <case>_flair.nii.gz
              (or the BraTS 2023 names _t1n _t1c _t2w _t2f; any prefix, the suffix decides)
    DIR/<case>/<case>_ct.nii.gz      fit-ct --paired: CT in HU, co-registered and resampled
                                     onto the MRI grid (same shape and affine)
    DIR/<case>/<case>_us.nii.gz      fit-us --paired: the intra-operative 3-D US volume in
                                     [0, 1] (or 0-255), resampled onto the MRI grid, 0 outside
                                     the sweep (as ReMIND's registered US after resampling)
    DIR/<case>/<case>_brain.nii.gz   optional brain mask (default: MRI non-zero, skull-stripped)
    DIR/<case>/probe.json            optional US probe pose {"centre_mm": [..], "direction": [..]}
                                     in mm of the array frame (index × spacing); default: the
                                     craniotomy placement of :func:`~trifuse.physics.ultrasound.place_probe`

A pair is refused, with a message naming both files, when shapes or affines differ or
when the content says it is not registered (CT: the brain must hold soft-tissue HU;
US: the sweep must lie on the brain).

* :func:`fit_ct_paired`: Johansson's joint GMM / Gaussian-mixture regression
  (:func:`trifuse.physics.ct.fit_ct_gmr`) over brain voxels; writes the
  :class:`~trifuse.physics.ct.CTMixtureModel` file that :class:`SynthesizeCT` reads.
* :func:`fit_us_paired`: learns θ_mapper (impedance) and the tissue echogenicity of
  :class:`~trifuse.physics.acoustic.ImpedanceMapper` by gradient descent through the
  differentiable simulator, loss 1 − SSIM + L1 inside the sweep, as DiffUS fitted its
  renderer to intra-operative brain US (a versioned JSON file,
  :func:`save_us_mapper` / :func:`load_us_mapper`, that :class:`SimulateUltrasound`
  and the configs load). Resumable from a state file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from trifuse import keys

log = logging.getLogger(__name__)

__all__ = ["PairedCase", "read_paired_cases", "fit_ct_paired", "fit_us_paired", "save_us_mapper", "load_us_mapper", "us_mapper_to_dict", "us_mapper_from_dict",
           "US_FORMAT", "US_VERSION", "ssim_l1_loss"]

US_FORMAT = "trifuse.us_mapper"
US_VERSION = 1

_SUFFIXES = {name: (keys.MODALITY_SUFFIXES[2021][i], keys.MODALITY_SUFFIXES[2023][i]) for i, name in enumerate(keys.MODALITIES)}


class PairingError(ValueError):
    """A paired case that cannot be used (names the files)."""


@dataclass
class PairedCase:
    """One co-registered case: MRI z-scored over the brain, and the target modality.

    Attributes:
        case_id: folder name.
        mri: (4, D, H, W) float32 z-scored per contrast over the brain, 0 outside.
        brain: (1, D, H, W) bool.
        target: (1, D, H, W) float32: CT in HU, or US in [0, 1] (0 outside the sweep).
        spacing: voxel size (mm) in array order.
        files: the files read (for messages).
        probe: optional probe pose (US), mm of the array frame.
    """

    case_id: str
    mri: torch.Tensor
    brain: torch.Tensor
    target: torch.Tensor
    spacing: tuple[float, float, float]
    files: dict[str, str] = field(default_factory=dict)
    probe: dict | None = None

    def sample(self) -> dict:
        """The sample dict of the MRI (for the transforms)."""
        return {keys.MRI: self.mri, keys.BRAIN: self.brain, keys.CASE_ID: self.case_id,
                keys.META: {"spacing": list(self.spacing), "applied": []}}


def _find(files: dict[str, Path], suffixes: Sequence[str]) -> Path | None:
    for stem, p in files.items():
        if any(re.search(rf"(^|[-_. ]){re.escape(s)}$", stem) for s in suffixes):
            return p
    return None


def _zscore(vol: np.ndarray, mask: np.ndarray) -> np.ndarray:
    v = vol[mask]
    mean, std = (float(v.mean()), float(v.std())) if v.size else (0.0, 1.0)
    out = np.zeros_like(vol, dtype=np.float32)
    out[mask] = (vol[mask] - mean) / (std if std > 1e-8 else 1.0)
    return out


def read_paired_cases(root: str | os.PathLike, target: str) -> list[PairedCase]:
    """Read every case folder of ``root`` holding the four MRI contrasts and ``target``.

    Args:
        root: folder of case folders (layout in the module docstring).
        target: ``"ct"`` or ``"us"``.

    Returns:
        The cases, sorted by name.

    Raises:
        PairingError: no usable case, or a case whose pair is mismatched or
            misregistered (the message names the files and the problem).
    """
    from trifuse.io.discovery import nifti_stem
    from trifuse.io.nifti import read_nifti

    if target not in ("ct", "us"):
        raise ValueError(f"target must be 'ct' or 'us', got {target!r}")
    root = Path(root)
    if not root.is_dir():
        raise PairingError(f"{root}: not a folder")
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {nifti_stem(p.name).lower(): p for p in d.iterdir() if p.is_file() and nifti_stem(p.name)}
        tgt = _find(files, (target,))
        mods = {m: _find(files, _SUFFIXES[m]) for m in keys.MODALITIES}
        if tgt is None:
            log.info("%s: no *_%s file, skipped", d, target)
            continue
        missing = [m for m, p in mods.items() if p is None]
        if missing:
            raise PairingError(f"{d}: {tgt.name} has no MRI partner for {', '.join(missing)} (expected *_{'/*_'.join(_SUFFIXES[missing[0]])})")
        vols = {m: read_nifti(p) for m, p in mods.items()}
        tv = read_nifti(tgt)
        ref = vols[keys.MODALITIES[0]]
        for name, v in list(vols.items()) + [(target, tv)]:
            if v.data.shape != ref.data.shape:
                raise PairingError(f"{v.path} and {ref.path}: shapes differ ({v.data.shape} vs {ref.data.shape}); resample the pair onto one grid")
            if not np.allclose(v.affine, ref.affine, atol=1e-3):
                raise PairingError(f"{v.path} and {ref.path}: affines differ; the pair is not on one grid (register and resample it)")
        bm = _find(files, ("brain", "brainmask", "mask"))
        stack = np.stack([vols[m].data for m in keys.MODALITIES]).astype(np.float32)
        brain = read_nifti(bm).data > 0 if bm is not None else np.any(stack != 0, axis=0)
        if brain.sum() < 100:
            raise PairingError(f"{d}: brain mask has {int(brain.sum())} voxels")
        mri = np.stack([_zscore(stack[c], brain) for c in range(4)])
        t = tv.data.astype(np.float32)
        if target == "ct":
            soft = float(((t[brain] > -100) & (t[brain] < 150)).mean())
            if soft < 0.8:
                raise PairingError(f"{tgt} and {ref.path}: only {soft:.0%} of the brain has soft-tissue HU (-100..150) in the CT; "
                                   "the pair looks misregistered (or the CT is not in HU)")
        else:
            if t.max() > 1.0 + 1e-6:
                t = t / 255.0 if t.max() <= 255.0 + 1e-3 else t / float(t.max())
            sweep = t > 0
            if sweep.sum() < 100:
                raise PairingError(f"{tgt}: the US sweep is empty")
            on_brain = float(brain[sweep].mean())
            if on_brain < 0.5:
                raise PairingError(f"{tgt} and {ref.path}: only {on_brain:.0%} of the US sweep lies on the brain; "
                                   "the pair looks misregistered")
        probe = None
        if (d / "probe.json").exists():
            probe = json.loads((d / "probe.json").read_text())
        cases.append(PairedCase(d.name, torch.from_numpy(mri), torch.from_numpy(brain)[None], torch.from_numpy(t)[None],
                                tuple(float(s) for s in ref.spacing), {"target": str(tgt), **{m: str(p) for m, p in mods.items()}},
                                probe))
    if not cases:
        raise PairingError(f"{root}: no case folder holds the four MRI contrasts and a *_{target} file")
    return cases


def fingerprint(cases: Sequence[PairedCase]) -> dict:
    """Size and mtime of every file read: the up-to-date key of a paired fit."""
    out = {}
    for c in cases:
        for p in c.files.values():
            st = os.stat(p)
            out[p] = [st.st_size, int(st.st_mtime_ns)]
    return out


# ---------------------------------------------------------------------------------
# CT: Johansson GMR on paired voxels
# ---------------------------------------------------------------------------------
def fit_ct_paired(cases: Sequence[PairedCase], n_components: int = 6, seed: int = 0, max_voxels: int = 200_000):
    """Fit the joint GMM / GMR (Johansson et al., Med. Phys. 2011) on the brain voxels of paired cases.

    Voxels are subsampled uniformly over all cases (at most ``max_voxels``).

    Returns:
        :class:`~trifuse.physics.ct.CTMixtureModel` (form ``"gmr"``), the file format
        :class:`SynthesizeCT` reads.
    """
    from trifuse.physics.ct import fit_ct_gmr

    xs, ys = [], []
    for c in cases:
        b = c.brain[0]
        xs.append(c.mri[:, b].T)
        ys.append(c.target[0][b])
    x, y = torch.cat(xs), torch.cat(ys)
    model = fit_ct_gmr(x, y, n_components, seed=seed, max_voxels=max_voxels)
    model.meta.update({"paired": True, "n_cases": len(cases), "case_ids": [c.case_id for c in cases]})
    return model


# ---------------------------------------------------------------------------------
# US: gradient fit of θ_mapper and echogenicity through the simulator
# ---------------------------------------------------------------------------------
def ssim_l1_loss(sim: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, win_size: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffUS loss: (1 − SSIM) + L1 inside ``mask``.

    Both images are cropped to the mask's bounding box and zeroed outside it; SSIM is
    MONAI's (Gaussian window, data range 1).

    Args:
        sim, real: (1, 1, D, H, W) in [0, 1].
        mask: (1, 1, D, H, W) bool (the real sweep inside the simulated field of view).

    Returns:
        ``(loss, 1 − SSIM)`` scalars.
    """
    from monai.losses import SSIMLoss

    idx = mask[0, 0].nonzero()
    lo, hi = idx.min(0).values, idx.max(0).values + 1
    sl = (slice(None), slice(None)) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    m = mask[sl].float()
    s, r = sim[sl] * m, real[sl] * m
    ws = max(3, min(win_size, *[int(v) for v in (hi - lo)]) // 2 * 2 + 1)
    if ws > min(int(v) for v in (hi - lo)):
        ws = max(1, min(int(v) for v in (hi - lo)) // 2 * 2 - 1)
    d_ssim = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=ws)(s, r)
    l1 = ((s - r).abs() * m).sum() / m.sum().clamp_min(1.0)
    return d_ssim + l1, d_ssim


def _probe_config(base, case: PairedCase):
    import dataclasses

    if case.probe is None:
        return base
    return dataclasses.replace(base, centre_mm=tuple(case.probe["centre_mm"]), direction=tuple(case.probe["direction"]))


def fit_us_paired(
    cases: Sequence[PairedCase],
    mapper: nn.Module | None = None,
    config=None,
    steps: int = 200,
    lr: float = 0.5,
    lr_log: float = 1e-3,
    seed: int = 0,
    state_path: str | os.PathLike | None = None,
    save_every: int = 10,
    log_every: int = 10,
    print_fn=print,
) -> tuple[nn.Module, list[dict]]:
    """Fit θ_mapper and the tissue echogenicity to real US by 1 − SSIM + L1 (DiffUS).

    Each step simulates every case (the default probe or the case's ``probe.json``,
    speckle seed ``seed``), compares it with the real US inside the sweep and the field
    of view, and takes an Adam step. With ``state_path`` the parameters, optimiser and
    step are saved every ``save_every`` steps, and a later call resumes from them.

    Args:
        cases: paired cases with ``target`` the real US in [0, 1].
        mapper: :class:`~trifuse.physics.acoustic.ImpedanceMapper` to fit (default a fresh one).
        config: :class:`~trifuse.physics.ultrasound.ProbeConfig`.
        steps: total optimisation steps (a resumed run continues to this count).
        lr: Adam learning rate of the echogenicity (dB per step).
        lr_log: Adam learning rate of log c, log ρ (and log α if learnable).
        seed: speckle seed of the simulation.
        state_path: resumable state file.
        save_every, log_every: steps between saves and printed losses.
        print_fn: where the loss lines go.

    Returns:
        ``(mapper, history)`` with one ``{"step", "loss", "one_minus_ssim"}`` per logged step.
    """
    from trifuse.io.nifti import atomic_torch_save
    from trifuse.physics.acoustic import ImpedanceMapper
    from trifuse.physics.ultrasound import ProbeConfig, simulate_ultrasound

    config = config or ProbeConfig()
    mapper = mapper or ImpedanceMapper()
    # two scales: echogenicity in dB (lr), log c / log ρ / log α (lr_log: 1e-3 is 0.1 % of Z per step)
    db = [p for n, p in mapper.named_parameters() if p.requires_grad and n == "scatter_db"]
    rest = [p for n, p in mapper.named_parameters() if p.requires_grad and n != "scatter_db"]
    opt = torch.optim.Adam([{"params": db, "lr": lr}, {"params": rest, "lr": lr_log}])
    start, history = 0, []
    if state_path is not None and Path(state_path).exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        mapper.load_state_dict(st["mapper"])
        opt.load_state_dict(st["optimizer"])
        start, history = int(st["step"]), list(st["history"])
        print_fn(f"fit-us: resumed at step {start} from {state_path}")

    def step_loss():
        tot, dss = 0.0, 0.0
        for c in cases:
            sim = simulate_ultrasound(c.mri[None], c.brain[None], c.spacing, _probe_config(config, c), mapper, [seed])
            mask = (c.target[None] > 0) & (sim.detach() > 0)
            if int(mask.sum()) < 27:
                raise PairingError(f"{c.files['target']}: the simulated field of view misses the US sweep; give probe.json")
            loss, d = ssim_l1_loss(sim, c.target[None], mask)
            tot, dss = tot + loss, dss + float(d.detach())
        return tot / len(cases), dss / len(cases)

    for it in range(start, steps):
        opt.zero_grad(set_to_none=True)
        loss, dss = step_loss()
        loss.backward()
        opt.step()
        done = it + 1
        if done % log_every == 0 or done == steps or it == start:
            history.append({"step": done, "loss": float(loss.detach()), "one_minus_ssim": dss})
            print_fn(f"fit-us step {done}/{steps}: loss {float(loss.detach()):.4f}  1-SSIM {dss:.4f}")
        if state_path is not None and (done % save_every == 0 or done == steps):
            # writer-tagged temporary, fsync, rename; a full disk names the folder (OutOfSpaceError)
            atomic_torch_save({"mapper": mapper.state_dict(), "optimizer": opt.state_dict(), "step": done, "history": history},
                              state_path)
    return mapper, history


def us_mapper_to_dict(mapper: nn.Module, meta: dict | None = None) -> dict:
    """A fitted mapper as a plain dict (format :data:`US_FORMAT`): the content of the file
    :func:`save_us_mapper` writes, also what a teacher checkpoint stores so that prediction
    simulates with the mapper the teacher was trained on."""
    from trifuse.physics.acoustic import ImpedanceMapper

    if not isinstance(mapper, ImpedanceMapper):
        raise TypeError(f"only ImpedanceMapper is saved in {US_FORMAT} files, got {type(mapper).__name__}")
    from trifuse.physics.tissues import HEAD_TISSUES

    return {
        "format": US_FORMAT,
        "version": US_VERSION,
        "mapper": "ImpedanceMapper",
        "init_args": {"temperature": mapper.temperature, "learn_attenuation": mapper.learn_attenuation,
                      "learn_scatter": mapper.learn_scatter},
        "tissues": list(HEAD_TISSUES),
        "state": {k: v.detach().cpu().double().tolist() for k, v in mapper.state_dict().items()},
        "meta": dict(meta if meta is not None else getattr(mapper, "meta", {}) or {}),
    }


def us_mapper_from_dict(d: dict, source: str = "<dict>") -> nn.Module:
    """Inverse of :func:`us_mapper_to_dict`; validates format, version and state (errors name ``source``)."""
    from trifuse.physics.acoustic import ImpedanceMapper

    if d.get("format") != US_FORMAT:
        raise ValueError(f"{source}: not a US mapper file (format={d.get('format')!r}, expected {US_FORMAT!r})")
    if int(d.get("version", -1)) > US_VERSION:
        raise ValueError(f"{source}: US mapper version {d.get('version')} is newer than supported {US_VERSION}")
    m = ImpedanceMapper(**d.get("init_args", {}))
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["state"].items()}
    try:
        m.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source}: US mapper state does not fit ImpedanceMapper ({e})") from None
    m.meta = dict(d.get("meta", {}))
    return m


def save_us_mapper(mapper: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write a fitted mapper as small versioned JSON (format :data:`US_FORMAT`), atomically
    (writer-tagged temp file, fsync, rename; a full disk raises
    :class:`~trifuse.io.nifti.OutOfSpaceError` naming the folder)."""
    from trifuse.io.nifti import atomic_write_text

    d = us_mapper_to_dict(mapper, meta={} if meta is None else meta)
    return atomic_write_text(path, json.dumps(d, indent=1))


def load_us_mapper(path: str | os.PathLike) -> nn.Module:
    """Read a mapper written by :func:`save_us_mapper`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mapper file, a newer version, or inconsistent content.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt US mapper file ({e})") from None
    return us_mapper_from_dict(d, source=str(path))
