"""Renderers: each format parses with a real parser and carries the words and times of the transcript."""

from __future__ import annotations

import html
import json
from datetime import timedelta
from typing import get_args

import pytest
import srt
import webvtt

from ifw.core.formats import FORMATS, MEDIA_TYPES, render, render_object, to_openai_json
from ifw.core.transcript import Segment, SpeakerTurn, Transcript, Word
from ifw.crds.transcriptionjob import ResultFormat


def _words(start: float, text: str, speaker: str | None = None, step: float = 0.4) -> list[Word]:
    return [
        Word(start=start + i * step, end=start + i * step + step * 0.8, text=" " + w, speaker=speaker)
        for i, w in enumerate(text.split())
    ]


def _transcript(*, word: bool = False, diarized: bool = False) -> Transcript:
    a, b = ("SPEAKER_00", "SPEAKER_01") if diarized else (None, None)
    s1 = Segment(start=0.5, end=2.9, text=" The quick brown fox jumps.", speaker=a,
                 words=_words(0.5, "The quick brown fox jumps.", a) if word else None)  # fmt: skip
    s2 = Segment(start=3661.25, end=3663.5, text=" Cats & dogs <run> away.", speaker=b,
                 words=_words(3661.25, "Cats & dogs <run> away.", b) if word else None)  # fmt: skip
    return Transcript(
        text=" The quick brown fox jumps. Cats & dogs <run> away.",
        segments=[s1, s2],
        timestamp="word" if word else "chunk",
        language="en",
        language_probability=0.98,
        duration=3664.0,
        speakers=[
            SpeakerTurn(speaker="SPEAKER_00", start=0.5, end=2.9, text=" The quick brown fox jumps."),
            SpeakerTurn(speaker="SPEAKER_01", start=3661.25, end=3663.5, text=" Cats & dogs <run> away."),
        ]
        if diarized
        else None,
    )


def test_formats_match_the_crd():
    assert FORMATS == get_args(ResultFormat)
    assert set(MEDIA_TYPES) == set(FORMATS)


def test_original_json_chunk_shape():
    out = json.loads(render(_transcript(), "json"))
    assert out == {
        "text": " The quick brown fox jumps. Cats & dogs <run> away.",
        "chunks": [
            {"timestamp": [0.5, 2.9], "text": " The quick brown fox jumps."},
            {"timestamp": [3661.25, 3663.5], "text": " Cats & dogs <run> away."},
        ],
    }  # no "speakers" key without diarization, like the original


def test_original_json_word_chunks_and_speakers():
    out = render_object(_transcript(word=True, diarized=True), "json")
    assert [c["text"].strip() for c in out["chunks"]] == "The quick brown fox jumps. Cats & dogs <run> away.".split()
    assert out["chunks"][0] == {"timestamp": [0.5, 0.82], "text": " The"}
    assert out["speakers"] == [
        {"speaker": "SPEAKER_00", "timestamp": [0.5, 2.9], "text": " The quick brown fox jumps."},
        {"speaker": "SPEAKER_01", "timestamp": [3661.25, 3663.5], "text": " Cats & dogs <run> away."},
    ]


def test_empty_diarization_keeps_an_empty_speakers_list():
    t = Transcript(text="", segments=[], speakers=[], duration=2.0)
    assert render_object(t, "json") == {"text": "", "chunks": [], "speakers": []}


def test_srt_parses_with_times_and_speakers():
    subs = list(srt.parse(render(_transcript(diarized=True), "srt")))
    assert [s.index for s in subs] == [1, 2]
    assert subs[0].start == timedelta(seconds=0.5) and subs[0].end == timedelta(seconds=2.9)
    assert subs[1].start == timedelta(hours=1, minutes=1, seconds=1.25)
    assert subs[1].end == timedelta(hours=1, minutes=1, seconds=3.5)
    assert subs[0].content == "[SPEAKER_00] The quick brown fox jumps."
    assert subs[1].content == "[SPEAKER_01] Cats & dogs <run> away."


def test_vtt_parses_with_times_voices_and_escaping():
    text = render(_transcript(diarized=True), "vtt")
    assert text.startswith("WEBVTT\n")
    captions = webvtt.from_string(text).captions
    assert [(c.start, c.end) for c in captions] == [("00:00:00.500", "00:00:02.900"), ("01:01:01.250", "01:01:03.500")]
    assert captions[0].voice == "SPEAKER_00" and captions[1].voice == "SPEAKER_01"
    # & and < must be escaped in cue text (the spec); the parser hands back the escaped text.
    assert html.unescape(captions[1].text) == "Cats & dogs <run> away."
    assert "&amp;" in text and "&lt;run&gt;" in text


def test_vtt_and_srt_without_speakers_and_empty():
    captions = webvtt.from_string(render(_transcript(), "vtt")).captions
    assert [html.unescape(c.text) for c in captions] == ["The quick brown fox jumps.", "Cats & dogs <run> away."]
    empty = Transcript(text="", segments=[], duration=3.0)
    assert list(srt.parse(render(empty, "srt"))) == []
    assert webvtt.from_string(render(empty, "vtt")).captions == []
    assert render(empty, "text") == ""


def test_text():
    assert render(_transcript(), "text") == "The quick brown fox jumps. Cats & dogs <run> away.\n"


def test_verbose_json_openai_shape():
    out = json.loads(render(_transcript(word=True, diarized=True), "verbose_json"))
    assert out["task"] == "transcribe" and out["language"] == "english" and out["duration"] == 3664.0
    assert out["text"] == " The quick brown fox jumps. Cats & dogs <run> away."
    seg = out["segments"][1]
    assert set(seg) >= {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                        "compression_ratio", "no_speech_prob"}  # fmt: skip
    assert (seg["id"], seg["start"], seg["end"], seg["seek"], seg["speaker"]) == (1, 3661.25, 3663.5, 366125, "SPEAKER_01")
    assert out["words"][0] == {"word": "The", "start": 0.5, "end": 0.82, "speaker": "SPEAKER_00"}
    assert len(out["words"]) == 10
    # Without word timestamps there is no "words" key.
    assert "words" not in json.loads(render(_transcript(), "verbose_json"))


def test_verbose_json_parses_with_the_openai_client_types():
    from openai.types.audio import TranscriptionVerbose

    parsed = TranscriptionVerbose.model_validate(json.loads(render(_transcript(word=True), "verbose_json")))
    assert parsed.language == "english" and parsed.segments[0].text == " The quick brown fox jumps."
    assert parsed.words[1].word == "quick"


def test_openai_json_and_unknown_format():
    assert to_openai_json(_transcript()) == {"text": " The quick brown fox jumps. Cats & dogs <run> away."}
    with pytest.raises(ValueError, match="unknown result format 'docx'"):
        render(_transcript(), "docx")
