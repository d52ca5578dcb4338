"""One job's transcription: VAD pieces in, a Transcript out.

The audio is cut at silences into ≤30 s pieces (ifw.runner.vad) and decoded by the decode
engine (ifw.runner.decoding; the model: ifw.runner.models). `transcribe` adds the job's
rules: language per piece (a short or unsure piece takes the file's dominant language, decoded
again from the encoder output its first decode kept), a speech stretch without text decoded again
on its own (a new, shorter clip: encoded anew), and coverage figures so that nothing
is dropped silently. Segments and word times: ifw.runner.segments.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ifw.core.transcript import Segment, Transcript
from ifw.runner import decoding, vad
from ifw.runner.audio import SAMPLE_RATE
from ifw.runner.decoding import Decode, DecodeStats, Encoding, OnDone, PieceRequest, PieceResult
from ifw.runner.models import WhisperModel, only_language
from ifw.runner.segments import piece_segments, round_time

log = logging.getLogger(__name__)

# A piece with less speech than this, or detected with less confidence, takes the file's
# dominant language: one ambiguous second must not switch the language.
LANGUAGE_MIN_SPEECH_SECONDS = 2.0
LANGUAGE_MIN_PROBABILITY = 0.5
# A stretch of speech at least this long that no segment touches is decoded again on its own.
RETRY_MIN_SECONDS = 1.0
# Streaming: the first piece is cut at its first pause after this many seconds and decoded on its
# own, so that the first text comes once a few seconds of audio are decoded, not after a whole
# batch (24 pieces are 12 minutes of audio); the other pieces follow in time order.
STREAM_FIRST_SECONDS = 8.0

ProgressCallback = Callable[[float, float], None]  # (processed seconds, total seconds)
# The final text's beginning, as it grows: only text that no later pass can change (the final
# text starts with every text passed), in time order.
TextCallback = Callable[[str], None]


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
    hotwords: Sequence[str] = (),
    vad_options: vad.VadOptions | None = None,
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
    the text so far each time it grows (streaming clients): the pieces from the start on whose
    text is final, so that the final text starts with every text passed. Streaming decodes a
    short first piece alone, then the others in time order (see STREAM_FIRST_SECONDS).
    """
    if decode is None:
        decode = functools.partial(_decode_alone, whisper, batch_size, stats)
    language = language or None
    decoding.check_task_and_language(whisper, task, language)
    joined = decoding.join_hotwords(hotwords)
    decoding.prompt_ids(whisper, prompt, joined)  # a bad prompt fails before any decoding
    if pieces is None:
        pieces = vad.split_audio(audio, options=vad_options)
    if on_text is not None:
        pieces = _short_first(pieces, STREAM_FIRST_SECONDS)
    job = _Transcription(audio, whisper, pieces, task=task, prompt=prompt, hotwords=joined, temperature=temperature,
                         word_timestamps=timestamp == "word", on_progress=on_progress, on_text=on_text)  # fmt: skip
    speech = job.speech
    job.settling = language is None and whisper.multilingual
    job.report_progress()
    if not pieces:
        return Transcript(text="", segments=[], task=task, timestamp=timestamp,
                          language=language or only_language(whisper), duration=round_time(job.duration),
                          model=whisper.name, speech_seconds=0.0, text_seconds=0.0)  # fmt: skip

    # settling: the pieces it may decode again keep their encoder output on their result until then
    requests = [job.request(p, language or only_language(whisper), keep_encoding_below=job.keep_below(i))
                for i, p in enumerate(pieces)]  # fmt: skip
    if condition_on_previous:
        results = _decode_in_order(decode, requests, job.on_done)
    elif on_text is not None:
        results = _decode_in_time_order(decode, requests, job.on_done, batch_size)
    else:
        results = decode(requests, job.on_done)

    probability = None
    if job.settling:
        language, probability, redo = settle_languages(speech, results)
        kept = _take_encodings(results)  # no result holds device memory past settling
        if redo:
            log.info("%d short or unsure pieces decoded again in the dominant language %s", len(redo), language)
            # from the first pass's encoder output (a decode seam that drops it encodes them again)
            again = decode([job.request(pieces[i], language, encoding=kept[i]) for i in redo], None)
            for i, r in zip(redo, again, strict=True):
                results[i] = r
        del kept
    language = language or only_language(whisper)

    per_piece = [list(job.segments_of(i, r)) for i, r in enumerate(results)]
    dropped = job.decode_uncovered_speech(decode, results, per_piece)
    # piece by piece, as the stream gave them (pieces do not overlap: the same as sorting them all)
    segments = [s for segs in per_piece for s in sorted(segs, key=lambda s: s.start)]
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
                 prompt: str | None, hotwords: str | None, temperature: float, word_timestamps: bool,
                 on_progress: ProgressCallback | None, on_text: TextCallback | None):  # fmt: skip
        self.audio = audio
        self.whisper = whisper
        self.pieces = pieces
        self.task = task
        self.prompt = prompt
        self.hotwords = hotwords
        self.temperature = temperature
        self.word_timestamps = word_timestamps
        self.on_progress = on_progress
        self.on_text = on_text
        self.duration = len(audio) / SAMPLE_RATE
        self.processed = self.duration - sum(p.duration for p in pieces)  # silence counts as done
        self.decoded: dict[int, tuple[PieceResult, list[Segment]]] = {}  # piece -> its result and segments
        self.streamed = 0  # pieces[:streamed] are in the text so far
        self.speech = [sum(b - a for a, b in speech_of(p)) for p in pieces]  # seconds of speech per piece
        self.settling = False  # the file's language is settled after the first pass (settle_languages)

    def request(self, piece: vad.Piece, language: str | None, *, keep_encoding_below: float = 0.0,
                encoding: Encoding | None = None) -> PieceRequest:  # fmt: skip
        clip = self.audio[int(piece.start * SAMPLE_RATE) : int(piece.end * SAMPLE_RATE)]
        return PieceRequest(clip, self.task, language, self.prompt, self.temperature, self.word_timestamps,
                            hotwords=self.hotwords, keep_encoding_below=keep_encoding_below,
                            encoding=encoding)  # fmt: skip

    def keep_below(self, i: int) -> float:
        """Piece i's PieceRequest.keep_encoding_below: while settling, the pieces settle_languages
        may decode again keep their encoder output: a short one whatever its language's probability,
        any other one when that probability is under LANGUAGE_MIN_PROBABILITY (see _sure)."""
        if not self.settling:
            return 0.0
        return math.inf if self.speech[i] < LANGUAGE_MIN_SPEECH_SECONDS else LANGUAGE_MIN_PROBABILITY

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
            while self.streamed in self.decoded and self.final(self.streamed):
                self.streamed += 1
            if self.streamed > before:
                self.on_text("".join(s.text for i in range(self.streamed) for s in self.decoded[i][1]))
        self.report_progress()

    def final(self, i: int) -> bool:
        """Whether decoded piece i's text is final: no stretch of its speech will be decoded again
        (decode_uncovered_speech) and settling the language will not redo it (settle_languages)."""
        result, segments = self.decoded[i]
        if _retry_stretches(self.pieces[i], segments):
            return False
        return not self.settling or self._sure(i, result) or result.language == self._dominant()

    def _sure(self, i: int, result: PieceResult) -> bool:
        return (self.speech[i] >= LANGUAGE_MIN_SPEECH_SECONDS
                and (result.language_probability or 0.0) >= LANGUAGE_MIN_PROBABILITY)  # fmt: skip

    def _dominant(self) -> str | None:
        """The language settle_languages will find, once no piece still to decode can change it
        (the sure pieces' leader ahead by more than their speech); else None."""
        weight: Counter[str] = Counter()
        for i, (r, _) in self.decoded.items():
            if r.verdict == "ok" and self._sure(i, r):
                weight[r.language] += self.speech[i]
        if not weight:
            return None
        (lead, most), *rest = weight.most_common(2) + [("", 0.0)]
        to_come = sum(s for i, s in enumerate(self.speech) if i not in self.decoded)
        return lead if most > rest[0][1] + to_come else None

    def decode_uncovered_speech(self, decode: Decode, results: list[PieceResult],
                                per_piece: list[list[Segment]]) -> int:  # fmt: skip
        """Nothing dropped silently: speech that no segment covers is decoded again on its own
        (its segments are added to per_piece). Returns the pieces and stretches still without text."""
        dropped = 0
        retries: list[tuple[int, vad.Piece]] = []
        for i, (piece, segs) in enumerate(zip(self.pieces, per_piece, strict=True)):
            gaps = _retry_stretches(piece, segs)
            if gaps is None:
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


