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
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ifw.crds.vad_defaults import (
    VAD_DEFAULT_PREFIX_PADDING_MS,
    VAD_DEFAULT_SILENCE_DURATION_MS,
    VAD_DEFAULT_THRESHOLD,
)
from ifw.runner.audio import SAMPLE_RATE

MAX_PIECE_SECONDS = 30.0  # Whisper's window


@dataclass(frozen=True)
class VadOptions:
    """Silero's settings (spec.vad; OpenAI's server_vad names): the bounds are the CRD's."""

    threshold: float = VAD_DEFAULT_THRESHOLD
    prefix_padding_ms: int = VAD_DEFAULT_PREFIX_PADDING_MS
    silence_duration_ms: int = VAD_DEFAULT_SILENCE_DURATION_MS

    @classmethod
    def from_spec(cls, vad) -> VadOptions:
        """spec.vad (any field may be absent) as options; absent fields keep the defaults."""
        if vad is None:
            return cls()
        given = {k: getattr(vad, k) for k in ("threshold", "prefix_padding_ms", "silence_duration_ms")}
        return cls(**{k: v for k, v in given.items() if v is not None})


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


_local = threading.local()
# Below this, one thread does the whole audio; above, each thread takes a stretch at least this long.
MIN_STRETCH_SECONDS = 120.0


def _silero():
    """One Silero model per thread: the model carries state from frame to frame."""
    if not hasattr(_local, "model"):
        from silero_vad import load_silero_vad

        _local.model = load_silero_vad(onnx=importlib.util.find_spec("onnxruntime") is not None)
    return _local.model


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a pod's limit)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def speech_regions(
    audio: np.ndarray,
    *,
    threshold: float = 0.5,
    min_silence_s: float = 0.5,
    pad_s: float = 0.2,
    max_region_s: float = MAX_PIECE_SECONDS,
    workers: int | None = None,
) -> list[tuple[float, float]]:
    """Where someone speaks, in seconds. Regions longer than max_region_s are split at their longest pause.

    Pauses shorter than min_silence_s (commas, breaths) stay inside a region, so
    pieces are cut between sentences, not inside them: a word at a cut loses
    its context and is misheard more often.

    Silero runs frame by frame on one core (~150x real time), which would
    dominate a GPU pod's time on long audio; long audio is therefore cut into
    one stretch per usable core, run in threads (onnxruntime releases the GIL).
    """
    if audio.size == 0:
        return []
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    kwargs = {
        "threshold": threshold,
        "min_silence_duration_ms": int(min_silence_s * 1000),
        "speech_pad_ms": int(pad_s * 1000),
        # leave room for the padding on both sides
        "max_speech_duration_s": max_region_s - 2 * pad_s,
    }
    seconds = len(audio) / SAMPLE_RATE
    n = max(1, min(workers or usable_cpus(), int(seconds // MIN_STRETCH_SECONDS)))
    if n == 1:
        return _regions(audio, 0, len(audio), kwargs)
    # Each stretch also reads one window past its end, so it sees every region
    # that starts inside it to the region's real end.
    # The cuts sit on Silero's 512-sample frame grid: each stretch sees the frames one pass would
    # (and a shard of a long file, which starts on that grid too, the frames the unsharded run sees).
    cuts = [round(i * len(audio) / n / 512) * 512 for i in range(n)] + [len(audio)]
    overlap = int(max_region_s * SAMPLE_RATE)
    stretches = [(cuts[i], min(cuts[i + 1] + overlap, len(audio))) for i in range(n)]
    with ThreadPoolExecutor(n, thread_name_prefix="vad") as pool:
        parts = list(pool.map(lambda b: _regions(audio, b[0], b[1], kwargs), stretches))
    regions: list[tuple[float, float]] = []
    for i, part in enumerate(parts):
        own_end = cuts[i + 1] / SAMPLE_RATE
        for start, end in part:
            # a region belongs to the stretch it starts in; a later stretch's view of
            # a region already taken (it starts inside it) is dropped
            if start < own_end and (not regions or start >= regions[-1][1]):
                regions.append((start, end))
    return regions


def _regions(audio: np.ndarray, a: int, b: int, kwargs: dict) -> list[tuple[float, float]]:
    import torch
    from silero_vad import get_speech_timestamps

    stamps = get_speech_timestamps(
        torch.from_numpy(audio[a:b]), _silero(), sampling_rate=SAMPLE_RATE, **kwargs
    )
    return [((a + s["start"]) / SAMPLE_RATE, (a + s["end"]) / SAMPLE_RATE) for s in stamps]


# A piece is cut at the longest pause once it is at least this full: long pauses are where
# speakers and languages change, so a turn stays in one piece (and one detected language),
# while pieces stay full enough to batch well.
MIN_FILL = 2 / 3


def plan_pieces(regions: list[tuple[float, float]], max_piece_s: float = MAX_PIECE_SECONDS) -> list[Piece]:
    """Pack consecutive speech regions into pieces of at most max_piece_s, cut only at pauses.

    A piece spans from its first region's start to its last region's end (the short pauses
    inside stay, so timestamps map linearly). When the next region no longer fits, the
    piece ends at the longest pause after MIN_FILL of max_piece_s (the latest on a tie);
    the regions after that pause begin the next piece.
    """
    pieces: list[Piece] = []
    current: list[tuple[float, float]] = []
    for region in _at_most(regions, max_piece_s):
        while current and region[1] - current[0][0] > max_piece_s:
            k = _cut(current, region[0], MIN_FILL * max_piece_s)
            pieces.append(Piece(current[0][0], current[k - 1][1], tuple(current[:k])))
            current = current[k:]
        current.append(region)
    if current:
        pieces.append(Piece(current[0][0], current[-1][1], tuple(current)))
    return pieces


def _cut(current: list[tuple[float, float]], next_start: float, min_fill: float) -> int:
    """How many regions of `current` the piece keeps: the cut is the longest pause past min_fill."""
    best, best_pause = len(current), -1.0
    for k in range(1, len(current) + 1):
        if current[k - 1][1] - current[0][0] < min_fill:
            continue
        pause = (current[k][0] if k < len(current) else next_start) - current[k - 1][1]
        if pause >= best_pause:
            best, best_pause = k, pause
    return best


def _at_most(regions: list[tuple[float, float]], limit: float):
    """Regions, with any longer than `limit` cut into consecutive parts (the VAD rarely leaves one)."""
    for start, end in regions:
        while end - start > limit:
            yield start, start + limit
            start += limit
        yield start, end


def split_audio(audio: np.ndarray, max_piece_s: float = MAX_PIECE_SECONDS, *,
                options: VadOptions | None = None) -> list[Piece]:  # fmt: skip
    """The ≤max_piece_s pieces of the audio that hold speech, in time order (none for silence)."""
    o = options or VadOptions()
    regions = speech_regions(audio, threshold=o.threshold, min_silence_s=o.silence_duration_ms / 1000,
                             pad_s=o.prefix_padding_ms / 1000, max_region_s=max_piece_s)  # fmt: skip
    return plan_pieces(regions, max_piece_s)
