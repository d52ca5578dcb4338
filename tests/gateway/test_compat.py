"""The original Insanely Fast Whisper API's clients, unchanged, against the gateway.

Every request its README documents (POST / async with a webhook, sync with chunk or word
timestamps, diarised, with managed_task_id; /tasks, /status, /cancel; a wrong key; a bad URL),
checked field by field against what the original's code answers (app/app.py, app/diarize.py
of JigsawStack/insanely-fast-whisper-api). The Driver plays the operator and the runner with
the stored transcripts a runner writes (Whisper's leading spaces, speakers, scores).
Deliberate differences are asserted as such, and listed in README.md "Compatibility".
"""

from __future__ import annotations

import json
import sys
import time
from urllib.parse import quote

import pytest

from ifw.core.contract import ANNOTATION_TASK_ID
from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

URL = "https://audio.example.com/standup.mp3"
HOOK = {"url": "https://hooks.example.com/ifw", "header": {"Authorization": "Bearer hook-secret"}}
KEY = "the-admin-key-0123456789"

# The original's answers, key by key (app.py): sync {"output", "status", "task_id"}; async
# {"detail", "status", "task_id"}; output {"text", "chunks"} (+ "speakers" when diarised);
# a chunk {"timestamp", "text"}; a speaker entry {"speaker", **chunk}. ifw adds processed_by
# (the original's fly_machine_id) and, when diarised, output.speaker_turns.
SYNC_KEYS = {"output", "status", "task_id"}
ASYNC_ANSWER = {"detail": "Task is being processed in the background", "status": "processing"}
CHUNK_KEYS = {"timestamp", "text"}


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory(admin_key=KEY, diarization_available=True)


@pytest.fixture
def http(gw):
    with gw.client(headers={"x-admin-api-key": KEY}) as c:
        yield c


def original_speakers(chunks: list[dict], turns: list[tuple[str, float]]) -> list[dict]:
    """What the original's post_process_segments_and_transcripts(turns, chunks,
    group_by_speaker=False) returns: each turn, in order, takes the remaining chunks up to the
    one whose end is nearest the turn's end, as {"speaker", **chunk}; chunks after that are lost."""
    out, rest = [], list(chunks)
    for speaker, end in turns:
        if not rest:
            break
        ends = [c["timestamp"][1] if c["timestamp"][1] is not None else sys.float_info.max for c in rest]
        upto = min(range(len(ends)), key=lambda i: abs(ends[i] - end))
        out += [{"speaker": speaker, **c} for c in rest[: upto + 1]]
        rest = rest[upto + 1 :]
    return out


def run_sync(http, driver, pool, body: dict, result, name: str | None = None):
    pending = pool.submit(http.post, "/", json=body)
    tj = driver.wait_tj(name)
    driver.running(tj["metadata"]["name"])
    driver.succeed(tj["metadata"]["name"], result)
    response = pending.result(timeout=15)
    assert response.status_code == 200, response.text
    return tj, response


# ------------------------------------------------------------------ POST /, sync


def test_sync_chunk_request_answers_the_original_shape(http, driver, pool):
    """README: POST / {"url"}; every other field at its default."""
    tj, response = run_sync(http, driver, pool, {"url": URL}, transcript())
    # The original's defaults became the TranscriptionJob's: transcribe, detect the language
    # ("None"), batch_size 64, chunk timestamps, no diarization.
    spec = tj["spec"]
    assert (spec["task"], spec["batchSize"], spec["timestamp"]) == ("transcribe", 64, "chunk")
    assert "language" not in spec and spec["diarization"] == {"enabled": False}

    answer = response.json()
    assert set(answer) == SYNC_KEYS | {"processed_by"}
    assert answer["status"] == "completed" and answer["task_id"] == tj["metadata"]["name"]
    output = answer["output"]
    assert set(output) == {"text", "chunks"}  # no "speakers" key without diarisation
    assert all(set(c) == CHUNK_KEYS and len(c["timestamp"]) == 2 for c in output["chunks"])
    # Whisper's leading spaces, passed through: the chunks rebuild the text.
    assert [c["text"] for c in output["chunks"]] == [" Hello world.", " Thanks for coming.", " How are you? Fine."]
    assert "".join(c["text"] for c in output["chunks"]) == output["text"]
    assert output["chunks"][0]["timestamp"] == [0.2, 1.1]
    # The original's fly_machine_id, as ifw knows it.
    assert answer["processed_by"] == {"pod": "tj-talk-runner-x7k2p", "node": "gpu-node-3", "runtime": "Job"}


