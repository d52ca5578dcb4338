"""Voice activity detection: cut the audio into ≤30 s pieces at silences.

Whisper sees 30 s windows. Cutting the audio at pauses (instead of fixed,
overlapping 30 s strides) skips silence, gives every piece whole sentences so
its timestamps are right, and lets all pieces be decoded as one batch — how
the fastest batched Whisper systems work. The VAD is Silero (its weights ship
inside the `silero-vad` wheel); the ONNX build runs ~2x faster on CPU than the
TorchScript one, so it is used when onnxruntime is installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
MAX_PIECE_SECONDS = 30.0  # Whisper's window


@dataclass(frozen=True)
class Piece:
    """A stretch of the audio [start, end) in seconds that Whisper decodes as one window."""

    start: float
    end: float
    # The speech regions inside the piece (absolute seconds); empty when unknown.
    regions: tuple[tuple[float, float], ...] = ()

    @property
    def duration(self) -> float:
        return self.end - self.start

    def snap(self, start: float, end: float, max_shift: float = 1.5) -> tuple[float, float]:
        """Move a segment's predicted start/end onto the nearest edge of speech.

        Whisper's timestamp tokens are coarse (tiny models often step in whole
        seconds, and a boundary may land in the pause or in the next sentence);
        the VAD knows where speech starts and stops. Each boundary moves to the
        nearest region edge of its kind, at most `max_shift` seconds away.
        """
        starts = [s for s, _ in self.regions if s < end and abs(s - start) <= max_shift]
        if starts:
            start = min(starts, key=lambda s: abs(s - start))
        ends = [e for _, e in self.regions if e > start and abs(e - end) <= max_shift]
        if ends:
            end = min(ends, key=lambda e: abs(e - end))
        return start, max(start, end)


@lru_cache(maxsize=1)
def _silero():
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=importlib.util.find_spec("onnxruntime") is not None)


def speech_regions(
    audio: np.ndarray,
    *,
    threshold: float = 0.5,
    min_silence_s: float = 0.5,
    pad_s: float = 0.2,
    max_region_s: float = MAX_PIECE_SECONDS,
) -> list[tuple[float, float]]:
    """Where someone speaks, in seconds. Regions longer than max_region_s are split at their longest pause.

    Pauses shorter than min_silence_s (commas, breaths) stay inside a region, so
    pieces are cut between sentences, not inside them: a word at a cut loses
    its context and is misheard more often.
    """
    import torch
    from silero_vad import get_speech_timestamps

    if audio.size == 0:
        return []
    stamps = get_speech_timestamps(
        torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
        _silero(),
        threshold=threshold,
        sampling_rate=SAMPLE_RATE,
        min_silence_duration_ms=int(min_silence_s * 1000),
        speech_pad_ms=int(pad_s * 1000),
        # leave room for the padding on both sides
        max_speech_duration_s=max_region_s - 2 * pad_s,
    )
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]


def plan_pieces(regions: list[tuple[float, float]], max_piece_s: float = MAX_PIECE_SECONDS) -> list[Piece]:
    """Pack consecutive speech regions greedily into pieces of at most max_piece_s.

    A piece spans from its first region's start to its last region's end (the
    short pauses inside stay, so timestamps map linearly), and is cut only at a
    pause between regions. Fuller pieces mean fewer windows to decode.
    """
    pieces: list[Piece] = []
    current: list[tuple[float, float]] = []
    for region in _at_most(regions, max_piece_s):
        if current and region[1] - current[0][0] > max_piece_s:
            pieces.append(Piece(current[0][0], current[-1][1], tuple(current)))
            current = []
        current.append(region)
    if current:
        pieces.append(Piece(current[0][0], current[-1][1], tuple(current)))
    return pieces


def _at_most(regions: list[tuple[float, float]], limit: float):
    """Regions, with any longer than `limit` cut into consecutive parts (the VAD rarely leaves one)."""
    for start, end in regions:
        while end - start > limit:
            yield start, start + limit
            start += limit
        yield start, end


def split_audio(audio: np.ndarray, max_piece_s: float = MAX_PIECE_SECONDS) -> list[Piece]:
    """The ≤max_piece_s pieces of the audio that hold speech, in time order (none for silence)."""
    return plan_pieces(speech_regions(audio, max_region_s=max_piece_s), max_piece_s)
