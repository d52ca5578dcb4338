"""Voice activity detection: cut the audio into ≤30 s pieces at silences.

Whisper sees 30 s windows. Cutting the audio at pauses (instead of fixed,
overlapping 30 s strides) skips silence, gives every piece whole sentences so
its timestamps are right, and lets all pieces be decoded as one batch — how
the fastest batched Whisper systems work. The VAD is Silero (its weights ship
inside the `silero-vad` wheel); its ONNX build runs ~2x faster on CPU than the
TorchScript one.

The ONNX model is run here with onnxruntime and numpy alone, not through the
silero_vad package: importing that imports torch (~190 MB of RSS, for a process
that may hold nothing else) and sets torch's threads to 1 for the whole process.
The frames, the model's state between them and the rules that turn frame
probabilities into regions are Silero's own (get_speech_timestamps), so the
regions are the same; tests/runner/test_vad_memory.py holds them to that. The
audio is read a frame at a time (no copy of it, whatever its dtype), and a
frame's probability is kept as one float32.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
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


# Where the audio the VAD is given begins on its file's clock (file_clock): 0 but in a shard.
_clock: ContextVar[float] = ContextVar("ifw_vad_file_clock", default=0.0)
_load_lock = threading.Lock()
_onnx_session = None
# The VAD's stretches (run in threads, the model's state fresh at each): one every this many
# seconds of the file's clock (3750 frames), whatever the CPU count.
MIN_STRETCH_SECONDS = 120.0
# Each stretch's model first hears this much of the audio before it (as one pass would have),
# so that its state at the stretch's start is close to one pass's: Silero's state carries for
# minutes, and a cold start differs in about two regions of dense speech per stretch, a warmed
# one in about one (bench on 8 min of AMI meetings). Costs as much as the old stretches' overlap.
WARM_UP_SECONDS = 30.0
FRAME = 512  # Silero's frame at 16 kHz
CONTEXT = 64  # the samples before a frame that Silero's model sees with it


def _model_file(name: str) -> str:
    """A file of the silero_vad wheel's data folder, found without importing the package (torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("silero_vad is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / name)


def _silero():
    """The VAD model: one ONNX session for the process (its state is passed in and out, so threads
    share it). onnxruntime is a pinned dependency of the runner."""
    global _onnx_session
    with _load_lock:
        if _onnx_session is None:
            import onnxruntime

            opts = onnxruntime.SessionOptions()  # as silero_vad's OnnxWrapper builds it
            opts.inter_op_num_threads = 1
            opts.intra_op_num_threads = 1
            _onnx_session = onnxruntime.InferenceSession(
                _model_file("silero_vad.onnx"), providers=["CPUExecutionProvider"], sess_options=opts
            )
        return _onnx_session


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
    start: float | None = None,
) -> list[tuple[float, float]]:
    """Where someone speaks, in seconds. Regions longer than max_region_s are split at their longest pause.

    Pauses shorter than min_silence_s (commas, breaths) stay inside a region, so
    pieces are cut between sentences, not inside them: a word at a cut loses
    its context and is misheard more often.

    Silero runs frame by frame on one core (~150x real time), which would
    dominate a GPU pod's time on long audio; long audio is therefore cut into
    stretches run in threads (onnxruntime releases the GIL). The stretches lie on a fixed grid
    of the file's clock (every MIN_STRETCH_SECONDS from the file's start; ``start`` is where
    ``audio`` begins on it, by default ``file_clock``'s), not one per core: the model's state
    starts afresh at each grid point whatever the number of threads, so the regions do not
    depend on the CPU count, and a shard that starts elsewhere finds the file's own frame
    probabilities from its first grid point on. The probabilities of all stretches are then
    turned into regions in one pass, as for unbroken audio: a region across a grid point is
    one region.
    """
    if audio.size == 0:
        return []
    audio = np.asarray(audio)  # read a frame at a time as float32 (_frame_probs): no copy here
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (a 1-D array), got shape {audio.shape}")
    kwargs = {
        "threshold": threshold,
        "min_silence_duration_ms": int(min_silence_s * 1000),
        "speech_pad_ms": int(pad_s * 1000),
        # leave room for the padding on both sides
        "max_speech_duration_s": max_region_s - 2 * pad_s,
    }
    bounds = stretch_bounds(len(audio), _clock.get() if start is None else start)
    stretches = list(zip(bounds, bounds[1:]))
    threads = max(1, min(workers or usable_cpus(), len(stretches)))
    if threads == 1:
        parts = [_stretch_probs(audio, a, b) for a, b in stretches]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="vad") as pool:
            parts = list(pool.map(lambda s: _stretch_probs(audio, *s), stretches))
    probs = parts[0] if len(parts) == 1 else np.concatenate(parts)
    stamps = _speech_stamps(probs, len(audio), **kwargs)
    return [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in stamps]


