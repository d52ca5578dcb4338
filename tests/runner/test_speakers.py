"""Speaker assignment by time overlap, on hand-made turns and transcripts."""

from __future__ import annotations

import time

from ifw.core.transcript import Segment, Transcript, Word
from ifw.runner.speakers import assign_speakers


def _transcript(*segments: Segment, language: str | None = "en") -> Transcript:
    return Transcript(text="".join(s.text for s in segments), segments=list(segments), language=language)


def _words(*items: tuple[float, float, str]) -> list[Word]:
    return [Word(start=s, end=e, text=t) for s, e, t in items]


def _turns(t: Transcript) -> list[tuple[str, float, float, str]]:
    return [(x.speaker, x.start, x.end, x.text) for x in t.speakers]


def test_short_interjection_does_not_swallow_a_long_segment():
    # The original gave each turn the chunk whose end is nearest: B's 0.5 s "yeah"
    # at 9.4 s took A's whole 10 s chunk. Overlap keeps it A's.
    t = _transcript(Segment(start=0.0, end=10.0, text=" A long explanation of the plan."))
    out = assign_speakers(t, [(0.0, 9.3, "SPEAKER_00"), (9.4, 9.9, "SPEAKER_01")])
    assert out.segments[0].speaker == "SPEAKER_00"
    assert _turns(out) == [("SPEAKER_00", 0.0, 10.0, "A long explanation of the plan.")]


def test_each_segment_takes_the_speaker_it_overlaps_most():
    t = _transcript(
        Segment(start=0.0, end=4.0, text=" Hello there."),
        Segment(start=4.2, end=7.0, text=" Hi, how are you?"),
        Segment(start=7.1, end=8.6, text=" Fine thanks."),
        Segment(start=8.7, end=12.0, text=" Good to hear."),
    )
    turns = [(0.1, 3.8, "SPEAKER_00"), (3.9, 8.0, "SPEAKER_01"), (8.1, 12.0, "SPEAKER_00")]
    out = assign_speakers(t, turns)
    # 7.1-8.6 overlaps SPEAKER_01 0.9 s, SPEAKER_00 0.5 s
    assert [s.speaker for s in out.segments] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_01", "SPEAKER_00"]
    assert _turns(out) == [
        ("SPEAKER_00", 0.0, 4.0, "Hello there."),
        ("SPEAKER_01", 4.2, 8.6, "Hi, how are you? Fine thanks."),
        ("SPEAKER_00", 8.7, 12.0, "Good to hear."),
    ]
    # the input is not modified
    assert t.segments[0].speaker is None and t.speakers is None


def test_overlapping_turns_pick_the_longest_overlap():
    # Non-exclusive diarization: two people talk at once for a while.
    t = _transcript(Segment(start=2.0, end=6.0, text=" We agree."))
    out = assign_speakers(t, [(0.0, 3.0, "SPEAKER_00"), (2.5, 8.0, "SPEAKER_01"), (5.0, 5.5, "SPEAKER_00")])
    # SPEAKER_00: 1.0 + 0.5 = 1.5 s, SPEAKER_01: 3.5 s
    assert out.segments[0].speaker == "SPEAKER_01"


def test_several_turns_of_one_speaker_add_up():
    t = _transcript(Segment(start=0.0, end=6.0, text=" Yes no yes."))
    turns = [(0.0, 1.5, "SPEAKER_00"), (1.5, 3.5, "SPEAKER_01"), (3.5, 5.0, "SPEAKER_00")]
    # SPEAKER_00 1.5 + 1.5 = 3.0 s beats SPEAKER_01's single longest turn of 2.0 s
    assert assign_speakers(t, turns).segments[0].speaker == "SPEAKER_00"


def test_after_the_last_turn_keeps_the_nearest_speaker():
    t = _transcript(
        Segment(start=0.0, end=3.0, text=" First."),
        Segment(start=3.5, end=6.0, text=" Second."),
        Segment(start=20.0, end=22.0, text=" Trailing words."),
    )
    out = assign_speakers(t, [(0.0, 3.0, "SPEAKER_00"), (3.4, 6.1, "SPEAKER_01")])
    assert [s.speaker for s in out.segments] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_01"]
    # nothing vanishes from speakers: the trailing segment is merged into SPEAKER_01's turn
    assert _turns(out) == [
        ("SPEAKER_00", 0.0, 3.0, "First."),
        ("SPEAKER_01", 3.5, 22.0, "Second. Trailing words."),
    ]


