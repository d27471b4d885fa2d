"""What every describer backend shares: usage accounting, outcomes, errors, redaction."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

from trifuse.semantic.schema import ViewDescription

#: environment variable the OpenAI key is read from (and only from)
API_KEY_ENV = "OPENAI_API_KEY"

_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*]{4,}")


def redact(text: str, env: str = API_KEY_ENV) -> str:
    """Remove the API key (and anything shaped like an OpenAI key) from ``text``.

    Servers sometimes echo part of a bad key in error bodies ("Incorrect API key
    provided: sk-…"); every message this package stores, logs or raises goes through
    here.
    """
    key = os.environ.get(env, "")
    if len(key) >= 4:
        text = text.replace(key, "[REDACTED]")
    return _KEY_PATTERN.sub("sk-[REDACTED]", text)


#: failure kinds that no retry and no other view will fix: they stop a run (the breaker)
FATAL_KINDS = frozenset({"auth", "permission", "not_found", "no_image_input", "unsupported_response_format",
                         "insufficient_quota"})


class MissingAPIKeyError(RuntimeError):
    """The OpenAI backend was requested but the key variable is not set."""


class DescribeError(RuntimeError):
    """One (case, view) could not be described.

    Args:
        message: human-readable reason (already redacted).
        kind: machine-readable category: ``rate_limited``, ``server_error``,
            ``timeout``, ``connection``, ``http_error``, ``invalid_response``, ``invalid_json``, ``schema``,
            ``wrong_view``, ``refusal``, ``truncated``, ``empty``; the fatal kinds ``auth``,
            ``permission``, ``not_found``, ``no_image_input``, ``unsupported_response_format``,
            ``insufficient_quota``; ``aborted`` (not sent: the run stopped); ``refusal_capped``.
        attempts: HTTP requests made for this view.
        status: last HTTP status, if any.
    """

    def __init__(self, message: str, kind: str, attempts: int = 0, status: int | None = None) -> None:
        super().__init__(redact(message))
        self.message = redact(message)
        self.kind = kind
        self.attempts = attempts
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "attempts": self.attempts, "status": self.status}


@dataclass
class ViewOutcome:
    """A successful description of one view plus what it cost.

    Attributes:
        description: the validated view description.
        attempts: HTTP requests made (0 for the offline describer).
        prompt_tokens, completion_tokens: tokens billed for the successful request.
        cost_usd: cost of all attempts that returned usage.
        response_model: model name the server reported.
        response_format: how the answer was constrained (``json_schema``, ``json_object``,
            ``prompt``; ``None`` for the offline describer).
    """

    description: ViewDescription
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    response_model: str | None = None
    response_format: str | None = None


@dataclass
class Usage:
    """Running totals of one backend over a run.

    Attributes:
        requests: HTTP requests sent, retries included.
        retries: requests that were retries of a failed attempt.
        succeeded, failed: views.
        prompt_tokens, completion_tokens: tokens reported by the server.
        cost_usd: from the token counts and the configured prices.
        would_send, est_prompt_tokens, est_completion_tokens, est_cost_usd: dry-run estimates.
    """

    requests: int = 0
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    would_send: int = 0
    est_prompt_tokens: int = 0
    est_completion_tokens: int = 0
    est_cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_usd"] = round(d["cost_usd"], 6)
        d["est_cost_usd"] = round(d["est_cost_usd"], 6)
        return d


@runtime_checkable
class Describer(Protocol):
    """Backend interface used by :func:`trifuse.semantic.describe.describe_cases`.

    ``prepare`` runs in a worker thread once per case (CPU work, sample access);
    ``describe_view`` runs in the event loop once per uncached view and raises
    :class:`DescribeError` on failure; ``estimate`` serves ``--dry-run``.
    """

    source: str
    model: str
    prompt_version: str
    usage: Usage

    def prepare(self, sample: Mapping[str, Any], slices: Mapping[str, Any], abnormality: Any) -> Any: ...

    async def describe_view(self, case_id: str, view_slice: Any, context: Any) -> ViewOutcome: ...

    def estimate(self, view_slice: Any) -> tuple[int, int, float]: ...

    async def aclose(self) -> None: ...
