"""``trifuse clip``: contrastive training of the slice/description dual encoder."""
from __future__ import annotations

import json
from pathlib import Path

from lightning_app.stages import StageError

CKPT_NAME = "clip.pt"
METRICS_NAME = "metrics.json"


def run(args) -> int:
    from trifuse.io.nifti import sweep_dead_temps
    from trifuse.semantic.clip import (ClipConfig, data_fingerprint, format_metrics, read_checkpoint, save_clip,
                                       train_clip)
    from trifuse.semantic.clip_data import default_clip_dir, default_descriptions_dir, resolve_cache
    from trifuse.semantic.describe import load_descriptions
    from trifuse.semantic.provenance import DescriberMismatchError

    if args.backend == "hf" and not args.pretrained:
        raise StageError("--backend hf needs --pretrained HUB_ID_OR_DIR (a local CLIP folder or a cached hub id)")
    cache_dir, case_ids = resolve_cache(args.data, args.cache)
    desc_dir = Path(args.descriptions) if args.descriptions else default_descriptions_dir(args.data)
    try:  # one describer per set: a mixture (stale files of another describer) is refused, naming the cases
        descriptions = load_descriptions(desc_dir) if desc_dir.is_dir() else {}
    except DescriberMismatchError as exc:
        raise StageError(str(exc)) from None
    missing = [c for c in case_ids if c not in descriptions]
    if missing:
        raise StageError(f"{len(missing)} case(s) have no description in {desc_dir}: {', '.join(missing[:10])}"
                         f"{' …' if len(missing) > 10 else ''} by its describer (run `trifuse describe --data {args.data}`; "
                         f"failed views are listed in {desc_dir}/failures.jsonl)")
    config = ClipConfig(backend=args.backend, pretrained=args.pretrained, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr if args.lr is not None else (2e-3 if args.backend == "minilm" else 1e-5),
                        image_size=args.image_size, embed_dim=args.embed_dim, width=args.width,
                        unfreeze_last=args.unfreeze_last, val_fraction=args.val_fraction, seed=args.seed,
                        device=args.device)
    out = Path(args.out) if args.out else default_clip_dir(args.data)
    sweep_dead_temps(out)  # what a killed earlier run left half-written (never a live writer's temporaries)
    ckpt = out / CKPT_NAME
    fp = data_fingerprint(descriptions, case_ids, config, cache_dir)
    if ckpt.exists() and not args.force:
        try:
            old = read_checkpoint(ckpt)
        except ValueError:
            old = None
        if old is not None and old.get("fingerprint") == fp:
            # the metrics file follows the checkpoint: a run killed between the two writes left it stale or missing
            _write_metrics(out / METRICS_NAME, old["metrics"], old.get("config") or config.__dict__)
            print(format_metrics(old["metrics"]))
            print(f"{ckpt} is up to date (same data and settings; --force to retrain)")
            return 0
    result = train_clip(cache_dir, descriptions, case_ids, config, progress=print)
    save_clip(ckpt, result.model, fingerprint=fp)
    _write_metrics(out / METRICS_NAME, result.metrics, config.__dict__)
    print(format_metrics(result.metrics))
    print(f"checkpoint {ckpt}; metrics {out / METRICS_NAME}")
    return 0


def _write_metrics(path: Path, metrics: dict, config: dict) -> None:
    """``metrics.json``: the checkpoint's metrics and the settings it was trained with (rewritten only when it differs)."""
    from trifuse.io.nifti import atomic_write_text

    text = json.dumps(metrics | {"config": config}, indent=1, default=str)
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def register(sub) -> None:
    s = sub.add_parser("clip", help="train the CLIP-style slice/description dual encoder (held-out recall@1/5)")
    s.add_argument("--data", required=True, help="dataset folder")
    s.add_argument("--cache", default=None, help="preprocessed cache (default: <data>/../cache/<name>)")
    s.add_argument("--descriptions", default=None, help="describe output (default: <data>/../descriptions/<name>)")
    s.add_argument("--backend", choices=("minilm", "hf"), default="minilm",
                   help="minilm: packaged MiniLM-L6 text tower + small 2-D CNN (offline); hf: transformers CLIP")
    s.add_argument("--pretrained", default=None, help="hf backend: hub id (already cached) or local CLIP folder")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=None, help="default 2e-3 (minilm) or 1e-5 (hf)")
    s.add_argument("--image-size", type=int, default=64, help="minilm: square slice side in pixels (hf: the model's)")
    s.add_argument("--embed-dim", type=int, default=128, help="minilm: joint embedding width")
    s.add_argument("--width", type=int, default=16, help="minilm: image tower base width")
    s.add_argument("--unfreeze-last", action="store_true", help="minilm: also train MiniLM's last layer")
    s.add_argument("--val-fraction", type=float, default=0.25, help="held-out cases for retrieval")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, …")
    s.add_argument("--out", default=None, help="output folder (default: runs/clip/<name>)")
    s.add_argument("--force", action="store_true", help="retrain even if the checkpoint is up to date")
    s.set_defaults(func=run)
