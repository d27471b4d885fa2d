"""``trifuse physics fit-ct`` / ``fit-us``: fit the pixel tier once per dataset, or to real paired data.

* ``fit-ct --data DIR``: the unpaired CT mixture over the dataset's brain voxels (tissue-table HU).
* ``fit-ct --paired DIR``: Johansson's GMR on co-registered MR/CT pairs (same model file).
* ``fit-us --paired DIR``: θ_mapper and the tissue echogenicity by 1 − SSIM + L1 on
  co-registered MR/US pairs (a versioned mapper file that ``SimulateUltrasound`` loads).

The paired folder layout is in :mod:`trifuse.physics.paired`. Every fit skips work that is
up to date (same inputs and settings), and ``fit-us`` resumes from its state file.
"""
from __future__ import annotations

import json
from pathlib import Path

from lightning_app.stages import StageError

CT_MODEL_NAME = "ct_mixture.json"
US_MODEL_NAME = "us_mapper.json"


def cached_samples(data: str, cache: str | None):
    """Manifest and a lazy stream of the dataset's cached samples (preprocessing first if needed)."""
    from trifuse.io import cache as cache_mod
    from trifuse.io.manifest import read_manifest
    from trifuse.io.preprocess import default_cache_dir, preprocess

    cache_dir = Path(cache) if cache else default_cache_dir(data)
    preprocess(data, cache_dir)  # resumable: only new or changed cases are decoded
    manifest = read_manifest(cache_dir)
    ids = [c["case_id"] for c in manifest["cases"]]
    if not ids:
        raise StageError(f"{data}: no valid case to fit on")
    return cache_dir, manifest, (cache_mod.load_sample(cache_dir, cid) for cid in ids)


def _up_to_date(out: Path, key: dict, force: bool) -> bool:
    if not out.exists() or force:
        return False
    try:
        meta = json.loads(out.read_text()).get("meta", {})
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("fit_key") == key


def run_fit_ct(args) -> int:
    from trifuse.physics.ct import fit_ct_from_samples

    if args.paired:
        return _run_fit_ct_paired(args)
    if not args.data:
        raise StageError("fit-ct needs --data DIR (unpaired) or --paired DIR")
    cache_dir, manifest, samples = cached_samples(args.data, args.cache)
    out = Path(args.out) if args.out else cache_dir / CT_MODEL_NAME
    ids = sorted(c["case_id"] for c in manifest["cases"])
    # everything the fit depends on: a change of any of them refits
    key = {"case_ids": ids, "n_components": args.components, "seed": args.seed, "max_voxels": args.max_voxels, "paired": False}
    return _fit_ct_and_save(out, key, args.force, lambda: fit_ct_from_samples(
        samples, n_components=args.components, max_voxels=args.max_voxels, seed=args.seed),
        {"case_ids": ids, "n_components": args.components, "data_dir": str(Path(args.data).resolve())})


def _fit_ct_and_save(out: Path, key: dict, force: bool, fit, meta: dict) -> int:
    """Skip if ``out`` was fitted with ``key``; else fit, record the key, save and print the components."""
    from trifuse.io.nifti import sweep_dead_temps

    sweep_dead_temps(out.parent)  # what a killed earlier run left half-written (never a live writer's temporaries)
    if _up_to_date(out, key, force):
        print(f"CT mixture up to date: {out} (use --force to refit)")
        return 0
    model = fit()
    model.meta.update(meta, fit_key=key)
    model.save(out)
    print(model.summary())  # weights and tissue names, one line per component
    print(f"EM log-likelihood {model.meta['log_likelihood']:.4f} after {model.meta['n_iter']} iterations; "
          f"{len(model.meta.get('events', []))} re-seeded/pruned component event(s)")
    print(f"wrote {out}")
    return 0


def _run_fit_ct_paired(args) -> int:
    from trifuse.physics.paired import PairingError, fingerprint, fit_ct_paired, read_paired_cases

    try:
        cases = read_paired_cases(args.paired, "ct")
    except PairingError as e:
        raise StageError(str(e)) from None
    out = Path(args.out) if args.out else Path(args.paired) / CT_MODEL_NAME
    key = {"files": fingerprint(cases), "n_components": args.components, "seed": args.seed, "max_voxels": args.max_voxels,
           "paired": True}
    print(f"fit-ct --paired: {len(cases)} MR/CT pair(s) from {args.paired}")
    return _fit_ct_and_save(out, key, args.force, lambda: fit_ct_paired(
        cases, n_components=args.components, seed=args.seed, max_voxels=args.max_voxels), {})


