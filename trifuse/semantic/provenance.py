"""Provenance of the semantic tier: who described, and what a student carries to predict as trained.

A **describer identity** is a small dict::

    {"backend": "openai" | "offline", "model": "gpt-4o", "prompt_version": "v1",
     "prompt_hash": "<16 hex>", "base_url": None}

``backend``, ``model``, ``prompt_version`` and ``prompt_hash`` say which descriptions a
describer makes (:data:`IDENTITY_KEYS`); ``base_url`` says where it was reached (not
part of the comparison: the same model behind another host is the same describer). It
is recorded in every description, cache entry, describe manifest, prior file, CLIP
checkpoint and student checkpoint.

The **semantic bundle** is what a student checkpoint embeds so ``trifuse predict``
needs nothing else (:func:`build_bundle`, :func:`bundle_clip`):

* ``clip``: the CLIP export — for the ``minilm`` backend the trained image tower,
  projections and temperature (the frozen MiniLM body ships with the package; a few
  hundred kB); for ``hf`` a reference ``{"path", "sha256"}`` verified when loaded;
* ``clip_sha256``: hash of the CLIP file the priors were made with;
* ``prior_config``: the :class:`~trifuse.semantic.priors.PriorConfig` of the training priors;
* ``describer``: the identity of the describer of the training descriptions.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

IDENTITY_KEYS = ("backend", "model", "prompt_version", "prompt_hash")
BUNDLE_VERSION = 1


class DescriberMismatchError(RuntimeError):
    """Descriptions, priors, CLIP or a student come from different describers."""


def text_hash(*parts: Any) -> str:
    """16-hex sha256 prefix of the JSON of ``parts`` (prompt texts, schemas, thresholds)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def describer_identity(describer: Any) -> dict[str, Any]:
    """Identity of a describer object (its ``identity()`` when it has one)."""
    f = getattr(describer, "identity", None)
    if callable(f):
        return dict(f())
    return {"backend": describer.source, "model": describer.model, "prompt_version": describer.prompt_version,
            "prompt_hash": "", "base_url": None}


def description_identity(description: Any) -> dict[str, Any]:
    """Identity recorded in a :class:`~trifuse.semantic.schema.Description`."""
    return {"backend": description.source, "model": description.model,
            "prompt_version": description.prompt_version, "prompt_hash": getattr(description, "prompt_hash", "")}


def identity_key(identity: Mapping[str, Any] | None) -> tuple:
    """The compared part of an identity (an empty ``prompt_hash`` matches any: older records)."""
    if not identity:
        return ()
    return tuple(str(identity.get(k) or "") for k in IDENTITY_KEYS)


