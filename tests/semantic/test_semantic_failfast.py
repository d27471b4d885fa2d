"""Fail fast and fail clear, against a real OpenAI-compatible HTTP server on 127.0.0.1:
preflight, breaker, fatal kinds, response-format fallback, per-family options, rate-limit
headers, refusal cap, cache key, prices, and one description set per run."""
from __future__ import annotations

import json
import socket

import pytest

from trifuse.semantic.describe import MANIFEST_NAME, describe_cases, load_descriptions
from trifuse.semantic.openai_describer import OpenAIDescriber
from trifuse.semantic.pricing import family_image_tokens, model_family, resolve_prices
from trifuse.semantic.provenance import DescriberMismatchError

FAST = dict(backoff_base=0.01, backoff_max=0.05, jitter=0.1, timeout=5.0)


def _cases(phantom, n):
    return [phantom(case_id=f"case_{i:03d}", side=("left", "right")[i % 2], seed=i) for i in range(n)]


def _describer(server, **kw):
    return OpenAIDescriber(base_url=server.url, **{"model": "gpt-4o", **FAST, **kw})


def _err(message, type_="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


FATAL = {
    "401": (401, _err("Incorrect API key provided: sk-xx**yy.", code="invalid_api_key"), "auth"),
    "403": (403, _err("Project does not have access to this model.", code="model_access_denied"), "permission"),
    "404": (404, _err("The model `gpt-5o` does not exist or you do not have access to it.", code="model_not_found"),
            "not_found"),
    "no_images": (400, _err("Invalid content type. image_url is only supported by certain models.",
                            param="messages.[1].content.[1].type"), "no_image_input"),
    "insufficient_quota": (429, _err("You exceeded your current quota, please check your plan and billing details.",
                                     type_="insufficient_quota", code="insufficient_quota"), "insufficient_quota"),
    # a server that rejects every response_format, and still says so without one
    "response_format": (400, _err("response_format is not supported by this server", param="response_format"),
                        "unsupported_response_format"),
}


@pytest.mark.parametrize("behaviour", sorted(FATAL))
def test_fatal_server_behaviour_stops_after_a_handful(fake_openai, api_key, phantom, tmp_path, behaviour):
    status, payload, kind = FATAL[behaviour]
    fake_openai.script = lambda n, body: (status, payload, {})
    s = describe_cases(_cases(phantom, 4), _describer(fake_openai, max_retries=5), tmp_path, concurrency=8)
    # the preflight request fails: nothing else is sent (the response-format case tries its 3 modes)
    assert fake_openai.n_requests == (3 if behaviour == "response_format" else 1), behaviour
    assert s.aborted and kind in s.aborted and "preflight" in s.aborted
    assert not s.ok and s.described == 0 and s.failed == 1 and s.skipped == 2 and s.cases == 1  # no other case loaded
    assert not list((tmp_path / "cache").glob("*.json")) and not list(tmp_path.glob("case_*.json"))
    assert s.failures[0]["kind"] == kind


def test_breaker_stops_mid_run_on_quota(fake_openai, api_key, phantom, tmp_path):
    quota = FATAL["insufficient_quota"]
    fake_openai.script = lambda n, body: fake_openai.ok(n, body) if n <= 2 else quota[:2] + ({},)
    s = describe_cases(_cases(phantom, 20), _describer(fake_openai, concurrency=2), tmp_path, concurrency=2)
    assert s.aborted and "insufficient_quota" in s.aborted and "3 fatal" in s.aborted
    assert s.described == 2 and fake_openai.n_requests <= 2 + 3 + 2  # threshold + what was in flight
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_wrong_base_url_stops_after_the_preflight_retries(api_key, phantom, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    d = OpenAIDescriber(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, **FAST)
    s = describe_cases(_cases(phantom, 5), d, tmp_path)
    assert s.aborted and "connection" in s.aborted and s.requests == 3 and s.cases == 1


def test_json_schema_then_json_object_then_prompt_only(fake_openai, api_key, phantom, tmp_path):
    def script(n, body):
        rf = body.get("response_format")
        if rf is not None:
            return 400, _err(f"response_format type {rf['type']!r} is not supported", param="response_format"), {}
        # prompt-only: the schema must be in the system prompt; answer with a fenced JSON object
        assert '"enhancement"' in body["messages"][0]["content"]
        return 200, fake_openai.completion("```json\n" + json.dumps(fake_openai.view_answer(
            fake_openai.requested_view(body))) + "\n```"), {}

    fake_openai.script = script
    s = describe_cases(_cases(phantom, 2), _describer(fake_openai), tmp_path)
    assert s.ok and s.described == 6 and s.fallbacks == ["response_format json_schema -> json_object",
                                                        "response_format json_object -> prompt"]
    types = [(b.get("response_format") or {}).get("type") for b in fake_openai.bodies]
    assert types[:3] == ["json_schema", "json_object", None] and set(types[3:]) == {None}
    assert fake_openai.n_requests == 8  # 2 fallbacks, then one request per view
    recs = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert len(recs) == 6 and {r["response_format"] for r in recs} == {"prompt"}
    assert len(load_descriptions(tmp_path)) == 2


def test_request_options_follow_the_model_family(fake_openai, api_key, phantom, tmp_path):
    describe_cases(_cases(phantom, 1), _describer(fake_openai, model="o4-mini"), tmp_path / "a", views=("axial",))
    b = fake_openai.bodies[-1]
    assert "temperature" not in b and "max_tokens" not in b and b["max_completion_tokens"] >= 4000
    describe_cases(_cases(phantom, 1), _describer(fake_openai, model="gpt-4o"), tmp_path / "b", views=("axial",))
    b = fake_openai.bodies[-1]
    assert b["temperature"] == 0.0 and b["max_tokens"] == 600

    def script(n, body):  # an unknown model that rejects temperature: dropped, asked again
        if "temperature" in body:
            return 400, _err("Unsupported value: 'temperature' does not support 0.0 with this model.",
                             code="unsupported_value", param="temperature"), {}
        return fake_openai.ok(n, body)

    fake_openai.script = script
    n0 = fake_openai.n_requests
    s = describe_cases(_cases(phantom, 1), _describer(fake_openai, model="my-vlm"), tmp_path / "c", views=("axial",))
    assert s.ok and fake_openai.n_requests - n0 == 2 and s.fallbacks == ["temperature dropped"]


def test_retry_after_ms_and_rate_limit_headers_are_honoured(fake_openai, api_key, phantom, tmp_path):
    def script(n, body):
        if n == 1:
            return 429, _err("Rate limit reached", type_="requests", code="rate_limit_exceeded"), {"retry-after-ms": "400"}
        if n == 2:  # answered, but the request window is used up for 300 ms
            return 200, fake_openai.ok(n, body)[1], {"x-ratelimit-remaining-requests": "0",
                                                    "x-ratelimit-reset-requests": "300ms"}
        return fake_openai.ok(n, body)

    fake_openai.script = script
    s = describe_cases(_cases(phantom, 1), _describer(fake_openai, backoff_base=0.001, backoff_max=0.002), tmp_path,
                       views=("axial", "coronal"))
    assert s.ok and fake_openai.n_requests == 3
    t = fake_openai.times
    assert t[1] - t[0] >= 0.38 and t[2] - t[1] >= 0.28


def test_refused_views_are_not_re_requested_without_limit(fake_openai, api_key, phantom, tmp_path):
    refusal = fake_openai.completion("")
    refusal["choices"][0]["message"]["refusal"] = "I can't help with that."
    fake_openai.script = lambda n, body: (200, refusal, {})
    cases = _cases(phantom, 1)
    counts = []
    for _ in range(3):
        n0 = fake_openai.n_requests
        s = describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",))
        counts.append(fake_openai.n_requests - n0)
    assert counts == [1, 1, 0] and s.refusal_capped == 1 and s.failures[0]["kind"] == "refusal_capped"
    n0 = fake_openai.n_requests
    describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",), retry_refused=True)
    assert fake_openai.n_requests - n0 == 1


@pytest.mark.parametrize("change", [{"detail": "high"}, {"max_tokens": 900}, {"temperature": 0.5},
                                    {"response_format": "json_object"}, {"request_kwargs": {"seed": 1}}])
def test_cache_key_covers_every_request_parameter(fake_openai, api_key, phantom, tmp_path, change):
    cases = _cases(phantom, 1)
    describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",))
    s = describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",))
    assert s.cached == 1 and fake_openai.n_requests == 1
    s = describe_cases(cases, _describer(fake_openai, **change), tmp_path, views=("axial",))
    assert s.cached == 0 and fake_openai.n_requests == 2


def test_cache_key_covers_the_prompt_text(fake_openai, api_key, phantom, tmp_path, monkeypatch):
    from trifuse.semantic import openai_describer as od

    cases = _cases(phantom, 1)
    describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",))
    monkeypatch.setitem(od.SYSTEM_PROMPTS, "v1", od.SYSTEM_PROMPTS["v1"] + " Be brief.")
    s = describe_cases(cases, _describer(fake_openai), tmp_path, views=("axial",))
    assert s.cached == 0 and fake_openai.n_requests == 2


def test_prices_per_family_and_zero_for_local_servers():
    assert model_family("gpt-4o-mini-2024-07-18").name == "gpt-4o-mini"
    assert model_family("gpt-4o-2024-11-20").name == "gpt-4o"
    big, mini = resolve_prices("gpt-4o", None), resolve_prices("gpt-4o-mini", None)
    assert (big.input, big.output, mini.input, mini.output) == (2.5, 10.0, 0.15, 0.6)
    assert resolve_prices("gpt-4o", None, batch=True).input == 1.25
    assert resolve_prices("gpt-4o", "http://localhost:8000/v1").cost(10**6, 10**6) == 0.0
    assert resolve_prices("llava", "http://localhost:8000/v1", 1.0, 2.0).cost(10**6, 10**6) == 3.0
    # image tokens per family: gpt-4o-mini bills 2833 for a low-detail image, gpt-4.1-mini by 32-px patches
    assert family_image_tokens("gpt-4o", 512, 512) == 85 and family_image_tokens("gpt-4o-mini", 512, 512) == 2833
    assert family_image_tokens("gpt-4.1-mini", 512, 512) == 415  # 16·16 patches × 1.62


def test_dry_run_costs_the_model_and_prints_an_eta(fake_openai, no_api_key, phantom, tmp_path):
    runs = {m: describe_cases(_cases(phantom, 2), "openai", tmp_path / m, model=m, dry_run=True)
            for m in ("gpt-4o", "gpt-4o-mini")}
    big, mini = runs["gpt-4o"], runs["gpt-4o-mini"]
    assert big.would_request == mini.would_request == 6 and fake_openai.n_requests == 0
    assert mini.est_prompt_tokens > big.est_prompt_tokens  # 2833 image tokens instead of 85
    assert 0 < mini.est_cost_usd < big.est_cost_usd
    assert "ETA ~" in big.format() and "gpt-4o $2.50/$10.00 per 1M" in big.format()
    local = describe_cases(_cases(phantom, 2), "openai", tmp_path / "l", base_url=fake_openai.url, dry_run=True)
    assert local.est_cost_usd == 0.0 and "not OpenAI's server" in local.format()


def test_stale_offline_plus_failed_openai_run_is_refused(synthetic_cohort, fake_openai, api_key, tmp_path, capsys):
    from lightning_app.cli import main

    data, cache = synthetic_cohort
    desc = tmp_path / "desc"
    assert main(["describe", "--data", str(data), "--cache", str(cache), "--out", str(desc), "--backend", "offline",
                 "--no-progress"]) == 0
    fake_openai.script = lambda n, body: FATAL["401"][:2] + ({},)
    assert main(["describe", "--data", str(data), "--cache", str(cache), "--out", str(desc), "--backend", "openai",
                 "--base-url", fake_openai.url, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped after 1 request(s)" in err and "auth" in err
    assert json.loads((desc / MANIFEST_NAME).read_text())["describer"]["backend"] == "openai"
    with pytest.raises(DescriberMismatchError, match="offline/trifuse-offline"):
        load_descriptions(desc)
    for stage in ("clip", "semantic"):
        assert main([stage, "--data", str(data), "--cache", str(cache), "--descriptions", str(desc)]) == 1
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "mixes describers" in line and "BraTS2021_00000" in line and "openai/gpt-4o" in line, line


def test_batch_api_end_to_end_with_restart_mid_batch(fake_openai, api_key, phantom, tmp_path):
    cases = _cases(phantom, 3)
    api = fake_openai.batch_api
    api.polls_before_done = 3
    prices = dict(price_input=2.0, price_output=8.0)  # standard tier; the batch pays half
    s1 = describe_cases(cases, _describer(fake_openai, batch=True, **prices), tmp_path, batch_poll_s=0.02,
                        batch_max_wait_s=0.0)
    # the preflight went online alone; the other 8 views are in one uploaded batch, still running
    assert fake_openai.n_requests == 1 and (api.uploads, api.creates) == (1, 1)
    assert s1.batch_requests == 8 and s1.batch_pending == ["batch_1"] and not s1.ok and s1.cases_complete == 0
    state = json.loads((tmp_path / "batches" / "state.json").read_text())
    assert [b["id"] for b in state["batches"]] == ["batch_1"] and len(state["batches"][0]["keys"]) == 8
    lines = [json.loads(x) for x in api.files["file-1"].decode().splitlines()]
    assert {x["url"] for x in lines} == {"/v1/chat/completions"} and lines[0]["body"]["model"] == "gpt-4o"

    # a restart (new process, new describer): the stored batch is polled and collected, nothing re-uploaded
    s2 = describe_cases(cases, _describer(fake_openai, batch=True, **prices), tmp_path, batch_poll_s=0.02)
    assert (api.uploads, api.creates) == (1, 1) and fake_openai.n_requests == 1
    assert s2.ok and (s2.cached, s2.described, s2.cases_complete) == (1, 8, 3)
    assert not (tmp_path / "batches" / "state.json").exists()
    assert s2.cost_usd == pytest.approx(8 * (100 * 1.0 + 50 * 4.0) / 1e6)  # half of 2.0 / 8.0 per 1M
    recs = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert sum(r.get("batch_id") == "batch_1" for r in recs) == 8 and len(recs) == 9
    descs = load_descriptions(tmp_path)
    assert sorted(descs) == ["case_000", "case_001", "case_002"]
    assert all(d.views["axial"].enhancement == "ring" for d in descs.values())
    # a third run is all cache
    s3 = describe_cases(cases, _describer(fake_openai, batch=True, **prices), tmp_path, batch_poll_s=0.02)
    assert s3.cached == 9 and api.uploads == 1 and s3.batch_requests == 0


def test_batch_results_are_validated_and_failures_recorded(fake_openai, api_key, phantom, tmp_path):
    def script(n, body):
        if fake_openai.requested_view(body) == "sagittal":
            return 200, fake_openai.completion(json.dumps(fake_openai.view_answer("sagittal", oedema="vast"))), {}
        return fake_openai.ok(n, body)

    fake_openai.script = script
    s = describe_cases(_cases(phantom, 2), _describer(fake_openai, batch=True), tmp_path, batch_poll_s=0.02)
    assert s.failed == 2 and {f["kind"] for f in s.failures} == {"schema"} and s.cases_complete == 0
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4


def test_progress_bar_counts_done_failed_cached_tokens_and_cost(fake_openai, api_key, phantom, tmp_path, capsys):
    fake_openai.script = lambda n, body: (fake_openai.ok(n, body) if fake_openai.requested_view(body) != "sagittal"
                                          else (200, fake_openai.completion("{bad"), {}))
    describe_cases(_cases(phantom, 2), _describer(fake_openai, price_input=1.0, price_output=2.0), tmp_path,
                   progress=True, total=2)
    err = capsys.readouterr().err
    last = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("describe") and "done=" in ln][-1]
    assert "2/2" in last and "done=4" in last and "failed=2" in last and "cached=0" in last
    assert "tok=900" in last and "usd=0.00" in last  # 6 × (100 + 50) tokens
