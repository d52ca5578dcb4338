"""Settling a file's language decodes a short or unsure piece again in the dominant language:
from the first pass's encoder output, not from the audio again (issue 16).

Real speech: 0.7 s of a real AMI meeting (English, but base detects Spanish on it, ~0.3 against
~0.12 for English, and finds no speech in that decode), then a Harvard sentence (English, sure):
the meeting's piece is short, so it is decoded again in English.
The encoder's forward calls are counted with a forward hook (observed, not replaced), and the
transcript is compared with the one made when the redo encodes its piece again (a decode seam
that drops the kept encoder output, as a seam unaware of it would).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from ifw.runner import asr, batching, decoding, models, vad
from ifw.runner.config import RunnerSettings
from tests.runner.conftest import SAMPLE_RATE, SPEECH_DIR, read_wav

GAP_S = 0.5
MEETING = ("trn03", 16.21, 16.91)  # AMI excerpt, seconds


def _float_wav(path) -> np.ndarray:
    """A 16 kHz mono float32 WAV (the AMI excerpts; the stdlib's wave reads only PCM)."""
    raw = path.read_bytes()
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(raw):
        tag, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        body = raw[pos + 8 : pos + 8 + size]
        if tag == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif tag == b"data":
            data = body
        pos += 8 + size + size % 2
    assert fmt is not None and data is not None and fmt[:3] == (3, 1, SAMPLE_RATE) and fmt[5] == 32, fmt
    return np.frombuffer(data, dtype="<f4").copy()


@pytest.fixture(scope="module")
def whisper() -> models.WhisperModel:
    return models.load_model("base", RunnerSettings(default_model="base", device="cpu", cpu_threads=2))


@pytest.fixture(scope="module")
def meeting_words_and_a_sentence():
    """(audio, pieces): the meeting's 0.7 s, a pause, the sentence; one piece each."""
    name, a, b = MEETING
    meeting = _float_wav(SPEECH_DIR / "ami" / f"{name}.wav")[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)]
    sentence = read_wav(SPEECH_DIR / "harvard" / "spk1_snt1.wav")
    audio = np.concatenate([meeting, np.zeros(int(GAP_S * SAMPLE_RATE), np.float32), sentence])
    first = len(meeting) / SAMPLE_RATE
    second = first + GAP_S
    end = len(audio) / SAMPLE_RATE
    return audio, [vad.Piece(0.0, first, ((0.0, first),)), vad.Piece(second, end, ((second, end),))]


class _Encoder:
    """The pieces (rows) each forward call of the model's encoder took."""

    def __init__(self, whisper: models.WhisperModel):
        self.rows: list[int] = []
        self._hook = whisper.model.model.encoder.register_forward_hook(self._seen)

    def _seen(self, module, inputs, output) -> None:
        self.rows.append(int(inputs[0].shape[0]))

    def close(self) -> None:
        self._hook.remove()


class _Seam:
    """transcribe()'s decode seam around decode_pieces, recording what went in and came out;
    `drop` takes every kept encoding off the requests (the redo then encodes its pieces again)."""

    def __init__(self, whisper: models.WhisperModel, drop: bool = False):
        self.whisper, self.drop = whisper, drop
        self.requests: list[list[decoding.PieceRequest]] = []
        self.results: list[list[decoding.PieceResult]] = []
        self.kept_after_call: list[list[bool]] = []

    def __call__(self, requests, on_done):
        if self.drop:
            requests = [dataclasses.replace(r, encoding=None) for r in requests]
        self.requests.append(list(requests))
        results = decoding.decode_pieces(self.whisper, requests, batch_size=8, on_done=on_done)
        self.results.append(list(results))  # transcribe puts the redone pieces into its list
        self.kept_after_call.append([r.encoding is not None for r in results])
        return results


@pytest.fixture(scope="module")
def encoded_again(whisper, meeting_words_and_a_sentence):
    """The transcript, the redo encoding its piece again (the behaviour before issue 16's fix)."""
    audio, pieces = meeting_words_and_a_sentence
    encoder = _Encoder(whisper)
    try:
        seam = _Seam(whisper, drop=True)
        t = asr.transcribe(audio, whisper, pieces=pieces, batch_size=8, decode=seam)
    finally:
        encoder.close()
    # the redo happened: the meeting piece was detected as another language, short and unsure
    first = seam.results[0]
    assert first[0].language != "en" and first[1].language == "en", first
    assert [len(r) for r in seam.requests] == [2, 1] and seam.requests[1][0].language == "en"
    assert encoder.rows == [2, 1]  # both pieces, then the redone one again
    return t


