"""Shared runner fixtures: real human speech, and speech made with espeak-ng at test time.

`speech([(voice, text, pause_after_s), ...])` returns a SpeechClip: a 16 kHz
mono 16-bit wav plus where each utterance truly starts and ends (measured on
the generated samples, not guessed), so tests can check words and timestamps
against what was spoken. `harvard_sentences()` and `harvard_conversation()` do
the same with the real recordings in ../shared/speech (read in place, never
copied into the repository). `wer(reference, hypothesis)` scores a transcript
after normalising case and punctuation.

Needs `espeak-ng` and `sox` (apt-get install espeak-ng sox ffmpeg).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.speaking import speak

# Two shared cores: oversubscribed torch threads make some ops 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "0")

SAMPLE_RATE = 16000
# Samples below this amplitude (of full scale) count as silence when measuring
# where an utterance starts and ends.
_SILENCE_LEVEL = 0.01


@dataclass(frozen=True)
class Utterance:
    voice: str
    text: str
    start: float  # seconds, first audible sample
    end: float  # seconds, last audible sample


@dataclass
class SpeechClip:
    path: Path
    duration: float
    utterances: list[Utterance] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(u.text for u in self.utterances)

    @property
    def voices(self) -> list[str]:
        return sorted({u.voice for u in self.utterances})

    def audio(self) -> np.ndarray:
        """The samples as float32 in [-1, 1]."""
        return read_wav(self.path)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def write_wav(path: Path, samples: np.ndarray) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def _espeak(voice: str, text: str, speed: int, workdir: Path) -> np.ndarray:
    """One utterance at 16 kHz, trimmed to its audible part."""
    raw = workdir / "utt.wav"
    res = workdir / "utt16k.wav"
    speak(text, raw, voice=voice, rate=speed)
    subprocess.run(["sox", "-V1", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(res)], check=True)
    samples = read_wav(res)
    loud = np.flatnonzero(np.abs(samples) > _SILENCE_LEVEL)
    assert loud.size, f"espeak-ng produced no audible speech for {text!r}"
    return samples[loud[0] : loud[-1] + 1]


# Known English sentences for speech made with espeak-ng (tests and bench/runner_cpu.py).
SENTENCES = [
    "The weather is nice today, so we are going to walk to the park.",
    "We will meet at the station early in the morning.",
    "She reads a book every evening before going to sleep.",
    "My brother bought a new car last week.",
    "Please open the window because it is very warm in here.",
    "The children are playing football in the garden.",
    "I would like a cup of coffee with milk and sugar.",
    "The train to London leaves from the main platform.",
    "He forgot his umbrella, and now he is wet from the rain.",
    "Our team finished the project two days before the deadline.",
    "The museum is closed on Mondays and open every other day.",
    "Turn left at the bank and the hotel is on your right.",
    "We need to buy bread, eggs, and cheese for breakfast.",
    "The doctor told him to drink more water and rest.",
    "Every summer the family drives to the lake for a week.",
    "The library has thousands of books about history and science.",
    "Can you tell me how to get to the nearest post office?",
    "The meeting was moved to the afternoon because of the storm.",
    "She plays the piano beautifully and sings in a choir.",
    "The new bridge will be finished before the end of the year.",
]


class SpeechFactory:
    """Builds (and caches, per test session) spoken clips."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(
        self,
        parts: list[tuple[str, str, float]],
        *,
        lead_s: float = 0.5,
        speed: int = 165,
        name: str | None = None,
    ) -> SpeechClip:
        """parts: [(espeak voice, text, seconds of silence after it)]."""
        key = hashlib.sha256(json.dumps([parts, lead_s, speed]).encode()).hexdigest()[:16]
        path = self.root / f"{name or 'speech'}-{key}.wav"
        meta = path.with_suffix(".json")
        if path.exists() and meta.exists():
            utts = [Utterance(**u) for u in json.loads(meta.read_text())]
            return SpeechClip(path, len(read_wav(path)) / SAMPLE_RATE, utts)

        work = self.root / f"work-{key}"
        work.mkdir(parents=True, exist_ok=True)
        pieces = [np.zeros(int(lead_s * SAMPLE_RATE), np.float32)]
        cursor = len(pieces[0])
        utts: list[Utterance] = []
        for voice, text, pause_after in parts:
            samples = _espeak(voice, text, speed, work)
            utts.append(Utterance(voice, text, cursor / SAMPLE_RATE, (cursor + len(samples)) / SAMPLE_RATE))
            silence = np.zeros(int(pause_after * SAMPLE_RATE), np.float32)
            pieces += [samples, silence]
            cursor += len(samples) + len(silence)
        shutil.rmtree(work, ignore_errors=True)
        audio = np.concatenate(pieces)
        write_wav(path, audio)
        meta.write_text(json.dumps([u.__dict__ for u in utts]))
        return SpeechClip(path, len(audio) / SAMPLE_RATE, utts)

    def silence(self, seconds: float, *, noise: float = 0.0) -> SpeechClip:
        """Digital silence (or faint white noise of that amplitude): nothing was said."""
        path = self.root / f"silence-{seconds}-{noise}.wav"
        if not path.exists():
            rng = np.random.default_rng(0)
            write_wav(path, rng.normal(0.0, noise, int(seconds * SAMPLE_RATE)).astype(np.float32))
        return SpeechClip(path, seconds, [])


