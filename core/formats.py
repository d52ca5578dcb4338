"""The one place a stored Transcript (ifw.core.transcript) becomes what a client asked for.

- json: the original Insanely Fast Whisper API's `output` object:
  {"text", "chunks": [{"timestamp": [start, end], "text"}], "speakers"?: [...], "speaker_turns"?: [...]}
  Chunks are words when word timestamps were asked for. Texts are Whisper's, passed through
  unchanged (leading spaces included), so "".join(chunk texts) rebuilds the text. When
  diarization ran, `speakers` has one entry per chunk (the original's
  group_by_speaker=False shape, so clients zip chunks with speakers) and `speaker_turns`
  the merged turns. With word chunks, `word_probabilities` has each word's probability, one
  per chunk in chunk order (beside the chunks, not inside them: the chunk objects keep the
  original's two keys, so no client that reads them can break).
- verbose_json adds each segment's `language` and each word's `probability`; diarized_json
  each segment's `language` (extension fields: OpenAI's SDK types keep unknown fields).
- text, srt, vtt: plain text and subtitles (speaker names as a prefix / a <v> tag).
- verbose_json, openai json, diarized_json: OpenAI's /v1/audio/transcriptions shapes.

The gateway, the operator's webhooks and the CLI all call these, so every surface shows the same thing.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, get_args

from ifw.core.languages import WHISPER_LANGUAGES, join_texts
from ifw.core.transcript import Segment, Transcript, Word
from ifw.crds.transcriptionjob import ResultFormat

FORMATS: tuple[str, ...] = ("json", "text", "srt", "vtt", "verbose_json")
assert FORMATS == get_args(ResultFormat), "FORMATS and the CRD's ResultFormat must list the same formats"
# What /v1/audio/* answers: OpenAI's json ({"text", "usage"}) instead of the original's, plus diarized_json.
OPENAI_FORMATS: tuple[str, ...] = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")

MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "verbose_json": "application/json",
    "diarized_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def _t(seconds: float) -> float:
    """Timestamps to the millisecond: enough for any use, no float noise in the JSON."""
    return round(float(seconds), 3)


def processed_by(transcript: Transcript) -> dict[str, str] | None:
    """Who did the work ({pod, node, runtime}, unknown ones left out), for answers and webhooks
    (the original API's fly_machine_id); None when the runner did not say."""
    if transcript.processed_by is None:
        return None
    found = transcript.processed_by.model_dump(exclude_none=True)
    return found or None


def usage(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's usage for models billed by audio duration (whisper-1)."""
    return {"type": "duration", "seconds": _t(transcript.duration)}


# --------------------------------------------------------------- original API


def _units(transcript: Transcript) -> list[tuple[Segment | Word, str | None]]:
    """The chunks of the original API, each with its speaker: words when timestamp == "word"
    (a word without a speaker of its own takes its segment's), else segments."""
    if transcript.timestamp == "word":
        return [(w, w.speaker or seg.speaker) for seg in transcript.segments for w in (seg.words or [])]
    return [(seg, seg.speaker) for seg in transcript.segments]


def _channel(unit: Any) -> dict[str, int]:
    """Multichannel jobs: {"channel": n} on the original's speaker entries (ifw's), else nothing."""
    channel = getattr(unit, "channel", None)
    return {} if channel is None else {"channel": channel}


def to_original_json(transcript: Transcript) -> dict[str, Any]:
    """The original API's `output`."""
    units = _units(transcript)
    chunks = [{"timestamp": [_t(u.start), _t(u.end)], "text": u.text} for u, _ in units]
    output: dict[str, Any] = {"text": transcript.text, "chunks": chunks}
    if transcript.timestamp == "word" and units:
        # Beside the chunks, zipped with them as `speakers` is: the chunks stay as the original's.
        output["word_probabilities"] = [getattr(u, "probability", None) for u, _ in units]
    if transcript.speakers is not None:
        # One entry per chunk, in chunk order: speaker is null only when diarization found no one at all.
        output["speakers"] = [{"speaker": speaker, **chunk} | _channel(unit)
                              for chunk, (unit, speaker) in zip(chunks, units, strict=True)]  # fmt: skip
        output["speaker_turns"] = [
            {"speaker": turn.speaker, "timestamp": [_t(turn.start), _t(turn.end)], "text": turn.text} | _channel(turn)
            for turn in transcript.speakers
        ]
    return output


# --------------------------------------------------------------- OpenAI shapes


def openai_text(transcript: Transcript) -> str:
    """OpenAI's top-level text: Whisper's leading space dropped (its segments keep theirs)."""
    return transcript.text.strip()


def to_openai_json(transcript: Transcript, logprobs: bool = False) -> dict[str, Any]:
    """OpenAI's json: {"text", "usage"}, and "logprobs" when include[]=logprobs asked for them."""
    out: dict[str, Any] = {"text": openai_text(transcript)}
    if logprobs:
        out["logprobs"] = to_logprobs(transcript)
    out["usage"] = usage(transcript)
    return out


def to_logprobs(transcript: Transcript) -> list[dict[str, Any]]:
    """Every stored token's log-probability, in order, in OpenAI's {token, logprob, bytes}.

    The transcript keeps token ids, not their texts, and the gateway has no tokenizer: `token`
    and `bytes` are null and `token_id` (ifw's addition) names the Whisper token. Segments
    stored without scores contribute nothing.
    """
    out = []
    for seg in transcript.segments:
        if seg.tokens and seg.logprobs and len(seg.tokens) == len(seg.logprobs):
            out.extend(
                {"token": None, "logprob": lp, "bytes": None, "token_id": tid}
                for tid, lp in zip(seg.tokens, seg.logprobs, strict=True)
            )
    return out


def _compression_ratio(text: str) -> float:
    """Whisper's own measure (raw bytes / zlib bytes): high means repetitive, likely hallucinated."""
    raw = text.encode("utf-8")
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


def _avg_logprob(seg: Segment) -> float:
    if seg.avg_logprob is not None:
        return seg.avg_logprob
    if seg.logprobs:
        return sum(seg.logprobs) / len(seg.logprobs)
    return 0.0  # not measured: OpenAI's type, a neutral value


def _language_name(code: str | None) -> str | None:
    """OpenAI reports a language by name ("english"); unknown codes stay as they are."""
    return WHISPER_LANGUAGES.get(code or "", code)


def to_verbose_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's verbose_json, with the scores the runner stored for each segment; a score it
    did not store keeps OpenAI's type with a neutral value so strict clients still parse it."""
    segments = []
    for i, seg in enumerate(transcript.segments):
        item: dict[str, Any] = {
            "id": i,
            "seek": int(round(seg.start * 100)),  # Whisper's seek counts 10 ms mel frames
            "start": _t(seg.start),
            "end": _t(seg.end),
            "text": seg.text,
            "tokens": list(seg.tokens or []),
            "temperature": seg.temperature if seg.temperature is not None else 0.0,
            "avg_logprob": _avg_logprob(seg),
            "compression_ratio": (
                seg.compression_ratio if seg.compression_ratio is not None else _compression_ratio(seg.text)
            ),
            "no_speech_prob": seg.no_speech_prob if seg.no_speech_prob is not None else 0.0,
        }
        if seg.speaker is not None:
            item["speaker"] = seg.speaker
        if seg.language is not None:  # the piece's own language (code-switching): named as the top level's
            item["language"] = _language_name(seg.language)
        if seg.channel is not None:  # multichannel jobs: the audio channel it was said on
            item["channel"] = seg.channel
        segments.append(item)
    out: dict[str, Any] = {
        "task": transcript.task,
        # OpenAI reports the language by name ("english"); keep unknown codes as they are.
        "language": _language_name(transcript.language),
        "duration": _t(transcript.duration),
        "text": openai_text(transcript),
        "segments": segments,
    }
    words = [w for seg in transcript.segments for w in (seg.words or [])]
    if words:
        out["words"] = [
            # OpenAI's words carry no leading space.
            {"word": w.text.strip(), "start": _t(w.start), "end": _t(w.end)}
            | ({"probability": w.probability} if w.probability is not None else {})
            | ({"speaker": w.speaker} if w.speaker is not None else {})
            | ({"channel": w.channel} if w.channel is not None else {})
            for w in words
        ]
    out["usage"] = usage(transcript)
    return out


UNKNOWN_SPEAKER = "unknown"


def _speaker_pieces(transcript: Transcript) -> list[tuple[float, float, str, str | None, str | None]]:
    """(start, end, text, speaker, language) per segment; a segment whose words have several
    speakers is cut where the speaker changes."""
    pieces = []
    for seg in transcript.segments:
        words = seg.words or []
        if not words or len({w.speaker or seg.speaker for w in words}) <= 1:
            pieces.append((seg.start, seg.end, seg.text, seg.speaker or (words[0].speaker if words else None),
                           seg.language))  # fmt: skip
            continue
        run: list[Word] = []
        for word in words:
            if run and (word.speaker or seg.speaker) != (run[-1].speaker or seg.speaker):
                pieces.append((run[0].start, run[-1].end, join_texts([w.text for w in run], transcript.language),
                               run[0].speaker or seg.speaker, seg.language))  # fmt: skip
                run = []
            run.append(word)
        pieces.append((run[0].start, run[-1].end, join_texts([w.text for w in run], transcript.language),
                       run[0].speaker or seg.speaker, seg.language))  # fmt: skip
    return pieces


def to_diarized_segments(transcript: Transcript) -> list[dict[str, Any]]:
    """OpenAI's diarized segments (gpt-4o-transcribe-diarize): one per stretch of one speaker
    within a segment. Speakers keep ifw's names (SPEAKER_00, ...); "unknown" when diarization
    found no one."""
    return [
        {
            "id": f"seg_{i}",
            "type": "transcript.text.segment",
            "speaker": speaker or UNKNOWN_SPEAKER,
            "start": _t(start),
            "end": _t(end),
            "text": text,
        }
        | ({"language": _language_name(language)} if language else {})
        for i, (start, end, text, speaker, language) in enumerate(_speaker_pieces(transcript))
    ]


def to_diarized_json(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's diarized_json: task, duration, text, speaker segments, usage."""
    return {
        "task": "transcribe",
        "duration": _t(transcript.duration),
        "text": openai_text(transcript),
        "segments": to_diarized_segments(transcript),
        "usage": usage(transcript),
    }


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


def render_openai(transcript: Transcript, fmt: str, logprobs: bool = False) -> dict[str, Any] | str:
    """The body of an OpenAI /v1/audio answer in `fmt` (one of OPENAI_FORMATS)."""
    if fmt == "json":
        return to_openai_json(transcript, logprobs)
    if fmt == "diarized_json":
        return to_diarized_json(transcript)
    return render_object(transcript, fmt)


def render(transcript: Transcript, fmt: str) -> str:
    """The transcript as the body of a response in format `fmt` (one of FORMATS)."""
    out = render_object(transcript, fmt)
    return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)


__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "OPENAI_FORMATS",
    "processed_by",
    "render",
    "render_object",
    "render_openai",
    "to_diarized_json",
    "to_diarized_segments",
    "to_logprobs",
    "to_openai_json",
    "to_original_json",
    "to_srt",
    "to_text",
    "to_verbose_json",
    "to_vtt",
    "usage",
]
