"""Uploads (POST / multipart) and the OpenAI-compatible routes, driven by the official `openai` SDK.

The upload is real speech made with espeak-ng; the test, playing the runner,
fetches it from the URL the gateway put in spec.audio.url (with its per-upload
token), checks the bytes, and completes the task.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

KEY = "openai-compatible-key"


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is needed: apt-get install espeak-ng")
    path = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), "Hello world. How are you?"], check=True)
    return path


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


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


# ------------------------------------------------------------------ OpenAI SDK


def openai_client(gw):
    import openai

    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def complete_when_created(driver, result) -> str:
    tj = driver.wait_tj()
    assert fetch_as_runner(tj).status_code == 200
    driver.succeed(tj["metadata"]["name"], result)
    return tj["metadata"]["name"]


def test_openai_sdk_transcriptions_in_every_format(gateway_factory, driver, pool, wav):
    import srt
    import webvtt

    gw = gateway_factory(uploads=True, admin_key=KEY)
    client = openai_client(gw)

    def ask(**kwargs):
        with wav.open("rb") as f:
            return client.audio.transcriptions.create(model="whisper-1", file=f, **kwargs)

    # json (the default): {"text"}
    pending = pool.submit(ask)
    name = complete_when_created(driver, transcript())
    assert pending.result(timeout=15).text == " Hello world. How are you?"
    tj = driver.get(name)
    assert "model" not in tj["spec"]  # whisper-1 = the operator's default model
    driver.custom.delete_namespaced_custom_object("ifw.dev", "v1alpha1", driver.namespace, "transcriptionjobs", name)

    # srt and vtt: plain text the subtitle libraries parse, with the segment times
    pending = pool.submit(ask, response_format="srt", language="en")
    name = complete_when_created(driver, transcript())
    cues = list(srt.parse(pending.result(timeout=15)))
    assert [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in cues] == [
        (0.2, 1.1, "Hello world."),
        (1.6, 2.6, "How are you?"),
    ]
    assert driver.get(name)["spec"]["language"] == "en"
    driver.custom.delete_namespaced_custom_object("ifw.dev", "v1alpha1", driver.namespace, "transcriptionjobs", name)

    pending = pool.submit(ask, response_format="vtt")
    name = complete_when_created(driver, transcript())
    vtt = webvtt.from_string(pending.result(timeout=15))
    assert [(c.start, c.end, c.text) for c in vtt] == [
        ("00:00:00.200", "00:00:01.100", "Hello world."),
        ("00:00:01.600", "00:00:02.600", "How are you?"),
    ]
    driver.custom.delete_namespaced_custom_object("ifw.dev", "v1alpha1", driver.namespace, "transcriptionjobs", name)

    # verbose_json with word timestamps: language, duration, segments and words
    pending = pool.submit(ask, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    name = complete_when_created(driver, transcript("word"))
    verbose = pending.result(timeout=15)
    assert driver.get(name)["spec"]["timestamp"] == "word"
    assert verbose.language == "english" and verbose.duration == 3.0
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.2, 1.1, " Hello world."), (1.6, 2.6, " How are you?")]
    assert [(w.word, w.start, w.end) for w in verbose.words][:2] == [("Hello", 0.2, 0.6), ("world.", 0.6, 1.1)]


def test_openai_sdk_translation_and_errors(gateway_factory, driver, pool, wav):
    import openai

    gw = gateway_factory(uploads=True, admin_key=KEY)
    client = openai_client(gw)
    with wav.open("rb") as f:
        pending = pool.submit(client.audio.translations.create, model="whisper-1", file=f)
        name = complete_when_created(driver, transcript())
        assert pending.result(timeout=15).text == " Hello world. How are you?"
    assert driver.get(name)["spec"]["task"] == "translate"

    with wav.open("rb") as f, pytest.raises(openai.UnprocessableEntityError) as bad:
        client.audio.transcriptions.create(model="whisper-1", file=f, language="klingon")
    assert "language" in str(bad.value)
    # What the runner cannot honour is refused, naming the field, not silently ignored.
    for extra, field in (({"prompt": "Kubernetes, kopf"}, "prompt"), ({"temperature": 0.4}, "temperature")):
        with wav.open("rb") as f, pytest.raises(openai.UnprocessableEntityError) as bad:
            client.audio.transcriptions.create(model="whisper-1", file=f, **extra)
        assert field in str(bad.value)
    assert len(driver.tjs()) == 1  # only the translation above created a TranscriptionJob
    with wav.open("rb") as f, pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0).audio.transcriptions.create(
            model="whisper-1", file=f
        )
    # A failed task surfaces its reason through the SDK's error.
    with wav.open("rb") as f:
        pending = pool.submit(client.audio.transcriptions.create, model="whisper-1", file=f)
        tj = None
        deadline = time.monotonic() + 10
        while tj is None and time.monotonic() < deadline:
            tj = next((j for j in driver.tjs() if j["metadata"]["name"] != name), None)
            time.sleep(0.05)
        driver.fail(tj["metadata"]["name"], "InvalidAudio", "ffmpeg could not decode the file")
        with pytest.raises(openai.UnprocessableEntityError) as failed:
            pending.result(timeout=15)
    assert "InvalidAudio" in str(failed.value)
