"""Vision-language describer over the OpenAI chat-completions API (or any compatible server).

One request per (case, view): a system prompt, a short user text with the view's
geometry, and the 2×2 four-contrast PNG of the slice through the abnormality as a
base64 ``data:`` URL. The answer is forced into the :class:`ViewDescription` JSON schema
(structured output, strict) and validated again with pydantic.

Retries are ours, not the client's (the client is built with ``max_retries=0``): 429,
408/409, 5xx, time-outs and connection errors are retried with exponential backoff and
jitter (honouring ``Retry-After`` when the server sends one), every HTTP request is
counted, and an ``asyncio.Semaphore`` bounds the requests in flight. Anything that
still fails becomes a :class:`~trifuse.semantic.backend.DescribeError` — recorded by
the caller, never replaced by offline output.

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

from trifuse.semantic.backend import API_KEY_ENV, DescribeError, MissingAPIKeyError, Usage, ViewOutcome, redact
from trifuse.semantic.schema import ViewDescription, openai_response_format
from trifuse.semantic.slices import ViewSlice

log = logging.getLogger(__name__)

#: list prices in USD per 1k tokens (gpt-4o, OpenAI pricing page, 2024-08 onward); override per model
GPT4O_PRICE_IN_PER_1K = 0.0025
GPT4O_PRICE_OUT_PER_1K = 0.010

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


def user_text(view_slice: ViewSlice) -> str:
    """The per-request text: view, panel layout and pixel size."""
    fov = view_slice.panel_fov_mm
    return (f"Plane: {view_slice.view}. Each of the four panels is {fov:.0f} mm x {fov:.0f} mm "
            f"({view_slice.mm_per_px:.2f} mm per pixel). Describe the abnormality on this {view_slice.view} slice.")


def image_tokens(width: int, height: int, detail: str = "low", base: int = 85, per_tile: int = 170) -> int:
    """Image input tokens by OpenAI's published rule for GPT-4o-class models.

    ``low``: a flat ``base``. ``high``: fit within 2048², scale the short side to 768,
    count 512-px tiles: ``base + per_tile · tiles`` (OpenAI vision guide, "Calculating costs").
    """
    if detail == "low":
        return base
    w, h = float(width), float(height)
    s = min(1.0, 2048.0 / max(w, h))
    w, h = w * s, h * s
    s = 768.0 / min(w, h) if min(w, h) > 768 else 1.0
    w, h = w * s, h * s
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def _text_tokens(text: str) -> int:
    # ~4 characters per token for English/JSON (OpenAI rule of thumb); tiktoken is not
    # a dependency and an estimate is all a dry run needs
    return int(math.ceil(len(text) / 4))


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
        price_per_1k_input, price_per_1k_output: USD per 1k prompt / completion tokens.
        prompt_version: key into :data:`SYSTEM_PROMPTS`; part of the cache key.
        detail: image ``detail`` (``low`` sees 512×512, which is the size we render).
        max_tokens: completion token cap.
        temperature: sampling temperature (``None``: server default).
        backoff_base, backoff_max: first delay and cap in seconds (``base · 2^(n−1)``).
        jitter: multiplicative jitter fraction (delay × U[1, 1 + jitter]).
        dry_run: never contact the server; :meth:`estimate` counts instead.
        expected_output_tokens: completion tokens assumed by :meth:`estimate`.
        request_kwargs: extra arguments for ``chat.completions.create`` (e.g. ``seed``).

    Raises:
        MissingAPIKeyError: no ``OPENAI_API_KEY`` and not ``dry_run``.
    """

    source = "openai"

    def __init__(self, model: str = "gpt-4o", base_url: str | None = None, concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 60.0,
                 price_per_1k_input: float = GPT4O_PRICE_IN_PER_1K,
                 price_per_1k_output: float = GPT4O_PRICE_OUT_PER_1K, prompt_version: str = "v1",
                 detail: str = "low", max_tokens: int = 600, temperature: float | None = 0.0,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, jitter: float = 0.25,
                 dry_run: bool = False, expected_output_tokens: int = 200,
                 request_kwargs: Mapping[str, Any] | None = None) -> None:
        if prompt_version not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown prompt_version {prompt_version!r}; known: {sorted(SYSTEM_PROMPTS)}")
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")
        if not dry_run and not os.environ.get(API_KEY_ENV):
            raise MissingAPIKeyError(
                f"the OpenAI backend needs the {API_KEY_ENV} environment variable (for a local server "
                f"without auth set it to any placeholder), or use --dry-run or --backend offline")
        self.model = model
        self.base_url = base_url
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.price_in = float(price_per_1k_input)
        self.price_out = float(price_per_1k_output)
        self.prompt_version = prompt_version
        self.detail = detail
        self.max_tokens = int(max_tokens)
        self.temperature = temperature
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.jitter = float(jitter)
        self.dry_run = bool(dry_run)
        self.expected_output_tokens = int(expected_output_tokens)
        self.request_kwargs = dict(request_kwargs or {})
        self.usage = Usage()
        self._rng = random.Random()
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    def __repr__(self) -> str:  # no key, ever
        return (f"OpenAIDescriber(model={self.model!r}, base_url={self.base_url!r}, "
                f"concurrency={self.concurrency}, prompt_version={self.prompt_version!r}, dry_run={self.dry_run})")

    @property
    def system_prompt(self) -> str:
        return SYSTEM_PROMPTS[self.prompt_version]

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
    def messages(self, view_slice: ViewSlice) -> list[dict[str, Any]]:
        """Chat messages for one view: system prompt, text, and the PNG as a data URL."""
        url = "data:image/png;base64," + base64.b64encode(view_slice.png).decode("ascii")
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": [
                {"type": "text", "text": user_text(view_slice)},
                {"type": "image_url", "image_url": {"url": url, "detail": self.detail}},
            ]},
        ]

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for the given token counts."""
        return prompt_tokens / 1000.0 * self.price_in + completion_tokens / 1000.0 * self.price_out

    def estimate(self, view_slice: ViewSlice) -> tuple[int, int, float]:
        """Dry-run estimate for one view: ``(prompt_tokens, completion_tokens, usd)``; counted in usage."""
        schema = json.dumps(openai_response_format(view_slice.view))
        text = self.system_prompt + user_text(view_slice) + schema
        p = _text_tokens(text) + image_tokens(*view_slice.size_px, detail=self.detail) + 3 * 2 + 3
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
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max))
        return d

    @staticmethod
    def _retry_after(exc: Exception) -> float | None:
        resp = getattr(exc, "response", None)
        try:
            value = resp.headers.get("retry-after") if resp is not None else None
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @staticmethod
    def _classify(exc: Exception) -> tuple[str, bool, int | None]:
        """``(kind, retryable, status)`` of an exception from the client."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return "timeout", True, None
        if isinstance(exc, openai.APIConnectionError):
            return "connection", True, None
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            if code == 429:
                return "rate_limited", True, code
            if code >= 500:
                return "server_error", True, code
            if code in (408, 409):
                return "http_error", True, code
            return "http_error", False, code
        if isinstance(exc, openai.APIError):  # e.g. a 200 whose body is not a chat completion
            return "invalid_response", False, None
        return "error", False, None

    async def describe_view(self, case_id: str, view_slice: ViewSlice, context: Any = None) -> ViewOutcome:
        """Describe one view; retries transient errors; raises :class:`DescribeError`.

        Args:
            case_id: for log messages only (not sent to the server).
            view_slice: the rendered slice.
            context: unused (protocol compatibility).
        """
        if self.dry_run:
            raise RuntimeError("describe_view called in dry-run mode; use estimate()")
        self._ensure_client()
        view = view_slice.view
        kwargs: dict[str, Any] = dict(model=self.model, messages=self.messages(view_slice),
                                      response_format=openai_response_format(view), max_tokens=self.max_tokens)
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        kwargs.update(self.request_kwargs)
        attempts = 0
        while True:
            attempts += 1
            self.usage.requests += 1
            if attempts > 1:
                self.usage.retries += 1
            try:
                async with self._sem:  # type: ignore[union-attr]
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    try:
                        resp = await self._client.chat.completions.create(**kwargs)
                    finally:
                        self.in_flight -= 1
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as DescribeError
                kind, retryable, status = self._classify(exc)
                msg = redact(f"{type(exc).__name__}: {exc}")
                if kind == "error":  # not an API error (e.g. an undecodable body): keep the traceback in debug
                    log.debug("%s/%s: unexpected %s from the client", case_id, view, type(exc).__name__, exc_info=True)
                if retryable and attempts <= self.max_retries:
                    delay = self._delay(attempts, self._retry_after(exc))
                    log.info("%s/%s: %s (attempt %d/%d); retrying in %.2fs", case_id, view, kind, attempts,
                             self.max_retries + 1, delay)
                    await asyncio.sleep(delay)
                    continue
                self.usage.failed += 1
                what = "retries exhausted" if retryable else "not retryable"
                raise DescribeError(f"{what} after {attempts} request(s): {msg}", kind=kind, attempts=attempts,
                                    status=status) from None
            break

        pt = int(getattr(resp.usage, "prompt_tokens", 0) or 0) if resp.usage else 0
        ct = int(getattr(resp.usage, "completion_tokens", 0) or 0) if resp.usage else 0
        spent = self.cost(pt, ct)
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
                           response_model=getattr(resp, "model", None))

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