def test_sync_word_request_gives_one_chunk_per_word(http, driver, pool):
    """README: timestamp "word" (the original's return_timestamps="word": chunks are words)."""
    tj, response = run_sync(http, driver, pool, {"url": URL, "timestamp": "word"}, transcript("word"))
    assert tj["spec"]["timestamp"] == "word"
    output = response.json()["output"]
    assert [c["text"] for c in output["chunks"]] == [
        " Hello", " world.", " Thanks", " for", " coming.", " How", " are", " you?", " Fine."]  # fmt: skip
    assert "".join(c["text"] for c in output["chunks"]) == output["text"]
    assert output["chunks"][5] == {"timestamp": [2.9, 3.1], "text": " How"}


@pytest.mark.parametrize("timestamp", ["chunk", "word"])
def test_diarised_request_gives_each_chunk_its_speaker(http, driver, pool, timestamp):
    """README: diarise_audio true. output.speakers is the original's group_by_speaker=False list:
    one {"speaker", **chunk} per chunk, so clients zip chunks with speakers."""
    stored = transcript(timestamp, speakers=True)
    tj, response = run_sync(http, driver, pool, {"url": URL, "timestamp": timestamp, "diarise_audio": True}, stored)
    assert tj["spec"]["diarization"]["enabled"] is True
    output = response.json()["output"]
    chunks, speakers = output["chunks"], output["speakers"]
    assert len(speakers) == len(chunks)
    for chunk, entry in zip(chunks, speakers, strict=True):
        assert entry == {"speaker": entry["speaker"], **chunk}
    # The original's own alignment of the same turns gives the same list here.
    turns = [(t.speaker, t.end) for t in stored.speakers]
    assert speakers == original_speakers(chunks, turns)
    # ifw's addition: the merged turns.
    assert output["speaker_turns"] == [
        {"speaker": t.speaker, "timestamp": [t.start, t.end], "text": t.text} for t in stored.speakers
    ]
    if timestamp == "chunk":
        assert [s["speaker"] for s in speakers] == ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01"]
        assert len(output["speaker_turns"]) == 2  # not one per chunk


def test_chunks_after_the_last_turn_keep_their_speaker(http, driver, pool):
    """The original loses the chunks after the chunk nearest the last turn's end; ifw never does."""
    stored = transcript(speakers=True)
    stored.speakers = stored.speakers[:1]  # diarization heard only the first turn
    stored.segments[2].speaker = "SPEAKER_00"  # the runner gives it the nearest speaker
    _, response = run_sync(http, driver, pool, {"url": URL, "diarise_audio": True}, stored)
    output = response.json()["output"]
    lost = original_speakers(output["chunks"], [(t.speaker, t.end) for t in stored.speakers])
    assert len(lost) == 2 < len(output["chunks"])
    assert [s["speaker"] for s in output["speakers"]] == ["SPEAKER_00"] * 3


def test_no_speaker_heard_still_gives_one_entry_per_chunk(http, driver, pool):
    """Diarization found no one (the original raised IndexError): every chunk is listed, speaker null,
    in the sync answer and in /status alike."""
    stored = transcript()
    stored.speakers = []
    _, response = run_sync(http, driver, pool, {"url": URL, "diarise_audio": True, "managed_task_id": "quiet"},
                           stored, "quiet")  # fmt: skip
    for output in (response.json()["output"], http.get("/status/quiet").json()["output"]):
        assert [s["speaker"] for s in output["speakers"]] == [None, None, None]
        assert [set(s) for s in output["speakers"]] == [{"speaker", "timestamp", "text"}] * 3
        assert output["speaker_turns"] == []


# ------------------------------------------------------------------ POST /, async


