"""Semantic tier: describers (OpenAI, offline), slice extraction, description cache.

Describer API (see ``shared/DESIGN.md``, "Semantic tier"):

* :mod:`trifuse.semantic.schema` — ``ViewDescription``, ``Description``, ``to_text``.
* :mod:`trifuse.semantic.slices` — abnormality, view geometry, rendered slices.
* :mod:`trifuse.semantic.offline` — ``OfflineDescriber`` (deterministic, image-only).
* :mod:`trifuse.semantic.openai_describer` — ``OpenAIDescriber`` (async, retries, cost).
* :mod:`trifuse.semantic.describe` — ``describe_cases`` (cache, resume, failures).

Submodules are imported on use so that ``import trifuse.semantic`` stays light.
"""
