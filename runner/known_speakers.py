"""Known speakers: put people's names on the speakers that diarization (or multichannel) found.

As OpenAI's ``known_speaker_names[]`` / ``known_speaker_references[]``: each known speaker
comes with a short reference clip of their voice (2-10 s). The runner embeds each reference
with the embedding model of the diarization pipeline itself (the packaged CAM++, or the hub
pipeline's own), embeds each found speaker from the audio of their own turns (cut into
windows as long as a reference, averaged), and matches them by cosine similarity: the most
similar pair first, each name and each speaker at most once, and only above
``MATCH_THRESHOLD``. A speaker no reference matches keeps its label (SPEAKER_NN, CHANNEL_N);
a reference that matches nobody names nobody.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ifw.runner import errors
from ifw.runner.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from ifw.crds.transcriptionjob import KnownSpeaker
    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)

# OpenAI's bounds for a reference clip; a little slack for codec padding (an MP3 frame, ...).
MIN_REFERENCE_SECONDS = 2.0
MAX_REFERENCE_SECONDS = 10.0
_SLACK_SECONDS = 0.25
MAX_REFERENCE_BYTES = 16 * 1024**2  # a 10 s clip is far smaller in any format
# Cosine similarity of CAM++ embeddings above which a reference and a speaker are one person.
# Measured on the AMI excerpts (packaged CAM++): a person's reference against their diarized speaker
# in another part of the meeting scores 0.76-0.86; against other people's speakers at most 0.44 (a
# speaker into which diarization had merged two people), clean clips of different people at most 0.14.
MATCH_THRESHOLD = 0.5
WINDOW_SECONDS = MAX_REFERENCE_SECONDS  # a speaker's audio is embedded in windows this long
MIN_WINDOW_SECONDS = 1.0  # a shorter tail is left out (its embedding is noise)
MIN_TURN_SECONDS = 0.3  # shorter turns are mostly cross-talk and boundaries
MAX_SPEAKER_SECONDS = 120.0  # the longest turns of a speaker, up to this much, make their embedding

Turn = tuple[float, float, str]


@dataclasses.dataclass
class Reference:
    name: str
    audio: np.ndarray  # 16 kHz mono float32


# ----------------------------------------------------------------- references


def load_references(known: Sequence[KnownSpeaker], settings: RunnerSettings, field: str) -> list[Reference]:
    """Fetch (through the same guard and limits as the main audio) and decode each reference.

    ``field`` is how the spec names the list (``diarization.knownSpeakers``), for the errors.
    A URL may also be a local path when the caller allows it (the CLI; the CRD only takes http(s)).
    """
    from ifw.runner import audio

    capped = settings.model_copy(
        update={
            "max_audio_bytes": min(settings.max_audio_bytes, MAX_REFERENCE_BYTES),
            "max_audio_seconds": MAX_REFERENCE_SECONDS + 5.0,
        }
    )
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, speaker in enumerate(known):
        where = f"{field}[{i}] ({speaker.name!r})"
        with tempfile.TemporaryDirectory(dir=settings.work_dir) as work:
            try:
                samples = audio.load_audio(speaker.audio.url, capped, Path(work))
            except errors.AudioTooLarge as error:
                raise errors.InvalidAudio(
                    f"{where}: the reference clip is too large: {error.message}; a reference must be "
                    f"{MIN_REFERENCE_SECONDS:g}-{MAX_REFERENCE_SECONDS:g} s of the person speaking"
                ) from error
            except errors.RunnerError as error:
                raise type(error)(f"{where}: {error.message}") from error
        seconds = len(samples) / SAMPLE_RATE
        if not MIN_REFERENCE_SECONDS - _SLACK_SECONDS <= seconds <= MAX_REFERENCE_SECONDS + _SLACK_SECONDS:
            raise errors.InvalidAudio(
                f"{where}: the reference clip is {seconds:.1f} s long; it must be "
                f"{MIN_REFERENCE_SECONDS:g}-{MAX_REFERENCE_SECONDS:g} s of the person speaking"
            )
        out.append(Reference(speaker.name, samples))
    return out


# ----------------------------------------------------------------- embeddings


def embed(clips: Sequence[np.ndarray], settings: RunnerSettings) -> np.ndarray:
    """One unit-length embedding per clip, by the diarization pipeline's own embedding model.

    Clips too short to embed give a row of NaN.
    """
    import torch

    from ifw.runner import diarize

    pipeline = diarize.load_pipeline(settings)
    model = pipeline._embedding  # pyannote's PretrainedSpeakerEmbedding: (batch, 1, samples) -> (batch, dim)
    rows = []
    with diarize._running, torch.inference_mode():  # one user of the pipeline's models at a time
        for clip in clips:
            if len(clip) < model.min_num_samples or len(clip) < 0.5 * SAMPLE_RATE:
                rows.append(np.full(model.dimension, np.nan, dtype=np.float32))
                continue
            wave = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None, None]
            rows.append(np.asarray(model(wave), dtype=np.float32)[0])
    vectors = np.stack(rows) if rows else np.zeros((0, 1), dtype=np.float32)
    return _unit(vectors)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return vectors / norms


def speaker_windows(samples: np.ndarray, turns: Sequence[Turn]) -> dict[str, list[np.ndarray]]:
    """Each speaker's own audio (their longest turns, up to MAX_SPEAKER_SECONDS, in time order),
    cut into windows of WINDOW_SECONDS."""
    by_speaker: dict[str, list[tuple[float, float]]] = {}
    for start, end, speaker in turns:
        if end - start >= MIN_TURN_SECONDS:
            by_speaker.setdefault(speaker, []).append((start, end))
    out: dict[str, list[np.ndarray]] = {}
    window = int(WINDOW_SECONDS * SAMPLE_RATE)
    for speaker, spans in by_speaker.items():
        kept, total = [], 0.0
        for start, end in sorted(spans, key=lambda s: s[0] - s[1]):  # longest first
            if total >= MAX_SPEAKER_SECONDS:
                break
            kept.append((start, end))
            total += end - start
        audio = np.concatenate([samples[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)] for s, e in sorted(kept)])
        pieces = [audio[i : i + window] for i in range(0, len(audio), window)]
        if len(pieces) > 1 and len(pieces[-1]) < MIN_WINDOW_SECONDS * SAMPLE_RATE:
            pieces.pop()  # a short tail would only add noise
        out[speaker] = pieces
    return out


def speaker_embeddings(samples: np.ndarray, turns: Sequence[Turn], settings: RunnerSettings) -> dict[str, np.ndarray]:
    """One unit-length embedding per speaker: the length-weighted mean of their windows' embeddings."""
    windows = speaker_windows(samples, turns)
    flat = [w for pieces in windows.values() for w in pieces]
    vectors = embed(flat, settings)
    out, i = {}, 0
    for speaker, pieces in windows.items():
        rows = vectors[i : i + len(pieces)]
        weights = np.array([len(p) for p in pieces], dtype=np.float64)
        i += len(pieces)
        ok = ~np.isnan(rows).any(axis=1)
        if ok.any():
            mean = (rows[ok] * weights[ok, None]).sum(axis=0)
            out[speaker] = _unit(mean.astype(np.float32))
    return out


