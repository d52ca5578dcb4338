"""One decoded piece's tokens as segments with absolute times, and their words.

A segment runs from one timestamp token to the next; times are snapped onto the piece's
speech, kept monotonic, and made absolute (seconds into the file). Word times come from the
alignment heads' cross-attention over the piece's tokens (PieceResult.alignment): its DTW runs
here, in the job's own thread, not on the decoder's (ifw.runner.alignment).
"""

from __future__ import annotations

import math

import numpy as np

from ifw.core.languages import NO_SPACE_LANGUAGES, with_leading_space
from ifw.core.transcript import Segment, Word
from ifw.runner import alignment, vad
from ifw.runner.decoding import PieceResult
from ifw.runner.models import WhisperModel

TIME_PRECISION = 0.02  # seconds per Whisper timestamp token


def piece_segments(whisper: WhisperModel, piece: vad.Piece, result: PieceResult) -> list[Segment]:
    """Split one piece's tokens at timestamp tokens into segments with absolute times and the piece's scores."""
    gc = whisper.model.generation_config
    eot = whisper.eot
    ts_begin = gc.no_timestamps_token_id + 1
    tok = whisper.processor.tokenizer
    dur = piece.duration

    def clamp(t: float) -> float:
        return min(max(t, 0.0), dur)

    raw: list[tuple[float, float | None, list[int], list[int]]] = []  # start, end, tokens, token positions
    start: float | None = None
    text: list[int] = []
    pos: list[int] = []
    for i, t in enumerate(result.tokens):
        if t >= ts_begin:
            time = clamp((t - ts_begin) * TIME_PRECISION)
            if text:
                raw.append((start if start is not None else 0.0, time, text, pos))
                text, pos, start = [], [], None
            else:
                start = time  # a segment's opening timestamp (or a bare pair's second one)
        elif t < eot:
            text.append(t)
            pos.append(i)
    if text:  # no closing timestamp: the piece ended mid-segment
        raw.append((start if start is not None else 0.0, None, text, pos))

    token_times = alignment.token_times(result.alignment, len(result.tokens)) if result.alignment is not None else None
    scores = {
        "language": result.language,
        "temperature": result.temperature,
        "avg_logprob": round(result.avg_logprob, 4),
        "compression_ratio": round(result.compression_ratio, 4),
        "no_speech_prob": round(result.no_speech_prob, 4),
    }
    segments: list[Segment] = []
    floor = 0.0  # keeps times monotonic within the piece
    for start, end, toks, positions in raw:
        body = tok.decode(toks)
        if not body.strip():
            continue
        start = max(start, floor)
        end = max(end if end is not None else dur, start)
        # boundaries predicted in a pause move onto the speech (piece-relative times)
        a, b = piece.snap(piece.start + start, piece.start + end)
        start = max(a - piece.start, floor)
        end = max(b - piece.start, start)
        words = None
        if token_times is not None:
            ends = [min(max(token_times[p], start), end) for p in positions]
            ends = list(np.maximum.accumulate(ends)) if ends else ends
            words = []
            for w_text, w_start, w_end, group in _words(whisper, toks, ends, start, result.language):
                w_start = max(w_start, start)
                w_end = max(w_end, w_start)
                probability = float(np.mean([math.exp(result.token_logprobs[positions[j]]) for j in group]))
                words.append(Word(start=round_time(piece.start + w_start), end=round_time(piece.start + w_end),
                                  text=w_text, probability=round(probability, 4)))  # fmt: skip
        logprobs = [round(result.token_logprobs[p], 4) for p in positions]
        # Whisper's leading space stays (" Hello."): the segments join into the text
        text = with_leading_space(body.rstrip(), result.language)
        segments.append(Segment(start=round_time(piece.start + start), end=round_time(piece.start + end), text=text,
                                words=words, tokens=toks, logprobs=logprobs, **scores))  # fmt: skip
        floor = end
    return segments


def round_time(t: float) -> float:
    """A time as the transcript stores it: seconds to the millisecond."""
    return round(float(t), 3)


def _words(whisper: WhisperModel, tokens: list[int], ends: list[float], prev_end: float, language: str | None):
    """Group a segment's text tokens into words: (text, start, end, token indices); token i spans (ends[i-1], ends[i])."""
    tok = whisper.processor.tokenizer
    no_space = language in NO_SPACE_LANGUAGES
    groups: list[list[int]] = []  # indices into tokens
    for i, t in enumerate(tokens):
        if not groups:
            groups.append([i])
        elif no_space:
            # each character is a word, but a character may span several byte tokens
            if "\ufffd" in tok.decode([tokens[j] for j in groups[-1]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        elif tok.decode([t]).startswith(" "):
            groups.append([i])
        else:
            groups[-1].append(i)  # continuation or punctuation
    words = []
    for g in groups:
        text = tok.decode([tokens[j] for j in g])
        if text.strip():  # as Whisper wrote it: " Hello" (the original API's chunks keep the space)
            words.append((with_leading_space(text.rstrip(), language), ends[g[0] - 1] if g[0] > 0 else prev_end,
                          ends[g[-1]], g))  # fmt: skip
    return words