def run_fit_us(args) -> int:
    from trifuse.io.nifti import sweep_dead_temps
    from trifuse.physics.paired import PairingError, fingerprint, fit_us_paired, load_us_mapper, read_paired_cases, save_us_mapper
    from trifuse.physics.ultrasound import ProbeConfig

    try:
        cases = read_paired_cases(args.paired, "us")
    except PairingError as e:
        raise StageError(str(e)) from None
    out = Path(args.out) if args.out else Path(args.paired) / US_MODEL_NAME
    state = Path(str(out) + ".state.pt")
    sweep_dead_temps(out.parent)  # the mapper's and state file's temporaries a killed run left (never a live writer's)
    key = {"files": fingerprint(cases), "steps": args.steps, "lr": args.lr, "seed": args.seed,
           "resolution_mm": args.resolution_mm}
    if _up_to_date(out, key, args.force):
        print(f"US mapper up to date: {out} (use --force to refit)")
        return 0
    if args.force and state.exists():
        state.unlink()
    init = load_us_mapper(args.init) if args.init else None
    cfg = ProbeConfig(resolution_mm=args.resolution_mm or None)
    print(f"fit-us --paired: {len(cases)} MR/US pair(s) from {args.paired}; {args.steps} steps (state {state})")
    try:
        mapper, history = fit_us_paired(cases, init, cfg, steps=args.steps, lr=args.lr, seed=args.seed, state_path=state)
    except PairingError as e:
        raise StageError(str(e)) from None
    save_us_mapper(mapper, out, {"fit_key": key, "history": history, "case_ids": [c.case_id for c in cases]})
    print(f"wrote {out} (load it with SimulateUltrasound(mapper='{out}') or data.init_args.sample_transforms"
          f"[...].init_args.mapper in a config)")
    return 0


def register(sub) -> None:
    s = sub.add_parser("physics", help="pixel-tier tools (fit-ct, fit-us)")
    psub = s.add_subparsers(dest="physics_command", required=True, metavar="TOOL")
    f = psub.add_parser("fit-ct", help="fit the CT Gaussian mixture (unpaired over a dataset, or GMR on MR/CT pairs)")
    f.add_argument("--data", default=None, help="dataset folder (unpaired fit)")
    f.add_argument("--paired", default=None, metavar="DIR", help="folder of co-registered MR/CT cases (trifuse.physics.paired)")
    f.add_argument("--cache", default=None, help="cache folder (default <data>/../cache/<name>)")
    f.add_argument("--out", default=None, help=f"model file (default <cache>/{CT_MODEL_NAME}, or <paired>/{CT_MODEL_NAME})")
    f.add_argument("--components", type=int, default=6)
    f.add_argument("--max-voxels", type=int, default=200_000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="refit even if the stored model matches the inputs and settings")
    f.set_defaults(func=run_fit_ct)
    u = psub.add_parser("fit-us", help="fit θ_mapper and tissue echogenicity to co-registered MR/US pairs (1 - SSIM + L1)")
    u.add_argument("--paired", required=True, metavar="DIR", help="folder of co-registered MR/US cases (trifuse.physics.paired)")
    u.add_argument("--out", default=None, help=f"mapper file (default <paired>/{US_MODEL_NAME}); its state file is <out>.state.pt")
    u.add_argument("--init", default=None, help="start from this mapper file (default: the tissue table)")
    u.add_argument("--steps", type=int, default=200)
    u.add_argument("--lr", type=float, default=0.5, help="Adam step of the echogenicity, dB")
    u.add_argument("--resolution-mm", type=float, default=2.0, help="simulation working resolution (0 = native)")
    u.add_argument("--seed", type=int, default=0, help="speckle seed of the simulation")
    u.add_argument("--force", action="store_true", help="start over (drops the state file)")
    u.set_defaults(func=run_fit_us)
    s.set_defaults(command="physics")
