"""The one place a stored Transcript (ifw.core.transcript) becomes what a client asked for.

- json: the original Insanely Fast Whisper API's `output` object, exactly:
  {"text", "chunks": [{"timestamp": [start, end], "text"}], "speakers"?: [...]}
  (chunks are words when word timestamps were asked for; `speakers` only when
  diarization ran).
- text, srt, vtt: plain text and subtitles (speaker names as a prefix / a <v> tag).
- verbose_json / openai json: OpenAI's /v1/audio/transcriptions shapes.

The gateway and the CLI both call `render`, so every surface shows the same thing.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, get_args

from ifw.core.languages import WHISPER_LANGUAGES
from ifw.core.transcript import Transcript
from ifw.crds.transcriptionjob import ResultFormat

FORMATS: tuple[str, ...] = ("json", "text", "srt", "vtt", "verbose_json")
assert FORMATS == get_args(ResultFormat), "FORMATS and the CRD's ResultFormat must list the same formats"

MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def _t(seconds: float) -> float:
    """Timestamps to the millisecond: enough for any use, no float noise in the JSON."""
    return round(float(seconds), 3)


# --------------------------------------------------------------- original API


def to_original_json(transcript: Transcript) -> dict[str, Any]:
    """The original API's `output`: word chunks when timestamp == "word", else segment chunks."""
    if transcript.timestamp == "word":
        chunks = [
            {"timestamp": [_t(w.start), _t(w.end)], "text": w.text}
            for seg in transcript.segments
            for w in (seg.words or [])
        ]
    else:
        chunks = [{"timestamp": [_t(s.start), _t(s.end)], "text": s.text} for s in transcript.segments]
    output: dict[str, Any] = {"text": transcript.text, "chunks": chunks}
    if transcript.speakers is not None:
        output["speakers"] = [
            {"speaker": turn.speaker, "timestamp": [_t(turn.start), _t(turn.end)], "text": turn.text}
            for turn in transcript.speakers
        ]
    return output


# --------------------------------------------------------------- OpenAI shapes


def to_openai_json(transcript: Transcript) -> dict[str, Any]:
    return {"text": transcript.text}


def _compression_ratio(text: str) -> float:
    """Whisper's own measure (raw bytes / zlib bytes): high means repetitive, likely hallucinated."""
    raw = text.encode("utf-8")
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


def to_verbose_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's verbose_json. Fields this runner does not measure (tokens, logprobs)
    keep OpenAI's types with neutral values so strict clients still parse them."""
    segments = []
    for i, seg in enumerate(transcript.segments):
        item: dict[str, Any] = {
            "id": i,
            "seek": int(round(seg.start * 100)),  # Whisper's seek counts 10 ms mel frames
            "start": _t(seg.start),
            "end": _t(seg.end),
            "text": seg.text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": 0.0,
            "compression_ratio": _compression_ratio(seg.text),
            "no_speech_prob": 0.0,
        }
        if seg.speaker is not None:
            item["speaker"] = seg.speaker
        segments.append(item)
    out: dict[str, Any] = {
        "task": transcript.task,
        # OpenAI reports the language by name ("english"); keep unknown codes as they are.
        "language": WHISPER_LANGUAGES.get(transcript.language or "", transcript.language),
        "duration": _t(transcript.duration),
        "text": transcript.text,
        "segments": segments,
    }
    words = [w for seg in transcript.segments for w in (seg.words or [])]
    if words:
        out["words"] = [
            {"word": w.text.strip(), "start": _t(w.start), "end": _t(w.end)}
            | ({"speaker": w.speaker} if w.speaker is not None else {})
            for w in words
        ]
    return out


# --------------------------------------------------------------- text and subtitles


def to_text(transcript: Transcript) -> str:
    text = transcript.text.strip()
    return text + "\n" if text else ""


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cues(transcript: Transcript) -> list[tuple[float, float, str, str | None]]:
    """One cue per segment with text; end never before start."""
    cues = []
    for seg in transcript.segments:
        text = " ".join(seg.text.split())  # a blank line inside a cue would end it
        if text:
            cues.append((seg.start, max(seg.end, seg.start), text, seg.speaker))
    return cues


def to_srt(transcript: Transcript) -> str:
    blocks = []
    for i, (start, end, text, speaker) in enumerate(_cues(transcript), 1):
        line = f"[{speaker}] {text}" if speaker else text
        blocks.append(f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{line}\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(transcript: Transcript) -> str:
    blocks = ["WEBVTT\n"]
    for start, end, text, speaker in _cues(transcript):
        line = _vtt_escape(text)
        if speaker:  # a voice span: players show and style the speaker
            line = f"<v {_vtt_escape(speaker)}>{line}</v>"
        blocks.append(f"{_clock(start, '.')} --> {_clock(end, '.')}\n{line}\n")
    return "\n".join(blocks)


# --------------------------------------------------------------- dispatch


def render_object(transcript: Transcript, fmt: str) -> dict[str, Any] | str:
    """json/verbose_json as dicts (for embedding, e.g. the original API's {"output": ...}), others as text."""
    renderers = {
        "json": to_original_json,
        "verbose_json": to_verbose_json,
        "text": to_text,
        "srt": to_srt,
        "vtt": to_vtt,
    }
    if fmt not in renderers:
        raise ValueError(f"unknown result format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return renderers[fmt](transcript)


def render(transcript: Transcript, fmt: str) -> str:
    """The transcript as the body of a response in format `fmt` (one of FORMATS)."""
    out = render_object(transcript, fmt)
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)


__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "render",
    "render_object",
    "to_openai_json",
    "to_original_json",
    "to_srt",
    "to_text",
    "to_verbose_json",
    "to_vtt",
]
