"""One job's transcription: VAD pieces in, a Transcript out.

The audio is cut at silences into ≤30 s pieces (ifw.runner.vad) and decoded by the decode
engine (ifw.runner.decoding; the model: ifw.runner.models). `transcribe` adds the job's
rules: language per piece (a short or unsure piece takes the file's dominant language), a
speech stretch without text decoded again on its own, and coverage figures so that nothing
is dropped silently. Segments and word times: ifw.runner.segments.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ifw.core.transcript import Segment, Transcript
from ifw.runner import decoding, vad
from ifw.runner.audio import SAMPLE_RATE
from ifw.runner.decoding import Decode, DecodeStats, OnDone, PieceRequest, PieceResult
from ifw.runner.models import WhisperModel, only_language
from ifw.runner.segments import piece_segments, round_time

log = logging.getLogger(__name__)

# A piece with less speech than this, or detected with less confidence, takes the file's
# dominant language: one ambiguous second must not switch the language.
LANGUAGE_MIN_SPEECH_SECONDS = 2.0
LANGUAGE_MIN_PROBABILITY = 0.5
# A stretch of speech at least this long that no segment touches is decoded again on its own.
RETRY_MIN_SECONDS = 1.0

ProgressCallback = Callable[[float, float], None]  # (processed seconds, total seconds)
TextCallback = Callable[[str], None]  # the text so far, in time order (it only grows)


def speech_of(piece: vad.Piece) -> tuple[tuple[float, float], ...]:
    """The piece's speech regions (the whole piece when the VAD did not say)."""
    return piece.regions or ((piece.start, piece.end),)


def settle_languages(speech_seconds: Sequence[float], results: Sequence[PieceResult]):
    """The file's dominant language, its probability, and the pieces to decode again in it.

    Pieces that are long and sure enough keep their own language (code-switching); the
    others, when detected otherwise, are decoded again in the language with the most
    confident speech. Returns (language, probability or None, indices).
    """
    def sure(i: int) -> bool:
        return (speech_seconds[i] >= LANGUAGE_MIN_SPEECH_SECONDS
                and (results[i].language_probability or 0.0) >= LANGUAGE_MIN_PROBABILITY)  # fmt: skip

    spoken = [i for i, r in enumerate(results) if r.verdict == "ok"] or list(range(len(results)))
    voters = [i for i in spoken if sure(i)] or spoken
    weight: Counter[str] = Counter()
    for i in voters:
        weight[results[i].language] += speech_seconds[i]
    dominant = weight.most_common(1)[0][0]
    same = [i for i in voters if results[i].language == dominant and results[i].language_probability is not None]
    total = sum(speech_seconds[i] for i in same)
    probability = sum(speech_seconds[i] * results[i].language_probability for i in same) / total if total else None
    redo = [i for i, r in enumerate(results) if r.language != dominant and not sure(i)]
    return dominant, probability, redo


def transcribe(
    audio: np.ndarray,
    whisper: WhisperModel,
    *,
    task: str = "transcribe",
    language: str | None = None,
    batch_size: int = 24,
    timestamp: str = "chunk",
    prompt: str | None = None,
    temperature: float = 0.0,
    condition_on_previous: bool = False,
    on_progress: ProgressCallback | None = None,
    on_text: TextCallback | None = None,
    pieces: list[vad.Piece] | None = None,
    stats: DecodeStats | None = None,
    decode: Decode | None = None,
) -> Transcript:
    """Transcribe 16 kHz mono float32 audio. Silence gives an empty transcript, not an error.

    language None detects it per piece; a given language holds for the whole file. `prompt`
    conditions every piece; `condition_on_previous` adds the previous piece's text to it
    (the pieces are then decoded one after the other). `stats` collects the generate() calls;
    `decode` replaces this job's own decode_pieces calls (cross-job batching). `on_text` gets
    the text so far each time the pieces from the start on have grown (for streaming clients;
    the final text may still differ where later passes redo a piece).
    """
    if decode is None:
        decode = functools.partial(_decode_alone, whisper, batch_size, stats)
    language = language or None
    decoding.check_task_and_language(whisper, task, language)
    decoding.prompt_ids(whisper, prompt)  # a bad prompt fails before any decoding
    if pieces is None:
        pieces = vad.split_audio(audio)
    job = _Transcription(audio, whisper, pieces, task=task, prompt=prompt, temperature=temperature,
                         word_timestamps=timestamp == "word", on_progress=on_progress, on_text=on_text)  # fmt: skip
    speech = [sum(b - a for a, b in speech_of(p)) for p in pieces]
    job.report_progress()
    if not pieces:
        return Transcript(text="", segments=[], task=task, timestamp=timestamp,
                          language=language or only_language(whisper), duration=round_time(job.duration),
                          model=whisper.name, speech_seconds=0.0, text_seconds=0.0)  # fmt: skip

    requests = [job.request(p, language or only_language(whisper)) for p in pieces]
    if condition_on_previous:
        results = _decode_in_order(decode, requests, job.on_done)
    else:
        results = decode(requests, job.on_done)

    probability = None
    if language is None and whisper.multilingual:
        language, probability, redo = settle_languages(speech, results)
        if redo:
            log.info("%d short or unsure pieces decoded again in the dominant language %s", len(redo), language)
            again = decode([job.request(pieces[i], language) for i in redo], None)
            for i, r in zip(redo, again, strict=True):
                results[i] = r
    language = language or only_language(whisper)

    per_piece = [list(job.segments_of(i, r)) for i, r in enumerate(results)]
    dropped = job.decode_uncovered_speech(decode, results, per_piece)
    segments = sorted((s for segs in per_piece for s in segs), key=lambda s: s.start)
    return Transcript(
        text="".join(s.text for s in segments),  # each carries its leading space
        segments=segments,
        task=task,
        timestamp=timestamp,
        language=language,
        language_probability=None if probability is None else round(probability, 4),
        duration=round_time(job.duration),
        model=whisper.name,
        speech_seconds=round_time(sum(speech)),
        text_seconds=round_time(_covered([r for p in pieces for r in speech_of(p)], segments)),
        dropped_pieces=dropped,
    )


