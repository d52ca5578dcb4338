"""Batched Whisper on real weights and espeak-ng speech: words, timestamps, language, silence.

Real human speech: test_real_speech_asr.py; the decode engine's guards, prompts, languages and
retries: test_asr_quality.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ifw.runner import asr, models, vad
from ifw.runner.config import RunnerSettings
from ifw.runner.errors import InvalidSpec, ModelLoadFailed
from ifw.runner.progress import ProgressReporter
from tests.runner.conftest import SENTENCES as CORPUS

SENTENCES = CORPUS[:14]


def settings(model: str) -> RunnerSettings:
    return RunnerSettings(default_model=model, device="cpu", cpu_threads=2)


@pytest.fixture(scope="module")
def long_clip(speech):
    """~75 s, two voices, 1.5 s pauses: longer than two Whisper windows."""
    parts = [("en-us" if i % 2 == 0 else "en-gb", text, 1.5) for i, text in enumerate(SENTENCES)]
    clip = speech(parts, name="long")
    assert clip.duration > 60
    return clip


@pytest.fixture(scope="module")
def short_clip(speech):
    return speech([("en-gb", SENTENCES[1], 0.8), ("en-us", SENTENCES[2], 0.8), ("en-gb", SENTENCES[3], 0.5)])


def assert_segments_match_sentences(transcript, clip, tolerance=1.0):
    """Every spoken sentence has a segment starting, and one ending, within `tolerance` seconds of it."""
    got = [(s.start, s.end, s.text) for s in transcript.segments]
    starts = [s.start for s in transcript.segments]
    ends = [s.end for s in transcript.segments]
    for u in clip.utterances:
        assert min(abs(s - u.start) for s in starts) <= tolerance, f"no segment starts near {u.start:.2f} ({u.text}): {got}"
        assert min(abs(e - u.end) for e in ends) <= tolerance, f"no segment ends near {u.end:.2f} ({u.text}): {got}"
    for seg in transcript.segments:
        assert 0 <= seg.start <= seg.end <= clip.duration + 0.01
    assert all(a.start <= b.start for a, b in zip(transcript.segments, transcript.segments[1:]))


@pytest.mark.model
def test_tiny_en_long_clip_words_and_segment_times(long_clip, wer):
    whisper = models.load_model("tiny.en", settings("tiny.en"))
    reports = []
    t = asr.transcribe(long_clip.audio(), whisper, batch_size=4, on_progress=lambda p, total: reports.append((p, total)))
    assert wer(long_clip.text, t.text) <= 0.15, t.text
    assert_segments_match_sentences(t, long_clip)
    assert t.language == "en" and t.language_probability is None  # English-only: nothing detected
    assert t.duration == pytest.approx(long_clip.duration, abs=0.01) and t.model == "tiny.en"
    # progress: starts with the silence skipped, grows, ends at the whole duration
    assert reports[0][0] < reports[-1][0] == pytest.approx(long_clip.duration)
    assert all(a[0] <= b[0] for a, b in zip(reports, reports[1:]))


@pytest.mark.model
def test_base_detects_english_and_word_timestamps(short_clip, wer):
    whisper = models.load_model("base", settings("base"))
    t = asr.transcribe(short_clip.audio(), whisper, timestamp="word")
    assert t.language == "en" and t.language_probability > 0.8
    assert wer(short_clip.text, t.text) <= 0.10, t.text
    words = [w for s in t.segments for w in s.words]
    assert len(words) >= 0.9 * len(short_clip.text.split())
    previous_end = 0.0
    for w in words:
        assert 0.0 <= w.start <= w.end <= short_clip.duration, w
        assert w.start >= previous_end - 1e-6, f"word times go back at {w}"
        previous_end = w.end
    # each sentence's words lie within its spoken stretch (±1 s)
    for seg, u in zip(t.segments, short_clip.utterances, strict=True):
        assert u.start - 1 <= seg.words[0].start and seg.words[-1].end <= u.end + 1
        assert wer(u.text, " ".join(w.text for w in seg.words)) <= 0.2


@pytest.mark.model
def test_base_translates_german_to_english(speech):
    clip = speech([("de", "Guten Morgen. Das Wetter ist heute sehr schön, und die Sonne scheint.", 0.5)])
    whisper = models.load_model("base", settings("base"))
    t = asr.transcribe(clip.audio(), whisper, task="translate")
    assert t.language == "de" and t.task == "translate"
    words = set(t.text.lower().replace(",", " ").replace(".", " ").split())
    assert {"weather", "sun", "morning"} & words, t.text
    assert not {"das", "wetter", "heute", "sonne"} & words, t.text


@pytest.mark.model
@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_silence_gives_an_empty_transcript(speech, noise):
    clip = speech.silence(6.0, noise=noise)
    whisper = models.load_model("tiny.en", settings("tiny.en"))
    t = asr.transcribe(clip.audio(), whisper, timestamp="word")
    assert t.text == "" and t.segments == [] and t.duration == pytest.approx(6.0)


@pytest.mark.model
def test_batch_size_does_not_change_the_words(short_clip):
    whisper = models.load_model("tiny.en", settings("tiny.en"))
    audio = short_clip.audio()
    # one piece per sentence: three windows of different lengths
    pieces = [vad.Piece(u.start - 0.2, u.end + 0.2) for u in short_clip.utterances]
    one = asr.transcribe(audio, whisper, batch_size=1, pieces=pieces)
    many = asr.transcribe(audio, whisper, batch_size=3, pieces=pieces)
    assert len(one.segments) >= 3
    assert [s.text for s in one.segments] == [s.text for s in many.segments]


@pytest.mark.model
def test_english_only_model_refuses_translate_and_other_languages(short_clip):
    whisper = models.load_model("tiny.en", settings("tiny.en"))
    with pytest.raises(InvalidSpec, match="English-only"):
        asr.transcribe(short_clip.audio(), whisper, task="translate")
    with pytest.raises(InvalidSpec, match="English-only"):
        asr.transcribe(short_clip.audio(), whisper, language="fr")


# ------------------------------------------------------------ no model needed


@pytest.mark.parametrize("workers", [1, 3])
def test_vad_cuts_at_the_pauses_into_pieces_of_at_most_30s(long_clip, workers, monkeypatch):
    # with 3 workers the ~62 s clip is cut into 3 stretches run in threads, then joined
    monkeypatch.setattr(vad, "MIN_STRETCH_SECONDS", 15.0)
    regions = vad.speech_regions(long_clip.audio(), workers=workers)
    assert all(a[1] < b[0] for a, b in zip(regions, regions[1:]))  # sorted, no overlaps
    # every region is speech (inside a sentence), every sentence starts and ends a region
    for start, end in regions:
        assert any(u.start - 0.4 <= start and end <= u.end + 0.4 for u in long_clip.utterances), (start, end)
    for u in long_clip.utterances:
        assert min(abs(start - u.start) for start, _ in regions) < 0.4
        assert min(abs(end - u.end) for _, end in regions) < 0.4
    pieces = vad.plan_pieces(regions)
    assert 3 <= len(pieces) <= 4  # ~73 s of speech and pauses
    assert all(p.duration <= 30.0 for p in pieces)
    # every sentence lies inside exactly one piece
    for u in long_clip.utterances:
        assert sum(p.start <= u.start and u.end <= p.end for p in pieces) == 1


def test_plan_pieces_packs_greedily_and_splits_overlong_regions():
    regions = [(0.0, 10.0), (11.0, 25.0), (26.0, 29.0), (31.0, 45.0), (50.0, 95.0)]
    pieces = vad.plan_pieces(regions, max_piece_s=30.0)
    assert [(p.start, p.end) for p in pieces] == [(0.0, 29.0), (31.0, 45.0), (50.0, 80.0), (80.0, 95.0)]
    assert vad.plan_pieces([]) == []


def test_vad_finds_no_speech_in_silence(speech):
    assert vad.split_audio(speech.silence(3.0).audio()) == []
    assert vad.split_audio(np.zeros(0, np.float32)) == []


def test_model_not_in_the_allowed_list_is_refused():
    s = RunnerSettings(default_model="openai/whisper-large-v3", allowed_models=["base"])
    models.check_model_allowed("base", s)
    with pytest.raises(InvalidSpec, match="'tiny.en' is not allowed.*base, openai/whisper-large-v3"):
        models.check_model_allowed("tiny.en", s)


def test_uncached_hub_model_fails_clearly_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadFailed, match="not in the hub cache"):
        models.resolve_model("openai/whisper-nonexistent", settings("base"))


def test_local_model_folder_and_model_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadFailed, match="has no config.json"):
        models.resolve_model(str(tmp_path / "empty"), settings("base"))
    (tmp_path / "org" / "mine").mkdir(parents=True)
    (tmp_path / "org" / "mine" / "config.json").write_text("{}")
    s = RunnerSettings(model_dir=tmp_path)
    assert models.resolve_model("org/mine", s) == str(tmp_path / "org" / "mine")


def test_progress_reporter_throttles_and_always_sends_the_end():
    now = [0.0]
    sent = []
    r = ProgressReporter(sent.append, interval=3.0, clock=lambda: now[0])
    r(0.0, 100.0)  # first: sent
    now[0] = 1.0
    r(10.0, 100.0)  # too soon: held
    now[0] = 2.0
    r(20.0, 100.0)  # too soon: held (replaces 10)
    assert [b["processedSeconds"] for b in sent] == [0.0]
    now[0] = 3.5
    r(30.0, 100.0)  # interval passed: sent
    now[0] = 4.0
    r(100.0, 100.0)  # the end: always sent
    assert [b["percent"] for b in sent] == [0.0, 30.0, 100.0]
    assert sent[-1]["totalSeconds"] == 100.0 and sent[-1]["lastUpdateTime"].endswith("Z")


def test_progress_reporter_survives_a_failing_sink():
    def boom(_):
        raise RuntimeError("apiserver away")

    r = ProgressReporter(boom, interval=0.0)
    r(1.0, 2.0)
    r(2.0, 2.0)
    assert r.sent == []