# ------------------------------------------------------------ real speech

# ../shared/speech beside the checkout (see its README.md): Harvard sentences and AMI excerpts.
SPEECH_DIR = Path(__file__).resolve().parents[3] / "shared" / "speech"
HARVARD_DIR = SPEECH_DIR / "harvard"
# transcripts.tsv copies speechbrain's character transcript of spk2_snt5, "Canned pears lack
# full flavor."; speechbrain's own phone annotation of the same file reads "jh ah m p dh ax f eh
# n s ae n hh er iy ah p dh ax b ae ng" -- what is said, and what tiny.en, base and faster-whisper hear.
HARVARD_CORRECTIONS = {"spk2_snt5.wav": "Jump the fence and hurry up the bank."}
# 20 ms frames louder than this (RMS) are speech when measuring where a recording's speech lies.
_REAL_SPEECH_RMS = 0.01


@dataclass(frozen=True)
class RealSentence:
    path: Path
    speaker: str
    text: str


def harvard_sentences() -> list[RealSentence]:
    """The ten Harvard sentences (spk1_snt1 ... spk2_snt5) with their reference texts."""
    if not (HARVARD_DIR / "transcripts.tsv").is_file():
        pytest.fail(f"real speech not found at {HARVARD_DIR} (the shared/speech folder beside the checkout)")
    with (HARVARD_DIR / "transcripts.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [RealSentence(HARVARD_DIR / r["file"], r["speaker"], HARVARD_CORRECTIONS.get(r["file"], r["text"]))
            for r in rows]  # fmt: skip


def _speech_span(samples: np.ndarray) -> tuple[float, float]:
    frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(axis=1)) > _REAL_SPEECH_RMS)
    return float(loud[0] * 0.02), float((loud[-1] + 1) * 0.02)


def harvard_conversation(dest: Path, pauses: tuple[float, ...] = (0.8, 1.2, 0.6, 1.5, 1.0), *,
                         lead_s: float = 0.5, noise: float = 0.0005) -> SpeechClip:  # fmt: skip
    """The ten sentences as one two-speaker conversation: spk1 and spk2 take turns (snt1 of each,
    then snt2, ...), with the given pauses (cycled) of faint room noise between them."""
    by_name = {s.path.stem: s for s in harvard_sentences()}
    order = [by_name[f"spk{k}_snt{n}"] for n in range(1, 6) for k in (1, 2)]
    key = hashlib.sha256(json.dumps([pauses, lead_s, noise]).encode()).hexdigest()[:12]
    path = dest / f"harvard-conversation-{key}.wav"
    rng = np.random.default_rng(0)
    parts = [rng.normal(0.0, noise, int(lead_s * SAMPLE_RATE)).astype(np.float32)]
    cursor = len(parts[0])
    utterances = []
    for i, sentence in enumerate(order):
        samples = read_wav(sentence.path)
        a, b = _speech_span(samples)
        utterances.append(Utterance(sentence.speaker, sentence.text, cursor / SAMPLE_RATE + a,
                                    cursor / SAMPLE_RATE + b))  # fmt: skip
        gap = rng.normal(0.0, noise, int(pauses[i % len(pauses)] * SAMPLE_RATE)).astype(np.float32)
        parts += [samples, gap]
        cursor += len(samples) + len(gap)
    audio = np.concatenate(parts[:-1])  # no pause after the last sentence
    if not path.exists():
        write_wav(path, audio)
    return SpeechClip(path, len(audio) / SAMPLE_RATE, utterances)


@pytest.fixture(scope="session")
def harvard() -> list[RealSentence]:
    return harvard_sentences()


@pytest.fixture(scope="session")
def conversation(tmp_path_factory) -> SpeechClip:
    return harvard_conversation(tmp_path_factory.mktemp("real-speech"))


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> SpeechFactory:
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.fail("espeak-ng and sox are needed for runner tests: apt-get install espeak-ng sox ffmpeg")
    return SpeechFactory(tmp_path_factory.mktemp("speech"))


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, single spaces: what WER should compare."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    ref = normalize_text(reference)
    hyp = normalize_text(hypothesis)
    if not hyp:
        return 1.0 if ref else 0.0
    return jiwer.wer(ref, hyp)


@pytest.fixture(scope="session")
def wer():
    return word_error_rate


@pytest.fixture(autouse=True)
def _pin_torch_threads(request):
    """Model tests share two cores: pin torch to them."""
    if request.node.get_closest_marker("model"):
        import torch

        torch.set_num_threads(2)
    yield
