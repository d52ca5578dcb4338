"""Known speakers and multichannel over HTTP, against the real test apiserver: the original route
(JSON and multipart), the OpenAI SDK (its own known_speaker_* parameters; multichannel through
extra_body), and what each refuses, naming the field.

A request must become a TranscriptionJob whose spec carries the field: spec.diarization.knownSpeakers
with URLs only (an inline data-URL reference is kept beside the upload and served to the runner by
its own token, as the upload is), spec.multichannel. The runner side is tested on real speech in
tests/runner/test_known_speakers.py and tests/runner/test_multichannel.py.
"""

from __future__ import annotations

import base64
import wave

import httpx
import numpy as np
import pytest

from ifw.core.transcript import Segment, SpeakerTurn, Transcript, Word
from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

KEY = "speakers-key"
URL = "https://audio.example.com/call.wav"
ALICE_URL = "https://audio.example.com/alice.wav"


def wav_bytes(channels: int, seconds: float = 2.5) -> bytes:
    import io

    t = np.arange(int(16000 * seconds)) / 16000
    frames = np.stack([0.2 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((frames * 32767).astype("<i2").tobytes())
    return out.getvalue()


# small: POST /'s JSON body is capped (max_json_bytes, 64 KiB by default); the runner checks the 2-10 s
REFERENCE = wav_bytes(1, seconds=0.5)
DATA_URL = "data:audio/wav;base64," + base64.b64encode(REFERENCE).decode()


def named(speakers: list[str], channels: bool = False) -> Transcript:
    """A stored transcript whose speakers carry names (or channels)."""
    segs = [
        Segment(start=0.2, end=1.1, text=" Hello there.", speaker=speakers[0], channel=0 if channels else None,
                words=[Word(start=0.2, end=0.6, text=" Hello", speaker=speakers[0]),
                       Word(start=0.6, end=1.1, text=" there.", speaker=speakers[0])]),
        Segment(start=0.9, end=2.0, text=" Hi.", speaker=speakers[1], channel=1 if channels else None,
                words=[Word(start=0.9, end=2.0, text=" Hi.", speaker=speakers[1])]),
    ]  # fmt: skip
    turns = [SpeakerTurn(speaker=s.speaker, start=s.start, end=s.end, text=s.text.strip(), channel=s.channel)
             for s in segs]  # fmt: skip
    return Transcript(text=" Hello there. Hi.", segments=segs, speakers=turns, language="en", duration=2.5)


def finish(driver, result) -> dict:
    tj = driver.wait_tj()
    driver.succeed(tj["metadata"]["name"], result)
    return tj


# ------------------------------------------------------------------ the original route


def test_rest_json_known_speakers_by_url_and_inline(gw, driver, pool):
    body = {"url": URL, "diarise_audio": True,
            "known_speakers": [{"name": "Alice", "url": ALICE_URL}, {"name": "Bob", "url": DATA_URL}]}  # fmt: skip
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", json=body)
        tj = driver.wait_tj()
        d = tj["spec"]["diarization"]
        assert d["enabled"] is True and tj["spec"]["audio"]["url"] == URL
        assert [k["name"] for k in d["knownSpeakers"]] == ["Alice", "Bob"]
        assert d["knownSpeakers"][0]["audio"]["url"] == ALICE_URL
        inline = d["knownSpeakers"][1]["audio"]["url"]
        assert "/internal/uploads/" in inline and "base64" not in inline  # the spec holds a URL, never the audio
        assert httpx.get(inline, timeout=10).content == REFERENCE  # the runner fetches it like an upload
        driver.succeed(tj["metadata"]["name"], named(["Alice", "SPEAKER_01"]))
        answer = pending.result(timeout=15)
    assert answer.status_code == 200, answer.text
    assert [c["speaker"] for c in answer.json()["output"]["speakers"]] == ["Alice", "SPEAKER_01"]


def test_rest_multipart_multichannel_upload(gw, driver, pool):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", data={"multichannel": "true"},
                              files={"file": ("call.wav", wav_bytes(2), "audio/wav")})  # fmt: skip
        tj = finish(driver, named(["CHANNEL_0", "CHANNEL_1"], channels=True))
        answer = pending.result(timeout=15)
    assert answer.status_code == 200, answer.text
    assert tj["spec"]["multichannel"] is True and tj["spec"]["diarization"].get("enabled") is not True
    out = answer.json()["output"]
    assert [(c["speaker"], c["channel"]) for c in out["speakers"]] == [("CHANNEL_0", 0), ("CHANNEL_1", 1)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"multichannel": True, "diarise_audio": True}, "multichannel"),
        ({"known_speakers": [{"name": "Alice", "url": ALICE_URL}]}, "known_speakers"),
        ({"diarise_audio": True, "known_speakers": [{"name": "SPEAKER_00", "url": ALICE_URL}]}, "name"),
        (
            {
                "diarise_audio": True,
                "known_speakers": [{"name": "A", "url": ALICE_URL}, {"name": "A", "url": ALICE_URL}],
            },
            "known_speakers",
        ),
        (
            {"diarise_audio": True, "known_speakers": [{"name": f"p{i}", "url": ALICE_URL} for i in range(9)]},
            "known_speakers",
        ),
        ({"diarise_audio": True, "known_speakers": [{"name": "A", "url": "data:text/plain;base64,aGk="}]}, "url"),
        ({"diarise_audio": True, "known_speakers": [{"name": "A", "url": "data:audio/wav;base64,@@"}]}, "url"),
        ({"diarise_audio": True, "known_speakers": [{"name": "A", "url": "ftp://x/y.wav"}]}, "url"),
        ({"diarise_audio": True, "known_speakers": [{"name": "A", "url": "http://127.0.0.1/a.wav"}]}, "known_speakers"),
        ({"diarise_audio": True, "known_speakers": [{"name": "A"}]}, "url"),
        ({"multichannel": "maybe"}, "multichannel"),
    ],
)
def test_rest_refusals_name_the_field(gw, driver, body, field):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        answer = http.post("/", json={"url": URL, **body})
    assert 400 <= answer.status_code < 500, answer.text
    detail = answer.json()["detail"]
    assert field in str(detail), detail
    assert driver.tjs() == []