# ----------------------------------------------------------------- matching


def match(
    references: dict[str, np.ndarray], speakers: dict[str, np.ndarray], threshold: float = MATCH_THRESHOLD
) -> dict[str, str]:
    """{speaker label: name}: the most similar (reference, speaker) pair first, each once, above threshold."""
    pairs = []
    for name, ref in references.items():
        for label, vec in speakers.items():
            score = float(np.dot(ref, vec))
            if not np.isnan(score):
                pairs.append((score, name, label))
    pairs.sort(reverse=True)
    log.info("known speakers: similarities %s", ", ".join(f"{n}~{lab} {s:.2f}" for s, n, lab in pairs))
    named: dict[str, str] = {}
    used: set[str] = set()
    for score, name, label in pairs:
        if score < threshold:
            break
        if name in used or label in named:
            continue
        named[label] = name
        used.add(name)
    return named


def name_speakers(
    samples: np.ndarray,
    turns: Sequence[Turn],
    references: Sequence[Reference],
    settings: RunnerSettings,
    threshold: float = MATCH_THRESHOLD,
) -> dict[str, str]:
    """{speaker label: known name} for the speakers of `turns` that a reference matches."""
    if not references or not turns:
        return {}
    ref_vectors = embed([r.audio for r in references], settings)
    refs = {r.name: v for r, v in zip(references, ref_vectors, strict=True) if not np.isnan(v).any()}
    return match(refs, speaker_embeddings(samples, turns, settings), threshold)


def rename(turns: Sequence[Turn], names: dict[str, str]) -> list[Turn]:
    return [(s, e, names.get(label, label)) for s, e, label in turns]