@pytest.mark.model
def test_the_redo_reuses_the_first_pass_encoder_output(whisper, meeting_words_and_a_sentence, encoded_again):
    audio, pieces = meeting_words_and_a_sentence
    encoder = _Encoder(whisper)
    try:
        seam = _Seam(whisper)
        t = asr.transcribe(audio, whisper, pieces=pieces, batch_size=8, decode=seam)
    finally:
        encoder.close()
    assert encoder.rows == [2]  # once per piece: the redo ran no encoder
    assert [len(r) for r in seam.requests] == [2, 1]
    # kept for the piece that could be redone (short, unsure) only; none after settling
    assert seam.kept_after_call == [[True, False], [False]]
    assert seam.requests[1][0].encoding is not None and seam.requests[1][0].language == "en"
    assert all(r.encoding is None for call in seam.results for r in call)
    # the same transcript as when the redo encodes the piece again
    assert t.model_dump() == encoded_again.model_dump()
    assert seam.results[1][0].language == "en" and t.language == "en"
    assert {s.language for s in t.segments} == {"en"} and "small dog" in t.text, t.text


@pytest.mark.model
def test_the_shared_decoder_reuses_it_too(whisper, meeting_words_and_a_sentence, encoded_again):
    """A pool worker's SharedDecoder passes the requests on as they are: the same reuse."""
    audio, pieces = meeting_words_and_a_sentence
    decoder = batching.SharedDecoder(whisper, batch_size=8, max_wait_seconds=0.0)
    encoder = _Encoder(whisper)
    try:
        t = asr.transcribe(audio, whisper, pieces=pieces, batch_size=8, decode=decoder.session(lambda: None))
    finally:
        encoder.close()
        decoder.stop()
    assert encoder.rows == [2]
    assert t.model_dump() == encoded_again.model_dump()


@pytest.mark.model
def test_nothing_is_kept_when_the_language_is_given(whisper, meeting_words_and_a_sentence):
    audio, pieces = meeting_words_and_a_sentence
    seam = _Seam(whisper)
    t = asr.transcribe(audio, whisper, pieces=pieces, batch_size=8, language="en", decode=seam)
    assert [len(r) for r in seam.requests] == [2]
    assert [r.keep_encoding_below for r in seam.requests[0]] == [0.0, 0.0]
    assert seam.kept_after_call == [[False, False]]
    assert {s.language for s in t.segments} == {"en"}


def test_what_a_kept_encoding_stands_in_for():
    """No model: which steps a request's Encoding skips, and which pieces keep one."""
    import torch

    whisper = SimpleNamespace(name="stand-in", multilingual=True)
    clip = np.zeros(SAMPLE_RATE, np.float32)
    batch = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 3, 2)  # two pieces' encoder output
    known = decoding.Encoding(batch[1].clone(), None, 0.7, "es", 0.3)
    opts = decoding.DEFAULT_OPTIONS
    # a redo in a given language: encoder output and no-speech probability (same prompt) from before
    s = decoding._start(whisper, decoding.PieceRequest(clip, language="en", encoding=known), opts)
    assert s.encoded is known.hidden and s.no_speech_prob == 0.7
    assert (s.language, s.language_probability) == ("en", None)
    # language to detect: the detection is reused too
    s = decoding._start(whisper, decoding.PieceRequest(clip, encoding=known), opts)
    assert (s.language, s.language_probability, s.no_speech_prob) == ("es", 0.3, 0.7)
    # another prompt: only the encoder output (the first decoder step runs again)
    other = dataclasses.replace(known, prompt=(50361, 123))
    s = decoding._start(whisper, decoding.PieceRequest(clip, language="en", encoding=other), opts)
    assert s.encoded is other.hidden and s.no_speech_prob is None
    # nothing known: nothing set
    s = decoding._start(whisper, decoding.PieceRequest(clip), opts)
    assert s.encoded is None and s.no_speech_prob is None and s.language is None

    def finished(keep: float, language: str | None = None, probability: float | None = 0.3):
        s = decoding._start(whisper, decoding.PieceRequest(clip, language=language, keep_encoding_below=keep), opts)
        s.encoded, s.no_speech_prob = batch[1], 0.1
        if language is None:
            s.language, s.language_probability = "es", probability
        return decoding._kept(whisper, s)

    kept = finished(math.inf, probability=0.99)  # short: kept however sure
    assert kept is not None and (kept.language, kept.language_probability, kept.no_speech_prob) == ("es", 0.99, 0.1)
    assert torch.equal(kept.hidden, batch[1]) and kept.hidden.untyped_storage().nbytes() == kept.hidden.nbytes
    assert finished(0.5, probability=0.3) is not None  # unsure: kept
    assert finished(0.5, probability=0.5) is None  # sure enough: not
    assert finished(0.0) is None  # not asked
    assert finished(math.inf, language="en") is None  # the language was given: no redo to come