def test_before_the_first_turn_and_in_gaps_take_the_nearest_speaker():
    t = _transcript(
        Segment(start=0.0, end=0.8, text=" Um."),
        Segment(start=5.0, end=5.5, text=" So."),
        Segment(start=9.2, end=9.6, text=" Right."),
    )
    out = assign_speakers(t, [(1.0, 4.0, "SPEAKER_01"), (10.0, 12.0, "SPEAKER_00")])
    # 5.0 is 1.0 s after SPEAKER_01 and 4.5 s before SPEAKER_00; 9.6 is 0.4 s before SPEAKER_00
    assert [s.speaker for s in out.segments] == ["SPEAKER_01", "SPEAKER_01", "SPEAKER_00"]


def test_no_turns_means_no_speakers_and_no_crash():
    t = _transcript(Segment(start=0.0, end=2.0, text=" Hello."))
    out = assign_speakers(t, [])
    assert out.speakers == [] and out.segments[0].speaker is None
    empty = assign_speakers(Transcript(text="", segments=[]), [])
    assert empty.speakers == []
    # turns but no words: no speakers, no crash
    assert assign_speakers(Transcript(text="", segments=[]), [(0.0, 1.0, "SPEAKER_00")]).speakers == []


def test_words_split_a_segment_that_spans_two_speakers():
    seg = Segment(
        start=0.0,
        end=4.0,
        text=" Are you ready? Yes I am.",
        words=_words(
            (0.0, 0.4, " Are"), (0.4, 0.7, " you"), (0.7, 1.5, " ready?"),
            (2.0, 2.5, " Yes"), (2.5, 2.8, " I"), (2.8, 3.2, " am."),
        ),
        language="en", tokens=[1, 2, 3], avg_logprob=-0.2, no_speech_prob=0.01,
    )  # fmt: skip
    out = assign_speakers(_transcript(seg), [(0.0, 1.6, "SPEAKER_00"), (1.9, 3.4, "SPEAKER_01")])
    assert [w.speaker for s in out.segments for w in s.words] == ["SPEAKER_00"] * 3 + ["SPEAKER_01"] * 3
    assert _turns(out) == [
        ("SPEAKER_00", 0.0, 1.5, "Are you ready?"),
        ("SPEAKER_01", 2.0, 3.2, "Yes I am."),
    ]
    # the segment is cut between the speakers: no subtitle mixes two people
    assert [(s.start, s.end, s.text, s.speaker) for s in out.segments] == [
        (0.0, 1.5, " Are you ready?", "SPEAKER_00"),
        (2.0, 4.0, " Yes I am.", "SPEAKER_01"),
    ]
    # each piece keeps the decode's scores; token ids cannot be divided among words
    assert all(s.avg_logprob == -0.2 and s.no_speech_prob == 0.01 and s.language == "en" for s in out.segments)
    assert all(s.tokens is None for s in out.segments)
    assert out.text == " Are you ready? Yes I am."  # the transcript's text is untouched


def test_chunk_timestamps_are_split_by_the_words_then_come_back_without_them():
    """With diarization the pipeline decodes word times even for chunk timestamps: the chunk is cut
    where the speaker changes, and the output keeps the original's shape (chunks: timestamp, text)."""
    from ifw.core import formats

    seg = Segment(start=0.0, end=4.0, text=" Are you ready? Yes I am.", words=_words(
        (0.0, 0.4, " Are"), (0.4, 0.7, " you"), (0.7, 1.5, " ready?"), (2.0, 2.5, " Yes"), (2.5, 2.8, " I"),
        (2.8, 3.2, " am.")))  # fmt: skip
    made = _transcript(seg).model_copy(update={"timestamp": "word"})
    turns = [(0.0, 1.6, "SPEAKER_00"), (1.9, 3.4, "SPEAKER_01")]
    out = assign_speakers(made, turns, timestamp="chunk")
    assert out.timestamp == "chunk" and all(s.words is None for s in out.segments)
    original = formats.to_original_json(out)
    assert original["chunks"] == [{"timestamp": [0.0, 1.5], "text": " Are you ready?"},
                                  {"timestamp": [2.0, 4.0], "text": " Yes I am."}]  # fmt: skip
    assert [s["speaker"] for s in original["speakers"]] == ["SPEAKER_00", "SPEAKER_01"]
    assert formats.to_srt(out).count("SPEAKER_0") == 2  # one person per cue
    # without words to go by (the old chunk path), the whole chunk went to one of them
    whole = assign_speakers(made.model_copy(update={"segments": [seg.model_copy(update={"words": None})]}), turns,
                            timestamp="chunk")  # fmt: skip
    assert len(whole.segments) == 1
    # no turns at all: still chunk-level, unassigned
    assert assign_speakers(made, [], timestamp="chunk").segments[0].words is None


