"""Fixtures of the semantic-tier tests: a four-contrast brain phantom and a real
OpenAI-compatible HTTP server on 127.0.0.1 (stdlib ``http.server`` in a thread)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
import pytest

from trifuse import keys

FAKE_KEY = "sk-test-TRIFUSE-0123456789-SECRET-abcdef"

BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS storage: index ↑ along axis 0 → subject's left


def phantom_sample(shape=(40, 44, 36), spacing=4.0, centre=None, radius=6.0, side="left",
                   necrotic=True, enhancing=True, oedema=True, affine=None, seed=0, case_id="phantom_001",
                   lesion=True):
    """An ellipsoidal 'brain' with a spherical glioma-like lesion.

    Tumour layout (radii as fractions of ``radius``): necrotic core (r < 0.35; T1/T1ce
    dark, T2 very bright), enhancing rim (0.35 ≤ r < 0.55; T1ce bright), oedema
    (0.55 ≤ r < 1; FLAIR and T2 bright, T1/T1ce mildly dark). Intensities are per-channel z-scored over the brain.

    ``side`` is the subject's side in RAS+: with the BraTS affine (x = -i) the subject's
    left is at large array index along axis 0.
    """
    rng = np.random.default_rng(seed)
    aff = np.asarray(BRATS_AFFINE if affine is None else affine, dtype=float).copy()
    aff[:3, :3] = aff[:3, :3] * spacing
    D, H, W = shape
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    c0 = (np.array(shape) - 1) / 2
    brain = (((g - c0[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) <= 1
    mri = np.zeros((4,) + shape, np.float32)
    base = {keys.T1: 1.0, keys.T1CE: 1.0, keys.T2: 1.0, keys.FLAIR: 1.0}
    for ch, v in base.items():
        mri[ch] = v + 0.05 * rng.standard_normal(shape)
    if lesion:
        if centre is None:
            # x_world = sign * i: the subject's left has smaller x
            sign = np.sign(aff[0, 0])
            off = 0.22 * D
            i = c0[0] + (-off if side == "left" else off) * sign
            centre = (i, c0[1] + 0.2 * H * np.sign(aff[1, 1]), c0[2] + 0.1 * W)  # anterior, a bit superior
        r = np.sqrt(((g - np.array(centre)[:, None, None, None]) ** 2).sum(0)) / radius
        core, rim, ed = r < 0.35, (r >= 0.35) & (r < 0.55), (r >= 0.55) & (r < 1.0)
        if not necrotic:
            rim, core = rim | core, np.zeros_like(core)
        if not enhancing:
            ed, rim, core = ed | rim | core, np.zeros_like(rim), np.zeros_like(core)
        if not oedema:
            ed = np.zeros_like(ed)
        tum = (core | rim | ed) & brain
        mri[keys.FLAIR][tum] = 3.0
        mri[keys.T2][tum] = 3.0
        mri[keys.T2][core & brain] = 5.0
        mri[keys.T1][tum] = 0.6  # T1-hypointense lesion, on both pre- and post-contrast T1
        mri[keys.T1CE][tum] = 0.6
        mri[keys.T1CE][rim & brain] = 4.0
        mri[keys.T1][core & brain] = 0.3
        mri[keys.T1CE][core & brain] = 0.3
    mri = mri + 0.05 * rng.standard_normal(mri.shape).astype(np.float32)
    for ch in range(4):  # z-score over brain, 0 outside (the sample contract)
        v = mri[ch][brain]
        mri[ch] = np.where(brain, (mri[ch] - v.mean()) / v.std(), 0.0)
    meta = {"spacing": [spacing] * 3, "affine": aff.tolist(), "year": 2021,
            "crop_box": [[0, D], [0, H], [0, W]], "shape": list(shape), "applied": []}
    return {keys.CASE_ID: case_id, keys.MRI: mri.astype(np.float32), keys.BRAIN: brain[None], keys.META: meta}


def view_answer(view: str, **overrides: Any) -> dict:
    """A valid ViewDescription payload for ``view``."""
    d = {"view": view, "hemisphere": "left", "lobes": ["frontal"], "size_mm": 41.5, "enhancement": "ring",
         "necrosis": True, "oedema": "moderate", "mass_effect": True,
         "impression": "Left frontal ring-enhancing mass with necrosis."}
    d.update(overrides)
    return d


def completion(content: str, prompt_tokens: int = 100, completion_tokens: int = 50, model: str = "gpt-4o",
               finish_reason: str = "stop") -> dict:
    """A chat.completion object as the OpenAI API returns it."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def requested_view(body: dict) -> str:
    """The view a request asks for (from its JSON schema, or from the user text without one)."""
    rf = body.get("response_format") or {}
    if rf.get("type") == "json_schema":
        return rf["json_schema"]["schema"]["properties"]["view"]["enum"][0]
    text = [p for p in body["messages"][1]["content"] if p["type"] == "text"][0]["text"]
    return text.split("Plane: ", 1)[1].split(".", 1)[0]


