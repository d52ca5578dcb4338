"""OpenAI's audio API through the official `openai` SDK, pointed at the gateway.

Every response format (parsed with the SDK's own types), a prompt and a temperature reaching
the TranscriptionJob, streaming fed by the job's real progress (the Driver plays the runner
writing status.progress.text), models, diarized_json, usage, logprobs; and what is refused.
"""

from __future__ import annotations

import json
import queue
import time

import httpx
import pytest

from ifw.core.contract import ANNOTATION_STREAM
from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

KEY = "openai-compatible-key"
TEXT = transcript().text.strip()  # OpenAI's top-level text has no leading space (its segments keep theirs)


def fetch_as_runner(tj: dict) -> httpx.Response:
    return httpx.get(tj["spec"]["audio"]["url"], timeout=10)


def complete(driver, result) -> dict:
    """Play the runner of the one job there is: fetch the upload, store `result`, succeed."""
    tj = driver.wait_tj()
    assert fetch_as_runner(tj).status_code == 200
    driver.succeed(tj["metadata"]["name"], result)
    return tj


def forget(driver, tj) -> None:
    driver.custom.delete_namespaced_custom_object(
        "ifw.dev", "v1alpha1", driver.namespace, "transcriptionjobs", tj["metadata"]["name"])  # fmt: skip


def ask(client, wav, **kwargs):
    with wav.open("rb") as f:
        return client.audio.transcriptions.create(model=kwargs.pop("model", "whisper-1"), file=f, **kwargs)


# ------------------------------------------------------------------ formats


def test_json_text_srt_vtt(client, driver, pool, wav):
    import srt
    import webvtt

    pending = pool.submit(ask, client, wav)
    tj = complete(driver, transcript())
    answer = pending.result(timeout=15)
    assert answer.text == TEXT
    assert (answer.usage.type, answer.usage.seconds) == ("duration", 4.5)  # as OpenAI bills whisper-1
    assert "model" not in tj["spec"] and tj["spec"]["batchSize"] == 64  # whisper-1: the default model
    forget(driver, tj)

    pending = pool.submit(ask, client, wav, response_format="text")
    forget(driver, complete(driver, transcript()))
    assert pending.result(timeout=15) == TEXT.strip() + "\n"

    pending = pool.submit(ask, client, wav, response_format="srt", language="en")
    tj = complete(driver, transcript())
    cues = list(srt.parse(pending.result(timeout=15)))
    assert [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in cues][0] == (0.2, 1.1, "Hello world.")
    assert len(cues) == 3 and tj["spec"]["language"] == "en"
    forget(driver, tj)

    pending = pool.submit(ask, client, wav, response_format="vtt")
    forget(driver, complete(driver, transcript()))
    vtt = webvtt.from_string(pending.result(timeout=15))
    assert [(c.start, c.end, c.text) for c in vtt][2] == ("00:00:02.900", "00:00:04.000", "How are you? Fine.")


