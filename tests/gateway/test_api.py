"""The original API over HTTP (a real uvicorn server) against the real test apiserver.

The tests play the operator and runner through `driver` (status patches and
result Secrets written with ifw.core.results), then check what the gateway
answers: the original API's shapes, exactly.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

URL = "https://audio.example.com/talk.mp3"
HOOK = "https://hooks.example.com/done"

EXPECTED_OUTPUT = {
    "text": " Hello world. Thanks for coming. How are you? Fine.",
    "chunks": [
        {"timestamp": [0.2, 1.1], "text": " Hello world."},
        {"timestamp": [1.3, 2.4], "text": " Thanks for coming."},
        {"timestamp": [2.9, 4.0], "text": " How are you? Fine."},
    ],
}
PROCESSED_BY = {"pod": "tj-talk-runner-x7k2p", "node": "gpu-node-3", "runtime": "Job"}


def test_sync_request_waits_for_the_task_and_returns_the_original_shape(gateway, http, driver, pool):
    pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "talk-1", "language": "English"})
    tj = driver.wait_tj("talk-1")

    # The request became a TranscriptionJob with the original defaults (batch_size 64) and no secrets.
    spec = tj["spec"]
    assert spec["audio"]["url"] == URL
    assert spec["batchSize"] == 64
    assert spec["task"] == "transcribe" and spec["timestamp"] == "chunk"
    assert spec["language"] == "en"
    assert spec["diarization"] == {"enabled": False}
    assert "webhook" not in spec
    assert tj["metadata"]["labels"]["app.kubernetes.io/created-by"] == "ifw-gateway"

    driver.running("talk-1", percent=40)
    status = http.get("/status/talk-1")
    assert status.status_code == 200
    assert status.json() == {
        "status": "processing",
        "task_id": "talk-1",
        "phase": "Running",
        "progress": {"percent": 40.0, "processed_seconds": 1.2, "total_seconds": 3.0},
        "language": "en",
        "duration": 3.0,
    }
    assert http.get("/tasks").json() == {"tasks": ["talk-1"]}
    assert not pending.done()

    driver.succeed("talk-1")
    response = pending.result(timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "output": EXPECTED_OUTPUT, "status": "completed", "task_id": "talk-1", "processed_by": PROCESSED_BY}  # fmt: skip

    # Unlike the original (404 once done), the status keeps the output until the TranscriptionJob's TTL.
    after = http.get("/status/talk-1").json()
    assert after["status"] == "completed" and after["phase"] == "Succeeded"
    assert after["output"] == EXPECTED_OUTPUT
    assert http.get("/tasks").json() == {"tasks": []}


def test_completion_in_one_status_write_and_a_rewritten_result(http, driver, pool):
    """The operator may set Succeeded together with the result; a runner retry may rewrite the
    result after the gateway read it early: the answer is always the final result."""
    pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "one-patch"})
    driver.wait_tj("one-patch")
    driver.succeed("one-patch", one_patch=True)
    assert pending.result(timeout=10).json()["output"] == EXPECTED_OUTPUT

    pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "retried"})
    driver.wait_tj("retried")
    first = transcript()
    first.text = " An earlier attempt."
    first.segments = first.segments[:1]
    driver.report_result("retried", first)  # read early by the gateway...
    time.sleep(0.3)
    driver.succeed("retried")  # ...then rewritten (new sha256) before the TranscriptionJob succeeded
    assert pending.result(timeout=10).json()["output"] == EXPECTED_OUTPUT


def test_sync_word_timestamps_and_speakers(gateway_factory, driver, pool):
    gw = gateway_factory(diarization_available=True)
    with gw.client() as http:
        body = {"url": URL, "timestamp": "word", "diarise_audio": True, "min_speakers": 1, "max_speakers": 3}
        pending = pool.submit(http.post, "/", json=body)
        tj = driver.wait_tj()
        assert tj["spec"]["timestamp"] == "word"
        assert tj["spec"]["diarization"] == {"enabled": True, "minSpeakers": 1, "maxSpeakers": 3}
        driver.succeed(tj["metadata"]["name"], transcript("word", speakers=True))
        answer = pending.result(timeout=10).json()
    assert answer["task_id"] == tj["metadata"]["name"]
    chunks = answer["output"]["chunks"]
    assert [c["text"] for c in chunks][:5] == [" Hello", " world.", " Thanks", " for", " coming."]
    assert chunks[5]["timestamp"] == [2.9, 3.1]
    # One speaker entry per word chunk; the turns merged beside them.
    assert [(s["speaker"], s["text"]) for s in answer["output"]["speakers"]][4:7] == [
        ("SPEAKER_00", " coming."), ("SPEAKER_01", " How"), ("SPEAKER_01", " are")]  # fmt: skip
    assert answer["output"]["speaker_turns"] == [
        {"speaker": "SPEAKER_00", "timestamp": [0.2, 2.4], "text": " Hello world. Thanks for coming."},
        {"speaker": "SPEAKER_01", "timestamp": [2.9, 3.6], "text": " How are you?"},
        {"speaker": "SPEAKER_00", "timestamp": [3.7, 4.0], "text": " Fine."},
    ]


def test_async_puts_webhook_headers_in_an_owned_secret(http, driver, namespace):
    body = {
        "url": URL,
        "is_async": True,
        "managed_task_id": "bg-1",
        "webhook": {"url": HOOK, "header": {"Authorization": "Bearer s3cr3t-token"}},
    }
    response = http.post("/", json=body)
    assert response.status_code == 200
    assert response.json() == {
        "detail": "Task is being processed in the background",
        "status": "processing",
        "task_id": "bg-1",
    }
    tj = driver.get("bg-1")
    assert "s3cr3t-token" not in json.dumps(tj)  # never in the spec
    ref = tj["spec"]["webhook"]["headersSecretRef"]["name"]
    assert tj["spec"]["webhook"]["url"] == HOOK
    secret = driver.core.read_namespaced_secret(ref, namespace)
    assert base64.b64decode(secret.data["Authorization"]).decode() == "Bearer s3cr3t-token"
    owners = secret.metadata.owner_references
    assert [(o.kind, o.name, o.uid) for o in owners] == [("TranscriptionJob", "bg-1", tj["metadata"]["uid"])]
    assert http.get("/tasks").json() == {"tasks": ["bg-1"]}
    assert http.get("/status/bg-1").json() == {
        "status": "processing", "task_id": "bg-1", "phase": "Pending", "webhook": {"attempts": 0, "delivered": False}}  # fmt: skip

    driver.succeed("bg-1")
    done = http.get("/status/bg-1").json()
    assert done["status"] == "completed" and done["output"] == EXPECTED_OUTPUT


def test_status_shows_the_webhook_delivery_so_an_async_client_learns_it_failed(http, driver):
    body = {"url": URL, "is_async": True, "managed_task_id": "hooked", "webhook": {"url": HOOK}}
    assert http.post("/", json=body).status_code == 200
    driver.succeed("hooked")
    # The operator's record of a failing receiver, as it writes it after its second attempt.
    driver.patch_status("hooked", {"webhook": {"attempts": 2, "delivered": False, "lastAttemptTime": "2026-01-02T03:04:05Z",
                                               "lastError": "https://hooks.example.com/done answered HTTP 503"}})  # fmt: skip
    status = http.get("/status/hooked").json()
    assert status["status"] == "completed" and status["output"] == EXPECTED_OUTPUT
    assert status["webhook"] == {"attempts": 2, "delivered": False, "last_attempt_time": "2026-01-02T03:04:05Z",
                                 "last_error": "https://hooks.example.com/done answered HTTP 503"}  # fmt: skip
    driver.patch_status("hooked", {"webhook": {"attempts": 3, "delivered": True, "lastError": None}})
    assert http.get("/status/hooked").json()["webhook"] == {
        "attempts": 3, "delivered": True, "last_attempt_time": "2026-01-02T03:04:05Z"}  # fmt: skip
    # (A task without a webhook has no "webhook" in /status: the sync test above compares the whole body.)


def test_async_without_webhook_is_refused_like_the_original(http, driver):
    response = http.post("/", json={"url": URL, "is_async": True})
    assert response.status_code == 400
    assert response.json() == {"detail": "Webhook is required for async tasks"}
    assert driver.tjs() == []


def test_duplicate_managed_task_id_is_409_and_never_overwrites(http, driver, namespace):
    hook = {"url": HOOK, "header": {"X-Token": "first"}}
    first = http.post("/", json={"url": URL, "is_async": True, "webhook": hook, "managed_task_id": "dup"})
    assert first.status_code == 200
    before = driver.get("dup")
    other = {"url": "https://other.example.com/b.mp3", "is_async": True, "managed_task_id": "dup"}
    second = http.post("/", json={**other, "webhook": {"url": HOOK, "header": {"X-Token": "second"}}})
    assert second.status_code == 409
    assert second.json() == {"detail": "Task dup already exists"}
    after = driver.get("dup")
    assert after["spec"] == before["spec"] and after["metadata"]["uid"] == before["metadata"]["uid"]
    # The refused request's Secret was cleaned up; the first task's Secret is intact.
    secrets = driver.core.list_namespaced_secret(namespace, label_selector="ifw.dev/task-id=dup").items
    assert [s.metadata.name for s in secrets] == [before["spec"]["webhook"]["headersSecretRef"]["name"]]
    assert base64.b64decode(secrets[0].data["X-Token"]) == b"first"


@pytest.mark.parametrize(
    ("reason", "code"),
    [("InvalidAudio", 422), ("AudioFetchFailed", 422), ("AudioTooLarge", 413), ("OutOfMemory", 500), ("DeadlineExceeded", 500)],
)
def test_failed_task_answers_its_reason_4xx_for_bad_input_5xx_for_faults(http, driver, pool, reason, code):
    pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "broken"})
    driver.wait_tj("broken")
    driver.fail("broken", reason, "what went wrong, for people")
    response = pending.result(timeout=10)
    assert response.status_code == code
    assert response.json() == {
        "detail": f"{reason}: what went wrong, for people",
        "status": "error",
        "task_id": "broken",
        "reason": reason,
        "message": "what went wrong, for people",
    }
    status = http.get("/status/broken").json()
    assert status["status"] == "error" and status["reason"] == reason and "output" not in status


def test_sync_timeout_is_504_with_the_task_id(gateway_factory, driver):
    gw = gateway_factory(sync_timeout_seconds=0.5)
    with gw.client() as http:
        started = time.monotonic()
        response = http.post("/", json={"url": URL, "managed_task_id": "slow"})
        waited = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["task_id"] == "slow" and response.json()["status"] == "processing"
        assert "/status/slow" in response.json()["detail"]
        assert 0.5 <= waited < 5
        # The task keeps running; the client polls it.
        assert driver.get("slow") is not None
        driver.succeed("slow")
        assert http.get("/status/slow").json()["output"] == EXPECTED_OUTPUT


def test_cancel_deletes_the_tj_and_wakes_its_waiter(http, driver, pool):
    pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "doomed"})
    driver.wait_tj("doomed")
    response = http.delete("/cancel/doomed")
    assert response.status_code == 200 and response.json() == {"status": "cancelled"}
    assert driver.get("doomed") is None
    waited = pending.result(timeout=10)
    assert waited.status_code == 409
    assert waited.json()["status"] == "cancelled" and waited.json()["task_id"] == "doomed"
    again = http.delete("/cancel/doomed")
    assert again.status_code == 404 and again.json() == {"detail": "Task not found"}


def test_a_task_deleted_while_its_cancelled_webhook_goes_out_shows_as_cancelled(http, driver):
    from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION

    body = {"url": URL, "is_async": True, "managed_task_id": "held", "webhook": {"url": HOOK}}
    assert http.post("/", json=body).status_code == 200
    driver.running("held")
    # The operator's finalizer keeps a deleted job until its cancelled webhook is delivered.
    patch = {"metadata": {"finalizers": ["ifw.dev/cleanup"]}}
    driver.custom.patch_namespaced_custom_object(GROUP, VERSION, driver.namespace, PLURAL, "held", patch)
    driver.custom.delete_namespaced_custom_object(GROUP, VERSION, driver.namespace, PLURAL, "held")
    try:
        assert driver.get("held")["metadata"]["deletionTimestamp"]
        deadline = time.monotonic() + 10
        while (status := http.get("/status/held").json())["status"] == "processing" and time.monotonic() < deadline:
            time.sleep(0.05)  # the gateway's watch sees the deletion
        assert status["status"] == "cancelled" and status["phase"] == "Running", status
    finally:
        driver.custom.patch_namespaced_custom_object(GROUP, VERSION, driver.namespace, PLURAL, "held",
                                                     {"metadata": {"finalizers": None}})  # fmt: skip
    assert http.get("/status/held").status_code in (200, 404)


@pytest.mark.parametrize("path", ["/status/nope", "/status/NOT_A_NAME", "/status/" + "a" * 64])
def test_unknown_task_is_404(http, path):
    response = http.get(path)
    assert response.status_code == 404 and response.json() == {"detail": "Task not found"}
    assert http.delete(path.replace("/status/", "/cancel/")).status_code == 404


def test_client_disconnect_cancels_the_task_when_configured(gateway_factory, driver):
    gw = gateway_factory(cancel_on_disconnect=True)
    with httpx.Client(base_url=gw.url, timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/", json={"url": URL, "managed_task_id": "impatient"})
    deadline = time.monotonic() + 10
    while driver.get("impatient") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.get("impatient") is None


def test_client_disconnect_keeps_the_task_by_default(gateway, driver):
    with httpx.Client(base_url=gateway.url, timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/", json={"url": URL, "managed_task_id": "stays"})
    time.sleep(0.5)
    assert driver.get("stays") is not None


# ------------------------------------------------------------------ bad requests

BAD_REQUESTS = [
    # (body, expected status, field named in the error)
    ({}, 422, "url"),
    ({"url": "ftp://example.com/a.mp3"}, 400, "Invalid URL"),  # the original's check and answer
    ({"url": "not a url"}, 400, "Invalid URL"),
    ({"url": "https://"}, 422, "url"),
    ({"url": "https://example.com/" + "a" * 2100}, 422, "url"),
    ({"url": "http://127.0.0.1/a.mp3"}, 422, "url"),
    ({"url": "http://169.254.169.254/latest/meta-data"}, 422, "url"),
    ({"url": "http://10.0.0.8/a.mp3"}, 422, "url"),
    ({"url": "http://localhost:8080/a.mp3"}, 422, "url"),
    ({"url": "http://[::1]/a.mp3"}, 422, "url"),
    ({"url": URL, "task": "foo"}, 422, "task"),
    ({"url": URL, "language": "klingon"}, 422, "language"),
    ({"url": URL, "batch_size": 0}, 422, "batch_size"),
    ({"url": URL, "batch_size": 257}, 422, "batch_size"),
    ({"url": URL, "batch_size": "many"}, 422, "batch_size"),
    ({"url": URL, "timestamp": "sentence"}, 422, "timestamp"),
    ({"url": URL, "diarise_audio": "perhaps"}, 422, "diarise_audio"),
    ({"url": URL, "is_async": "maybe"}, 422, "is_async"),
    ({"url": URL, "managed_task_id": "x" * 257}, 422, "managed_task_id"),
    ({"url": URL, "managed_task_id": "bell\a"}, 422, "managed_task_id"),
    ({"url": URL, "managed_task_id": ""}, 422, "managed_task_id"),
    ({"url": URL, "webhook": {"url": "gopher://x"}}, 422, "webhook"),
    ({"url": URL, "webhook": {"url": "http://192.168.1.1/hook"}}, 422, "webhook"),
    ({"url": URL, "webhook": {"url": HOOK, "header": {"bad header": "x"}}}, 422, "webhook"),
    ({"url": URL, "webhook": {"url": HOOK, "header": {"X-A": "line\r\nInjected: 1"}}}, 422, "webhook"),
    ({"url": URL, "webhook": "https://hooks.example.com"}, 422, "webhook"),
    ({"url": URL, "diarise_audio": True}, 400, "diarise_audio"),
    ({"url": URL, "num_speakers": 2}, 422, "num_speakers"),
    ({"url": URL, "model": "../../etc/passwd"}, 422, "model"),
    ({"url": URL, "prompt": "x" * 2001}, 422, "prompt"),
    ({"url": URL, "temperature": 1.5}, 422, "temperature"),
    ({"url": URL, "is_async": True}, 400, "Webhook"),
]


@pytest.mark.parametrize(("body", "code", "field"), BAD_REQUESTS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_names_the_field(http, driver, body, code, field):
    response = http.post("/", json=body)
    assert response.status_code == code, response.text
    detail = response.json()["detail"]
    if isinstance(detail, list):  # FastAPI's validation shape: loc names the field
        assert any(field in [str(p) for p in d["loc"]] for d in detail), detail
        assert all(d["msg"] for d in detail)
    else:
        assert field in detail
    assert driver.tjs() == []


@pytest.mark.parametrize(
    ("content", "headers", "code"),
    [
        (b"{not json", {"content-type": "application/json"}, 422),
        (b"[1, 2]", {"content-type": "application/json"}, 422),
        (b"", {"content-type": "application/json"}, 422),
        (b"url=https://x", {"content-type": "application/x-www-form-urlencoded"}, 422),
        (b"x" * 70_000, {"content-type": "application/json"}, 413),
    ],
)
def test_malformed_bodies_are_4xx(http, driver, content, headers, code):
    response = http.post("/", content=content, headers=headers)
    assert response.status_code == code, response.text
    assert driver.tjs() == []


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        for _ in range(100):
            yield b" " * 1024

    response = http.post("/", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
