"""The decode engine's guards, prompts, per-piece languages and retries, on real inputs.

Whisper's own recipe, per piece: a repetitive or unlikely decode is decoded again at a higher
temperature (only the pieces that failed, together); an unlikely decode where no speech is
likely is silence; speech left without text is decoded again on its own, and what is given up
is counted. Inputs: real recordings (../shared/speech), music synthesised here, espeak-ng speech.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import numpy as np
import pytest

from ifw.runner import asr, decoding, errors, models, vad
from ifw.runner.config import RunnerSettings
from tests.runner.conftest import SAMPLE_RATE, read_wav

SR = SAMPLE_RATE
NAME = "Siobhan Kowalczyk"
OPTIONS = decoding.DEFAULT_OPTIONS  # what transcribe() decodes with


def model(name: str) -> models.WhisperModel:
    return models.load_model(name, RunnerSettings(default_model=name, device="cpu", cpu_threads=2))


def music(seconds: float, seed: int = 1) -> np.ndarray:
    """Piano-like chords (three notes, three harmonics, decaying) on a beat with a noise 'drum'."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    chords = [[261.6, 329.6, 392.0], [220.0, 261.6, 329.6], [174.6, 220.0, 261.6], [196.0, 246.9, 293.7]]
    beat = int(0.5 * SR)
    for k in range(len(t) // beat):
        a, b = k * beat, (k + 1) * beat
        for f in chords[(k // 2) % 4]:
            for h in (1, 2, 3):
                out[a:b] += np.sin(2 * np.pi * f * h * t[a:b]) / h
        out[a:b] *= np.exp(-np.arange(b - a) / SR * 3)
        n = int(0.05 * SR)
        out[a : a + n] += rng.normal(0, 1, n) * np.exp(-np.arange(n) / SR * 60) * 2
    return (out / np.abs(out).max() * 0.3).astype(np.float32)


def vocal_burst_in_silence(harvard) -> np.ndarray:
    """20 s of faint room noise with, at 9 s, a 0.6 s vocal burst that holds no words: a fragment
    of a real recording played backwards (the VAD takes it for speech, as it does a cough)."""
    source = read_wav(next(s.path for s in harvard if s.path.stem == "spk1_snt1"))
    burst = source[int(0.2 * SR) : int(0.8 * SR)][::-1] * np.hanning(int(0.6 * SR)) ** 0.3
    audio = np.random.default_rng(0).normal(0, 0.0005, 20 * SR).astype(np.float32)
    audio[9 * SR : 9 * SR + len(burst)] += burst.astype(np.float32)
    return audio


# ------------------------------------------------------------------ guards


@pytest.mark.model
def test_music_is_judged_silence_not_thanked_for():
    whisper = model("tiny.en")
    clip = music(12.0)
    assert vad.speech_regions(clip) == []  # the first guard: no speech, nothing reaches Whisper
    t = asr.transcribe(clip, whisper)
    assert t.text == "" and t.segments == [] and t.speech_seconds == 0
    # Decoded anyway (as one piece), greedy Whisper says "Thank you."; its no-speech check says silence.
    stats = decoding.DecodeStats()
    [r] = decoding.decode_pieces(whisper, [decoding.PieceRequest(clip)], batch_size=4, stats=stats)
    assert r.verdict == "no_speech" and r.attempts == 1 and stats.pieces == [1]
    assert r.no_speech_prob > OPTIONS.no_speech_threshold and r.avg_logprob < OPTIONS.logprob_threshold
    assert "thank" in r.text.lower()  # what would have been printed
    t = asr.transcribe(clip, whisper, pieces=[vad.Piece(0.0, 12.0)])
    assert t.text == "" and t.dropped_pieces == 1  # given up, and counted


@pytest.mark.model
def test_a_wordless_burst_in_silence_fails_every_temperature_and_is_counted(harvard):
    whisper = model("tiny.en")
    audio = vocal_burst_in_silence(harvard)
    [(start, end)] = vad.speech_regions(audio)
    assert 8.5 < start < end < 10.5
    stats = decoding.DecodeStats()
    t = asr.transcribe(audio, whisper, stats=stats)
    # greedy says "Oh, yeah." with a log-probability below -1; so does every sampled decode up to 1.0
    assert stats.temperatures == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and stats.pieces == [1] * 6
    assert stats.rows == [1] + [OPTIONS.best_of] * 5 and stats.fallback_decodes == 5
    assert t.text == "" and t.segments == []
    assert t.dropped_pieces == 1 and t.speech_seconds > 0.5 and t.text_seconds == 0


@pytest.mark.model
def test_only_the_pieces_that_fail_are_decoded_again(harvard, wer):
    """One batch: a sentence, the same sentence said three times back to back (a loop to the
    compression check), and music. Only the repeated one is decoded again, up the temperatures."""
    whisper = model("tiny.en")
    sentence = next(s for s in harvard if s.path.stem == "spk1_snt1")
    once = read_wav(sentence.path)
    thrice = np.concatenate([once] * 3)
    requests = [decoding.PieceRequest(c) for c in (once, thrice, music(8.0))]
    stats = decoding.DecodeStats()
    done: list[int] = []
    results = decoding.decode_pieces(whisper, requests, batch_size=3, stats=stats, on_done=lambda idx, _: done.extend(idx))
    # the first call had all three; every later call only the repeated piece, one temperature up
    assert stats.pieces[0] == 3 and set(stats.pieces[1:]) == {1} and len(stats.pieces) >= 2
    assert stats.temperatures == OPTIONS.fallback_temperatures(0.0)[: len(stats.pieces)]
    assert stats.rows[1:] == [OPTIONS.best_of] * (len(stats.pieces) - 1)
    assert sorted(done[:2]) == [0, 2] and done[2:] == [1]  # finished pieces are reported at once
    single, repeated, noise = results
    assert single.verdict == "ok" and single.attempts == 1 and wer(sentence.text, single.text) == 0
    assert noise.verdict == "no_speech"
    # greedy decoding of the repeated sentence fails the repetition checks; a sampled decode at a
    # higher temperature passes them, and it is what was said
    assert repeated.attempts >= 2 and repeated.temperature > 0 and repeated.verdict == "ok"
    assert repeated.compression_ratio <= OPTIONS.compression_ratio_threshold
    assert wer(" ".join([sentence.text] * 3), repeated.text) <= 0.1, repeated.text


@pytest.mark.model
def test_sampled_fallbacks_decode_as_many_pieces_per_call_as_greedy_ones(harvard):
    """best_of samples per piece do not shrink a fallback call to batch_size // best_of pieces: on a
    GPU a decoder step costs nearly the same for batch_size rows as for five times as many."""
    whisper = model("tiny.en")
    once = read_wav(next(s for s in harvard if s.path.stem == "spk1_snt1").path)
    looping = [np.concatenate([once] * 3)] * 3  # each fails the repetition check when greedy
    stats = decoding.DecodeStats()
    results = decoding.decode_pieces(whisper, [decoding.PieceRequest(c) for c in looping], batch_size=3, stats=stats)
    assert stats.pieces[:2] == [3, 3] and stats.rows[:2] == [3, 3 * OPTIONS.best_of]
    assert all(r.attempts >= 2 for r in results)


def test_loop_detection_compression_and_temperatures():
    is_looping = functools.partial(decoding.is_looping, min_tokens=OPTIONS.loop_min_tokens)
    assert is_looping([7] * 20) and not is_looping([7] * 19)
    assert is_looping([1, 2, 3, 4, 5] * 4) and not is_looping([1, 2, 3, 4, 5] * 3)
    assert is_looping(list(range(30)) + [8, 9] * 10 + [99])  # a loop anywhere, not only at the end
    assert not is_looping(list(range(200)))
    assert decoding.compression_ratio("") == 0.0
    assert decoding.compression_ratio("the the the " * 20) > 2.4 > decoding.compression_ratio("The child almost hurt the small dog.")
    assert OPTIONS.fallback_temperatures(0.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert OPTIONS.fallback_temperatures(0.5) == [0.5, 0.7, 0.9]
    assert OPTIONS.fallback_temperatures(1.0) == [1.0]
    assert OPTIONS.token_budget(2.0) == 36 and OPTIONS.token_budget(30.0) == OPTIONS.max_new_tokens


# ------------------------------------------------------------------ prompt


@pytest.fixture(scope="module")
def name_clip(speech):
    """~38 s, two pieces: a name no model knows, said once in each."""
    from tests.runner.conftest import SENTENCES

    parts = [("en-us", f"Please send the invoice to {NAME} before Thursday.", 1.0)]
    parts += [("en-gb" if i % 2 else "en-us", text, 1.0) for i, text in enumerate(SENTENCES[:8])]
    parts += [("en-us", f"{NAME} will call you back tomorrow.", 0.5)]
    clip = speech(parts, name="name")
    assert clip.duration > 32
    return clip


@pytest.mark.model
def test_prompt_spells_a_name_as_given_in_every_piece(name_clip, wer):
    whisper = model("tiny.en")
    audio = name_clip.audio()
    plain = asr.transcribe(audio, whisper, batch_size=8)
    assert NAME not in plain.text and "Kowalczyk" not in plain.text, plain.text
    stats = decoding.DecodeStats()
    prompted = asr.transcribe(audio, whisper, batch_size=8, prompt=NAME, stats=stats)
    # both pieces, decoded together in one generate() call, carry the prompted spelling
    assert stats.pieces[0] == 2
    assert prompted.text.count(NAME) == 2, prompted.text
    first, last = [s for s in prompted.segments if NAME in s.text]
    assert first.start < 3 and last.end > name_clip.duration - 3  # one in each piece
    assert wer(name_clip.text, prompted.text) <= wer(name_clip.text, plain.text)


@pytest.mark.model
def test_prompt_with_special_tokens_is_refused(name_clip):
    whisper = model("tiny.en")
    with pytest.raises(errors.InvalidSpec, match="prompt"):
        asr.transcribe(name_clip.audio()[: 3 * SR], whisper, prompt="hello <|endoftext|>")


# ------------------------------------------------------------------ languages


EN = [
    "The children are playing football in the garden.",
    "My brother bought a new car last week.",
    "The weather is nice today, so we are going to walk to the park.",
    "We will meet at the station early in the morning.",
    "She reads a book every evening before going to sleep.",
    "Please open the window because it is very warm in here.",
]
DE = [
    "Das Wetter ist heute sehr schön, und die Sonne scheint.",
    "Wir treffen uns morgen früh am Bahnhof.",
    "Meine Schwester liest jeden Abend ein Buch.",
    "Bitte mach das Fenster auf, es ist sehr warm hier.",
]


@pytest.fixture(scope="module")
def english_then_german(speech):
    parts = [("en-us", t, 0.8) for t in EN[:-1]] + [("en-us", EN[-1], 2.0)] + [("de", t, 0.8) for t in DE]
    return speech(parts, name="en-de")


@pytest.mark.model
def test_english_and_german_in_one_file_each_in_its_own_language(english_then_german, wer):
    whisper = model("base")
    clip = english_then_german
    stats = decoding.DecodeStats()
    t = asr.transcribe(clip.audio(), whisper, batch_size=8, stats=stats)
    switch = next(u.start for u in clip.utterances if u.voice == "de")
    english = [s for s in t.segments if s.end <= switch]
    german = [s for s in t.segments if s.start >= switch - 0.5]
    assert english and german and len(english) + len(german) == len(t.segments)
    assert {s.language for s in english} == {"en"} and {s.language for s in german} == {"de"}
    assert stats.pieces[0] == 2  # two languages, one generate() call
    assert wer(" ".join(EN), " ".join(s.text for s in english)) <= 0.1
    heard = set(" ".join(s.text for s in german).lower().replace(",", " ").replace(".", " ").split())
    assert len(heard & {"das", "ist", "heute", "sehr", "schön", "morgen", "früh", "bahnhof", "abend", "fenster"}) >= 6
    assert t.language == "en"  # the file's dominant language: the most confident speech


@pytest.mark.model
def test_a_given_language_holds_for_every_piece(harvard, monkeypatch):
    whisper = model("base")
    asked = []
    real = decoding.decode_pieces

    def spy(whisper, requests, **kwargs):
        asked.extend(r.language for r in requests)
        return real(whisper, requests, **kwargs)

    monkeypatch.setattr(decoding, "decode_pieces", spy)
    audio = np.concatenate([read_wav(s.path) for s in harvard[:2]])
    pieces = [vad.Piece(0.0, 2.87), vad.Piece(2.87, len(audio) / SR)]  # two pieces, nothing detected
    t = asr.transcribe(audio, whisper, language="en", pieces=pieces)
    assert asked == ["en", "en"] and t.language == "en" and t.language_probability is None
    assert [s.language for s in t.segments] == ["en", "en"]


def _result(language: str, probability: float, verdict: str = "ok") -> decoding.PieceResult:
    return decoding.PieceResult(verdict, [], [], None, "", language, probability, 0.0, -0.3, 1.0, 0.01, 1)


def test_short_or_unsure_pieces_take_the_dominant_language():
    speech = [12.0, 1.2, 25.0, 8.0, 3.0, 6.0]
    results = [_result("en", 0.95), _result("de", 0.9),  # short: follows the file
               _result("en", 0.99), _result("nl", 0.4),  # unsure: follows the file
               _result("de", 0.97), _result("es", 0.3, "no_speech")]  # sure German stays German  # fmt: skip
    language, probability, redo = asr.settle_languages(speech, results)
    assert language == "en" and redo == [1, 3, 5]
    assert probability == pytest.approx((12 * 0.95 + 25 * 0.99) / 37)
    # nothing sure at all: the most speech decides, every other piece follows
    language, _, redo = asr.settle_languages([1.0, 1.5], [_result("fr", 0.3), _result("it", 0.4)])
    assert language == "it" and redo == [0]


# ------------------------------------------------------------------ nothing dropped silently


@pytest.mark.model
def test_a_piece_without_text_is_decoded_again_cut_at_its_pauses(conversation, wer, monkeypatch):
    """The first decode of every piece comes back as silence (a stand-in for Whisper skipping
    it); each stretch of speech is then decoded on its own, and the words are all there."""
    whisper = model("tiny.en")
    real = decoding.decode_pieces
    calls: list[int] = []

    def first_call_silent(whisper, requests, **kwargs):
        results = real(whisper, requests, **kwargs)
        calls.append(len(requests))
        if len(calls) == 1:
            results = [dataclasses.replace(r, verdict="no_speech") for r in results]
        return results

    monkeypatch.setattr(decoding, "decode_pieces", first_call_silent)
    t = asr.transcribe(conversation.audio(), whisper, batch_size=8)
    pieces = vad.split_audio(conversation.audio())
    assert [len(p.regions) for p in pieces] == [8, 1]
    assert calls == [2, 8]  # both pieces, then the first one's eight stretches (together)
    said = " ".join(u.text for u in conversation.utterances if u.end <= pieces[0].end)
    assert wer(said, t.text) <= 0.08, t.text
    # the last piece is one stretch: nothing smaller to try, so it is given up -- and counted
    assert t.dropped_pieces == 1 and t.text_seconds == pytest.approx(t.speech_seconds - pieces[1].duration, abs=0.5)


def test_cuda_out_of_memory_halves_the_call_and_retries(monkeypatch):
    """No GPU here: a stand-in chunk decoder that runs out of memory above 2 pieces."""
    import torch

    calls = []

    def chunk(whisper, states, options):
        calls.append(sorted(len(s.request.clip) for s in states))
        if len(states) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [decoding._Candidate([len(s.request.clip)], [-0.1], None, "x", -0.1, 1.0, False, True, 0.0)
                for s in states]  # fmt: skip

    monkeypatch.setattr(decoding, "_decode_chunk", chunk)
    whisper = SimpleNamespace(name="stand-in", multilingual=False)
    clips = [np.zeros(n * 1000, np.float32) for n in (3, 9, 1, 7, 5)]
    done = []
    stats = decoding.DecodeStats()
    out = decoding.decode_pieces(whisper, [decoding.PieceRequest(c) for c in clips], batch_size=8,
                                 on_done=lambda idx, _: done.extend(idx), stats=stats)  # fmt: skip
    assert [r.tokens[0] for r in out] == [3000, 9000, 1000, 7000, 5000]  # back in request order
    # 5 pieces: out of memory; 2 (the longest), 2, then 1
    assert calls == [[1000, 3000, 5000, 7000, 9000], [7000, 9000], [3000, 5000], [1000]]
    assert stats.pieces == [2, 2, 1] and stats.oom_halvings == 1 and sorted(done) == [0, 1, 2, 3, 4]

    def always(whisper, states, options):
        raise torch.cuda.OutOfMemoryError()

    monkeypatch.setattr(decoding, "_decode_chunk", always)
    with pytest.raises(errors.OutOfMemory, match="single 30 s piece"):
        decoding.decode_pieces(whisper, [decoding.PieceRequest(clips[0])], batch_size=4)


def test_requests_are_grouped_by_what_a_generate_call_shares(monkeypatch):
    seen = []

    def chunk(whisper, states, options):
        seen.append([(s.request.prompt, s.temperature, s.request.word_timestamps, len(s.request.clip)) for s in states])
        return [decoding._Candidate([], [], None, "x", -0.1, 1.0, False, True, s.temperature) for s in states]

    monkeypatch.setattr(decoding, "_decode_chunk", chunk)
    whisper = SimpleNamespace(name="stand-in", multilingual=False)
    clip = np.zeros(SR, np.float32)
    request = decoding.PieceRequest
    requests = [request(clip[:800]), request(clip, prompt="Kubeflow"), request(clip),
                request(clip, temperature=0.4), request(clip, word_timestamps=True)]  # fmt: skip
    decoding.decode_pieces(whisper, requests, batch_size=8)
    assert sorted(seen, key=str) == sorted([
        [(None, 0.0, False, SR), (None, 0.0, False, 800)],  # longest first
        [("Kubeflow", 0.0, False, SR)], [(None, 0.4, False, SR)], [(None, 0.0, True, SR)],
    ], key=str)  # fmt: skip
