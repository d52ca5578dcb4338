"""One transcription, start to end: the code path shared by the Pod and the CLI.

    audio (URL, file or array) -> decode once (16 kHz mono float32)
      -> [diarization, when asked] -> VAD pieces -> batched Whisper
      -> speakers assigned by time overlap -> Transcript

Diarization runs before ASR so that the reported progress (seconds of audio
transcribed) reaches 100% only when the work is really done.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ifw.core.transcript import ProcessedBy
from ifw.runner import asr, decoding, models, vad
from ifw.runner.audio import SAMPLE_RATE, DecodeReport
from ifw.runner.errors import InvalidAudio

if TYPE_CHECKING:
    from ifw.core.transcript import Transcript
    from ifw.crds.transcriptionjob import TranscriptionJobSpec
    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)


def load(source: str | Path | np.ndarray, settings: RunnerSettings, multichannel: bool = False,
         report: DecodeReport | None = None) -> np.ndarray:  # fmt: skip
    """The audio as 16 kHz mono float32: decoded from a URL or a file, or taken as given.
    multichannel: (channels, samples) instead, each channel kept (ifw.runner.channels).
    report: what the decode found (a file cut short), when it is decoded here."""
    if multichannel:
        from ifw.runner import channels

        return channels.load(source, settings, report)
    if isinstance(source, np.ndarray):
        if source.ndim != 1:
            raise InvalidAudio(f"expected mono audio (a 1-D array), got shape {source.shape}")
        return np.ascontiguousarray(source, dtype=np.float32)
    return decode_source(source, settings, report=report)


def decode_source(source: str | Path, settings: RunnerSettings, *, multichannel: bool = False,
                  report: DecodeReport | None = None) -> np.ndarray:  # fmt: skip
    """A URL or a file decoded in a scratch folder under settings.work_dir, removed afterwards."""
    from ifw.runner import audio

    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as work:
        return audio.load_audio(source, settings, Path(work), multichannel=multichannel, report=report)


def run(
    spec: TranscriptionJobSpec,
    source: str | Path | np.ndarray,
    settings: RunnerSettings,
    on_progress: asr.ProgressCallback | None = None,
    stats: decoding.DecodeStats | None = None,
    decode: decoding.Decode | None = None,
    on_text: asr.TextCallback | None = None,
    report: DecodeReport | None = None,
) -> Transcript:
    """Transcribe `source` as `spec` asks (spec.audio.url is not read: the caller passes the audio).

    `stats`, when given, collects what the decode engine did (generate() calls, pieces per call);
    `decode` hands the pieces to a shared decoder instead (a pool worker's cross-job batching);
    `on_text` gets the text so far as it grows (streaming jobs);
    `report` is what decoding `source` found: filled here when it is decoded here, else the one the
    caller filled when it decoded it; a file cut short says so in the transcript (cut_short, audio_note).
    """
    report = report if report is not None else DecodeReport()
    model_name = spec.model or settings.default_model
    models.check_model_allowed(model_name, settings)
    # Load the model before the (possibly long) download: a bad model fails fast.
    whisper = models.load_model(model_name, settings)
    if spec.multichannel:  # each channel through this same pipeline, as its own speaker
        from ifw.runner import channels

        merged = channels.run(spec, source, settings, on_progress=on_progress, stats=stats, decode=decode,
                              report=report)  # fmt: skip
        return merged.model_copy(update=report.transcript_fields())

    samples = load(source, settings, report=report)
    duration = len(samples) / SAMPLE_RATE
    if on_progress:
        on_progress(0.0, duration)

    turns = None
    if spec.diarization.enabled:
        from ifw.runner import diarize

        d = spec.diarization
        references = []
        if d.known_speakers:  # fetched first: a bad reference fails before the diarization runs
            from ifw.runner import known_speakers

            references = known_speakers.load_references(d.known_speakers, settings, "diarization.knownSpeakers")
        turns = diarize.diarize(
            samples, settings, num_speakers=d.num_speakers, min_speakers=d.min_speakers, max_speakers=d.max_speakers
        )
        if references:  # the speakers whose voice matches a reference take its name
            turns = known_speakers.rename(turns, known_speakers.name_speakers(samples, turns, references, settings))
        log.info("diarization: %d turns, %d speakers", len(turns), len({t[2] for t in turns}))

    transcript = asr.transcribe(
        samples,
        whisper,
        task=spec.task,
        language=spec.language or None,
        batch_size=spec.batch_size,
        # with speakers, word times split chunks where the speaker changes (dropped after: speakers.py)
        timestamp="word" if turns is not None else spec.timestamp,
        prompt=spec.prompt,
        temperature=spec.temperature or 0.0,
        hotwords=spec.hotwords or (),
        vad_options=vad.VadOptions.from_spec(spec.vad),
        condition_on_previous=settings.condition_on_previous,
        on_progress=on_progress,
        stats=stats,
        decode=decode,
        on_text=on_text,
    )
    if turns is not None:
        from ifw.runner.speakers import assign_speakers

        transcript = assign_speakers(transcript, turns, timestamp=spec.timestamp)
    # How the model ran; the runtime adds who ran it (execute.transcribe).
    transcript.processed_by = ProcessedBy(device=whisper.device.type, dtype=whisper.dtype_name,
                                          attention=whisper.attention)  # fmt: skip
    return transcript.model_copy(update=report.transcript_fields())

