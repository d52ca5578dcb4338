"""hotwords, VAD settings and the returned figures over HTTP: the original route (JSON and
multipart), the OpenAI SDK and raw multipart on /v1, against the real test apiserver.

Each request must become a TranscriptionJob whose spec carries the field (spec.hotwords,
spec.vad); each answer must carry what the runner computed (a language per segment in
verbose_json and diarized_json, a probability per word in verbose_json and, beside the chunks,
in the original's word output). Bad values are refused elsewhere (test_bad_input's catalogue,
test_openai's refusals, tests/crds for the apiserver).
"""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

KEY = "figures-key"
URL = "https://audio.example.com/talk.mp3"
VAD = {"threshold": 0.6, "prefix_padding_ms": 100, "silence_duration_ms": 300}
SPEC_VAD = {"threshold": 0.6, "prefixPaddingMs": 100, "silenceDurationMs": 300}


def finish(driver, result) -> dict:
    """Play the runner of the one job there is: succeed with `result`; the job's spec is returned."""
    tj = driver.wait_tj()
    driver.succeed(tj["metadata"]["name"], result)
    return tj


# ------------------------------------------------------------------ the original route


def test_rest_json_takes_hotwords_and_vad_and_word_output_gains_probabilities(gw, driver, pool):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", json={"url": URL, "timestamp": "word", "hotwords": ["Kubernetes", "kopf"],
                                                    "prompt": "A talk about operators.", "vad": VAD})  # fmt: skip
        tj = finish(driver, transcript("word"))
        answer = pending.result(timeout=15)
    assert answer.status_code == 200, answer.text
    spec = tj["spec"]
    assert spec["hotwords"] == ["Kubernetes", "kopf"] and spec["prompt"] == "A talk about operators."
    assert spec["vad"] == SPEC_VAD
    output = answer.json()["output"]
    # the chunks keep exactly the original's keys; the probabilities come beside them, one per chunk
    assert all(set(c) == {"timestamp", "text"} for c in output["chunks"])
    assert output["word_probabilities"] == [0.9] * len(output["chunks"]) and len(output["chunks"]) == 9


def test_rest_chunk_output_is_the_originals_exactly(gw, driver, pool):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", json={"url": URL, "vad": {"threshold": 0.3}})
        tj = finish(driver, transcript())
        answer = pending.result(timeout=15)
    assert tj["spec"]["vad"] == {"threshold": 0.3} and "hotwords" not in tj["spec"]
    assert set(answer.json()["output"]) == {"text", "chunks"}


def test_rest_multipart_takes_repeated_hotwords_and_vad_as_json(gw, driver, pool, wav):
    files = [("file", ("a.wav", wav.read_bytes(), "audio/wav")), ("hotwords", (None, "Ebenezer")),
             ("hotwords", (None, "Duguid")), ("vad", (None, '{"silence_duration_ms": 1200}'))]  # fmt: skip
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", files=files)
        tj = finish(driver, transcript())
        assert pending.result(timeout=15).status_code == 200
    assert tj["spec"]["hotwords"] == ["Ebenezer", "Duguid"] and tj["spec"]["vad"] == {"silenceDurationMs": 1200}


# ------------------------------------------------------------------ OpenAI


def test_openai_sdk_chunking_strategy_and_hotwords_reach_the_spec_and_verbose_json_has_the_figures(
    client, driver, pool, wav
):
    def ask():
        with wav.open("rb") as f:
            return client.audio.transcriptions.create(
                model="whisper-1", file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"],
                chunking_strategy={"type": "server_vad", **VAD}, extra_body={"hotwords": ["Kubernetes", "kopf"]},
            )  # fmt: skip

    pending = pool.submit(ask)
    tj = finish(driver, transcript("word"))
    answer = pending.result(timeout=15)
    assert tj["spec"]["vad"] == SPEC_VAD and tj["spec"]["hotwords"] == ["Kubernetes", "kopf"]
    # the SDK's own types keep the extension fields
    assert [s.model_extra["language"] for s in answer.segments] == ["english"] * 3
    assert answer.language == "english"
    assert len(answer.words) == 9 and all(w.model_extra["probability"] == 0.9 for w in answer.words)


def test_openai_diarized_json_segments_carry_their_language(client, driver, pool, wav):
    def ask():
        with wav.open("rb") as f:
            return client.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=f,
                                                      response_format="diarized_json")  # fmt: skip

    pending = pool.submit(ask)
    finish(driver, transcript(speakers=True))
    answer = pending.result(timeout=15)
    assert [s.speaker for s in answer.segments] == ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01"]
    assert {s.model_extra["language"] for s in answer.segments} == {"english"}


@pytest.mark.parametrize(
    ("data", "vad", "hotwords"),
    [
        # curl's way: the object as JSON text, terms as repeated parts
        ([("chunking_strategy", '{"type": "server_vad", "threshold": 0.7}'), ("hotwords", "a"), ("hotwords", "b")],
         {"threshold": 0.7}, ["a", "b"]),
        # the SDK's form encoding of the object and of a list
        ([("chunking_strategy[type]", "server_vad"), ("chunking_strategy[silence_duration_ms]", "900"),
          ("hotwords[]", "c")], {"silenceDurationMs": 900}, ["c"]),
        ([("chunking_strategy", "auto")], None, None),
        ([("chunking_strategy", '"auto"')], None, None),
    ],
)  # fmt: skip
def test_openai_multipart_forms(gw, driver, pool, wav, data, vad, hotwords):
    files = [("file", ("a.wav", wav.read_bytes(), "audio/wav")), *((k, (None, v)) for k, v in data)]
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
        pending = pool.submit(http.post, "/v1/audio/transcriptions", files=files)
        tj = finish(driver, transcript())
        assert pending.result(timeout=15).status_code == 200
    assert tj["spec"].get("vad") == vad and tj["spec"].get("hotwords") == hotwords


def test_openai_chunking_strategy_sent_twice_is_refused(gw, driver, wav):
    files = [("file", ("a.wav", wav.read_bytes(), "audio/wav")), ("chunking_strategy", (None, "auto")),
             ("chunking_strategy[type]", (None, "server_vad"))]  # fmt: skip
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
        answer = http.post("/v1/audio/transcriptions", files=files)
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "chunking_strategy"
    assert driver.tjs() == []
