"""Batched Whisper with transformers: VAD pieces in, a Transcript out.

The audio is cut at silences into ≤30 s pieces (ifw.runner.vad); the pieces
are decoded `batch_size` at a time, longest first (similar lengths share a
batch), with `WhisperForConditionalGeneration.generate(return_timestamps=True)`,
and each piece's segment times are offset by the piece's start. Word times
come from the cross-attention alignment heads (`return_token_timestamps`).

Models: GPU runs fp16 with FlashAttention-2 when `flash_attn` is installed,
else PyTorch SDPA; CPU runs fp32 on pinned threads. When the GPU runs out of
memory the batch is halved and retried.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ifw.core.languages import NO_SPACE_LANGUAGES
from ifw.core.transcript import Segment, Transcript, Word
from ifw.runner import vad, weights
from ifw.runner.audio import SAMPLE_RATE
from ifw.runner.errors import InvalidSpec, ModelHubUnavailable, ModelLoadFailed, OutOfMemory

if TYPE_CHECKING:
    import torch

    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)

TIME_PRECISION = 0.02  # seconds per Whisper timestamp token

ProgressCallback = Callable[[float, float], None]  # (processed seconds, total seconds)


# ------------------------------------------------------------------ loading


@dataclass
class WhisperModel:
    name: str  # as asked for (spec.model or the default)
    source: str  # what from_pretrained loaded: a folder or a hub id
    model: Any  # WhisperForConditionalGeneration
    processor: Any  # WhisperProcessor
    device: torch.device
    dtype: torch.dtype

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    @property
    def lang_to_id(self) -> dict[str, int]:
        return dict(getattr(self.model.generation_config, "lang_to_id", None) or {})


def select_device(settings: RunnerSettings) -> torch.device:
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadFailed("IFW_DEVICE=cuda but no CUDA device is visible to this process")
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pin_cpu_threads(settings: RunnerSettings) -> int:
    """Use the cores this process may run on (or cpu_threads); more threads than cores thrash."""
    import torch

    threads = settings.cpu_threads or vad.usable_cpus()
    torch.set_num_threads(threads)
    return threads


def check_model_allowed(name: str, settings: RunnerSettings) -> None:
    allowed = {settings.default_model, *settings.allowed_models}
    if name not in allowed:
        raise InvalidSpec(
            f"spec.model {name!r} is not allowed here; allowed models: {', '.join(sorted(allowed))}"
        )


def resolve_model(name: str, settings: RunnerSettings) -> str:
    """Where to load `name` from: a local folder, <model_dir>/<name>, a packaged model, or the hub (cache)."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadFailed(f"model folder {local} has no config.json")
        return str(local)
    if settings.model_dir and (settings.model_dir / name / "config.json").is_file():
        return str(settings.model_dir / name)
    if name in weights.PACKAGED:
        return str(weights.packaged_model_path(name))
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> str:
    """The cached snapshot when there is one (no HTTP at all), else download unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # a malformed repo id and the like
        raise ModelLoadFailed(f"model {repo_id!r}: {e}") from e
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelLoadFailed(
            f"model {repo_id!r} is not in the hub cache (HF_HOME) and HF_HUB_OFFLINE is set; "
            "pre-stage it, or name a packaged model (tiny.en, base) or a local folder"
        )
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except RepositoryNotFoundError as e:
        raise ModelLoadFailed(f"model {repo_id!r} does not exist on the hub (or needs a token)") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelHubUnavailable(f"could not download model {repo_id!r} from the hub: {e}") from e


_models: dict[tuple[str, str], WhisperModel] = {}
_models_lock = threading.Lock()


def load_model(name: str, settings: RunnerSettings) -> WhisperModel:
    """Load (once per process) the Whisper model `name` on the configured device."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    device = select_device(settings)
    source = resolve_model(name, settings)
    key = (source, str(device))
    with _models_lock:
        if key in _models:
            return _models[key]
        if device.type == "cuda":
            dtype = torch.float16
            attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
        else:
            dtype = torch.float32  # fp16 matmuls are slow or missing on CPU
            attn = "sdpa"
            pin_cpu_threads(settings)
        try:
            model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation=attn)
            processor = WhisperProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadFailed(f"could not load Whisper model {name!r} from {source}: {e}") from e
        model.to(device).eval()
        if model.generation_config.is_multilingual and not getattr(model.generation_config, "task", None):
            model.generation_config.task = "transcribe"  # else it may loop when no language is given
        log.info("loaded %s from %s on %s (%s, %s)", name, source, device, dtype, attn)
        _models[key] = WhisperModel(name, source, model, processor, device, dtype)
        return _models[key]


