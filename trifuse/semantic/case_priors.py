"""Priors of a new case made the way the training priors were: same CLIP, same settings, same describer.

:class:`CasePriors` is what a student uses at prediction time (``trifuse predict`` needs
only the four MRI files). It is built from the student's semantic bundle
(:func:`trifuse.semantic.provenance.build_bundle`, embedded in the checkpoint):

* the CLIP model comes from the bundle (no file path, no working directory involved);
* the :class:`~trifuse.semantic.priors.PriorConfig` is the training priors' one;
* the describer is the training describer. An OpenAI-trained student needs
  ``OPENAI_API_KEY`` (and reaches the model and server it was trained with; the prompt
  hash must still match); without it, :meth:`CasePriors.check` refuses with a message
  naming ``--describer offline``, the explicit (and logged) choice of offline
  descriptions instead.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Mapping

from trifuse.semantic.provenance import (DescriberMismatchError, bundle_clip, bundle_prior_config, format_identity,
                                         same_describer)

log = logging.getLogger(__name__)

DESCRIBER_CHOICES = ("as-trained", "offline")


class CasePriors:
    """Args:
        bundle: the student's semantic bundle (``None``: a student saved before bundles
            existed; then ``clip_ckpt`` is loaded from its path and the offline
            describer with default settings is used, as before).
        describer: ``"as-trained"`` (default) or ``"offline"`` (explicit override).
        clip_ckpt: fallback CLIP path for bundle-less students.
        device: where CLIP runs.
    """

    def __init__(self, bundle: Mapping[str, Any] | None, describer: str | None = "as-trained",
                 clip_ckpt: str | None = None, device: str = "cpu") -> None:
        describer = describer or "as-trained"
        if describer not in DESCRIBER_CHOICES:
            raise ValueError(f"describer must be one of {DESCRIBER_CHOICES}, got {describer!r}")
        self.bundle = dict(bundle) if bundle else None
        self.choice = describer
        self.clip_ckpt = clip_ckpt
        self.device = device
        self.trained = (self.bundle or {}).get("describer")
        self.config = bundle_prior_config(self.bundle)
        self._clip = None
        self._describer = None

    # -- which describer ------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Decide the describer now (before any case); returns its identity.

        Raises:
            DescriberMismatchError: the training describer cannot be used here and no
                override was given.
        """
        from trifuse.semantic.backend import API_KEY_ENV
        from trifuse.semantic.offline import OfflineDescriber

        trained = self.trained
        if self.choice == "offline" or not trained or trained.get("backend") == "offline":
            d = OfflineDescriber()
            if self.choice == "offline" and trained and not same_describer(trained, d.identity()):
                log.warning("--describer offline: the training priors came from %s; this prediction uses the "
                            "offline describer instead (explicit choice: its Dice is not the validated one)",
                            format_identity(trained))
            elif trained and not same_describer(trained, d.identity()):
                raise DescriberMismatchError(
                    f"this student was trained on priors from {format_identity(trained)}, but this installation's "
                    f"offline describer is {format_identity(d.identity())} (its rules changed); pass "
                    "--describer offline to use it anyway (explicit choice, logged)")
            self._describer = d
            return d.identity()
        # an OpenAI(-compatible) describer, as trained
        if not os.environ.get(API_KEY_ENV):
            raise DescriberMismatchError(
                f"this student was trained on priors from {format_identity(trained)}"
                f"{' at ' + trained['base_url'] if trained.get('base_url') else ''}, and {API_KEY_ENV} is not set: "
                f"set it to predict as trained, or pass --describer offline to use offline descriptions instead "
                "(an explicit choice, logged; the validation Dice then no longer describes the predictions)")
        from trifuse.semantic.openai_describer import OpenAIDescriber

        base_url = os.environ.get("OPENAI_BASE_URL") or trained.get("base_url")  # the same model, maybe moved
        d = OpenAIDescriber(model=trained["model"], base_url=base_url,
                            prompt_version=trained["prompt_version"], concurrency=3)
        if not same_describer(trained, d.identity()):
            raise DescriberMismatchError(
                f"this student was trained on priors from {format_identity(trained)}; this installation's prompt is "
                f"{format_identity(d.identity())}; pass --describer offline to use offline descriptions instead")
        self._describer = d
        return d.identity()

    @property
    def identity(self) -> dict[str, Any]:
        if self._describer is None:
            self.check()
        from trifuse.semantic.provenance import describer_identity

        return describer_identity(self._describer)

    # -- the model ------------------------------------------------------------------------
    def clip(self):
        if self._clip is None:
            if self.bundle is not None:
                self._clip = bundle_clip(self.bundle, self.device)
            else:
                if not self.clip_ckpt:
                    raise ValueError("this student uses semantic priors but its checkpoint has neither an embedded "
                                     "CLIP nor a clip_ckpt")
                from trifuse.semantic.clip import load_clip

                log.warning("student checkpoint without an embedded CLIP: loading %s from disk", self.clip_ckpt)
                self._clip = load_clip(self.clip_ckpt, device=self.device)
        return self._clip

    def describe(self, sample: Mapping[str, Any]):
        """The case's :class:`~trifuse.semantic.schema.Description` by the chosen describer."""
        if self._describer is None:
            self.check()
        d = self._describer
        if d.source == "offline":
            return d.describe(sample)
        from trifuse.semantic.describe import describe_cases, load_descriptions

        with tempfile.TemporaryDirectory(prefix="trifuse-describe-") as tmp:
            s = describe_cases([sample], d, tmp, progress=False)
            got = load_descriptions(tmp)
        cid = str(sample.get("case_id"))
        if cid not in got:
            why = s.aborted or "; ".join(f"{f['view']}: [{f['kind']}] {f['message']}" for f in s.failures[:3])
            raise RuntimeError(f"{cid}: the training describer {format_identity(self.trained)} could not describe "
                               f"the case ({why}); pass --describer offline to use offline descriptions instead")
        return got[cid]

    def __call__(self, sample: Mapping[str, Any]):
        """:class:`~trifuse.semantic.priors.PriorResult` of one prepared (cropped) case."""
        from trifuse.semantic.priors import compute_prior

        cfg = self.config
        if cfg.device != "cpu" and self.device == "cpu":
            cfg = type(cfg)(**{**cfg.__dict__, "device": "cpu"})
        return compute_prior(self.clip(), sample, self.describe(sample), cfg)