def test_verbose_json_carries_the_stored_scores_and_words(client, driver, pool, wav):
    pending = pool.submit(ask, client, wav, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    tj = complete(driver, transcript("word"))
    verbose = pending.result(timeout=15)
    assert tj["spec"]["timestamp"] == "word"
    assert (verbose.language, verbose.duration, verbose.text) == ("english", 4.5, TEXT)
    assert verbose.usage.seconds == 4.5
    stored = transcript("word").segments
    for seg, want in zip(verbose.segments, stored, strict=True):
        assert (seg.start, seg.end, seg.text) == (want.start, want.end, want.text)
        assert (seg.tokens, seg.avg_logprob, seg.temperature, seg.compression_ratio, seg.no_speech_prob) == (
            want.tokens, want.avg_logprob, want.temperature, want.compression_ratio, want.no_speech_prob)  # fmt: skip
    assert [(w.word, w.start, w.end) for w in verbose.words][:2] == [("Hello", 0.2, 0.6), ("world.", 0.6, 1.1)]


def test_diarized_json_gives_speaker_segments(client, driver, pool, wav):
    from openai.types.audio import TranscriptionDiarized

    pending = pool.submit(ask, client, wav, model="gpt-4o-transcribe-diarize", response_format="diarized_json")
    tj = complete(driver, transcript("word", speakers=True))
    answer = pending.result(timeout=15)
    assert isinstance(answer, TranscriptionDiarized)
    assert tj["spec"]["diarization"]["enabled"] is True and "model" not in tj["spec"]
    assert (answer.task, answer.duration, answer.text, answer.usage.seconds) == ("transcribe", 4.5, TEXT, 4.5)
    assert [(s.speaker, s.start, s.end, s.text) for s in answer.segments] == [
        ("SPEAKER_00", 0.2, 1.1, " Hello world."),
        ("SPEAKER_00", 1.3, 2.4, " Thanks for coming."),
        ("SPEAKER_01", 2.9, 3.6, " How are you?"),  # the segment is cut where its words change speaker
        ("SPEAKER_00", 3.7, 4.0, " Fine."),
    ]
    assert {s.type for s in answer.segments} == {"transcript.text.segment"}
    assert [s.id for s in answer.segments] == ["seg_0", "seg_1", "seg_2", "seg_3"]


def test_diarize_field_puts_speakers_in_other_formats(client, driver, pool, wav):
    import srt

    pending = pool.submit(ask, client, wav, response_format="srt", extra_body={"diarize": "true"})
    tj = complete(driver, transcript(speakers=True))
    assert tj["spec"]["diarization"]["enabled"] is True
    assert list(srt.parse(pending.result(timeout=15)))[2].content == "[SPEAKER_01] How are you? Fine."


def test_logprobs_are_the_stored_token_scores(client, driver, pool, wav):
    pending = pool.submit(ask, client, wav, include=["logprobs"])
    complete(driver, transcript())
    answer = pending.result(timeout=15)
    stored = [(t, lp) for s in transcript().segments for t, lp in zip(s.tokens, s.logprobs, strict=True)]
    assert [(p.model_extra["token_id"], p.logprob) for p in answer.logprobs] == stored
    # No tokenizer in the gateway: token texts are not known here (documented).
    assert {(p.token, p.bytes) for p in answer.logprobs} == {(None, None)}


def test_prompt_and_temperature_reach_the_job(client, driver, pool, wav):
    pending = pool.submit(ask, client, wav, prompt="Kubernetes, kopf, Whisper.", temperature=0.4)
    tj = complete(driver, transcript())
    assert (tj["spec"]["prompt"], tj["spec"]["temperature"]) == ("Kubernetes, kopf, Whisper.", 0.4)
    assert pending.result(timeout=15).text == TEXT

    with wav.open("rb") as f:
        pending = pool.submit(client.audio.translations.create, model="whisper-1", file=f, prompt="Fachbegriffe")
        forget(driver, tj)
        tj = complete(driver, transcript())
        assert pending.result(timeout=15).text == TEXT
    assert (tj["spec"]["task"], tj["spec"]["prompt"]) == ("translate", "Fachbegriffe")


# ------------------------------------------------------------------ streaming


def _consume(client, wav, events: queue.Queue, **kwargs) -> None:
    try:
        for event in ask(client, wav, stream=True, **kwargs):
            events.put(event)
    except Exception as exc:  # noqa: BLE001 - handed to the test thread
        events.put(exc)
    events.put(None)


def _subscribed(gw, driver) -> dict:
    tj = driver.wait_tj()
    watch = gw.app.state.service.watch
    deadline = time.monotonic() + 10
    while (driver.namespace, tj["metadata"]["name"]) not in watch._subscribers:
        assert time.monotonic() < deadline, "the stream never subscribed"
        time.sleep(0.01)
    return tj


def test_stream_sends_deltas_as_the_runner_reports_text(gw, client, driver, pool, wav):
    events: queue.Queue = queue.Queue()
    pool.submit(_consume, client, wav, events)
    tj = _subscribed(gw, driver)
    name = tj["metadata"]["name"]
    assert tj["metadata"]["annotations"][ANNOTATION_STREAM] == "true"  # the runner reports progress.text

    driver.progress_text(name, " Hello world.")
    assert events.get(timeout=10).delta == "Hello world."  # Whisper's leading space dropped, as in the text
    driver.progress_text(name, " Hello world. Thanks for coming.")
    assert events.get(timeout=10).delta == " Thanks for coming."
    driver.progress_text(name, " Hello world. Thanks for coming.", percent=70)  # no growth: no event
    driver.succeed(name, transcript())
    rest = []
    while (event := events.get(timeout=10)) is not None:
        rest.append(event)
    assert [e.type for e in rest] == ["transcript.text.delta", "transcript.text.done"]
    assert rest[0].delta == " How are you? Fine."  # what progress.text had not said yet
    done = rest[-1]
    assert done.text == TEXT and done.usage.type == "duration" and done.usage.seconds == 4.5


def test_stream_of_diarized_json_ends_with_speaker_segments(gw, client, driver, pool, wav):
    events: queue.Queue = queue.Queue()
    pool.submit(_consume, client, wav, events, response_format="diarized_json")
    name = _subscribed(gw, driver)["metadata"]["name"]
    driver.succeed(name, transcript(speakers=True))
    got = []
    while (event := events.get(timeout=10)) is not None:
        got.append(event)
    assert [e.type for e in got] == ["transcript.text.delta"] + ["transcript.text.segment"] * 3 + ["transcript.text.done"]
    assert got[1].speaker == "SPEAKER_00" and got[3].text == " How are you? Fine."


def test_a_failure_during_the_stream_is_raised_by_the_sdk(gw, client, driver, pool, wav):
    import openai

    events: queue.Queue = queue.Queue()
    pool.submit(_consume, client, wav, events)
    name = _subscribed(gw, driver)["metadata"]["name"]
    driver.progress_text(name, " Hello")
    assert events.get(timeout=10).delta == "Hello"
    driver.fail(name, "InvalidAudio", "the file ends in the middle of a frame")
    error = events.get(timeout=10)
    assert isinstance(error, openai.APIError) and "InvalidAudio" in error.message


# ------------------------------------------------------------------ models


def test_models_lists_what_the_server_allows(gateway_factory, driver, wav):
    import openai

    allowed = ["openai/whisper-large-v3", "openai/whisper-large-v3-turbo"]
    gw = gateway_factory(uploads=True, allowed_models=allowed)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=30)
    ids = [m.id for m in client.models.list()]
    assert ids == ["whisper-1", "gpt-4o-transcribe-diarize", *allowed]
    model = client.models.retrieve("openai/whisper-large-v3-turbo")  # a slash in the id
    assert (model.id, model.object, model.owned_by) == ("openai/whisper-large-v3-turbo", "model", "ifw")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("whisper-2")
    assert missing.value.body["code"] == "model_not_found"
    # A model the server does not offer is refused before any job exists.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        ask(client, wav, model="openai/whisper-tiny")
    assert refused.value.body["param"] == "model"
    assert driver.tjs() == []