def _take_encodings(results: Sequence[PieceResult]) -> list[Encoding | None]:
    """Each result's kept Encoding (see _Transcription.keep_below), taken off the result."""
    kept = [r.encoding for r in results]
    for r in results:
        r.encoding = None
    return kept


def _retry_stretches(piece: vad.Piece, segments: Sequence[Segment]) -> list[tuple[float, float]] | None:
    """The stretches of a piece's speech to decode again on their own: those no segment touches,
    or each stretch when the piece has no text; None when nothing smaller is left to try."""
    regions = speech_of(piece)
    if segments:
        return [(a, b) for a, b in regions if b - a >= RETRY_MIN_SECONDS and not _touched(a, b, segments)]
    return list(regions) if len(regions) > 1 else None


def _short_first(pieces: list[vad.Piece], seconds: float) -> list[vad.Piece]:
    """The first piece cut at the first pause after `seconds` (when it has one), for streaming."""
    if not pieces or not pieces[0].regions:
        return pieces
    first = pieces[0]
    for k, (_, end) in enumerate(first.regions[:-1]):
        if end - first.start >= seconds:
            rest = first.regions[k + 1 :]
            return [vad.Piece(first.start, end, first.regions[: k + 1]), vad.Piece(rest[0][0], first.end, rest),
                    *pieces[1:]]  # fmt: skip
    return pieces


def _decode_in_time_order(decode: Decode, requests: list[PieceRequest], on_done: OnDone,
                          batch_size: int) -> list[PieceResult]:  # fmt: skip
    """Streaming: the first piece alone, then the others in time order, `batch_size` per call, so
    that the text from the start on grows call by call (one call would finish them all at once)."""
    results: list[PieceResult] = []
    bounds = [0, 1, *range(1 + max(1, batch_size), len(requests), max(1, batch_size)), len(requests)]
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            results += decode(requests[a:b], lambda done, finished, a=a: on_done([a + i for i in done], finished))
    return results


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
