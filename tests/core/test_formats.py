"""Renderers: each format parses with a real parser and carries the words and times of the transcript."""

from __future__ import annotations

import html
import json
from datetime import timedelta
from typing import get_args

import pytest
import srt
import webvtt

from ifw.core import formats
from ifw.core.formats import FORMATS, MEDIA_TYPES, OPENAI_FORMATS, render, render_object, to_openai_json
from ifw.core.transcript import ProcessedBy, Segment, SpeakerTurn, Transcript, Word
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
    assert set(MEDIA_TYPES) == set(OPENAI_FORMATS) >= set(FORMATS)


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
    # The original's group_by_speaker=False list: one {"speaker", **chunk} per chunk, in order.
    assert out["speakers"] == [{"speaker": w.speaker, **c} for w, c in zip(
        [w for s in _transcript(word=True, diarized=True).segments for w in s.words], out["chunks"], strict=True)]
    assert [s["speaker"] for s in out["speakers"]] == ["SPEAKER_00"] * 5 + ["SPEAKER_01"] * 5
    # ifw's addition: the merged turns.
    assert out["speaker_turns"] == [
        {"speaker": "SPEAKER_00", "timestamp": [0.5, 2.9], "text": " The quick brown fox jumps."},
        {"speaker": "SPEAKER_01", "timestamp": [3661.25, 3663.5], "text": " Cats & dogs <run> away."},
    ]


def test_speakers_per_chunk_differ_from_turns_and_texts_pass_through():
    """Two segments of one speaker are two chunks, one turn; Whisper's texts are kept byte for byte."""
    segs = [
        Segment(start=0.0, end=1.0, text=" Hi,", speaker="SPEAKER_00"),
        Segment(start=1.0, end=2.0, text="  there.", speaker="SPEAKER_00"),  # odd spacing, kept
        Segment(start=2.5, end=3.0, text=" Yes?", speaker="SPEAKER_01"),
    ]
    t = Transcript(text=" Hi,  there. Yes?", segments=segs, speakers=[
        SpeakerTurn(speaker="SPEAKER_00", start=0.0, end=2.0, text=" Hi,  there."),
        SpeakerTurn(speaker="SPEAKER_01", start=2.5, end=3.0, text=" Yes?")])  # fmt: skip
    out = render_object(t, "json")
    assert "".join(c["text"] for c in out["chunks"]) == out["text"] == " Hi,  there. Yes?"
    assert [(s["speaker"], s["text"]) for s in out["speakers"]] == [
        ("SPEAKER_00", " Hi,"), ("SPEAKER_00", "  there."), ("SPEAKER_01", " Yes?")]  # fmt: skip
    assert len(out["speaker_turns"]) == 2


def test_a_word_without_a_speaker_takes_its_segments():
    seg = Segment(start=0, end=1, text=" a b", speaker="SPEAKER_01",
                  words=[Word(start=0, end=0.5, text=" a"), Word(start=0.5, end=1, text=" b", speaker="SPEAKER_00")])
    t = Transcript(text=" a b", segments=[seg], timestamp="word", speakers=[])
    assert [s["speaker"] for s in render_object(t, "json")["speakers"]] == ["SPEAKER_01", "SPEAKER_00"]


def test_empty_diarization_keeps_empty_speakers_lists():
    t = Transcript(text="", segments=[], speakers=[], duration=2.0)
    assert render_object(t, "json") == {"text": "", "chunks": [], "speakers": [], "speaker_turns": []}
    # Text but nobody found: every chunk is there, its speaker null (zip still lines up).
    t = Transcript(text=" Hm.", segments=[Segment(start=0, end=1, text=" Hm.")], speakers=[])
    assert render_object(t, "json")["speakers"] == [{"speaker": None, "timestamp": [0.0, 1.0], "text": " Hm."}]


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
    # OpenAI's top-level text has no leading space (its segments keep theirs)
    assert out["text"] == "The quick brown fox jumps. Cats & dogs <run> away."
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