# ---------------------------------------------------------------- decoding


@dataclass
class _Decoded:
    tokens: list[int]
    token_times: list[float] | None  # end time of each token, seconds into the piece


def _features(wm: WhisperModel, clips: Sequence[np.ndarray]):
    fe = wm.processor.feature_extractor
    # On a GPU the STFT runs there too: on CPU it costs ~20 ms per 30 s window per core.
    out = fe(list(clips), sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True,
             device=str(wm.device))  # fmt: skip
    return out.input_features.to(wm.device, wm.dtype), out.attention_mask.to(wm.device)


def detect_language(wm: WhisperModel, clip: np.ndarray) -> tuple[str, float]:
    """Most likely spoken language of a ≤30 s clip: (code, probability), from the first decoder step."""
    import torch

    lang_to_id = wm.lang_to_id
    features, _ = _features(wm, [clip])
    sot = wm.model.generation_config.decoder_start_token_id
    with torch.inference_mode():
        logits = wm.model(
            input_features=features,
            decoder_input_ids=torch.tensor([[sot]], device=wm.device),
        ).logits[0, -1]
    ids = torch.tensor(list(lang_to_id.values()), device=wm.device)
    probs = torch.softmax(logits[ids].float(), dim=-1)
    best = int(torch.argmax(probs))
    token = list(lang_to_id)[best]
    return token.strip("<|>"), float(probs[best])


def _generate(wm: WhisperModel, clips: Sequence[np.ndarray], *, language, task, word_timestamps) -> list[_Decoded]:
    import torch

    features, attention_mask = _features(wm, clips)
    kwargs: dict[str, Any] = {"return_timestamps": True, "num_beams": 1, "do_sample": False}
    if wm.multilingual:
        kwargs |= {"language": language, "task": task}
    if word_timestamps:
        kwargs["return_token_timestamps"] = True
    with torch.inference_mode():
        out = wm.model.generate(features, attention_mask=attention_mask, **kwargs)
    if isinstance(out, torch.Tensor):
        sequences, times = out, None
    else:
        sequences, times = out["sequences"], out.get("token_timestamps")
    decoded = []
    for i, row in enumerate(sequences.tolist()):
        decoded.append(_Decoded(row, times[i].tolist() if times is not None else None))
    return decoded


