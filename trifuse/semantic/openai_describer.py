"""Vision-language describer over the OpenAI chat-completions API (or any compatible server).

One request per (case, view): a system prompt, a short user text with the view's
geometry, and the 2×2 four-contrast PNG of the slice through the abnormality as a
base64 ``data:`` URL. The answer is forced into the :class:`ViewDescription` JSON schema
(structured output, strict) and validated again with pydantic.

Retries are ours, not the client's (the client is built with ``max_retries=0``): 429,
408/409, 5xx, time-outs and connection errors are retried with exponential backoff and
jitter (honouring ``retry-after-ms``, ``Retry-After`` and the ``x-ratelimit-*`` headers:
a server-requested pause holds every request, not only the one that got the 429), every
HTTP request is counted, and an ``asyncio.Semaphore`` bounds the requests in flight.

What no retry fixes is classified, not retried (:data:`FATAL_KINDS`): 401, 403, 404,
a model without image input, ``insufficient_quota`` (a 429 that waiting never cures);
the run's breaker (:mod:`trifuse.semantic.describe`) stops on them. A server that
rejects ``json_schema`` gets ``json_object``, then a prompt-only request (the schema in
the system prompt), each answer validated the same way; a model that rejects
``temperature`` or ``max_tokens`` gets the request without them. Request options follow
the model family (:mod:`trifuse.semantic.pricing`). Anything that still fails becomes a
:class:`~trifuse.semantic.backend.DescribeError` — recorded by the caller, never
replaced by offline output.

The key is read from ``OPENAI_API_KEY`` only, handed to the client, and never stored
in this object's state, logged, or put into an error message (see
:func:`~trifuse.semantic.backend.redact`).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import random
import re
from typing import Any, Mapping

from pydantic import ValidationError

from trifuse.semantic import pricing
from trifuse.semantic.backend import (API_KEY_ENV, FATAL_KINDS, DescribeError, MissingAPIKeyError, Usage,  # noqa: F401
                                      ViewOutcome, redact)
from trifuse.semantic.provenance import text_hash
from trifuse.semantic.schema import ViewDescription, openai_response_format
from trifuse.semantic.slices import ViewSlice

log = logging.getLogger(__name__)

SYSTEM_PROMPTS = {
    "v1": (
        "You are an experienced neuroradiologist reading brain MRI of adult patients with suspected glioma.\n"
        "You receive ONE slice in one plane, shown as a 2x2 grid of co-registered contrasts: top-left T1, "
        "top-right T1ce (T1 after gadolinium), bottom-left T2, bottom-right FLAIR. Images are skull-stripped "
        "and intensity-normalised per contrast.\n"
        "Orientation: axial and coronal images are in radiological convention (the subject's RIGHT is on the "
        "image LEFT, marked R/L); sagittal images have anterior on the left (marked A/P). Report laterality "
        "in the SUBJECT's frame.\n"
        "Describe the most conspicuous abnormality on this slice:\n"
        "- hemisphere: left, right, bilateral (crosses the midline substantially), midline, or none.\n"
        "- lobes: involved lobes/regions among frontal, parietal, temporal, occipital, insular, deep "
        "(basal ganglia, thalamus, internal capsule, corpus callosum), cerebellum, brainstem; most involved first.\n"
        "- size_mm: the longest in-plane diameter of the WHOLE abnormal region including oedema, in mm, "
        "using the pixel size given; 0 if there is no abnormality.\n"
        "- enhancement on T1ce: none, nodular (solid focal), ring (rim around a non-enhancing centre), "
        "heterogeneous (patchy/irregular).\n"
        "- necrosis: true if a non-enhancing, T2-bright core lies inside enhancing tumour.\n"
        "- oedema: perilesional FLAIR-hyperintense oedema as a proportion of the abnormality: none (<5%), "
        "mild (5-33%), moderate (34-67%), marked (>67%).\n"
        "- mass_effect: true if there is sulcal effacement, ventricular compression or midline shift.\n"
        "- impression: one or two sentences.\n"
        "If no abnormality is visible use hemisphere none, lobes [], size_mm 0, enhancement none, "
        "necrosis false, oedema none, mass_effect false. Answer only with the JSON object."
    ),
}


#: the per-request text (``{view}``, ``{fov}``, ``{mm}`` filled per slice); hashed into the prompt hash
USER_TEMPLATE = ("Plane: {view}. Each of the four panels is {fov:.0f} mm x {fov:.0f} mm "
                 "({mm:.2f} mm per pixel). Describe the abnormality on this {view} slice.")

#: response-format modes, strongest first: a server that rejects one gets the next
RESPONSE_MODES = ("json_schema", "json_object", "prompt")

_IMAGE_RX = re.compile(r"image|vision|multi-?modal", re.I)
_FORMAT_RX = re.compile(r"response_format|json_schema|json_object|structured output|guided_json|guided decoding", re.I)
_DURATION_RX = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def user_text(view_slice: ViewSlice) -> str:
    """The per-request text: view, panel layout and pixel size."""
    return USER_TEMPLATE.format(view=view_slice.view, fov=view_slice.panel_fov_mm, mm=view_slice.mm_per_px)


def image_tokens(width: int, height: int, detail: str = "low", base: int = 85, per_tile: int = 170) -> int:
    """Image input tokens of a GPT-4o-class (tile rule) model; see :func:`trifuse.semantic.pricing.image_tokens`."""
    return pricing.image_tokens(width, height, detail, base, per_tile)


def _text_tokens(text: str) -> int:
    # ~4 characters per token for English/JSON (OpenAI rule of thumb); tiktoken is not
    # a dependency and an estimate is all a dry run needs
    return int(math.ceil(len(text) / 4))


def parse_duration(value: str | None) -> float | None:
    """Seconds of an OpenAI rate-limit reset header (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"0.5"``)."""
    if value is None:
        return None
    v = str(value).strip()
    try:
        return float(v)
    except ValueError:
        pass
    parts = _DURATION_RX.findall(v)
    if not parts:
        return None
    unit = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * unit[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str] | None, status: int | None = None) -> float | None:
    """How long the server asks us to wait: ``retry-after-ms``, ``retry-after`` (seconds or HTTP date), or,
    on a 429, the later of ``x-ratelimit-reset-requests``/``-tokens``."""
    if not headers:
        return None
    h = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in h:
        try:
            return float(h["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    if "retry-after" in h:
        ra = h["retry-after"]
        try:
            return float(ra)
        except ValueError:
            import email.utils
            import time as _time

            try:
                return max(0.0, email.utils.parsedate_to_datetime(ra).timestamp() - _time.time())
            except (TypeError, ValueError):
                pass
    if status == 429:
        resets = [parse_duration(h.get(k)) for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
        resets = [r for r in resets if r is not None]
        if resets:
            return max(resets)
    return None


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


class OpenAIDescriber:
    """Describe view slices with an OpenAI(-compatible) vision model.

    Args:
        model: model name (e.g. ``gpt-4o``; any vision model the server offers).
        base_url: server URL (e.g. ``http://host:8000/v1`` for vLLM); ``None`` = OpenAI
            (or ``OPENAI_BASE_URL``).
        concurrency: most requests in flight.
        max_retries: retries after the first attempt (so ``1 + max_retries`` requests at most).
        timeout: per-request time-out in seconds.
        price_input, price_output: USD per 1M prompt / completion tokens; ``None``: the
            family's list price on OpenAI's server, 0 elsewhere (:func:`~trifuse.semantic.pricing.resolve_prices`).
        price_per_1k_input, price_per_1k_output: the same per 1k tokens (older spelling).
        prompt_version: key into :data:`SYSTEM_PROMPTS`; part of the cache key.
        detail: image ``detail`` (``low`` sees 512×512, which is the size we render).
        max_tokens: completion token cap (``None``: the family's default; sent as
            ``max_completion_tokens`` to reasoning models).
        temperature: sampling temperature (``None``: server default; never sent to
            reasoning models, which reject it).
        response_format: first mode tried (``json_schema``, ``json_object`` or ``prompt``);
            a server that rejects it gets the next one, and the mode used is recorded.
        backoff_base, backoff_max: first delay and cap in seconds (``base · 2^(n−1)``).
        jitter: multiplicative jitter fraction (delay × U[1, 1 + jitter]).
        max_retry_after: longest server-requested wait honoured (s).
        dry_run: never contact the server; :meth:`estimate` counts instead.
        expected_output_tokens: completion tokens assumed by :meth:`estimate`.
        batch: prices of the Batch API (half) in :meth:`cost` and :meth:`estimate`.
        request_kwargs: extra arguments for ``chat.completions.create`` (e.g. ``seed``).

    Raises:
        MissingAPIKeyError: no ``OPENAI_API_KEY`` and not ``dry_run``.
    """

    source = "openai"

    def __init__(self, model: str = "gpt-4o", base_url: str | None = None, concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 60.0, price_input: float | None = None,
                 price_output: float | None = None, price_per_1k_input: float | None = None,
                 price_per_1k_output: float | None = None, prompt_version: str = "v1",
                 detail: str = "low", max_tokens: int | None = None, temperature: float | None = 0.0,
                 response_format: str = "json_schema", backoff_base: float = 1.0, backoff_max: float = 60.0,
                 jitter: float = 0.25, max_retry_after: float = 300.0, dry_run: bool = False,
                 expected_output_tokens: int = 200, batch: bool = False,
                 request_kwargs: Mapping[str, Any] | None = None) -> None:
        if prompt_version not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown prompt_version {prompt_version!r}; known: {sorted(SYSTEM_PROMPTS)}")
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")
        if response_format not in RESPONSE_MODES:
            raise ValueError(f"response_format must be one of {RESPONSE_MODES}, got {response_format!r}")
        if not dry_run and not os.environ.get(API_KEY_ENV):
            raise MissingAPIKeyError(
                f"the OpenAI backend needs the {API_KEY_ENV} environment variable (for a local server "
                f"without auth set it to any placeholder), or use --dry-run or --backend offline")
        self.model = model
        self.base_url = base_url if base_url is not None else (os.environ.get("OPENAI_BASE_URL") or None)
        self.family = pricing.model_family(model)
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        if price_per_1k_input is not None:
            price_input = 1000.0 * float(price_per_1k_input)
        if price_per_1k_output is not None:
            price_output = 1000.0 * float(price_per_1k_output)
        self.batch = bool(batch)
        self.prices = pricing.resolve_prices(model, self.base_url, price_input, price_output, batch=self.batch)
        self.online_prices = pricing.resolve_prices(model, self.base_url, price_input, price_output)
        self.prompt_version = prompt_version
        self.detail = detail
        self.max_tokens = int(max_tokens) if max_tokens is not None else self.family.default_max_tokens
        self.temperature = None if self.family.reasoning else temperature
        self.response_format = response_format
        self.mode = response_format  # current mode (falls back within a run)
        self.token_param = "max_completion_tokens" if self.family.reasoning else "max_tokens"
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.jitter = float(jitter)
        self.max_retry_after = float(max_retry_after)
        self.dry_run = bool(dry_run)
        self.expected_output_tokens = int(expected_output_tokens)
        self.request_kwargs = dict(request_kwargs or {})
        self.usage = Usage()
        self.fallbacks: list[str] = []  #: what this run had to change (response format, options)
        self.stop_reason: str | None = None  #: set by the run's breaker: no further request is sent
        self._rng = random.Random()
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hold_until = 0.0  # loop time before which no request starts (server-requested pause)
        self.in_flight = 0
        self.max_in_flight = 0

    def __repr__(self) -> str:  # no key, ever
        return (f"OpenAIDescriber(model={self.model!r}, base_url={self.base_url!r}, "
                f"concurrency={self.concurrency}, prompt_version={self.prompt_version!r}, dry_run={self.dry_run})")

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PROMPTS[self.prompt_version]

    @property
    def price_in(self) -> float:
        """USD per 1k prompt tokens (older spelling of :attr:`prices`)."""
        return self.prices.input / 1000.0

    @property
    def price_out(self) -> float:
        return self.prices.output / 1000.0

    @property
    def prompt_hash(self) -> str:
        """Hash of every text the model is given: system prompt, user template and response schema."""
        return text_hash(self.system_prompt, USER_TEMPLATE, openai_response_format(None))

    def identity(self) -> dict[str, Any]:
        """Describer identity (:mod:`trifuse.semantic.provenance`)."""
        return {"backend": self.source, "model": self.model, "prompt_version": self.prompt_version,
                "prompt_hash": self.prompt_hash, "base_url": self.base_url}

    def request_params(self) -> dict[str, Any]:
        """Every request setting that can change an answer: part of the cache key."""
        return {"model": self.model, "base_url": self.base_url, "detail": self.detail, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "response_format": self.response_format,
                "prompt_hash": self.prompt_hash, "request_kwargs": self.request_kwargs}

    # -- client -----------------------------------------------------------------------
    def _ensure_client(self) -> None:
        """(Re)create client and semaphore for the running loop (one per ``asyncio.run``)."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return
        import openai

        # the key goes straight from the environment into the client; our retries only
        self._client = openai.AsyncOpenAI(api_key=os.environ.get(API_KEY_ENV), base_url=self.base_url,
                                          max_retries=0, timeout=self.timeout)
        self._sem = asyncio.Semaphore(self.concurrency)
        self._loop = loop
        self._hold_until = 0.0

    async def aclose(self) -> None:
        """Close the HTTP client (call before the event loop ends)."""
        if self._client is not None:
            try:
                await self._client.close()
            finally:
                self._client, self._sem, self._loop = None, None, None

    def prepare(self, sample: Mapping[str, Any], slices: Mapping[str, ViewSlice], abnormality: Any) -> None:
        """Nothing per case: the rendered slices are all a request needs."""
        return None

    # -- request ----------------------------------------------------------------------
    def messages(self, view_slice: ViewSlice, mode: str | None = None) -> list[dict[str, Any]]:
        """Chat messages for one view: system prompt, text, and the PNG as a data URL.

        Without ``json_schema`` the schema travels in the system prompt instead.
        """
        mode = mode or self.mode
        system = self.system_prompt
        if mode != "json_schema":
            schema = openai_response_format(view_slice.view)["json_schema"]["schema"]
            system += ("\nReply with one JSON object (no prose, no code fence) that follows this JSON schema:\n"
                       + json.dumps(schema, separators=(",", ":")))
        url = "data:image/png;base64," + base64.b64encode(view_slice.png).decode("ascii")
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": [
                {"type": "text", "text": user_text(view_slice)},
                {"type": "image_url", "image_url": {"url": url, "detail": self.detail}},
            ]},
        ]

    def request_body(self, view_slice: ViewSlice, mode: str | None = None) -> dict[str, Any]:
        """The ``chat.completions.create`` arguments for one view (also a Batch API line's body)."""
        mode = mode or self.mode
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(view_slice, mode),
                                self.token_param: self.max_tokens}
        if mode == "json_schema":
            body["response_format"] = openai_response_format(view_slice.view)
        elif mode == "json_object":
            body["response_format"] = {"type": "json_object"}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.request_kwargs)
        return body

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for the given token counts (0 on a server that is not OpenAI's, unless prices were given)."""
        return self.prices.cost(prompt_tokens, completion_tokens)

    def estimate(self, view_slice: ViewSlice) -> tuple[int, int, float]:
        """Dry-run estimate for one view: ``(prompt_tokens, completion_tokens, usd)``; counted in usage."""
        schema = json.dumps(openai_response_format(view_slice.view))
        text = self.system_prompt + user_text(view_slice) + schema
        img = pricing.family_image_tokens(self.model, *view_slice.size_px, detail=self.detail)
        p = _text_tokens(text) + img + 3 * 2 + 3
        c = self.expected_output_tokens
        usd = self.cost(p, c)
        u = self.usage
        u.would_send += 1
        u.est_prompt_tokens += p
        u.est_completion_tokens += c
        u.est_cost_usd += usd
        return p, c, usd

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        d *= 1.0 + self.jitter * self._rng.random()
        if retry_after is not None:  # the server knows better than our backoff, within reason
            d = max(d, min(retry_after, self.max_retry_after))
        return d

    @staticmethod
    def _headers(exc: Exception) -> Mapping[str, str] | None:
        resp = getattr(exc, "response", None)
        return getattr(resp, "headers", None)

    @staticmethod
    def _classify(exc: Exception) -> tuple[str, bool, int | None]:
        """``(kind, retryable, status)`` of an exception from the client.

        Kinds in :data:`FATAL_KINDS` stop a run; ``unsupported_response_format`` and
        ``unsupported_param`` first make the describer fall back (see :meth:`describe_view`).
        """
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return "timeout", True, None
        if isinstance(exc, openai.APIConnectionError):
            return "connection", True, None
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            err_code = str(getattr(exc, "code", "") or "")
            err_type = str((exc.body or {}).get("type", "") if isinstance(exc.body, dict) else "")
            param = str(getattr(exc, "param", "") or "")
            text = str(getattr(exc, "message", "") or exc)
            if "insufficient_quota" in (err_code, err_type) or "insufficient_quota" in text:
                return "insufficient_quota", False, code  # a 429 that no waiting fixes
            if code == 429:
                return "rate_limited", True, code
            if code >= 500:
                return "server_error", True, code
            if code in (408, 409):
                return "http_error", True, code
            if code == 401:
                return "auth", False, code
            if code == 403:
                return "permission", False, code
            if code == 404:
                return "not_found", False, code
            if code in (400, 422):
                if param == "response_format" or _FORMAT_RX.search(text):
                    return "unsupported_response_format", False, code
                if err_code in ("unsupported_parameter", "unsupported_value") or param in ("temperature", "max_tokens"):
                    return "unsupported_param", False, code
                if _IMAGE_RX.search(text) or param.startswith("messages"):
                    return "no_image_input", False, code
            return "http_error", False, code
        if isinstance(exc, openai.APIError):  # e.g. a 200 whose body is not a chat completion
            return "invalid_response", False, None
        return "error", False, None

    def _fall_back(self, kind: str, exc: Exception) -> bool:
        """Change the request after a server rejected part of it; ``False`` when nothing is left to change."""
        if kind == "unsupported_response_format":
            i = RESPONSE_MODES.index(self.mode)
            if i + 1 < len(RESPONSE_MODES):
                new = RESPONSE_MODES[i + 1]
                log.warning("the server does not accept response_format %s; falling back to %s (validated "
                            "against the schema all the same)", self.mode, new)
                self.fallbacks.append(f"response_format {self.mode} -> {new}")
                self.mode = new
                return True
            return False
        if kind == "unsupported_param":
            param = str(getattr(exc, "param", "") or "")
            text = str(getattr(exc, "message", "") or exc)
            if (param == "temperature" or "temperature" in text) and self.temperature is not None:
                self.fallbacks.append("temperature dropped")
                self.temperature = None
                return True
            if (param == "max_tokens" or "max_tokens" in text) and self.token_param == "max_tokens":
                self.fallbacks.append("max_tokens -> max_completion_tokens")
                self.token_param = "max_completion_tokens"
                return True
        return False

    async def _hold(self) -> None:
        """Wait while the server asked for a pause (429 Retry-After, exhausted rate-limit window)."""
        loop = asyncio.get_running_loop()
        while (wait := self._hold_until - loop.time()) > 0:
            await asyncio.sleep(wait)

    def _pause(self, seconds: float | None) -> None:
        if seconds and seconds > 0:
            loop = asyncio.get_running_loop()
            self._hold_until = max(self._hold_until, loop.time() + min(seconds, self.max_retry_after))

    async def describe_view(self, case_id: str, view_slice: ViewSlice, context: Any = None) -> ViewOutcome:
        """Describe one view; retries transient errors, falls back on rejected options; raises :class:`DescribeError`.

        Args:
            case_id: for log messages only (not sent to the server).
            view_slice: the rendered slice.
            context: unused (protocol compatibility).
        """
        if self.dry_run:
            raise RuntimeError("describe_view called in dry-run mode; use estimate()")
        self._ensure_client()
        view = view_slice.view
        attempts = 0
        changes = 0
        while True:
            if self.stop_reason:
                raise DescribeError(f"not sent: the run stopped ({self.stop_reason})", kind="aborted",
                                    attempts=attempts)
            mode = self.mode
            kwargs = self.request_body(view_slice, mode)
            await self._hold()
            attempts += 1
            self.usage.requests += 1
            if attempts > 1:
                self.usage.retries += 1
            try:
                async with self._sem:  # type: ignore[union-attr]
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    try:
                        raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
                        resp = raw.parse()
                    finally:
                        self.in_flight -= 1
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as DescribeError
                kind, retryable, status = self._classify(exc)
                msg = redact(f"{type(exc).__name__}: {exc}")
                if kind == "error":  # not an API error (e.g. an undecodable body): keep the traceback in debug
                    log.debug("%s/%s: unexpected %s from the client", case_id, view, type(exc).__name__, exc_info=True)
                if kind in ("unsupported_response_format", "unsupported_param") and changes < 4:
                    if mode != self.mode or self._fall_back(kind, exc):  # another view may have fallen back already
                        changes += 1
                        continue
                if kind == "unsupported_param":
                    kind = "http_error"
                wait = retry_after_seconds(self._headers(exc), status)
                if retryable and attempts <= self.max_retries:
                    delay = self._delay(attempts, wait)
                    if kind == "rate_limited":
                        self._pause(wait)  # every request waits, not only this one
                    log.info("%s/%s: %s (attempt %d/%d); retrying in %.2fs", case_id, view, kind, attempts,
                             self.max_retries + 1, delay)
                    await asyncio.sleep(delay)
                    continue
                self.usage.failed += 1
                what = "retries exhausted" if retryable else "not retryable"
                raise DescribeError(f"{what} after {attempts} request(s): {msg}", kind=kind, attempts=attempts,
                                    status=status) from None
            break
        self._note_rate_limits(raw.headers)
        return self._outcome(resp, view, attempts, mode, batch=False)

    def _note_rate_limits(self, headers: Mapping[str, str] | None) -> None:
        """Pause new requests when the server says the request window is used up."""
        if not headers:
            return
        for what in ("requests", "tokens"):
            left = headers.get(f"x-ratelimit-remaining-{what}")
            if left is not None and str(left).strip() in ("0", "0.0"):
                self._pause(parse_duration(headers.get(f"x-ratelimit-reset-{what}")))

    def _outcome(self, resp: Any, view: str, attempts: int, mode: str, batch: bool = True) -> ViewOutcome:
        """Account for and validate one answered request (from a batch result, or ``batch=False``: online)."""
        usage = getattr(resp, "usage", None)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0
        ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0
        spent = (self.prices if batch else self.online_prices).cost(pt, ct)
        self.usage.prompt_tokens += pt
        self.usage.completion_tokens += ct
        self.usage.cost_usd += spent
        try:
            vd = self._parse(resp, view)
        except DescribeError as err:
            err.attempts = attempts
            self.usage.failed += 1
            raise
        self.usage.succeeded += 1
        return ViewOutcome(vd, attempts=attempts, prompt_tokens=pt, completion_tokens=ct, cost_usd=spent,
                           response_model=getattr(resp, "model", None), response_format=mode)

    @staticmethod
    def _parse(resp: Any, view: str) -> ViewDescription:
        """Validated :class:`ViewDescription` from a chat completion, or :class:`DescribeError`."""
        if not getattr(resp, "choices", None):
            raise DescribeError("response has no choices", kind="empty")
        choice = resp.choices[0]
        msg = choice.message
        refusal = getattr(msg, "refusal", None)
        if refusal:
            raise DescribeError(f"model refused: {refusal[:300]}", kind="refusal")
        if choice.finish_reason == "length":
            raise DescribeError("answer truncated (finish_reason=length); raise max_tokens", kind="truncated")
        content = msg.content or ""
        if not content.strip():
            raise DescribeError("answer is empty", kind="empty")
        m = _FENCE.match(content)  # some compatible servers wrap JSON in a code fence
        text = m.group(1) if m else content
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DescribeError(f"answer is not valid JSON ({e.msg} at char {e.pos}): {content[:200]!r}",
                                kind="invalid_json") from None
        try:
            vd = ViewDescription.model_validate(data)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(map(str, er['loc'])) or '<root>'}: {er['msg']}" for er in e.errors()[:5])
            raise DescribeError(f"answer does not match the ViewDescription schema: {errs}", kind="schema") from None
        if vd.view != view:
            raise DescribeError(f"answer describes view {vd.view!r}, asked for {view!r}", kind="wrong_view")
        return vd
