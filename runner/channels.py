"""Multichannel audio: each channel transcribed on its own, the channel as the speaker.

Call-centre and podcast recordings put each person on their own channel; mixed to mono, two
people talking at once become one garbled track. With ``spec.multichannel`` the runner decodes
the channels apart (ifw.runner.audio, the same limits, counted over all channels), runs the
whole single-channel pipeline on each (VAD pieces, Whisper, hotwords, ...), and merges the
segments in time order. Every segment, word and speaker turn carries its ``channel``; the
speaker is ``CHANNEL_<n>``, or the name of a known speaker whose reference matches that
channel's voice (``diarization.knownSpeakers``, matched as for diarized speakers). Diarization
within a channel is not offered (the spec refuses the combination): the channel is the speaker.

Progress is reported in seconds of the file: channel c of n at t seconds is (c * duration + t) / n.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ifw.core.languages import join_texts
from ifw.core.transcript import SpeakerTurn, Transcript
from ifw.crds.transcriptionjob import Diarization
from ifw.runner import errors
from ifw.runner.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from ifw.crds.transcriptionjob import TranscriptionJobSpec
    from ifw.runner import asr, decoding
    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)


def label(channel: int) -> str:
    return f"CHANNEL_{channel}"


def load(source: str | Path | np.ndarray, settings: RunnerSettings, report=None) -> np.ndarray:
    """The channels as (channels, samples) float32 at 16 kHz, each row contiguous."""
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise errors.NotMultichannel(f"multichannel expects (channels, samples) audio, got shape {source.shape}")
        audio = source
    else:
        from ifw.runner.pipeline import decode_source

        audio = decode_source(source, settings, multichannel=True, report=report)
    if audio.shape[0] < 2:
        raise errors.NotMultichannel("multichannel was asked for but the audio has one channel (mono)")
    return np.stack([np.ascontiguousarray(row, dtype=np.float32) for row in audio])


def run(
    spec: TranscriptionJobSpec,
    source: str | Path | np.ndarray,
    settings: RunnerSettings,
    on_progress: asr.ProgressCallback | None = None,
    stats: decoding.DecodeStats | None = None,
    decode: decoding.Decode | None = None,
    report=None,
) -> Transcript:
    """Transcribe each channel of `source` as `spec` asks, and merge them (see the module);
    `report`: what decoding `source` found (ifw.runner.audio.DecodeReport), when it is decoded here."""
    from ifw.runner import known_speakers, pipeline

    audio = load(source, settings, report)
    n, frames = audio.shape
    duration = frames / SAMPLE_RATE
    known = spec.diarization.known_speakers or []
    references = known_speakers.load_references(known, settings, "diarization.knownSpeakers") if known else []
    if on_progress:
        on_progress(0.0, duration)
    one = spec.model_copy(update={"multichannel": False, "diarization": Diarization()})
    parts: list[Transcript] = []
    for c in range(n):

        def progress(done: float, _total: float, c: int = c) -> None:
            if on_progress:
                on_progress(min((c * duration + done) / n, duration), duration)

        parts.append(pipeline.run(one, audio[c], settings, on_progress=progress, stats=stats, decode=decode))
        log.info("channel %d of %d: %d segments", c, n, len(parts[-1].segments))

    names = {label(c): label(c) for c in range(n)}
    if references:
        names.update(_known_names(audio, parts, references, settings))
    return merge(parts, duration, [names[label(c)] for c in range(n)])


def _known_names(audio: np.ndarray, parts: list[Transcript], references, settings) -> dict[str, str]:
    """{CHANNEL_c: known name} for the channels whose speech (their segments) matches a reference."""
    from ifw.runner import known_speakers

    vectors: dict[str, np.ndarray] = {}
    for c, part in enumerate(parts):
        turns = [(seg.start, seg.end, label(c)) for seg in part.segments if seg.end > seg.start]
        vectors.update(known_speakers.speaker_embeddings(audio[c], turns, settings))
    refs = known_speakers.embed([r.audio for r in references], settings)
    by_name = {r.name: v for r, v in zip(references, refs, strict=True) if not np.isnan(v).any()}
    return known_speakers.match(by_name, vectors)


def merge(parts: list[Transcript], duration: float, speakers: list[str]) -> Transcript:
    """One transcript of the channels' transcripts: segments in time order, each with its channel
    and speaker; the language of the channel with the most speech; the figures summed."""
    segments = []
    for c, part in enumerate(parts):
        for seg in part.segments:
            words = [w.model_copy(update={"channel": c, "speaker": speakers[c]}) for w in seg.words or []]
            segments.append(seg.model_copy(update={"channel": c, "speaker": speakers[c], "words": words or seg.words}))
    segments.sort(key=lambda s: (s.start, s.end, s.channel))
    main = max(parts, key=lambda p: (p.speech_seconds or 0.0, bool(p.segments)))
    language = main.language
    turns: list[SpeakerTurn] = []
    texts: list[list[str]] = []
    for seg in segments:
        if turns and turns[-1].channel == seg.channel:
            turns[-1].end = max(turns[-1].end, seg.end)
            texts[-1].append(seg.text)
        else:
            turns.append(
                SpeakerTurn(speaker=seg.speaker or "", start=seg.start, end=seg.end, text="", channel=seg.channel)
            )
            texts.append([seg.text])
    for turn, parts_text in zip(turns, texts, strict=True):
        turn.text = join_texts(parts_text, language).strip()

    def total(values) -> float | None:
        known = [v for v in values if v is not None]
        return round(sum(known), 3) if known else None

    return main.model_copy(
        update={
            "text": join_texts([seg.text for seg in segments], language),
            "segments": segments,
            "language": language,
            "language_probability": main.language_probability,
            "duration": duration,
            "speakers": turns,
            "speech_seconds": total(p.speech_seconds for p in parts),
            "text_seconds": total(p.text_seconds for p in parts),
            "dropped_pieces": sum(p.dropped_pieces for p in parts),
        }
    )