def test_split_keeps_one_speaker_segments_whole_and_joins_stripped_words():
    segs = [
        Segment(start=0.0, end=2.0, text="Hello there.", tokens=[7],
                words=_words((0.1, 0.5, "Hello"), (0.6, 1.2, "there."))),
        Segment(start=2.0, end=5.0, text="Hi. How are you?",
                words=_words((2.1, 2.4, "Hi."), (3.0, 3.3, "How"), (3.3, 3.6, "are"), (3.6, 4.0, "you?"))),
    ]  # fmt: skip
    turns = [(0.0, 2.5, "SPEAKER_00"), (2.9, 5.0, "SPEAKER_01")]
    out = assign_speakers(_transcript(*segs), turns)
    assert [(s.start, s.end, s.text, s.speaker) for s in out.segments] == [
        (0.0, 2.0, "Hello there.", "SPEAKER_00"),
        (2.0, 2.4, "Hi.", "SPEAKER_00"),
        (3.0, 5.0, "How are you?", "SPEAKER_01"),
    ]
    assert out.segments[0].tokens == [7]  # not split: kept as transcribed


def test_a_word_in_overlapping_speech_keeps_the_dominant_speaker():
    # Full (overlapping) turns: B's "mm-hm" lies inside A's long turn. Words wholly inside both
    # overlap each equally; the speaker whose turn around them is longer keeps them.
    seg = Segment(start=0.0, end=6.0, text=" so we ship it on Friday",
                  words=_words((0.2, 0.6, " so"), (2.1, 2.4, " we"), (2.4, 2.8, " ship"), (4.0, 4.5, " Friday")))  # fmt: skip
    turns = [(0.0, 6.0, "SPEAKER_00"), (2.0, 3.0, "SPEAKER_01")]
    out = assign_speakers(_transcript(seg), turns)
    assert {w.speaker for s in out.segments for w in s.words} == {"SPEAKER_00"}
    assert len(out.segments) == 1
    # a word only partly in the overlap goes to whoever covers more of it
    yes = Segment(start=0.0, end=4.0, text=" yes", words=_words((2.8, 3.6, " yes")))
    out = assign_speakers(_transcript(yes), [(0.0, 3.0, "SPEAKER_00"), (2.5, 4.0, "SPEAKER_01")])
    assert out.segments[0].speaker == "SPEAKER_01"


def test_words_merge_across_segments_and_zero_length_words():
    segs = [
        Segment(start=0.0, end=1.0, text=" One two", words=_words((0.0, 0.5, " One"), (0.5, 0.5, " two"))),
        Segment(start=1.0, end=2.0, text=" three", words=_words((1.2, 1.6, " three"))),
        Segment(start=3.0, end=4.0, text=" four", words=_words((3.0, 4.0, " four"))),
    ]
    out = assign_speakers(_transcript(*segs), [(0.0, 2.0, "SPEAKER_00"), (2.5, 4.0, "SPEAKER_01")])
    assert _turns(out) == [("SPEAKER_00", 0.0, 1.6, "One two three"), ("SPEAKER_01", 3.0, 4.0, "four")]


def test_stripped_and_unspaced_texts_join_properly():
    stripped = _transcript(Segment(start=0, end=1, text="Hello."), Segment(start=1, end=2, text="World."))
    assert assign_speakers(stripped, [(0.0, 2.0, "S")]).speakers[0].text == "Hello. World."
    chinese = _transcript(
        Segment(start=0, end=1, text="你好", words=_words((0, 0.5, "你"), (0.5, 1, "好"))), language="zh"
    )
    assert assign_speakers(chinese, [(0.0, 1.0, "S")]).speakers[0].text == "你好"


def test_fast_on_an_hour_of_words():
    # ~10 words per 3 s for an hour, ~1,200 turns: must stay well under a second.
    words = [Word(start=i * 0.3, end=i * 0.3 + 0.25, text=" w") for i in range(12_000)]
    segs = [
        Segment(start=words[i].start, end=words[i + 9].end, text="", words=words[i : i + 10])
        for i in range(0, 12_000, 10)
    ]
    turns = [(i * 3.0, i * 3.0 + 2.9, f"SPEAKER_{i % 3:02d}") for i in range(1_200)]
    began = time.perf_counter()
    out = assign_speakers(_transcript(*segs), turns)
    assert time.perf_counter() - began < 2.0
    assert len(out.speakers) == 1_200
    assert all(w.speaker == f"SPEAKER_{int(w.start // 3) % 3:02d}" for s in out.segments for w in s.words)