def _decode_batches(
    wm: WhisperModel,
    clips: list[np.ndarray],
    batch_size: int,
    on_batch: Callable[[list[int]], None],
    **kwargs,
) -> list[_Decoded]:
    """Decode all clips, longest first, `batch_size` at a time; halve the batch when CUDA runs out of memory."""
    import torch

    order = sorted(range(len(clips)), key=lambda i: -len(clips[i]))
    results: list[_Decoded | None] = [None] * len(clips)
    pos = 0
    while pos < len(order):
        idx = order[pos : pos + batch_size]
        try:
            batch = _generate(wm, [clips[i] for i in idx], **kwargs)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise OutOfMemory(f"GPU out of memory decoding a single 30 s piece: {e}") from e
            batch_size = max(1, batch_size // 2)
            log.warning("CUDA out of memory: retrying with batch size %d", batch_size)
            continue
        for i, d in zip(idx, batch, strict=True):
            results[i] = d
        pos += len(idx)
        on_batch(idx)
    return results  # type: ignore[return-value]


# ------------------------------------------------------- tokens -> segments


def _words(wm: WhisperModel, tokens: list[int], ends: list[float], prev_end: float, language: str | None):
    """Group a segment's text tokens into words: (text, start, end); token i spans (ends[i-1], ends[i])."""
    tok = wm.processor.tokenizer
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
        text = tok.decode([tokens[j] for j in g]).strip()
        if text:
            words.append((text, ends[g[0] - 1] if g[0] > 0 else prev_end, ends[g[-1]]))
    return words


def _segments(
    wm: WhisperModel,
    piece: vad.Piece,
    decoded: _Decoded,
    language: str | None,
) -> list[Segment]:
    """Split one piece's tokens at timestamp tokens into segments with absolute times."""
    gc = wm.model.generation_config
    eot = gc.eos_token_id if isinstance(gc.eos_token_id, int) else gc.eos_token_id[0]
    ts_begin = gc.no_timestamps_token_id + 1
    tok = wm.processor.tokenizer
    dur = piece.duration

    def clamp(t: float) -> float:
        return min(max(t, 0.0), dur)

    raw: list[tuple[float, float | None, list[int], list[int]]] = []  # start, end, tokens, token positions
    start: float | None = None
    text: list[int] = []
    pos: list[int] = []
    for i, t in enumerate(decoded.tokens):
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
        # other ids >= eot: prompt and end/padding tokens
    if text:  # no closing timestamp: the piece ended mid-segment
        raw.append((start if start is not None else 0.0, None, text, pos))

    segments: list[Segment] = []
    floor = 0.0  # keeps times monotonic within the piece
    for start, end, toks, positions in raw:
        body = tok.decode(toks).strip()
        if not body:
            continue
        start = max(start, floor)
        end = max(end if end is not None else dur, start)
        # boundaries predicted in a pause move onto the speech (piece-relative times)
        a, b = piece.snap(piece.start + start, piece.start + end)
        start = max(a - piece.start, floor)
        end = max(b - piece.start, start)
        words = None
        if decoded.token_times is not None:
            ends = [min(max(decoded.token_times[p], start), end) for p in positions]
            ends = list(np.maximum.accumulate(ends)) if ends else ends
            words = []
            for w_text, w_start, w_end in _words(wm, toks, ends, start, language):
                w_start = max(w_start, start)
                w_end = max(w_end, w_start)
                words.append(Word(start=_r(piece.start + w_start), end=_r(piece.start + w_end), text=w_text))
        segments.append(Segment(start=_r(piece.start + start), end=_r(piece.start + end), text=body, words=words))
        floor = end
    return segments


def _r(t: float) -> float:
    return round(float(t), 3)


# --------------------------------------------------------------- the whole


def transcribe(
    audio: np.ndarray,
    wm: WhisperModel,
    *,
    task: str = "transcribe",
    language: str | None = None,
    batch_size: int = 24,
    timestamp: str = "chunk",
    on_progress: ProgressCallback | None = None,
    pieces: list[vad.Piece] | None = None,
) -> Transcript:
    """Transcribe 16 kHz mono float32 audio. Silence gives an empty transcript, not an error."""
    duration = len(audio) / SAMPLE_RATE
    language = language or None
    if not wm.multilingual:
        if task != "transcribe":
            raise InvalidSpec(f"model {wm.name!r} is English-only: it cannot translate (use a multilingual model)")
        if language not in (None, "en"):
            raise InvalidSpec(f"model {wm.name!r} is English-only: language {language!r} is not supported")
    elif language and f"<|{language}|>" not in wm.lang_to_id:
        raise InvalidSpec(f"model {wm.name!r} does not know language {language!r}")

    if pieces is None:
        pieces = vad.split_audio(audio)
    processed = duration - sum(p.duration for p in pieces)  # silence counts as done
    if on_progress:
        on_progress(processed, duration)

    probability = None
    if not pieces:
        language = language or ("en" if not wm.multilingual else None)
        return Transcript(text="", segments=[], task=task, timestamp=timestamp, language=language,
                          duration=_r(duration), model=wm.name)  # fmt: skip

    clips = [audio[int(p.start * SAMPLE_RATE) : int(p.end * SAMPLE_RATE)] for p in pieces]
    if not wm.multilingual:
        language = "en"
    elif language is None:
        # One language per job, detected on the piece with the most speech.
        language, probability = detect_language(wm, max(clips, key=len))

    def on_batch(done: list[int]) -> None:
        nonlocal processed
        processed += sum(pieces[i].duration for i in done)
        if on_progress:
            on_progress(min(processed, duration), duration)

    decoded = _decode_batches(
        wm, clips, batch_size, on_batch, language=language, task=task, word_timestamps=timestamp == "word"
    )
    segments: list[Segment] = []
    for piece, d in zip(pieces, decoded, strict=True):
        segments += _segments(wm, piece, d, language)
    joiner = "" if language in NO_SPACE_LANGUAGES else " "
    return Transcript(
        text=joiner.join(s.text for s in segments),
        segments=segments,
        task=task,
        timestamp=timestamp,
        language=language,
        language_probability=None if probability is None else round(probability, 4),
        duration=_r(duration),
        model=wm.name,
    )