def same_describer(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two identities name the same describer (``prompt_hash`` compared when both have one)."""
    if not a or not b:
        return False
    ka, kb = identity_key(a), identity_key(b)
    if ka[:3] != kb[:3]:
        return False
    return not (ka[3] and kb[3]) or ka[3] == kb[3]


def format_identity(identity: Mapping[str, Any] | None) -> str:
    """``openai/gpt-4o prompt v1 #0123abcd`` (for messages)."""
    if not identity:
        return "an unrecorded describer"
    h = str(identity.get("prompt_hash") or "")
    return (f"{identity.get('backend')}/{identity.get('model')} prompt {identity.get('prompt_version')}"
            + (f" #{h[:8]}" if h else ""))


def single_identity(descriptions: Mapping[str, Any], where: str = "") -> dict[str, Any] | None:
    """The one describer identity of a description set, or :class:`DescriberMismatchError` naming cases.

    Returns ``None`` for an empty set.
    """
    groups: dict[tuple, list[str]] = {}
    idents: dict[tuple, dict] = {}
    for cid, d in sorted(descriptions.items()):
        ident = description_identity(d)
        k = identity_key(ident)[:3]
        groups.setdefault(k, []).append(cid)
        idents[k] = ident
    if not groups:
        return None
    if len(groups) > 1:
        parts = [f"{format_identity(idents[k])}: {', '.join(v[:5])}{' …' if len(v) > 5 else ''} ({len(v)})"
                 for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
        raise DescriberMismatchError(f"descriptions{' in ' + where if where else ''} mix describers — "
                                     + "; ".join(parts) + " — use one describer per description folder")
    return next(iter(idents.values()))


# --------------------------------------------------------------------------------------
# the student's semantic bundle
# --------------------------------------------------------------------------------------
def _file_sha256(path: str | Path) -> str:
    from trifuse.semantic.clip import file_sha256

    return file_sha256(path)


def read_priors_provenance(priors_dir: str | Path | None) -> dict[str, Any]:
    """``{"prior_config", "clip_sha256", "describer"}`` from ``trifuse semantic``'s summary (``{}`` if none)."""
    if priors_dir is None:
        return {}
    p = Path(priors_dir) / "priors_summary.json"
    if not p.is_file():
        return {}
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: s.get(k) for k in ("config", "clip_sha256", "describer")} | {"prior_config": s.get("config")}


def build_bundle(clip_ckpt: str | Path, priors_dir: str | Path | None = None) -> dict[str, Any]:
    """The semantic bundle of a student trained with ``clip_ckpt`` and the priors in ``priors_dir``.

    Raises:
        FileNotFoundError: no CLIP checkpoint.
        DescriberMismatchError: the priors were made with another CLIP file, or the
            priors' and the CLIP model's describers differ.
    """
    from trifuse.semantic.clip import read_checkpoint

    clip_ckpt = Path(clip_ckpt)
    payload = read_checkpoint(clip_ckpt)
    sha = _file_sha256(clip_ckpt)
    prov = read_priors_provenance(priors_dir)
    if prov.get("clip_sha256") and prov["clip_sha256"] != sha:
        raise DescriberMismatchError(
            f"the priors in {priors_dir} were made with another CLIP model (sha256 {prov['clip_sha256'][:12]}…) "
            f"than {clip_ckpt} ({sha[:12]}…): re-run `trifuse semantic` or point clip_ckpt at the CLIP they used")
    clip_desc = payload.get("describer")
    prior_desc = prov.get("describer")
    if clip_desc and prior_desc and not same_describer(clip_desc, prior_desc):
        raise DescriberMismatchError(f"CLIP {clip_ckpt} was trained on descriptions by {format_identity(clip_desc)}, "
                                     f"the priors in {priors_dir} by {format_identity(prior_desc)}")
    if payload.get("backend") == "minilm":
        clip: dict[str, Any] = {"embedded": True, "payload": payload}
    else:  # a full transformers CLIP is large: a verified reference
        clip = {"embedded": False, "path": str(clip_ckpt.resolve()), "sha256": sha}
    return {"version": BUNDLE_VERSION, "clip": clip, "clip_sha256": sha,
            "prior_config": prov.get("prior_config"), "describer": prior_desc or clip_desc,
            "priors_dir": str(priors_dir) if priors_dir else None}


def bundle_clip(bundle: Mapping[str, Any], device: str = "cpu"):
    """The CLIP dual encoder of a bundle (embedded, or the referenced file after its sha256 check)."""
    from trifuse.semantic.clip import load_clip, model_from_payload

    clip = bundle["clip"]
    if clip.get("embedded"):
        return model_from_payload(clip["payload"], device)
    path = Path(clip["path"])
    if not path.is_file():
        raise FileNotFoundError(f"this student references the hf CLIP {path} (sha256 {clip['sha256'][:12]}…), "
                                "which is not there; copy it back to that path")
    sha = _file_sha256(path)
    if sha != clip["sha256"]:
        raise DescriberMismatchError(f"{path} changed since the student was trained (sha256 {sha[:12]}… != "
                                     f"{clip['sha256'][:12]}…): predictions would not be the trained ones")
    return load_clip(path, device)


def bundle_prior_config(bundle: Mapping[str, Any] | None):
    """The :class:`~trifuse.semantic.priors.PriorConfig` recorded in a bundle (defaults when absent)."""
    from trifuse.semantic.priors import PriorConfig

    cfg = dict((bundle or {}).get("prior_config") or {})
    fields = set(PriorConfig.__dataclass_fields__)
    cfg = {k: v for k, v in cfg.items() if k in fields}
    if "views" in cfg:
        cfg["views"] = tuple(cfg["views"])
    return PriorConfig(**cfg)


def common_identity(identities: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The shared identity of several records, or :class:`DescriberMismatchError`."""
    out = None
    for ident in identities:
        if not ident:
            continue
        if out is None:
            out = dict(ident)
        elif not same_describer(out, ident):
            raise DescriberMismatchError(f"{format_identity(out)} and {format_identity(ident)} are mixed")
    return out