def test_async_request_with_webhook_answers_at_once(http, driver):
    """README: is_async with webhook{url, header}: {"detail", "status": "processing", "task_id"}."""
    response = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK})
    assert response.status_code == 200
    answer = response.json()
    task_id = answer.pop("task_id")
    assert answer == ASYNC_ANSWER
    assert http.get("/tasks").json() == {"tasks": [task_id]}
    assert http.get(f"/status/{task_id}").json()["status"] == "processing"  # the original: {"status": "processing"}
    tj = driver.get(task_id)
    assert tj["spec"]["webhook"]["url"] == HOOK["url"]
    driver.succeed(task_id, transcript())
    # The original forgets a finished task (404); ifw keeps its answer until the TTL.
    done = http.get(f"/status/{task_id}").json()
    assert done["status"] == "completed" and set(done["output"]) == {"text", "chunks"}
    assert done["processed_by"]["pod"] == "tj-talk-runner-x7k2p"
    assert http.get("/tasks").json() == {"tasks": []}


def test_async_without_webhook_is_the_originals_400(http, driver):
    response = http.post("/", json={"url": URL, "is_async": True})
    assert (response.status_code, response.json()) == (400, {"detail": "Webhook is required for async tasks"})
    assert driver.tjs() == []


def test_unknown_fields_are_ignored_and_named_in_a_header(http, driver):
    """The original's Body() fields ignore what they do not declare; ifw too, and says so."""
    body = {"url": URL, "is_async": True, "webhook": {**HOOK, "retries": 3}, "diarize_audio": True, "callback": "x"}
    response = http.post("/", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-ignored-fields"] == "diarize_audio, callback, webhook.retries"
    spec = driver.get(response.json()["task_id"])["spec"]
    assert spec["diarization"] == {"enabled": False}  # the misspelt field did nothing, as in the original
    clean = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK})
    assert "x-ignored-fields" not in clean.headers
    # A name no header can carry as it is (a line break, non-ASCII) is percent-encoded.
    odd = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "x\r\nSet-Cookie: a": 1, "ü": 2})
    assert odd.status_code == 200 and odd.headers["x-ignored-fields"] == "x%0D%0ASet-Cookie%3A%20a, %C3%BC"
    assert "set-cookie" not in odd.headers


# ------------------------------------------------------------------ managed_task_id

IDS = ["Meeting_2026-12-01_A", "crm:call/8812", "Kundengespräch 42 (Zürich)", "call-" + "0123456789abcdef" * 5, "talk-7"]


@pytest.mark.parametrize("task_id", IDS, ids=["underscore", "colon-slash", "unicode-spaces", "80-chars", "a-name"])
def test_any_managed_task_id_works_everywhere(http, driver, pool, task_id):
    """The original uses managed_task_id as a dict key: any string. ifw names the TranscriptionJob
    after it (a slug and a hash when it is no object name) and answers with the id itself."""
    response = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": task_id})
    assert response.status_code == 200, response.text
    assert response.json()["task_id"] == task_id
    [tj] = driver.tjs()
    name = tj["metadata"]["name"]
    assert len(name) <= 63 and name == name.lower() and name[0].isalnum() and name[-1].isalnum()
    if name != task_id:
        assert tj["metadata"]["annotations"][ANNOTATION_TASK_ID] == task_id
    assert http.get("/tasks").json() == {"tasks": [task_id]}
    encoded = quote(task_id, safe="")  # crm%3Acall%2F8812
    status = http.get(f"/status/{encoded}")
    assert status.status_code == 200 and status.json()["task_id"] == task_id
    # The same id maps to the same name: a second task with it is refused, never overwritten.
    again = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": task_id})
    assert (again.status_code, again.json()) == (409, {"detail": f"Task {task_id} already exists"})
    # A sync request with it answers with it too (and so do its errors).
    driver.fail(name, "InvalidAudio", "not audio")
    assert http.get(f"/status/{encoded}").json()["status"] == "error"
    assert http.delete(f"/cancel/{encoded}").json()["task_id"] == task_id  # finished: kept, answered
    driver.custom.delete_namespaced_custom_object("ifw.dev", "v1alpha1", driver.namespace, "transcriptionjobs", name)
    pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": task_id})
    driver.wait_tj(name)
    assert http.delete(f"/cancel/{encoded}").json() == {"status": "cancelled"}
    waited = pending.result(timeout=10)
    assert waited.status_code == 409 and waited.json()["task_id"] == task_id
    assert http.get(f"/status/{encoded}").status_code == 404