def test_rest_mono_upload_with_multichannel_is_refused(gw, driver):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        answer = http.post("/", data={"multichannel": "true"}, files={"file": ("a.wav", wav_bytes(1), "audio/wav")})
    assert answer.status_code == 422 and "multichannel" in str(answer.json()["detail"]), answer.text
    assert "mono" in answer.text and driver.tjs() == []


# ------------------------------------------------------------------ the OpenAI SDK


def test_sdk_known_speakers_and_diarized_json_names(client, driver, pool, tmp_path):
    audio = tmp_path / "call.wav"
    audio.write_bytes(wav_bytes(1))
    pending = pool.submit(client.audio.transcriptions.create, file=audio.open("rb"), model="whisper-1",
                          response_format="diarized_json", known_speaker_names=["agent", "customer"],
                          known_speaker_references=[DATA_URL, DATA_URL])  # fmt: skip
    tj = driver.wait_tj()
    d = tj["spec"]["diarization"]
    assert d["enabled"] is True and [k["name"] for k in d["knownSpeakers"]] == ["agent", "customer"]
    for k in d["knownSpeakers"]:
        assert httpx.get(k["audio"]["url"], timeout=10).content == REFERENCE
    upload = httpx.get(tj["spec"]["audio"]["url"], timeout=10)
    assert upload.status_code == 200 and upload.content == audio.read_bytes()
    driver.succeed(tj["metadata"]["name"], named(["agent", "SPEAKER_01"]))
    result = pending.result(timeout=15)
    assert [s.speaker for s in result.segments] == ["agent", "SPEAKER_01"]


