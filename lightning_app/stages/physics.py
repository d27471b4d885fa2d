"""``trifuse physics fit-ct``: fit the synthetic-CT Gaussian mixture once per dataset."""
from __future__ import annotations

import json
from pathlib import Path

from lightning_app.stages import StageError

CT_MODEL_NAME = "ct_mixture.json"


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


def run_fit_ct(args) -> int:
    from trifuse.physics.ct import fit_ct_from_samples

    cache_dir, manifest, samples = cached_samples(args.data, args.cache)
    out = Path(args.out) if args.out else cache_dir / CT_MODEL_NAME
    ids = sorted(c["case_id"] for c in manifest["cases"])
    if out.exists() and not args.force:
        meta = json.loads(out.read_text()).get("meta", {})
        if meta.get("case_ids") == ids and int(meta.get("n_components", args.components)) == args.components:
            print(f"CT mixture up to date: {out} (use --force to refit)")
            return 0
    model = fit_ct_from_samples(samples, n_components=args.components, max_voxels=args.max_voxels, seed=args.seed)
    model.meta["case_ids"] = ids
    model.meta["n_components"] = args.components
    model.meta["data_dir"] = str(Path(args.data).resolve())
    model.save(out)
    print(model.summary() if hasattr(model, "summary") else f"fitted {args.components} components")
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("physics", help="pixel-tier tools (fit-ct)")
    psub = s.add_subparsers(dest="physics_command", required=True, metavar="TOOL")
    f = psub.add_parser("fit-ct", help="fit the CT Gaussian mixture over the dataset's brain voxels")
    f.add_argument("--data", required=True, help="dataset folder")
    f.add_argument("--cache", default=None, help="cache folder (default <data>/../cache/<name>)")
    f.add_argument("--out", default=None, help=f"model file (default <cache>/{CT_MODEL_NAME})")
    f.add_argument("--components", type=int, default=6)
    f.add_argument("--max-voxels", type=int, default=200_000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="refit even if the stored model matches the dataset")
    f.set_defaults(func=run_fit_ct)
    s.set_defaults(command="physics")