class FakeOpenAIServer:
    """OpenAI-compatible ``POST /v1/chat/completions``, scripted per test.

    ``script(n, body) -> (status, payload, headers)`` is called for the n-th request
    (1-based); the default answers a valid description of the requested view.
    ``delay`` (s) is slept while the request counts as in flight.
    """

    def __init__(self) -> None:
        self.script: Callable[[int, dict], tuple[int, Any, dict]] = self.ok
        self.delay: float | Callable[[int], float] = 0.0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.times: list[float] = []  # monotonic arrival time of each chat request
        self.batch_bodies: list[dict] = []  # chat request bodies that arrived through a batch
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802
                status, payload = server.batch_api.get(self.path.rstrip("/"))
                self._send(status, payload, {})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.rstrip("/")
                if path in ("/v1/files", "/v1/batches"):
                    status, payload = server.batch_api.post(path, raw, self.headers.get("Content-Type", ""))
                    return self._send(status, payload, {})
                if path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}}, {})
                body = json.loads(raw)
                with server.lock:
                    server.times.append(time.monotonic())
                    server.bodies.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    n = len(server.bodies)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    d = server.delay(n) if callable(server.delay) else server.delay
                    if d:
                        time.sleep(d)
                    status, payload, headers = server.script(n, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                try:
                    self._send(status, payload, headers)
                except (BrokenPipeError, ConnectionResetError):  # client timed out and left
                    pass

            def _send(self, status: int, payload: Any, headers: dict) -> None:
                if isinstance(payload, bytes):
                    data = payload
                else:
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.batch_api = FakeBatchAPI(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def ok(n: int, body: dict) -> tuple[int, Any, dict]:
        return 200, completion(json.dumps(view_answer(requested_view(body)))), {}

    @property
    def n_requests(self) -> int:
        return len(self.bodies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeBatchAPI:
    """OpenAI Batch API on the same server: ``POST /v1/files`` (multipart upload),
    ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/files/{id}/content``.

    A batch stays ``in_progress`` for ``polls_before_done`` status polls, then runs every
    line through the server's chat ``script`` (same answers as online) and completes.
    """

    def __init__(self, server: "FakeOpenAIServer") -> None:
        self.server = server
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.polls_before_done = 1
        self.uploads = 0
        self.creates = 0
        self.lock = threading.Lock()

    def post(self, path: str, raw: bytes, ctype: str) -> tuple[int, Any]:
        import email.parser
        import email.policy

        with self.lock:
            if path == "/v1/files":
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
                data = next(p.get_payload(decode=True) for p in msg.iter_parts() if p.get_filename())
                self.uploads += 1
                fid = f"file-{len(self.files) + 1}"
                self.files[fid] = data
                return 200, {"id": fid, "object": "file", "bytes": len(data), "created_at": 1700000000,
                             "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}
            body = json.loads(raw)
            self.creates += 1
            bid = f"batch_{len(self.batches) + 1}"
            self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                                 "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                                 "status": "validating", "output_file_id": None, "error_file_id": None,
                                 "created_at": 1700000000, "metadata": body.get("metadata")}
            self.polls[bid] = 0
            return 200, self.batches[bid]

    def get(self, path: str) -> tuple[int, Any]:
        with self.lock:
            parts = path.strip("/").split("/")
            if len(parts) == 3 and parts[1] == "batches" and parts[2] in self.batches:
                b = self.batches[parts[2]]
                self.polls[b["id"]] += 1
                if b["status"] != "completed" and self.polls[b["id"]] > self.polls_before_done:
                    b["output_file_id"] = self._run(b)
                    b["status"] = "completed"
                elif b["status"] == "validating":
                    b["status"] = "in_progress"
                return 200, b
            if len(parts) == 4 and parts[1] == "files" and parts[3] == "content" and parts[2] in self.files:
                return 200, self.files[parts[2]]
        return 404, {"error": {"message": f"no such object {path}"}}

    def _run(self, batch: dict) -> str:
        out = []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            req = json.loads(line)
            with self.server.lock:
                self.server.batch_bodies.append(req["body"])
                n = len(self.server.batch_bodies)
            status, payload, _ = self.server.script(n, req["body"])
            out.append(json.dumps({"id": f"req_{n}", "custom_id": req["custom_id"],
                                   "response": {"status_code": status, "request_id": f"r{n}", "body": payload},
                                   "error": None}))
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = ("\n".join(out) + "\n").encode()
        return fid


@pytest.fixture
def fake_openai():
    server = FakeOpenAIServer()
    yield server
    server.close()


@pytest.fixture
def api_key(monkeypatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return FAKE_KEY


@pytest.fixture
def no_api_key(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def phantom():
    """Factory ``phantom(**kw) -> sample dict`` (see :func:`phantom_sample`)."""
    return phantom_sample


# helpers reachable from test modules through the fixture object
FakeOpenAIServer.completion = staticmethod(completion)
FakeOpenAIServer.view_answer = staticmethod(view_answer)
FakeOpenAIServer.requested_view = staticmethod(requested_view)


# --- the CLIP model shared by test_clip_train.py and test_priors_semantic.py -------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2-thread OpenMP kernels spin and run ~20x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def setup(tmp_path_factory, synthetic_cohort):
    """Describe the cohort offline and train the test CLIP once per session (cached on disk)."""
    from trifuse.io.cache import load_sample
    from trifuse.io.manifest import read_manifest
    from trifuse.semantic.clip import ClipConfig, data_fingerprint, save_clip, train_clip
    from trifuse.semantic.describe import describe_cases, load_descriptions

    config = ClipConfig(image_size=32, width=8, epochs=10, batch_size=32, seed=0)
    data, cache = synthetic_cohort
    base = tmp_path_factory.getbasetemp() / "semantic_shared"
    ids = [c["case_id"] for c in read_manifest(cache)["cases"]]
    desc_dir = base / "descriptions"
    if len(load_descriptions(desc_dir) if desc_dir.is_dir() else {}) < len(ids):
        describe_cases((load_sample(cache, c) for c in ids), "offline", desc_dir)
    descriptions = load_descriptions(desc_dir)
    ckpt = base / "clip.pt"
    if not ckpt.exists():
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            res = train_clip(cache, descriptions, ids, config)
        finally:
            torch.set_num_threads(n)
        save_clip(ckpt, res.model, fingerprint=data_fingerprint(descriptions, ids, config, cache))
    return {"data": data, "cache": cache, "ids": ids, "descriptions": descriptions, "desc_dir": desc_dir, "ckpt": ckpt, "config": config}
