"""Uploads (POST / multipart): the upload is real speech made with espeak-ng; the test, playing
the runner, fetches it from the URL the gateway put in spec.audio.url (with its per-upload
token), checks the bytes, and completes the task. The OpenAI routes are in test_openai.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster


def fetch_as_runner(tj: dict) -> httpx.Response:
    return httpx.get(tj["spec"]["audio"]["url"], timeout=10)


def test_multipart_upload_is_served_to_the_runner_then_removed(gateway_factory, driver, pool, wav, tmp_path):
    gw = gateway_factory(uploads=True)
    audio = wav.read_bytes()
    with gw.client() as http:
        form = {"managed_task_id": "up-1", "language": "en", "timestamp": "word", "batch_size": "8"}
        pending = pool.submit(http.post, "/", data=form, files={"file": ("hello.wav", audio, "audio/wav")})
        tj = driver.wait_tj("up-1")
        url = tj["spec"]["audio"]["url"]
        assert url.startswith(f"{gw.settings.internal_url}/internal/uploads/{driver.namespace}/up-1/")
        assert tj["spec"]["batchSize"] == 8 and tj["spec"]["timestamp"] == "word"

        fetched = fetch_as_runner(tj)
        assert fetched.status_code == 200 and fetched.content == audio
        # The token is the only key: a wrong one, or another task's path, finds nothing.
        assert httpx.get(url[:-3] + "xyz").status_code == 404
        assert httpx.get(url.replace("/up-1/", "/up-2/")).status_code == 404

        driver.succeed("up-1", transcript("word"))
        answer = pending.result(timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"]["chunks"][0] == {"timestamp": [0.2, 0.6], "text": " Hello"}
        deadline = time.monotonic() + 5
        while fetch_as_runner(tj).status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fetch_as_runner(tj).status_code == 404
        assert not (Path(gw.settings.upload_dir) / driver.namespace / "up-1").exists()


def test_multipart_with_webhook_json_and_async(gateway_factory, driver, wav):
    gw = gateway_factory(uploads=True)
    with gw.client() as http:
        form = {"is_async": "true", "webhook": json.dumps({"url": "https://hooks.example.com/x", "header": {"A": "b"}})}
        response = http.post("/", data=form, files={"file": ("hello.wav", wav.read_bytes(), "audio/wav")})
        assert response.status_code == 200 and response.json()["status"] == "processing"
        tj = driver.get(response.json()["task_id"])
        assert tj["spec"]["webhook"]["url"] == "https://hooks.example.com/x"
        assert fetch_as_runner(tj).content == wav.read_bytes()
        # A cancelled task's upload goes too.
        assert http.delete(f"/cancel/{tj['metadata']['name']}").status_code == 200
        deadline = time.monotonic() + 5
        while fetch_as_runner(tj).status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fetch_as_runner(tj).status_code == 404


WAV_PART = ("file", ("a.wav", b"RIFF0000WAVE", "audio/wav"))


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        ([("managed_task_id", (None, "no-audio"))], "file"),  # neither file nor url
        ([("url", (None, "https://a.example.com/x.mp3")), WAV_PART], "file"),  # both
        ([("file", (None, "not a file"))], "file"),  # a text part named file
        ([("webhook", (None, "{not json")), WAV_PART], "webhook"),
        ([("batch_size", (None, "0")), WAV_PART], "batch_size"),
        ([("task", (None, "summarise")), WAV_PART], "task"),
        ([("language", (None, "elvish")), WAV_PART], "language"),
        ([("surprise", (None, "1")), WAV_PART], "surprise"),
        ([("url", (None, "http://127.0.0.1/x.mp3"))], "url"),
    ],
)
def test_bad_multipart_requests(gateway_factory, driver, parts, field):
    gw = gateway_factory(uploads=True)
    with gw.client() as http:
        response = http.post("/", files=parts)
    assert response.status_code == 422, response.text
    assert any(field in d["loc"] for d in response.json()["detail"]), response.text
    assert driver.tjs() == []
    assert not any((Path(gw.settings.upload_dir) / ".staging").glob("*/audio"))


def test_upload_too_large_is_413(gateway_factory, driver):
    gw = gateway_factory(uploads=True, max_upload_bytes=4096)
    with gw.client() as http:
        response = http.post("/", files={"file": ("big.wav", b"\0" * 10_000, "audio/wav")})
        assert response.status_code == 413
    assert driver.tjs() == []
    assert not any((Path(gw.settings.upload_dir) / ".staging").glob("*/audio"))


def test_uploads_disabled_without_internal_url_is_503(gateway, driver, wav):
    with gateway.client() as http:
        response = http.post("/", files={"file": ("hello.wav", wav.read_bytes(), "audio/wav")})
    assert response.status_code == 503 and "file" in response.json()["detail"]
    assert driver.tjs() == []
