"""Per-model-family prices, image-token rules and request options of OpenAI vision models.

Prices are USD per **1M tokens**, standard tier, from OpenAI's pricing page
(https://openai.com/api/pricing, platform.openai.com/docs/pricing, as listed in 2025);
the Batch API bills half of them. Image tokens follow the vision guide
(platform.openai.com/docs/guides/images-vision, "Calculating costs"):

* tile models: ``low`` detail costs a flat ``base``; ``high`` fits the image in 2048²,
  scales the short side to 768 and counts 512-px tiles, ``base + tile · n_tiles``
  (gpt-4o / gpt-4.1: 85 + 170; gpt-4o-mini: 2833 + 5667 — its cheap text tokens are
  offset by 33× more image tokens; o1 / o3: 75 + 150; gpt-5: 70 + 140);
* patch models (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano): 32-px patches (at most
  1536, the image scaled down to fit) times a per-model multiplier; ``detail`` does
  not change the count.

A server that is not OpenAI's (vLLM, Ollama, LM Studio, a gateway) costs 0 unless
prices are given explicitly (``--price-input/--price-output``): its tokens are counted,
never turned into dollars we cannot know. Reasoning families (o1, o3, o4, gpt-5) reject
``temperature`` and ``max_tokens``; they get ``max_completion_tokens`` (with room for
the reasoning tokens) and no temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlparse

#: source of :data:`FAMILIES` (quoted in messages and the README)
PRICE_SOURCE = "OpenAI API pricing page and vision guide (list prices as of 2025; Batch API 50%)"
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class ModelFamily:
    """Attributes:
        name: family prefix (longest prefix of the model name wins).
        price_input, price_output: USD per 1M tokens (standard tier).
        image_base, image_tile: tile rule (``patch_multiplier`` 0).
        patch_multiplier: patch rule multiplier (0: tile rule).
        reasoning: rejects ``temperature``/``max_tokens``; uses ``max_completion_tokens``.
        default_max_tokens: completion cap (reasoning models need room to think).
    """

    name: str
    price_input: float
    price_output: float
    image_base: int = 85
    image_tile: int = 170
    patch_multiplier: float = 0.0
    reasoning: bool = False
    default_max_tokens: int = 600


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily("gpt-4o", 2.50, 10.00),
    ModelFamily("chatgpt-4o", 5.00, 15.00),
    ModelFamily("gpt-4o-mini", 0.15, 0.60, 2833, 5667),
    ModelFamily("gpt-4.1", 2.00, 8.00),
    ModelFamily("gpt-4.1-mini", 0.40, 1.60, patch_multiplier=1.62),
    ModelFamily("gpt-4.1-nano", 0.10, 0.40, patch_multiplier=2.46),
    ModelFamily("o1", 15.00, 60.00, 75, 150, reasoning=True, default_max_tokens=8000),
    ModelFamily("o3", 2.00, 8.00, 75, 150, reasoning=True, default_max_tokens=8000),
    ModelFamily("o4-mini", 1.10, 4.40, patch_multiplier=1.72, reasoning=True, default_max_tokens=8000),
    ModelFamily("gpt-5", 1.25, 10.00, 70, 140, reasoning=True, default_max_tokens=8000),
    ModelFamily("gpt-5-mini", 0.25, 2.00, patch_multiplier=1.62, reasoning=True, default_max_tokens=8000),
    ModelFamily("gpt-5-nano", 0.05, 0.40, patch_multiplier=2.46, reasoning=True, default_max_tokens=8000),
)}

#: a model we have no row for: GPT-4o's image rule, no price, classic request options
UNKNOWN = ModelFamily("unknown", 0.0, 0.0)


def model_family(model: str) -> ModelFamily:
    """The family of ``model`` by longest name prefix (``gpt-4o-mini-2024-07-18`` → gpt-4o-mini)."""
    name = model.lower().rsplit("/", 1)[-1]
    best = None
    for prefix, fam in FAMILIES.items():
        if name == prefix or name.startswith(prefix + "-") or name.startswith(prefix + ":"):
            if best is None or len(prefix) > len(best.name):
                best = fam
    return best or UNKNOWN


def is_openai_server(base_url: str | None) -> bool:
    """``None`` (the client default) or a host under ``openai.com``."""
    if not base_url:
        return True
    host = (urlparse(base_url).hostname or "").lower()
    return host == "openai.com" or host.endswith(".openai.com")


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens in force for a run, and where they come from."""

    input: float
    output: float
    source: str

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


def resolve_prices(model: str, base_url: str | None, price_input: float | None = None,
                   price_output: float | None = None, batch: bool = False) -> Prices:
    """Prices of a run: explicit ones win; OpenAI's server uses :data:`FAMILIES`; others 0. Batch halves them."""
    k = BATCH_DISCOUNT if batch else 1.0
    if price_input is not None or price_output is not None:
        return Prices(float(price_input or 0.0) * k, float(price_output or 0.0) * k,
                      "given (--price-input/--price-output)" + (", halved for the Batch API" if batch else ""))
    if not is_openai_server(base_url):
        return Prices(0.0, 0.0, f"0: {base_url} is not OpenAI's server (give --price-input/--price-output)")
    fam = model_family(model)
    if fam is UNKNOWN:
        return Prices(0.0, 0.0, f"unknown: no price for {model!r} in the table (give --price-input/--price-output)")
    return Prices(fam.price_input * k, fam.price_output * k,
                  f"{fam.name} ${fam.price_input:.2f}/${fam.price_output:.2f} per 1M in/out"
                  f"{', x0.5 Batch API' if batch else ''} — {PRICE_SOURCE}")


def image_tokens(width: int, height: int, detail: str = "low", base: int = 85, per_tile: int = 170,
                 patch_multiplier: float = 0.0) -> int:
    """Image input tokens by OpenAI's published rules (see module docstring).

    Args:
        width, height: image size in pixels.
        detail: ``low``, ``high`` or ``auto`` (treated as ``high``) for tile models.
        base, per_tile: tile rule constants of the family.
        patch_multiplier: > 0 selects the patch rule.
    """
    w, h = float(width), float(height)
    if patch_multiplier > 0:
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > 1536:  # scale down so that at most 1536 patches remain
            s = math.sqrt(32 * 32 * 1536 / (w * h))
            s = s * min(math.floor(w * s / 32) / (w * s / 32), math.floor(h * s / 32) / (h * s / 32))
            patches = math.ceil(w * s / 32) * math.ceil(h * s / 32)
        return int(math.ceil(min(patches, 1536) * patch_multiplier))
    if detail == "low":
        return base
    s = min(1.0, 2048.0 / max(w, h))
    w, h = w * s, h * s
    s = 768.0 / min(w, h) if min(w, h) > 768 else 1.0
    w, h = w * s, h * s
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def family_image_tokens(model: str, width: int, height: int, detail: str = "low") -> int:
    """:func:`image_tokens` with the constants of ``model``'s family."""
    f = model_family(model)
    return image_tokens(width, height, detail, f.image_base, f.image_tile, f.patch_multiplier)