def test_sdk_multichannel_extra_body(client, driver, pool, tmp_path):
    audio = tmp_path / "stereo.wav"
    audio.write_bytes(wav_bytes(2))
    pending = pool.submit(client.audio.transcriptions.create, file=audio.open("rb"), model="whisper-1",
                          response_format="verbose_json", timestamp_granularities=["word", "segment"],
                          extra_body={"multichannel": True})  # fmt: skip
    tj = finish(driver, named(["CHANNEL_0", "CHANNEL_1"], channels=True))
    result = pending.result(timeout=15)
    assert tj["spec"]["multichannel"] is True
    assert [(s.speaker, s.channel) for s in result.segments] == [("CHANNEL_0", 0), ("CHANNEL_1", 1)]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"known_speaker_names": ["a", "b"], "known_speaker_references": [DATA_URL]}, "known_speaker_references[]"),
        ({"known_speaker_names": ["a"], "known_speaker_references": [ALICE_URL]}, "known_speaker_references[]"),
        (
            {"known_speaker_names": ["a"], "known_speaker_references": ["data:audio/wav;base64,!!"]},
            "known_speaker_references[]",
        ),
        ({"known_speaker_names": ["CHANNEL_1"], "known_speaker_references": [DATA_URL]}, "known_speaker_names[]"),
        ({"known_speaker_names": ["a", "a"], "known_speaker_references": [DATA_URL] * 2}, "known_speaker_names[]"),
        (
            {"known_speaker_names": [f"p{i}" for i in range(9)], "known_speaker_references": [DATA_URL] * 9},
            "known_speaker_names[]",
        ),
        ({"extra_body": {"multichannel": True}}, "multichannel"),  # the upload is mono
        ({"extra_body": {"multichannel": True, "diarize": True}}, "multichannel"),
    ],
)
def test_sdk_refusals_name_the_field(client, driver, tmp_path, kwargs, param):
    import openai

    audio = tmp_path / "mono.wav"
    audio.write_bytes(wav_bytes(1))
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.audio.transcriptions.create(file=audio.open("rb"), model="whisper-1", **kwargs)
    assert refused.value.body["param"] == param, refused.value.body
    assert driver.tjs() == []


def test_sdk_reference_over_starlettes_default_part_size_is_taken(client, driver, pool, tmp_path):
    """A clip of 0.9 MB (1.2 MB as a data URL) is within ifw's limit for a reference; Starlette's
    default form part limit (1 MiB) used to refuse it with a 400 that named no field."""
    audio = tmp_path / "mono.wav"
    audio.write_bytes(wav_bytes(1))
    clip = wav_bytes(1, seconds=28.0)  # 896 KB of 16-bit mono at 16 kHz
    big = "data:audio/wav;base64," + base64.b64encode(clip).decode()
    assert 1024 * 1024 < len(big)
    pending = pool.submit(client.audio.transcriptions.create, file=audio.open("rb"), model="whisper-1",
                          response_format="diarized_json", known_speaker_names=["a"],
                          known_speaker_references=[big])  # fmt: skip
    tj = driver.wait_tj()
    (known,) = tj["spec"]["diarization"]["knownSpeakers"]
    assert httpx.get(known["audio"]["url"], timeout=10).content == clip
    driver.succeed(tj["metadata"]["name"], named(["a", "SPEAKER_01"]))
    assert [s.speaker for s in pending.result(timeout=15).segments] == ["a", "SPEAKER_01"]


@pytest.mark.parametrize(("decoded_bytes", "says"), [(2_000_000, "at most"), (4_000_000, "too long")])
def test_sdk_reference_over_the_limit_is_a_422_naming_the_field(client, driver, tmp_path, decoded_bytes, says):
    """Over ifw's limit: named by ifw's check (2 MB), or, past the form's part limit too (4 MB), by the
    gateway in place of Starlette's anonymous 400."""
    import openai

    audio = tmp_path / "mono.wav"
    audio.write_bytes(wav_bytes(1))
    huge = "data:audio/wav;base64," + base64.b64encode(bytes(decoded_bytes)).decode()
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.audio.transcriptions.create(file=audio.open("rb"), model="whisper-1", known_speaker_names=["a"],
                                           known_speaker_references=[huge])  # fmt: skip
    assert refused.value.body["param"] == "known_speaker_references[]", refused.value.body
    assert says in refused.value.body["message"], refused.value.body
    assert driver.tjs() == []


def test_rest_multipart_text_field_over_64k_names_it(gw, driver):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        answer = http.post("/", data={"prompt": "word " * 20_000}, files={"file": ("a.wav", wav_bytes(1))})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "prompt"], answer.text
    assert driver.tjs() == []


def test_transcript_without_names_keeps_the_original_shape(gw, driver, pool):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", json={"url": URL, "diarise_audio": True})
        tj = finish(driver, transcript(speakers=True))
        answer = pending.result(timeout=15)
    assert "knownSpeakers" not in tj["spec"]["diarization"] and "multichannel" not in str(answer.json())
