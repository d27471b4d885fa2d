"""OpenAI describer against a real OpenAI-compatible HTTP server on 127.0.0.1."""
from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from PIL import Image

from trifuse.semantic.backend import MissingAPIKeyError
from trifuse.semantic.describe import SUMMARY_NAME, describe_cases, load_descriptions, select_backend
from trifuse.semantic.offline import OfflineDescriber
from trifuse.semantic.openai_describer import OpenAIDescriber, image_tokens
from trifuse.semantic.schema import VIEWS, Description

FAST = dict(backoff_base=0.01, backoff_max=0.05, jitter=0.1, timeout=5.0)
P_IN, P_OUT = 0.0025, 0.01


def _cases(phantom, n):
    return [phantom(case_id=f"case_{i:03d}", side=("left", "right")[i % 2], seed=i) for i in range(n)]


def _describer(server, **kw):
    kw = {"model": "gpt-4o", "price_per_1k_input": P_IN, "price_per_1k_output": P_OUT, **FAST, **kw}
    return OpenAIDescriber(base_url=server.url, **kw)


def test_happy_path_records_validated(fake_openai, api_key, phantom, tmp_path):
    s = describe_cases(_cases(phantom, 2), _describer(fake_openai), tmp_path)
    assert s.ok and (s.described, s.cached, s.failed, s.cases_complete) == (6, 0, 0, 2)
    assert s.requests == fake_openai.n_requests == 6 and s.retries == 0
    assert (s.prompt_tokens, s.completion_tokens) == (600, 300)
    assert s.cost_usd == pytest.approx(6 * (100 / 1000 * P_IN + 50 / 1000 * P_OUT))
    descs = load_descriptions(tmp_path)
    assert sorted(descs) == ["case_000", "case_001"]
    for d in descs.values():
        assert isinstance(d, Description) and d.source == "openai" and d.model == "gpt-4o"
        assert set(d.views) == set(VIEWS) and set(d.slices) == set(VIEWS)
        assert d.views["axial"].enhancement == "ring" and d.views["axial"].size_mm == 41.5
    # what went over the wire: strict JSON schema for the asked view, a PNG data URL, the key as bearer
    body = fake_openai.bodies[0]
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["additionalProperties"] is False
    assert body["model"] == "gpt-4o" and body["messages"][0]["role"] == "system"
    part = [p for p in body["messages"][1]["content"] if p["type"] == "image_url"][0]
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "PNG" and img.size == (512, 512)
    assert fake_openai.headers[0]["authorization"] == f"Bearer {api_key}"
    assert sorted(fake_openai.requested_view(b) for b in fake_openai.bodies) == sorted(VIEWS * 2)
    saved = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert saved["requests"] == 6 and saved["described"] == 6


@pytest.mark.parametrize("failure", [429, 503, "timeout"])
def test_transient_failure_is_retried(fake_openai, api_key, phantom, tmp_path, failure):
    def script(n, body):
        if n <= 2 and failure != "timeout":
            return failure, {"error": {"message": "slow down", "type": "rate_limit"}}, {}
        return fake_openai.ok(n, body)

    fake_openai.script = script
    if failure == "timeout":  # the first two requests outlive the client time-out
        fake_openai.delay = lambda n: 1.0 if n <= 2 else 0.0
    d = _describer(fake_openai, timeout=0.3, max_retries=3)
    s = describe_cases(_cases(phantom, 1), d, tmp_path, views=("axial",))
    assert s.ok and s.described == 1
    assert fake_openai.n_requests == 3 and s.requests == 3 and s.retries == 2
    # usage is only billed for the answered request
    assert (s.prompt_tokens, s.completion_tokens) == (100, 50)


def test_retries_exhausted_recorded_then_retried_next_run(fake_openai, api_key, phantom, tmp_path):
    fake_openai.script = lambda n, body: (503, {"error": {"message": "overloaded"}}, {})
    cases = _cases(phantom, 1)
    s = describe_cases(cases, _describer(fake_openai, max_retries=2), tmp_path, views=("axial",))
    assert not s.ok and s.failed == 1 and s.described == 0 and s.cases_complete == 0
    assert fake_openai.n_requests == 3 and s.retries == 2
    f = s.failures[0]
    assert (f["case_id"], f["view"], f["kind"], f["attempts"], f["status"]) == ("case_000", "axial", "server_error",
                                                                                3, 503)
    assert "retries exhausted after 3 request(s)" in f["message"]
    report = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert len(report) == 1 and report[0]["kind"] == "server_error"
    assert not (tmp_path / "case_000.json").exists()  # never silently replaced
    assert not any((tmp_path / "cache").glob("*.json"))

    fake_openai.script = fake_openai.ok  # server recovers: the failure is retried
    s2 = describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",))
    assert s2.ok and s2.described == 1 and s2.requests == 1
    assert not (tmp_path / "failures.jsonl").exists() and not list((tmp_path / "failures").glob("*.json"))


