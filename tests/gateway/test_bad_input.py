"""The bad-input catalogue: what a client can get wrong, over every surface, and what it gets back.

Each row is sent for real: REST requests to a real gateway on the real apiserver (`POST /` as JSON
and multipart, `/v1/audio/*`, the API key), TranscriptionJobs through `kubectl apply`, and the
inputs only a runner can judge (a 404, HTML instead of audio, a truncated mp3, silence, zero bytes,
a redirect to a private address, an upload the runner cannot fetch) through the real operator,
the kubelet stand-in and a real runner (tiny.en on CPU). The rule: a 4xx that names the field, or
a Failed job whose reason and message say what to fix; never a 500, a crash or a stuck job.

    IFW_CATALOGUE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/gateway/test_bad_input.py

prints the case -> outcome table (also with -v).
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import threading
import uuid
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import Driver, Server, free_port
from tests.speaking import speak

# A mono 16 kHz PCM WAV header (fmt chunk: 1 channel), no samples: the gateway reads the channel count.
MONO_WAV_HEADER = (b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little") + bytes([1, 0, 1, 0])
                   + (16000).to_bytes(4, "little") + (32000).to_bytes(4, "little") + bytes([2, 0, 16, 0]) + b"data"
                   + bytes(4))  # fmt: skip
pytestmark = pytest.mark.cluster

KEY = "catalogue-key"
AUTH = {"x-admin-api-key": KEY}
URL = "https://media.example.com/talk.mp3"
HOOK = "https://hooks.example.com/done"
WAV = ("a.wav", b"RIFF0000WAVEfmt ", "audio/wav")

# Filled as the cases run; conftest prints it (IFW_CATALOGUE=1 or -v).
OUTCOMES: list[tuple[str, str, str, str]] = []  # (surface, case, sent, outcome)


@dataclass(frozen=True)
class Rest:
    """One request and what must come back: its status, and the field the answer names."""

    id: str
    sent: str  # the case in words, for the table
    status: int
    names: str  # a field (loc / param) or a word the detail must contain
    path: str = "/"
    json: Any = None
    data: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    method: str = "POST"


def j(id: str, sent: str, status: int, names: str, **body: Any) -> Rest:
    """POST / with a JSON body."""
    return Rest(id, sent, status, names, json=body)


def form(id: str, sent: str, status: int, names: str, files: dict[str, Any] | None = None, **data: Any) -> Rest:
    """POST / as multipart (fields without a file go as parts without a filename: still multipart)."""
    if files is None:
        return Rest(id, sent, status, names, files={k: (None, v) for k, v in data.items()})
    return Rest(id, sent, status, names, data=data or None, files=files)


def oa(id: str, sent: str, status: int, names: str, files: dict[str, Any] | None = None,
       path: str = "/v1/audio/transcriptions", **data: Any) -> Rest:  # fmt: skip
    """An OpenAI route, multipart, with a bearer key as the SDKs send it."""
    return Rest(id, sent, status, names, path=path, data=data or None, files=files if files is not None else {"file": WAV},
                headers={"authorization": f"Bearer {KEY}"})  # fmt: skip


REST_CASES = [
    # ---------------------------------------------------------------- POST / JSON: url
    j("url-missing", "no url", 422, "url"),
    j("url-type", "url: 123", 422, "url", url=123),
    j("url-empty", 'url: ""', 400, "URL", url=""),  # the original API's 400 Invalid URL
    j("url-blank", 'url: "   "', 400, "URL", url="   "),
    j("url-huge", "url of 3000 characters", 422, "url", url="https://example.com/" + "a" * 3000),
    j("url-ftp", "url: ftp://...", 400, "URL", url="ftp://media.example.com/a.mp3"),
    j("url-file", "url: file:///etc/passwd", 400, "URL", url="file:///etc/passwd"),
    j("url-javascript", "url: javascript:...", 400, "URL", url="javascript:alert(1)"),
    j("url-no-host", "url: https://", 422, "url", url="https://"),
    j("url-not-a-url", "url: http//no-colon/a.mp3", 422, "url", url="http//no-colon/a.mp3"),
    j("url-userinfo", "url: http://user:pass@host/a.wav", 422, "url", url="http://user:pass@media.example.com/a.wav"),
    j("url-token-userinfo", "url: https://token@host/a.wav", 422, "url", url="https://ghp_x1y2@media.example.com/a.wav"),
    j("url-loopback", "url: http://127.0.0.1/", 422, "url", url="http://127.0.0.1/a.mp3"),
    j("url-loopback-v6", "url: http://[::1]/", 422, "url", url="http://[::1]/a.mp3"),
    j("url-localhost", "url: http://localhost:8080/", 422, "url", url="http://localhost:8080/a.mp3"),
    j("url-metadata-name", "url: http://metadata.google.internal/...", 422, "url",
      url="http://metadata.google.internal/computeMetadata/v1/"),
    j("url-metadata-ip", "url: http://169.254.169.254/...", 422, "url", url="http://169.254.169.254/latest/meta-data/"),
    j("url-private", "url: http://10.0.0.8/", 422, "url", url="http://10.0.0.8/a.mp3"),
    j("url-decimal-ip", "url: http://2130706433/ (127.0.0.1 as a number)", 422, "url", url="http://2130706433/a.mp3"),
    j("url-mapped-v6", "url: http://[::ffff:10.0.0.1]/", 422, "url", url="http://[::ffff:10.0.0.1]/a.mp3"),
    # ---------------------------------------------------------------- POST / JSON: other fields
    j("task-enum", 'task: "foo"', 422, "task", url=URL, task="foo"),
    j("task-type", "task: 1", 422, "task", url=URL, task=1),
    j("timestamp-enum", 'timestamp: "sentence"', 422, "timestamp", url=URL, timestamp="sentence"),
    j("batch-zero", "batch_size: 0", 422, "batch_size", url=URL, batch_size=0),
    j("batch-huge", "batch_size: 10**12", 422, "batch_size", url=URL, batch_size=10**12),
    j("batch-text", 'batch_size: "64abc"', 422, "batch_size", url=URL, batch_size="64abc"),
    j("batch-fraction", "batch_size: 3.5", 422, "batch_size", url=URL, batch_size=3.5),
    j("temperature-range", "temperature: -0.1", 422, "temperature", url=URL, temperature=-0.1),
    j("temperature-type", 'temperature: "hot"', 422, "temperature", url=URL, temperature="hot"),
    j("language-unknown", 'language: "klingon"', 422, "language", url=URL, language="klingon"),
    j("language-unicode", 'language: "日本語"', 422, "language", url=URL, language="日本語"),
    j("language-type", "language: 42", 422, "language", url=URL, language=42),
    j("diarise-type", 'diarise_audio: "perhaps"', 422, "diarise_audio", url=URL, diarise_audio="perhaps"),
    j("task-id-empty", 'managed_task_id: ""', 422, "managed_task_id", url=URL, managed_task_id=""),
    j("task-id-huge", "managed_task_id of 257 characters", 422, "managed_task_id", url=URL, managed_task_id="x" * 257),
    j("task-id-control", "managed_task_id with a BEL", 422, "managed_task_id", url=URL, managed_task_id="bell\a"),
    j("task-id-line-separator", "managed_task_id with U+2028", 422, "managed_task_id", url=URL, managed_task_id="a\u2028b"),
    j("task-id-type", "managed_task_id: 123", 422, "managed_task_id", url=URL, managed_task_id=123),
    j("prompt-long", "prompt of 2001 characters", 422, "prompt", url=URL, prompt="x" * 2001),
    j("prompt-huge", "prompt of 60 000 characters", 422, "prompt", url=URL, prompt="é" * 30_000),
    j("model-path", 'model: "../../etc/passwd"', 422, "model", url=URL, model="../../etc/passwd"),
    j("model-not-offered", 'model: "large-v9" (not offered)', 422, "model", url=URL, model="large-v9"),
    j("speakers-no-diarise", "num_speakers without diarise_audio", 422, "num_speakers", url=URL, num_speakers=2),
    j("speakers-zero", "num_speakers: 0", 422, "num_speakers", url=URL, diarise_audio=True, num_speakers=0),
    j("speakers-min-over-max", "min_speakers 3 > max_speakers 2", 422, "max_speakers",
      url=URL, diarise_audio=True, min_speakers=3, max_speakers=2),
    # ---------------------------------------------------------------- POST / JSON: webhook
    j("webhook-type", 'webhook: "https://..."', 422, "webhook", url=URL, webhook=HOOK),
    j("webhook-scheme", "webhook.url: gopher://", 422, "webhook.url", url=URL, webhook={"url": "gopher://x/"}),
    j("webhook-private", "webhook.url: http://192.168.1.1/", 422, "webhook.url", url=URL,
      webhook={"url": "http://192.168.1.1/hook"}),
    j("webhook-loopback", "webhook.url: http://127.0.0.1:9/", 422, "webhook.url", url=URL,
      webhook={"url": "http://127.0.0.1:9/hook"}),
    j("webhook-metadata", "webhook.url: http://metadata.google.internal/", 422, "webhook.url", url=URL,
      webhook={"url": "http://metadata.google.internal/"}),
    j("webhook-userinfo", "webhook.url: https://user:pass@hooks/", 422, "webhook.url", url=URL,
      webhook={"url": "https://user:pass@hooks.example.com/done"}),
    j("webhook-header-name", 'webhook.header {"bad header": ...}', 422, "webhook.header", url=URL,
      webhook={"url": HOOK, "header": {"bad header": "x"}}),
    j("webhook-header-crlf", "webhook.header value with CRLF", 422, "webhook.header", url=URL,
      webhook={"url": HOOK, "header": {"X-A": "v\r\nInjected: 1"}}),
    j("webhook-header-many", "webhook.header with 33 entries", 422, "webhook.header", url=URL,
      webhook={"url": HOOK, "header": {f"X-{i}": "v" for i in range(33)}}),
    j("async-no-webhook", "is_async without webhook", 400, "Webhook", url=URL, is_async=True),
    j("hotwords-many", "hotwords: 101 terms", 422, "hotwords", url=URL, hotwords=["w"] * 101),
    j("hotwords-long", "hotwords: a term of 101 characters", 422, "hotwords.0", url=URL, hotwords=["x" * 101]),
    j("hotwords-string", 'hotwords: "kopf" (not a list)', 422, "hotwords", url=URL, hotwords="kopf"),
    j("vad-threshold", "vad.threshold: 1.5", 422, "vad.threshold", url=URL, vad={"threshold": 1.5}),
    j("vad-padding", "vad.prefix_padding_ms: 5000", 422, "vad.prefix_padding_ms", url=URL,
      vad={"prefix_padding_ms": 5000}),
    j("vad-unknown", "vad.min_speech_ms (unknown)", 422, "vad.min_speech_ms", url=URL, vad={"min_speech_ms": 5}),
    j("async-type", 'is_async: "maybe"', 422, "is_async", url=URL, is_async="maybe"),
    # ---------------------------------------------------------------- POST / bodies
    Rest("body-not-json", "body: {not json", 422, "body", content=b"{not json",
         headers={**AUTH, "content-type": "application/json"}),
    Rest("body-array", "body: [1, 2]", 422, "body", json=[1, 2]),
    Rest("body-empty", "empty body", 422, "body", content=b"", headers={**AUTH, "content-type": "application/json"}),
    Rest("body-surrogate", 'body with a lone surrogate "\\ud800"', 422, "body",
         content=b'{"url": "https://media.example.com/\\ud800.mp3"}', headers={**AUTH, "content-type": "application/json"}),
    Rest("body-deep", "body nested 20 000 arrays deep", 422, "body", content=b"[" * 20_000 + b"]" * 20_000,
         headers={**AUTH, "content-type": "application/json"}),
    Rest("body-huge", "JSON body of 70 KB (limit 64 KiB)", 413, "body",
         json={"url": URL, "prompt": "x" * 70_000}),
    Rest("content-type", "content-type: text/plain", 422, "content-type", content=b"url=x",
         headers={**AUTH, "content-type": "text/plain"}),
    # ---------------------------------------------------------------- POST / multipart
    form("form-zero-bytes", "a zero-byte file", 422, "file", files={"file": ("a.wav", b"", "audio/wav")}),
    form("form-file-and-url", "both file and url", 422, "file", files={"file": WAV}, url=URL),
    form("form-no-audio", "neither file nor url", 422, "file", language="en"),
    form("form-unknown-field", "an unknown field diarize_audio", 422, "diarize_audio", files={"file": WAV},
         diarize_audio="true"),
    form("form-webhook-text", "webhook: not JSON", 422, "webhook", files={"file": WAV}, webhook="https://x"),
    form("form-vad-text", "vad: not JSON", 422, "vad", files={"file": WAV}, vad="0.5"),
    form("form-batch-text", 'batch_size: "x"', 422, "batch_size", files={"file": WAV}, batch_size="x"),
    form("form-file-as-text", "file sent as a text field", 422, "file", file="not a file part"),
    form("form-too-large", "a 70 KB upload (limit 64 KiB)", 413, "body",
         files={"file": ("big.wav", b"\0" * 70_000, "audio/wav")}),
    form("form-userinfo", "url with user:pass@", 422, "url", url="http://user:pass@media.example.com/a.wav"),
    # ---------------------------------------------------------------- /v1/audio/*
    oa("oa-no-file", "no file", 422, "file", files={}, model="whisper-1"),
    oa("oa-zero-bytes", "a zero-byte file", 422, "file", files={"file": ("a.wav", b"", "audio/wav")}),
    oa("oa-format", 'response_format: "xml"', 422, "response_format", response_format="xml"),
    oa("oa-temperature", "temperature: 1.5", 422, "temperature", temperature="1.5"),
    oa("oa-temperature-type", 'temperature: "hot"', 422, "temperature", temperature="hot"),
    oa("oa-words-json", "timestamp_granularities[]=word with json", 422, "timestamp_granularities[]",
       **{"timestamp_granularities[]": "word"}),
    oa("oa-unknown-field", "speaker_labels (not supported)", 422, "speaker_labels", speaker_labels="true"),
    oa("oa-known-name-alone", "known_speaker_names[] without its reference", 422, "known_speaker_references[]",
       **{"known_speaker_names[]": "alice"}),
    oa("oa-multichannel-mono", "multichannel=true on a mono WAV", 422, "multichannel", multichannel="true",
       files={"file": ("a.wav", MONO_WAV_HEADER, "audio/wav")}),
    oa("oa-chunking-threshold", "chunking_strategy: server_vad threshold 2", 422, "chunking_strategy.threshold",
       chunking_strategy='{"type": "server_vad", "threshold": 2}'),
    oa("oa-chunking-type", 'chunking_strategy: type "semantic_vad"', 422, "chunking_strategy.type",
       chunking_strategy='{"type": "semantic_vad"}'),
    oa("oa-chunking-text", 'chunking_strategy: "fast" (neither auto nor JSON)', 422, "chunking_strategy",
       chunking_strategy="fast"),
    oa("oa-chunking-form", "chunking_strategy[silence_duration_ms]=-5 (the SDK's encoding)", 422,
       "chunking_strategy.silence_duration_ms",
       **{"chunking_strategy[type]": "server_vad", "chunking_strategy[silence_duration_ms]": "-5"}),
    oa("oa-hotword-special", "hotwords[]=<|en|> (a Whisper special token)", 422, "hotwords",
       **{"hotwords[]": "<|en|>"}),
    oa("oa-model", 'model: "gpt-9" (not offered)', 422, "model", model="gpt-9"),
    oa("oa-stream-srt", "stream=true with srt", 422, "stream", stream="true", response_format="srt"),
    oa("oa-logprobs-text", "include[]=logprobs with text", 422, "include[]", response_format="text",
       **{"include[]": "logprobs"}),
    oa("oa-language", 'language: "klingon"', 422, "language", language="klingon"),
    oa("oa-prompt", "prompt of 2001 characters", 422, "prompt", prompt="x" * 2001),
    oa("oa-translation-language", "translations with language (not one of its fields)", 422, "language",
       path="/v1/audio/translations", language="de"),
    # ---------------------------------------------------------------- the key
    Rest("key-missing", "POST / without a key", 401, "Unauthorized", json={"url": URL}, headers={}),
    Rest("key-wrong", "POST / with a wrong x-admin-api-key", 401, "Unauthorized", json={"url": URL},
         headers={"x-admin-api-key": "guess"}),
    Rest("key-wrong-bearer", "/v1 with a wrong bearer token", 401, "Unauthorized", path="/v1/audio/transcriptions",
         files={"file": WAV}, headers={"authorization": "Bearer guess"}),
    Rest("key-basic", "Authorization: Basic (not a bearer)", 401, "Unauthorized", json={"url": URL},
         headers={"authorization": "Basic Y2F0YWxvZ3VlLWtleQ=="}),
    Rest("key-status", "GET /status without a key (no task leaks)", 401, "Unauthorized", method="GET",
         path="/status/anything", headers={}),
]  # fmt: skip


def _named(response: httpx.Response, names: str) -> str | None:
    """The part of the answer that names `names` (for the table), or None when nothing does."""
    body = response.json()
    if "error" in body:  # OpenAI's shape under /v1: param is the field
        error = body["error"]
        return error["message"] if error.get("param") == names or error["message"].startswith(names) else None
    detail = body["detail"]
    if isinstance(detail, list):  # FastAPI's shape: loc is the field
        for d in detail:
            where = ".".join(str(p) for p in d["loc"][1:]) or "body"
            if where == names or where.startswith(names + "."):
                return f"{where}: {d['msg']}"
        return None
    return detail if names in detail else None


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@pytest.fixture(scope="module")
def catalogue_ns(kube, crd) -> Iterator[str]:
    from kubernetes import client

    name = f"t-catalogue-{uuid.uuid4().hex[:6]}"
    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    yield name
    with kube.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)


@pytest.fixture(scope="module")
def catalogue_driver(kube, catalogue_ns) -> Iterator[Driver]:
    with kube.api_client() as api:
        yield Driver(api, catalogue_ns)


@pytest.fixture(scope="module")
def rest(catalogue_ns, tmp_path_factory) -> Iterator[Server]:
    from ifw.gateway.config import GatewaySettings

    port = free_port()
    settings = GatewaySettings(
        namespace=catalogue_ns, admin_key=KEY, internal_url=f"http://127.0.0.1:{port}",
        upload_dir=tmp_path_factory.mktemp("uploads"), allowed_models=["tiny.en"], diarization_available=True,
        max_upload_bytes=64 * 1024, sync_timeout_seconds=2,  # a case wrongly accepted answers 504 at once, not never
    )  # fmt: skip
    with Server(settings, port) as server:
        yield server


@pytest.mark.parametrize("case", REST_CASES, ids=[c.id for c in REST_CASES])
def test_rest(rest, catalogue_driver, case: Rest):
    before = len(catalogue_driver.tjs())
    with httpx.Client(base_url=rest.url, timeout=30) as http:
        response = http.request(case.method, case.path, json=case.json, data=case.data, files=case.files,
                                content=case.content, headers=case.headers)  # fmt: skip
    named = _named(response, case.names) if response.headers.get("content-type", "").startswith("application/json") else None
    OUTCOMES.append((_surface(case), case.sent, case.id, f"{response.status_code} {_short(named or response.text)}"))
    assert response.status_code == case.status, response.text
    assert named, f"the answer does not name {case.names!r}: {response.text}"
    assert len(catalogue_driver.tjs()) == before, "a refused request made a TranscriptionJob"


def _surface(case: Rest) -> str:
    if case.id.startswith("key-"):
        return "API key"
    if case.path.startswith("/v1/"):
        return f"POST {case.path}"
    return "POST / multipart" if case.data or case.files else "POST / JSON"


def test_a_raw_content_length_that_is_no_number_is_400(rest):
    """Not sendable through httpx: the header is written by hand."""
    with socket.create_connection(("127.0.0.1", rest.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nx-admin-api-key: " + KEY.encode() +
                  b"\r\ncontent-type: application/json\r\ncontent-length: 12abc\r\n\r\n{}")  # fmt: skip
        chunks = []
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace")
    head, _, body = answer.partition("\r\n\r\n")
    status = head.split(" ", 2)[1]
    OUTCOMES.append(("POST / JSON", "Content-Length: 12abc", "content-length", f"{status} {_short(body)}"))
    # uvicorn's HTTP parser refuses it before the gateway sees it: a 400 all the same, never a 500.
    assert status == "400", answer


# ------------------------------------------------------------------ kubectl apply


@dataclass(frozen=True)
class Apply:
    id: str
    sent: str
    spec: dict[str, Any] | None = None  # merged over a valid spec (None values delete)
    name: str | None = None
    names: str = "spec"  # what the apiserver's refusal must name


BASE_SPEC = {"audio": {"url": URL}}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


APPLY_CASES = [
    Apply("k-url-ftp", "spec.audio.url: ftp://...", {"audio": {"url": "ftp://media.example.com/a.mp3"}}, names="spec.audio.url"),
    Apply("k-url-no-host", "spec.audio.url: http://", {"audio": {"url": "http://"}}, names="spec.audio.url"),
    Apply("k-url-space", "spec.audio.url with a space", {"audio": {"url": "https://a b.example.com/x.mp3"}},
          names="spec.audio.url"),
    Apply("k-url-huge", "spec.audio.url of 3000 characters", {"audio": {"url": "https://e.com/" + "a" * 3000}},
          names="spec.audio.url"),
    Apply("k-audio-missing", "no spec.audio", {"audio": None, "task": "transcribe"}, names="spec.audio"),
    Apply("k-spec-missing", "no spec at all", {"audio": None}, names="spec"),
    Apply("k-batch-zero", "spec.batchSize: 0", {"batchSize": 0}, names="spec.batchSize"),
    Apply("k-batch-type", 'spec.batchSize: "64"', {"batchSize": "64"}, names="spec.batchSize"),
    Apply("k-task-enum", 'spec.task: "foo"', {"task": "foo"}, names="spec.task"),
    Apply("k-timestamp-enum", 'spec.timestamp: "sentence"', {"timestamp": "sentence"}, names="spec.timestamp"),
    Apply("k-language", 'spec.language: "klingon"', {"language": "klingon"}, names="spec.language"),
    Apply("k-temperature", "spec.temperature: 2", {"temperature": 2}, names="spec.temperature"),
    Apply("k-prompt", "spec.prompt of 2001 characters", {"prompt": "x" * 2001}, names="spec.prompt"),
    Apply("k-speakers", "spec.diarization numSpeakers with maxSpeakers",
          {"diarization": {"enabled": True, "numSpeakers": 2, "maxSpeakers": 3}}, names="spec.diarization.numSpeakers"),
    Apply("k-webhook-scheme", "spec.webhook.url: gopher://", {"webhook": {"url": "gopher://x/"}}, names="spec.webhook.url"),
    Apply("k-unknown-field", "spec.audioUrl (unknown field)", {"audioUrl": URL}, names="audioUrl"),
    Apply("k-name-invalid", "metadata.name: Bad_Name", name="Bad_Name", names="metadata.name"),
    Apply("k-name-long", "metadata.name of 254 characters", name="a" * 254, names="metadata.name"),
]


@pytest.mark.parametrize("case", APPLY_CASES, ids=[c.id for c in APPLY_CASES])
def test_kubectl_apply(kube, catalogue_ns, catalogue_driver, case: Apply):
    manifest = {"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob",
                "metadata": {"name": case.name or case.id}}  # fmt: skip
    spec = _merge(BASE_SPEC, case.spec or {})
    if spec:
        manifest["spec"] = spec
    before = len(catalogue_driver.tjs())
    proc = kube.kubectl("apply", "-n", catalogue_ns, "-f", "-", input=json.dumps(manifest), check=False)
    said = proc.stderr.strip() or proc.stdout.strip()
    OUTCOMES.append(("kubectl apply", case.sent, case.id, f"refused: {_short(said)}" if proc.returncode else f"ACCEPTED: {said}"))
    assert proc.returncode != 0, f"kubectl accepted it: {said}"
    assert case.names in said, said
    assert len(catalogue_driver.tjs()) == before


def test_kubectl_apply_of_a_url_with_credentials_is_refused(kube, catalogue_ns):
    manifest = {"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob", "metadata": {"name": "k-url-userinfo"},
                "spec": {"audio": {"url": "http://user:pass@media.example.com/a.wav"}, "suspend": True}}  # fmt: skip
    proc = kube.kubectl("apply", "-n", catalogue_ns, "-f", "-", input=json.dumps(manifest), check=False)
    said = proc.stderr.strip() or proc.stdout.strip()
    OUTCOMES.append(("kubectl apply", "spec.audio.url: http://user:pass@host/a.wav", "k-url-userinfo",
                     f"refused: {_short(said)}" if proc.returncode else "ACCEPTED (needs the CRD's CEL rule)"))
    kube.kubectl("delete", "-n", catalogue_ns, "tj", "k-url-userinfo", "--ignore-not-found", check=False)
    assert proc.returncode != 0 and "spec.audio.url" in said


# ------------------------------------------------------------------ what only a runner can judge


@dataclass(frozen=True)
class Run:
    id: str
    sent: str
    status: int  # the sync answer's
    reason: str | None  # the failed job's; None: it succeeded
    says: str  # in the message (or, succeeded, the text)
    url: str | None = None  # on the origin; else an upload
    upload: str | None = None  # a file of the fixture's
    unreachable_upload: bool = False  # through a gateway whose internal URL nobody listens on


RUNS = [
    Run("r-404", "url answers 404", 422, "AudioFetchFailed", "answered HTTP 404", url="/missing.wav"),
    Run("r-html-upload", "upload of an HTML page", 422, "InvalidAudio", "cannot decode the audio", upload="page.html"),
    Run("r-zero-bytes", "url serves 0 bytes", 422, "InvalidAudio", "empty (0 bytes)", url="/empty.wav"),
    Run("r-truncated-tiny", "url serves the first 200 bytes of an mp3", 422, "InvalidAudio", "cannot decode the audio",
        url="/tiny.mp3"),
    Run("r-truncated-half", "upload of the first half of an mp3", 200, None, "Please call me", upload="half.mp3"),
    Run("r-silence", "url serves 3 s of silence", 200, None, "", url="/silence.wav"),
    Run("r-redirect-private", "url redirects to http://169.254.169.254/", 422, "AudioFetchFailed",
        "link-local", url="/redirect"),
    Run("r-upload-unreachable", "upload the runner cannot fetch (token hidden)", 422, "AudioFetchFailed",
        "/internal/uploads/", upload="speech.wav", unreachable_upload=True),
]  # fmt: skip


class _Origin(BaseHTTPRequestHandler):
    files: dict[str, Path] = {}

    def do_GET(self) -> None:  # noqa: N802 - the handler's name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = self.files.get(self.path)
        if path is None:
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if path.suffix == ".html" else "audio/mpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _media(work: Path) -> dict[str, Path]:
    if not shutil.which("ffmpeg"):
        pytest.fail("ffmpeg is needed (make setup installs it)")
    speech = speak("Please call me tomorrow morning. The weather is very nice today.", work / "speech.wav")
    mp3 = work / "speech.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(speech), "-b:a", "64k", str(mp3)], check=True)
    data = mp3.read_bytes()
    (work / "half.mp3").write_bytes(data[: len(data) // 2])
    (work / "tiny.mp3").write_bytes(data[:200])
    (work / "empty.wav").write_bytes(b"")
    (work / "page.html").write_text("<!DOCTYPE html><html><body><h1>Not Found</h1></body></html>")
    with wave.open(str(work / "silence.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000 * 3)
    return {f"/{p.name}": p for p in work.iterdir()}


@pytest.fixture(scope="module")
def runs(kube, crd, catalogue_ns, catalogue_driver, tmp_path_factory) -> Iterator[dict[str, tuple[httpx.Response, dict]]]:
    """Every Run sent at once (each is a runner process) to the real operator, stand-in and runner;
    the sync answer and the final TranscriptionJob of each."""
    from kubernetes import client

    from ifw.gateway.config import GatewaySettings
    from ifw.local.standin import KubeletStandIn
    from tests.operator.conftest import OperatorThread, operator_settings

    work = tmp_path_factory.mktemp("runs")
    _Origin.files = _media(work)
    origin = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{origin.server_port}"

    runner_env = {"IFW_DEVICE": "cpu", "IFW_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                  "IFW_FETCH_ALLOWLIST": '["127.0.0.1"]'}  # the origin and the gateway's uploads, on loopback
    operator = OperatorThread(catalogue_ns, operator_settings(default_model="tiny.en", runner={"env": runner_env},
                                                              startup_deadline_seconds=300)).start()  # fmt: skip
    (work / "pods").mkdir()
    node = KubeletStandIn(kube.kubeconfig, log_dir=work / "pods").start()

    def gateway(internal_port: int, port: int) -> Server:
        return Server(GatewaySettings(namespace=catalogue_ns, admin_key=KEY, internal_url=f"http://127.0.0.1:{internal_port}",
                                      upload_dir=work / f"uploads-{port}", url_allowlist=["127.0.0.1"],
                                      sync_timeout_seconds=400, keepalive_seconds=0), port)  # fmt: skip

    port, lost = free_port(), free_port()  # nothing listens on `lost`
    try:
        with gateway(port, port) as gw, gateway(lost, free_port()) as astray, ThreadPoolExecutor(4) as pool:

            def send(run: Run) -> tuple[httpx.Response, dict]:
                target = astray if run.unreachable_upload else gw
                task = f"run-{run.id}"
                with httpx.Client(base_url=target.url, timeout=420, headers=AUTH) as http:
                    if run.url:
                        response = http.post("/", json={"url": base + run.url, "managed_task_id": task})
                    else:
                        path = work / (run.upload or "")
                        response = http.post("/", data={"managed_task_id": task},
                                             files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
                tj = catalogue_driver.get(task)
                assert tj is not None, response.text
                return response, tj

            futures = {run.id: pool.submit(send, run) for run in RUNS}
            yield {name: f.result(timeout=600) for name, f in futures.items()}
    except BaseException:
        for log in sorted((work / "pods").glob("*")):
            print(f"--- {log}\n{log.read_text(errors='replace')[-2000:]}")
        raise
    finally:
        node.stop()
        operator.stop()
        origin.shutdown()
        with kube.api_client() as api:  # no garbage collector here: the stack's Jobs and pods go by hand
            batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
            for job in batch.list_namespaced_job(catalogue_ns).items:
                batch.delete_namespaced_job(job.metadata.name, catalogue_ns)
            for pod in core.list_namespaced_pod(catalogue_ns).items:
                core.delete_namespaced_pod(pod.metadata.name, catalogue_ns)


@pytest.mark.model
@pytest.mark.parametrize("run", RUNS, ids=[r.id for r in RUNS])
def test_runner(runs, run: Run):
    response, tj = runs[run.id]
    status = tj.get("status") or {}
    body = response.json()
    if run.reason:
        outcome = f"{response.status_code} Failed {status.get('reason')}: {_short(status.get('message') or '', 90)}"
    else:
        outcome = f"{response.status_code} Succeeded, text {body.get('output', {}).get('text', '')!r}"
    OUTCOMES.append(("runner (e2e)", run.sent, run.id, outcome))
    assert response.status_code == run.status, response.text
    if run.reason is None:
        assert status.get("phase") == "Succeeded" and body["status"] == "completed"
        text = body["output"]["text"]
        assert run.says in text if run.says else text.strip() == "", text
        return
    assert status.get("phase") == "Failed" and status.get("reason") == run.reason, status
    assert body["reason"] == run.reason and run.says in body["message"], body
    # The message names what went wrong, and never an upload's token (the runner's own message does).
    url = tj["spec"]["audio"]["url"]
    if "/internal/uploads/" in url:
        assert url.rsplit("/", 1)[1] not in response.text, response.text
    if run.unreachable_upload:
        assert "/internal/uploads/" in status["message"] and "/***" in body["message"], body["message"]