class _Transcription:
    """What one transcribe() call's decode callbacks share: its pieces, each one's segments,
    and the progress and text reported so far."""

    def __init__(self, audio: np.ndarray, whisper: WhisperModel, pieces: list[vad.Piece], *, task: str,
                 prompt: str | None, temperature: float, word_timestamps: bool,
                 on_progress: ProgressCallback | None, on_text: TextCallback | None):  # fmt: skip
        self.audio = audio
        self.whisper = whisper
        self.pieces = pieces
        self.task = task
        self.prompt = prompt
        self.temperature = temperature
        self.word_timestamps = word_timestamps
        self.on_progress = on_progress
        self.on_text = on_text
        self.duration = len(audio) / SAMPLE_RATE
        self.processed = self.duration - sum(p.duration for p in pieces)  # silence counts as done
        self.decoded: dict[int, tuple[PieceResult, list[Segment]]] = {}  # piece -> its result and segments
        self.streamed = 0  # pieces[:streamed] are in the text so far

    def request(self, piece: vad.Piece, language: str | None) -> PieceRequest:
        clip = self.audio[int(piece.start * SAMPLE_RATE) : int(piece.end * SAMPLE_RATE)]
        return PieceRequest(clip, self.task, language, self.prompt, self.temperature, self.word_timestamps)

    def segments_of(self, i: int, result: PieceResult) -> list[Segment]:
        """A piece's segments, made once per result (streaming makes them as the pieces finish)."""
        if i not in self.decoded or self.decoded[i][0] is not result:
            segments = piece_segments(self.whisper, self.pieces[i], result) if result.verdict == "ok" else []
            self.decoded[i] = (result, segments)
        return self.decoded[i][1]

    def report_progress(self) -> None:
        if self.on_progress:
            self.on_progress(min(self.processed, self.duration), self.duration)

    def on_done(self, done: list[int], finished: list[PieceResult]) -> None:
        """The engine's on_done: progress, and the text so far when it grew from the start on."""
        self.processed += sum(self.pieces[i].duration for i in done)
        if self.on_text:
            for i, r in zip(done, finished, strict=True):
                self.segments_of(i, r)
            before = self.streamed
            while self.streamed in self.decoded:
                self.streamed += 1
            if self.streamed > before:
                self.on_text("".join(s.text for i in range(self.streamed) for s in self.decoded[i][1]))
        self.report_progress()

    def decode_uncovered_speech(self, decode: Decode, results: list[PieceResult],
                                per_piece: list[list[Segment]]) -> int:  # fmt: skip
        """Nothing dropped silently: speech that no segment covers is decoded again on its own
        (its segments are added to per_piece). Returns the pieces and stretches still without text."""
        dropped = 0
        retries: list[tuple[int, vad.Piece]] = []
        for i, (piece, segs) in enumerate(zip(self.pieces, per_piece, strict=True)):
            regions = speech_of(piece)
            if segs:
                gaps = [(a, b) for a, b in regions if b - a >= RETRY_MIN_SECONDS and not _touched(a, b, segs)]
            elif len(regions) > 1:
                gaps = list(regions)  # cut smaller: each stretch of speech alone
            else:
                gaps = []
                dropped += 1  # nothing smaller to try: given up (counted)
            retries += [(i, vad.Piece(a, b, ((a, b),))) for a, b in gaps]
        if retries:
            again = decode([self.request(sub, results[i].language) for i, sub in retries], None)
            for (i, sub), r in zip(retries, again, strict=True):
                segs = piece_segments(self.whisper, sub, r) if r.verdict == "ok" else []
                per_piece[i] += segs
                dropped += not segs
            log.info("%d stretches of speech without text decoded again; %d still without text", len(retries), dropped)
        return dropped


def _decode_alone(whisper: WhisperModel, batch_size: int, stats: DecodeStats | None,
                  requests: list[PieceRequest], on_done: OnDone | None) -> list[PieceResult]:  # fmt: skip
    """transcribe()'s decode when no shared decoder is given: this job's pieces on their own."""
    return decoding.decode_pieces(whisper, requests, batch_size=batch_size, on_done=on_done, stats=stats)


def _decode_in_order(decode: Decode, requests: list[PieceRequest], on_done: OnDone) -> list[PieceResult]:
    """Each piece prompted with its own prompt and the text of the piece before it (OpenAI's
    condition_on_previous_text: dropped after a decode at temperature > 0.5)."""
    results: list[PieceResult] = []
    previous = ""
    for i, req in enumerate(requests):
        prompt = " ".join(x for x in (req.prompt, previous) if x) or None
        r = decode([replace(req, prompt=prompt)], None)[0]
        results.append(r)
        on_done([i], [r])
        previous = r.text.strip() if r.verdict == "ok" and r.temperature <= 0.5 else ""
    return results


def _touched(a: float, b: float, segments: Sequence[Segment]) -> bool:
    return any(s.start < b and s.end > a for s in segments)


def _covered(regions: Sequence[tuple[float, float]], segments: Sequence[Segment]) -> float:
    """Seconds of the regions that lie inside some segment."""
    spans: list[list[float]] = []
    for s in sorted(segments, key=lambda s: s.start):
        if spans and s.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], s.end)
        else:
            spans.append([s.start, s.end])
    return sum(max(0.0, min(b, e) - max(a, s)) for a, b in regions for s, e in spans)