# ------------------------------------------------------------------ refusals and errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"language": "klingon"}, "language"),
        ({"known_speaker_names": ["agent"]}, "known_speaker_references[]"),  # a name needs its reference
        ({"chunking_strategy": {"type": "server_vad", "threshold": 1.4}}, "chunking_strategy.threshold"),
        ({"chunking_strategy": {"type": "server_vad", "prefix_padding_ms": 3000}}, "chunking_strategy.prefix_padding_ms"),
        ({"extra_body": {"hotwords": ["x" * 101]}}, "hotwords.0"),
        ({"include": ["logprobs"], "response_format": "verbose_json"}, "include[]"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities[]"),
        ({"temperature": 1.5}, "temperature"),
        ({"prompt": "x" * 2001}, "prompt"),
    ],
)
def test_what_is_not_supported_is_refused_naming_it(client, driver, wav, kwargs, param):
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as refused:
        ask(client, wav, **kwargs)
    assert refused.value.body["param"] == param, refused.value.body
    assert driver.tjs() == []


def test_stream_of_subtitles_is_refused(gw, driver, wav):
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEY}"}) as http:
        response = http.post("/v1/audio/transcriptions", data={"stream": "true", "response_format": "srt"},
                             files={"file": ("a.wav", wav.read_bytes(), "audio/wav")})  # fmt: skip
    assert response.status_code == 422 and response.json()["error"]["param"] == "stream"


def test_chunking_strategy_auto_is_what_ifw_does(client, driver, pool, wav):
    pending = pool.submit(ask, client, wav, chunking_strategy="auto")
    complete(driver, transcript())
    assert pending.result(timeout=15).text == TEXT


def test_diarized_json_without_diarization_is_400(gateway_factory, driver, wav):
    import openai

    gw = gateway_factory(uploads=True)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, wav, response_format="diarized_json")
    assert "diarized_json" in refused.value.message
    assert driver.tjs() == []


def test_auth_and_a_failed_task(client, gw, driver, pool, wav):
    import openai

    wrong = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        ask(wrong, wav)
    pending = pool.submit(ask, client, wav)
    driver.fail(driver.wait_tj()["metadata"]["name"], "InvalidAudio", "ffmpeg could not decode the file")
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        pending.result(timeout=15)
    assert failed.value.body["code"] == "InvalidAudio"


def test_keepalive_then_an_error_in_openai_shape(gateway_factory, driver, pool, wav):
    gw = gateway_factory(uploads=True, keepalive_seconds=0.2)
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        pending = pool.submit(http.post, "/v1/audio/transcriptions", files={"file": ("a.wav", wav.read_bytes())})
        name = driver.wait_tj()["metadata"]["name"]
        time.sleep(0.6)
        driver.fail(name, "InvalidAudio", "not audio")
        response = pending.result(timeout=10)
    assert response.status_code == 200 and response.content.startswith(b" ")
    error = json.loads(response.content)["error"]
    assert (error["code"], error["task_id"], error["type"]) == ("InvalidAudio", name, "invalid_request_error")