def test_verbose_json_renders_the_stored_scores():
    t = _transcript()
    t.segments[0] = t.segments[0].model_copy(update=dict(
        tokens=[440, 1702], logprobs=[-0.1, -0.3], avg_logprob=-0.2, temperature=0.4, compression_ratio=1.7,
        no_speech_prob=0.03))  # fmt: skip
    t.segments[1] = t.segments[1].model_copy(update=dict(tokens=[7, 8], logprobs=[-1.0, -2.0]))
    first, second = render_object(t, "verbose_json")["segments"]
    assert (first["tokens"], first["avg_logprob"], first["temperature"], first["compression_ratio"],
            first["no_speech_prob"]) == ([440, 1702], -0.2, 0.4, 1.7, 0.03)  # fmt: skip
    # Missing scores keep OpenAI's types: the mean of the stored log-probs, else neutral values.
    assert second["avg_logprob"] == -1.5 and second["temperature"] == 0.0 and second["no_speech_prob"] == 0.0
    assert isinstance(second["compression_ratio"], float) and second["tokens"] == [7, 8]
    assert render_object(t, "verbose_json")["usage"] == {"type": "duration", "seconds": 3664.0}


def test_openai_json_usage_and_logprobs():
    t = _transcript()
    assert to_openai_json(t) == {
        "text": "The quick brown fox jumps. Cats & dogs <run> away.",
        "usage": {"type": "duration", "seconds": 3664.0},
    }
    t.segments[1] = t.segments[1].model_copy(update=dict(tokens=[7, 8], logprobs=[-1.0, -2.0]))
    assert to_openai_json(t, logprobs=True)["logprobs"] == [
        {"token": None, "logprob": -1.0, "bytes": None, "token_id": 7},
        {"token": None, "logprob": -2.0, "bytes": None, "token_id": 8},
    ]  # the first segment was stored without scores: nothing from it
    from openai.types.audio import Transcription

    parsed = Transcription.model_validate(to_openai_json(t, logprobs=True))
    assert parsed.usage.seconds == 3664.0 and parsed.logprobs[0].logprob == -1.0


def test_diarized_json_parses_with_the_openai_types():
    from openai.types.audio import TranscriptionDiarized

    out = formats.render_openai(_transcript(diarized=True), "diarized_json")
    parsed = TranscriptionDiarized.model_validate(out)
    assert [(s.id, s.speaker, s.start, s.end, s.text) for s in parsed.segments] == [
        ("seg_0", "SPEAKER_00", 0.5, 2.9, " The quick brown fox jumps."),
        ("seg_1", "SPEAKER_01", 3661.25, 3663.5, " Cats & dogs <run> away."),
    ]
    assert parsed.task == "transcribe" and parsed.usage.seconds == 3664.0


def test_diarized_segments_split_where_words_change_speaker():
    words = [Word(start=0, end=0.4, text=" Are", speaker="A"), Word(start=0.4, end=0.8, text=" you?", speaker="A"),
             Word(start=1.0, end=1.3, text=" Yes.", speaker="B")]  # fmt: skip
    t = Transcript(text=" Are you? Yes.", timestamp="word", speakers=[],
                   segments=[Segment(start=0, end=1.3, text=" Are you? Yes.", speaker="A", words=words)])  # fmt: skip
    assert [(s["speaker"], s["start"], s["end"], s["text"]) for s in formats.to_diarized_segments(t)] == [
        ("A", 0.0, 0.8, " Are you?"), ("B", 1.0, 1.3, " Yes.")]  # fmt: skip
    # Words stored without their spaces (older runners) are spaced when joined.
    for w in words:
        w.text = w.text.strip()
    assert formats.to_diarized_segments(t)[0]["text"] == "Are you?"


def test_processed_by():
    t = _transcript()
    assert formats.processed_by(t) is None
    t.processed_by = ProcessedBy(pod="tj-x-runner-abcde", node="gpu-1")
    assert formats.processed_by(t) == {"pod": "tj-x-runner-abcde", "node": "gpu-1"}


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown result format 'docx'"):
        render(_transcript(), "docx")