def test_a_slash_in_an_id_works_unencoded_too(http, driver):
    http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": "crm:call/8812"})
    assert http.get("/status/crm:call/8812").json()["task_id"] == "crm:call/8812"


def test_an_id_is_not_the_name_another_id_maps_to(http, driver):
    """The slug-and-hash name of one id is itself a valid id: it does not find the other task."""
    http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": "Meeting_A"})
    name = driver.tjs()[0]["metadata"]["name"]
    assert name != "Meeting_A"
    assert http.get(f"/status/{name}").status_code == 404
    assert http.delete(f"/cancel/{name}").status_code == 404
    # Another client may use that name as its own id: it gets a task of its own (it used to be a 409,
    # which let a client that knew the hash block another's id).
    taken = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": name})
    assert taken.status_code == 200 and len(driver.tjs()) == 2
    assert driver.get(name)["metadata"]["annotations"][ANNOTATION_TASK_ID] == "Meeting_A"


@pytest.mark.parametrize("task_id", ["", "a" * 257, "two\nlines", "tab\there", "nul\0"])
def test_unusable_ids_are_refused_naming_the_field(http, driver, task_id):
    response = http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": task_id})
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["detail"]] == [["body", "managed_task_id"]]
    assert driver.tjs() == []


# ------------------------------------------------------------------ /status, /cancel


def test_status_shapes_are_the_sync_answers(http, driver, pool):
    """/status of a completed task carries the same output and processed_by as the sync answer."""
    _, response = run_sync(http, driver, pool, {"url": URL, "diarise_audio": True, "managed_task_id": "same"},
                           transcript(speakers=True), "same")  # fmt: skip
    status = http.get("/status/same").json()
    assert status["output"] == response.json()["output"]
    assert status["processed_by"] == response.json()["processed_by"]


def test_cancel_a_running_task_like_the_original(http, driver):
    http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": "bg"})
    driver.running("bg")
    response = http.delete("/cancel/bg")
    assert (response.status_code, response.json()) == (200, {"status": "cancelled"})
    assert driver.get("bg") is None
    assert http.delete("/cancel/bg").json() == {"detail": "Task not found"}


def test_cancel_a_finished_task_keeps_it_and_answers_its_output(http, driver):
    """The original answers a done task {"status": "completed", "output": ...} and keeps it."""
    http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": "done"})
    driver.succeed("done", transcript())
    for _ in range(2):
        response = http.delete("/cancel/done")
        assert response.status_code == 200
        answer = response.json()
        assert answer["status"] == "completed" and answer["output"]["text"] == transcript().text
    assert driver.get("done") is not None  # the transcript survives
    assert http.get("/status/done").json()["output"] == answer["output"]


def test_cancel_a_failed_task_keeps_it_and_answers_its_error(http, driver):
    http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": "broke"})
    driver.fail("broke", "InvalidAudio", "ffmpeg could not decode the file")
    answer = http.delete("/cancel/broke").json()
    assert answer == http.get("/status/broke").json()
    assert (answer["status"], answer["reason"]) == ("error", "InvalidAudio")
    assert driver.get("broke") is not None


def test_unknown_task_is_the_originals_404(http):
    for response in (http.get("/status/nope"), http.delete("/cancel/nope")):
        assert (response.status_code, response.json()) == (404, {"detail": "Task not found"})


# ------------------------------------------------------------------ auth, URLs


@pytest.mark.parametrize("headers", [{}, {"x-admin-api-key": "wrong"}])
def test_wrong_key_is_the_originals_401_on_every_route(gw, headers):
    with gw.client(headers=headers) as client:
        for method, path in (("POST", "/"), ("GET", "/tasks"), ("GET", "/status/x"), ("DELETE", "/cancel/x"),
                             ("GET", "/docs")):  # fmt: skip
            response = client.request(method, path, json={"url": URL} if method == "POST" else None)
            assert (response.status_code, response.json()) == (401, {"detail": "Unauthorized"})


