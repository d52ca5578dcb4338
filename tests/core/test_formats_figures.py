"""The figures the runner computes come back: a language per segment (code-switching), a probability per word.

verbose_json and diarized_json carry them as extension fields; the original API's output carries
the word probabilities beside the chunks (`word_probabilities`, zipped with them as `speakers` is),
never inside them, so its chunk objects keep exactly the original's two keys.
"""

from __future__ import annotations

from ifw.core import formats
from ifw.core.transcript import Segment, SpeakerTurn, Transcript, Word


def switching(timestamp: str = "word", speakers: bool = False) -> Transcript:
    """An English sentence, then a German one: each piece detected on its own."""
    words = [
        [Word(start=0.0, end=0.4, text=" Good", probability=0.97), Word(start=0.4, end=0.9, text=" morning.", probability=0.88)],
        [Word(start=1.2, end=1.6, text=" Guten", probability=0.61), Word(start=1.6, end=2.0, text=" Morgen.", probability=None)],
    ]  # fmt: skip
    spk = ["SPEAKER_00", "SPEAKER_01"] if speakers else [None, None]
    segs = [
        Segment(start=0.0, end=0.9, text=" Good morning.", language="en", speaker=spk[0],
                words=words[0] if timestamp == "word" else None),
        Segment(start=1.2, end=2.0, text=" Guten Morgen.", language="de", speaker=spk[1],
                words=words[1] if timestamp == "word" else None),
    ]  # fmt: skip
    turns = [SpeakerTurn(speaker=s.speaker, start=s.start, end=s.end, text=s.text) for s in segs] if speakers else None
    return Transcript(text=" Good morning. Guten Morgen.", segments=segs, timestamp=timestamp, language="en",
                      duration=2.0, speakers=turns)  # fmt: skip


def test_verbose_json_has_each_segments_language_and_each_words_probability():
    out = formats.to_verbose_json(switching())
    assert out["language"] == "english"
    assert [s["language"] for s in out["segments"]] == ["english", "german"]  # named as the top level is
    assert [w.get("probability") for w in out["words"]] == [0.97, 0.88, 0.61, None]
    assert "probability" not in out["words"][3]  # not measured: left out, never a made-up number


def test_a_segment_without_a_language_has_no_key():
    t = switching("chunk")
    t.segments[1].language = None
    assert [("language" in s) for s in formats.to_verbose_json(t)["segments"]] == [True, False]


def test_diarized_json_segments_carry_their_language():
    segments = formats.to_diarized_json(switching(speakers=True))["segments"]
    assert [(s["speaker"], s["language"]) for s in segments] == [("SPEAKER_00", "english"), ("SPEAKER_01", "german")]


def test_original_word_output_keeps_the_chunks_and_adds_probabilities_beside_them():
    out = formats.to_original_json(switching(speakers=True))
    assert all(set(c) == {"timestamp", "text"} for c in out["chunks"])
    assert all(set(s) == {"speaker", "timestamp", "text"} for s in out["speakers"])
    assert out["word_probabilities"] == [0.97, 0.88, 0.61, None]
    assert len(out["word_probabilities"]) == len(out["chunks"])


def test_original_chunk_output_is_unchanged():
    assert set(formats.to_original_json(switching("chunk"))) == {"text", "chunks"}
    empty = Transcript(text="", segments=[], timestamp="word")
    assert formats.to_original_json(empty) == {"text": "", "chunks": []}