def stretch_bounds(length: int, start: float = 0.0) -> list[int]:
    """Where the VAD's stretches of ``length`` samples of audio that begin ``start`` seconds into
    the file begin (sample offsets into the audio), and its end: the audio's start and every
    multiple of MIN_STRETCH_SECONDS on the file's clock after it, on the audio's frame grid."""
    step = round(MIN_STRETCH_SECONDS * SAMPLE_RATE / FRAME) * FRAME
    offset = round(start * SAMPLE_RATE)
    bounds = [0]
    point = (offset // step + 1) * step  # the first grid point after the audio's start
    while point - offset < length:
        at = round((point - offset) / FRAME) * FRAME
        if bounds[-1] < at < length:
            bounds.append(at)
        point += step
    return bounds + [length]


@contextmanager
def file_clock(start: float):
    """Within this block the VAD's audio begins ``start`` seconds into its file (a shard's range):
    its stretches then lie on the file's grid, as in an unsharded run."""
    token = _clock.set(float(start))
    try:
        yield
    finally:
        _clock.reset(token)


def _stretch_probs(audio: np.ndarray, a: int, b: int) -> np.ndarray:
    """The frame probabilities of audio[a:b]: the model's state starts afresh WARM_UP_SECONDS
    before a (where the audio has them), and the frames before a only warm it up."""
    warm = min(a, round(WARM_UP_SECONDS * SAMPLE_RATE / FRAME) * FRAME)
    return _frame_probs(_silero(), audio, a - warm, b)[warm // FRAME :]


def _frame_probs(session, audio: np.ndarray, a: int, b: int) -> np.ndarray:
    """Silero's speech probability of each 512-sample frame of audio[a:b] (the last one zero-padded).

    As silero_vad's OnnxWrapper runs it from a reset state: each frame goes in after the 64 samples
    before it (zeros before the first), the model's state carries from frame to frame.
    """
    frames = -(-(b - a) // FRAME)
    probs = np.empty(frames, np.float32)
    window = np.zeros((1, CONTEXT + FRAME), np.float32)
    feed = {"input": window, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(SAMPLE_RATE, np.int64)}
    for i in range(frames):
        start = a + i * FRAME
        frame = audio[start : min(start + FRAME, b)]
        window[0, CONTEXT : CONTEXT + len(frame)] = frame  # cast to float32 here, a frame at a time
        if len(frame) < FRAME:
            window[0, CONTEXT + len(frame) :] = 0.0
        out, feed["state"] = session.run(None, feed)
        probs[i] = out[0, 0]
        window[0, :CONTEXT] = window[0, FRAME:]  # the next frame's context: this frame's last samples
    return probs


def _speech_stamps(
    probs: np.ndarray,
    length: int,
    *,
    threshold: float,
    min_silence_duration_ms: int,
    speech_pad_ms: int,
    max_speech_duration_s: float,
    min_speech_duration_ms: int = 250,
    min_silence_at_max_speech: int = 98,
) -> list[tuple[int, int]]:
    """Speech (start, end) in samples of a stretch `length` samples long, from its frames' probabilities.

    silero_vad's get_speech_timestamps rules (16 kHz, its defaults otherwise; a speech run over
    the maximum is cut at its longest pause), which the regions must match exactly: a frame is
    speech from `threshold` up, silence below threshold - 0.15, compared in float64 as Silero
    compares its Python floats; a region closes after min_silence of silence, is dropped under
    min_speech, and is padded by speech_pad, or by half the pause where two are closer.
    """
    rate = SAMPLE_RATE
    min_speech = rate * min_speech_duration_ms / 1000
    pad = rate * speech_pad_ms / 1000
    max_speech = rate * max_speech_duration_s - FRAME - 2 * pad
    min_silence = rate * min_silence_duration_ms / 1000
    min_pause_at_max = rate * min_silence_at_max_speech / 1000
    p = probs.astype(np.float64)
    is_speech = (p >= threshold).tolist()
    is_silence = (p < max(threshold - 0.15, 0.01)).tolist()
    del p

    spans: list[list[int]] = []
    start = None  # the open region's start (in speech) or None
    silence_from = 0  # where the current silence inside the region began (0: none)
    pauses: list[tuple[int, int]] = []  # (where, how long) of the pauses inside the open region
    for i, speech in enumerate(is_speech):
        at = i * FRAME
        if speech and silence_from:  # speech again after a silence: remember the pause
            if at - silence_from > min_pause_at_max:
                pauses.append((silence_from, at - silence_from))
            silence_from = 0
        if speech and start is None:
            start = at
            continue
        if start is not None and at - start > max_speech:
            if pauses:  # cut at the longest pause (the first of the longest)
                end, length_of_pause = max(pauses, key=lambda x: x[1])
                spans.append([start, end])
                resume = end + length_of_pause
                start = resume if resume < end + at else None
                silence_from, pauses = 0, []
            else:  # no pause: cut here
                spans.append([start, at])
                start, silence_from, pauses = None, 0, []
                continue
        if is_silence[i] and start is not None:
            if not silence_from:
                silence_from = at
            if at - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                spans.append([start, silence_from])
            start, silence_from, pauses = None, 0, []
    if start is not None and length - start > min_speech:
        spans.append([start, length])

    for k, span in enumerate(spans):
        if k == 0:
            span[0] = int(max(0, span[0] - pad))
        if k < len(spans) - 1:
            after = spans[k + 1]
            gap = after[0] - span[1]
            if gap < 2 * pad:  # two regions closer than their padding meet halfway
                span[1] += int(gap // 2)
                after[0] = int(max(0, after[0] - gap // 2))
            else:
                span[1] = int(min(length, span[1] + pad))
                after[0] = int(max(0, after[0] - pad))
        else:
            span[1] = int(min(length, span[1] + pad))
    return [(s, e) for s, e in spans]


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
                options: VadOptions | None = None, start: float | None = None) -> list[Piece]:  # fmt: skip
    """The ≤max_piece_s pieces of the audio that hold speech, in time order (none for silence).

    ``start``: where the audio begins on its file's clock (by default ``file_clock``'s). After each
    point of the VAD's stretch grid a piece always ends, at the longest pause in the
    CUT_WINDOW_SECONDS after it: the pieces from there on are the same whatever came before, so a
    shard's pieces are the unsharded run's from its first grid point on (Whisper decodes the same
    windows, and hears the same words), not shifted to its own start for the whole shard.
    """
    o = options or VadOptions()
    start = _clock.get() if start is None else start
    regions = speech_regions(audio, threshold=o.threshold, min_silence_s=o.silence_duration_ms / 1000,
                             pad_s=o.prefix_padding_ms / 1000, max_region_s=max_piece_s, start=start)  # fmt: skip
    step = round(MIN_STRETCH_SECONDS * SAMPLE_RATE / FRAME) * FRAME / SAMPLE_RATE
    duration = len(audio) / SAMPLE_RATE
    # the grid points whose window reaches into the audio, on the audio's clock: a shard that starts
    # inside a point's window finds the unsharded run's cut there too when it is the pause it starts in
    first = math.floor((start - FORCED_CUT_WINDOW_SECONDS) / step) + 1
    points = [k * step - start for k in range(max(1, first), math.ceil((start + duration) / step))]
    groups = _split_at_points(regions, points, duration)
    return [piece for part in groups for piece in plan_pieces(part, max_piece_s)]


# Where a piece must end after each stretch grid point: the longest pause within this window
# (the shards' CUT_WINDOW_SECONDS, ifw.core.shards).
FORCED_CUT_WINDOW_SECONDS = 30.0


def _split_at_points(regions: list[tuple[float, float]], points: list[float],
                     duration: float) -> list[list[tuple[float, float]]]:  # fmt: skip
    """The regions in groups, split after each point at the longest pause (the first of equals)
    that reaches into the FORCED_CUT_WINDOW_SECONDS after it. The silence before the first region
    and after the last count as pauses (the audio's ends: a shard's cuts), as in
    ifw.core.shards.cut_point; there, or with speech throughout the window, nothing is split."""
    cuts = []
    for point in points:
        best, longest = None, -1.0
        for k in range(len(regions) + 1):
            end = regions[k - 1][1] if k else 0.0
            after = regions[k][0] if k < len(regions) else duration
            if after <= point:
                continue
            if end >= point + FORCED_CUT_WINDOW_SECONDS:
                break
            if after - end > longest:
                best, longest = k, after - end
        if best is not None and 0 < best < len(regions):
            cuts.append(best)
    bounds = [0, *sorted(set(cuts)), len(regions)]
    return [regions[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