def test_bad_answers_are_recorded_failures(fake_openai, api_key, phantom, tmp_path):
    answers = {
        "axial": "{not json at all",
        "coronal": json.dumps(fake_openai.view_answer("coronal", enhancement="spiky")),
        "sagittal": json.dumps(fake_openai.view_answer("axial")),  # answers for the wrong plane
    }
    fake_openai.script = lambda n, body: (200, fake_openai.completion(answers[fake_openai.requested_view(body)]), {})
    s = describe_cases(_cases(phantom, 1), _describer(fake_openai), tmp_path)
    assert s.failed == 3 and s.requests == 3 and s.retries == 0  # bad answers are not retried in-run
    by_view = {f["view"]: f for f in s.failures}
    assert by_view["axial"]["kind"] == "invalid_json" and "not valid JSON" in by_view["axial"]["message"]
    assert by_view["coronal"]["kind"] == "schema" and "enhancement" in by_view["coronal"]["message"]
    assert by_view["sagittal"]["kind"] == "wrong_view"
    assert s.prompt_tokens == 300  # paid for even though unusable
    assert len(list((tmp_path / "failures").glob("*.json"))) == 3 and not (tmp_path / "case_000.json").exists()


def test_second_run_is_served_from_cache(fake_openai, api_key, phantom, tmp_path):
    cases = _cases(phantom, 2)
    s1 = describe_cases(cases, _describer(fake_openai), tmp_path)
    first = {p.name: p.read_text() for p in tmp_path.glob("case_*.json")}
    s2 = describe_cases(cases, _describer(fake_openai), tmp_path)
    assert s1.requests == 6 and s2.requests == 0 and fake_openai.n_requests == 6
    assert (s2.cached, s2.described, s2.cost_usd, s2.cases_complete) == (6, 0, 0.0, 2)
    assert {p.name: p.read_text() for p in tmp_path.glob("case_*.json")} == first
    # another model is another cache key: paid again
    s3 = describe_cases(cases, _describer(fake_openai, model="other-vlm"), tmp_path)
    assert s3.requests == 6 and s3.cached == 0


def test_concurrency_limit_is_honoured(fake_openai, api_key, phantom, tmp_path):
    fake_openai.delay = 0.15
    d = _describer(fake_openai, concurrency=2)
    s = describe_cases(_cases(phantom, 3), d, tmp_path, concurrency=2)
    assert s.ok and fake_openai.n_requests == 9
    assert fake_openai.max_in_flight == 2 and d.max_in_flight == 2


def test_key_never_leaks(fake_openai, api_key, phantom, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)

    def script(n, body):
        if fake_openai.requested_view(body) == "coronal":  # a server that echoes the key back
            return 401, {"error": {"message": f"Incorrect API key provided: {api_key}", "code": "invalid_api_key"}}, {}
        if n == 1:
            return 429, {"error": {"message": f"rate limited for key {api_key}"}}, {}
        return fake_openai.ok(n, body)

    fake_openai.script = script
    d = _describer(fake_openai)
    s = describe_cases(_cases(phantom, 1), d, tmp_path)
    assert s.failed == 1 and s.failures[0]["kind"] == "auth" and s.failures[0]["attempts"] == 1
    assert "REDACTED" in s.failures[0]["message"]
    secret = api_key.encode()
    assert api_key not in caplog.text
    assert api_key not in json.dumps(s.to_dict()) and api_key not in s.format()
    assert api_key not in repr(d) and api_key not in json.dumps(vars(d.usage))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4
    for p in files:
        assert secret not in p.read_bytes(), p
    assert fake_openai.headers[0]["authorization"] == f"Bearer {api_key}"  # it was really used


def test_dry_run_sends_and_writes_nothing(fake_openai, no_api_key, phantom, tmp_path):
    out = tmp_path / "out"
    s = describe_cases(_cases(phantom, 2), "openai", out, base_url=fake_openai.url, dry_run=True,
                       price_per_1k_input=P_IN, price_per_1k_output=P_OUT)
    assert fake_openai.n_requests == 0 and not out.exists()
    assert s.dry_run and s.would_request == 6 and s.requests == 0 and s.described == 0
    assert s.est_prompt_tokens > 6 * image_tokens(512, 512, "low")
    assert s.est_cost_usd == pytest.approx(s.est_prompt_tokens / 1000 * P_IN + s.est_completion_tokens / 1000 * P_OUT)
    assert "would send 6 request(s)" in s.format()


def test_backend_selection(monkeypatch, caplog, api_key):
    caplog.set_level(logging.INFO)
    assert isinstance(select_backend("auto"), OpenAIDescriber)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert isinstance(select_backend("auto"), OfflineDescriber)
    assert "OPENAI_API_KEY is not set: using the OFFLINE describer" in caplog.text
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        select_backend("openai")
    assert isinstance(select_backend("openai", dry_run=True), OpenAIDescriber)
    with pytest.raises(ValueError, match="unknown describe backend"):
        select_backend("claude")


def test_image_token_rule():
    assert image_tokens(512, 512, "low") == 85
    assert image_tokens(512, 512, "high") == 85 + 170 * 1  # 512² fits one tile (short side ≤ 768: no upscale)
    assert image_tokens(1024, 1024, "high") == 85 + 170 * 4  # → 768² → 2×2 tiles
    assert image_tokens(2048, 4096, "high") == 85 + 170 * 6  # → 1024×2048 → 768×1536 → 2×3 tiles


def test_undecodable_response_body_is_a_failure(fake_openai, api_key, phantom, tmp_path):
    fake_openai.script = lambda n, body: (200, "<html>proxy error</html>", {})  # a misconfigured proxy
    s = describe_cases([phantom()], _describer(fake_openai), tmp_path, views=("axial",))
    assert s.failed == 1 and s.requests == 1
    f = s.failures[0]
    assert f["attempts"] == 1 and "not retryable after 1 request(s)" in f["message"]