@pytest.mark.parametrize("url", ["ftp://example.com/a.mp3", "not a url", "s3://bucket/a.mp3", "file:///etc/passwd", ""])
def test_a_url_not_starting_with_http_is_the_originals_400(http, driver, url):
    response = http.post("/", json={"url": url})
    assert (response.status_code, response.json()) == (400, {"detail": "Invalid URL"})
    assert driver.tjs() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "url"),  # missing: FastAPI's 422, as in the original
        ({"url": "https://"}, "url"),  # starts with http but is no URL (the original failed later, 500)
        ({"url": "http://169.254.169.254/latest/meta-data"}, "url"),  # ifw's SSRF guard
        ({"url": "ftp://example.com/a.mp3", "batch_size": "many"}, "batch_size"),  # several errors: the list
    ],
)
def test_other_url_problems_are_422_naming_the_field(http, driver, body, field):
    response = http.post("/", json=body)
    assert response.status_code == 422, response.text
    assert any(d["loc"][-1] == field for d in response.json()["detail"])
    assert driver.tjs() == []


def test_diarisation_without_a_token_is_400_not_the_originals_500(gateway_factory, driver):
    gw = gateway_factory()  # no HF_TOKEN, no diarization configured
    with gw.client() as client:
        response = client.post("/", json={"url": URL, "diarise_audio": True})
    assert response.status_code == 400 and response.json()["detail"].startswith("diarise_audio: ")
    assert driver.tjs() == []


def test_hf_token_alone_turns_diarization_on_as_in_the_original(monkeypatch):
    from ifw.gateway.config import GatewaySettings

    for name in ("HF_TOKEN", "IFW_GATEWAY_HF_TOKEN", "IFW_GATEWAY_DIARIZATION_AVAILABLE"):
        monkeypatch.delenv(name, raising=False)
    assert GatewaySettings().diarization_available is False
    monkeypatch.setenv("HF_TOKEN", "hf_example")
    assert GatewaySettings().diarization_available is True
    monkeypatch.setenv("IFW_GATEWAY_DIARIZATION_AVAILABLE", "false")  # the chart's value decides
    assert GatewaySettings().diarization_available is False


# ------------------------------------------------------------------ long sync requests


def test_sync_waits_without_a_cap_by_default():
    from ifw.gateway.config import GatewaySettings

    assert GatewaySettings().sync_timeout_seconds is None


def test_a_long_sync_request_gets_keepalive_spaces_then_its_json(gateway_factory, driver):
    gw = gateway_factory(keepalive_seconds=0.2, sync_timeout_seconds=None)
    with gw.client() as client, client.stream("POST", "/", json={"url": URL, "managed_task_id": "long"}) as response:
        # The status and a first space arrive while the job still runs.
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        chunks = response.iter_bytes()
        first = next(chunks)
        assert first.strip() == b""
        assert "status" not in driver.get("long")  # nothing reported yet: the job has not finished
        time.sleep(0.5)
        driver.succeed("long", transcript())
        body = first + b"".join(chunks)
    assert body.startswith(b"  ")
    answer = json.loads(body)
    assert answer["status"] == "completed" and answer["output"]["text"] == transcript().text


def test_an_error_after_keepalive_started_is_in_the_body(gateway_factory, driver, pool):
    gw = gateway_factory(keepalive_seconds=0.2)
    with gw.client() as client:
        pending = pool.submit(client.post, "/", json={"url": URL, "managed_task_id": "late"})
        driver.wait_tj("late")
        time.sleep(0.6)
        driver.fail("late", "InvalidAudio", "not audio")
        response = pending.result(timeout=10)
    assert response.status_code == 200 and response.content.startswith(b" ")
    assert response.json() == {"detail": "InvalidAudio: not audio", "status": "error", "task_id": "late",
                               "reason": "InvalidAudio", "message": "not audio"}  # fmt: skip


def test_a_quick_failure_keeps_its_status_code(gateway_factory, driver, pool):
    gw = gateway_factory(keepalive_seconds=5)
    with gw.client() as client:
        pending = pool.submit(client.post, "/", json={"url": URL, "managed_task_id": "quick"})
        driver.wait_tj("quick")
        driver.fail("quick", "InvalidAudio", "not audio")
        response = pending.result(timeout=10)
    assert response.status_code == 422 and response.json()["reason"] == "InvalidAudio"
