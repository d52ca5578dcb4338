"""Batched Whisper with transformers: VAD pieces in, a Transcript out.

The audio is cut at silences into ≤30 s pieces (ifw.runner.vad). `decode_pieces` is the
engine: it decodes any pieces (of one job or of several) with
`WhisperForConditionalGeneration.generate`, up to `batch_size` pieces per call, longest
first, and applies Whisper's own guards to each piece (OpenAI's recipe): a decode whose
text is repetitive (gzip compression ratio > 2.4, or a loop of repeated n-grams) or
unlikely (average log-probability < -1) is decoded again at a higher temperature,
sampling — only the pieces that failed, together; a piece whose no-speech probability
is > 0.6 while its text is unlikely is silence. `transcribe` builds one job on it:
language per piece (a short or unsure piece takes the file's dominant language), a
speech stretch without text decoded again on its own, and coverage figures so that
nothing is dropped silently. Word times come from the cross-attention alignment heads.

Models: GPU runs fp16 with FlashAttention-2 when `flash_attn` is installed, else PyTorch
SDPA; CPU runs fp32 on pinned threads (IFW_CPU_INT8=true: int8 Linear layers, faster). When
the GPU runs out of memory the batch is halved and retried.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ifw.core.languages import NO_SPACE_LANGUAGES, with_leading_space
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
# How transcribe() gets pieces decoded: (requests, on_done(indices) or None) -> results in order.
# By default decode_pieces on this job alone; a pool worker passes its SharedDecoder's session,
# which batches the pieces with other jobs' (ifw.runner.batching).
OnDone = Callable[[list[int], list["PieceResult"]], None]  # (request indices, their results) as they finish
Decode = Callable[[list["PieceRequest"], OnDone | None], list["PieceResult"]]
TextCallback = Callable[[str], None]  # the text so far, in time order (it only grows)


# ------------------------------------------------------------------ loading


@dataclass
class WhisperModel:
    name: str  # as asked for (spec.model or the default)
    source: str  # what from_pretrained loaded: a folder or a hub id
    model: Any  # WhisperForConditionalGeneration
    processor: Any  # WhisperProcessor
    device: torch.device
    dtype: torch.dtype
    int8: bool = False  # Linear layers dynamically quantized (CPU)

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


class _BudgetWarning(logging.Filter):
    """decode_pieces gives every generate() call its token budget (max_new_tokens); transformers
    then warns, once per call, that the checkpoint's max_length is set too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Both `max_new_tokens`")


logging.getLogger("transformers.generation.utils").addFilter(_BudgetWarning())

_models: dict[tuple[str, str, bool], WhisperModel] = {}
_models_lock = threading.Lock()


def load_model(name: str, settings: RunnerSettings) -> WhisperModel:
    """Load (once per process) the Whisper model `name` on the configured device."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    device = select_device(settings)
    source = resolve_model(name, settings)
    int8 = device.type == "cpu" and settings.cpu_int8
    key = (source, str(device), int8)
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
        if int8:
            model = _quantize_int8(model)
        _keep_suppression_masks(model)
        log.info("loaded %s from %s on %s (%s%s, %s)", name, source, device, dtype, ", int8 Linear" if int8 else "", attn)
        _models[key] = WhisperModel(name, source, model, processor, device, dtype, int8)
        return _models[key]


def _keep_suppression_masks(model) -> None:
    """Make generate()'s token-suppression steps cheap on this model.

    transformers' SuppressTokens processors rebuild their vocabulary mask with torch.isin at
    every step (~2 ms each on CPU: a sixth of tiny.en's decode time); the same processors,
    keeping the mask, take the same tokens out. Whisper's generate() builds them in
    _retrieve_logit_processors, so the list it returns is swapped for this model only.
    """
    build = model._retrieve_logit_processors
    fast = _fast_suppression_classes()

    def retrieve(*args, **kwargs):
        processors = build(*args, **kwargs)
        if processors:
            for i, proc in enumerate(processors):
                if type(proc) in fast:
                    processors[i] = _copy_to(fast[type(proc)], proc)
        return processors

    model._retrieve_logit_processors = retrieve


def _copy_to(cls, obj):
    new = cls.__new__(cls)
    new.__dict__.update(obj.__dict__)
    return new


@functools.cache
def _fast_suppression_classes() -> dict[type, type]:
    import torch
    from transformers import SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor

    def mask_of(proc, tokens, scores):
        mask = getattr(proc, "_mask", None)
        if mask is None or mask.shape[0] != scores.shape[-1] or mask.device != scores.device:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            tokens = tokens.to(scores.device)
            mask[tokens[tokens < scores.shape[-1]]] = True
            proc._mask = mask
        return mask

    class Suppress(SuppressTokensLogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(mask_of(self, self.suppress_tokens, scores), -float("inf"))

    class SuppressAtBegin(SuppressTokensAtBeginLogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[-1] != self.begin_index:
                return scores
            return scores.masked_fill(mask_of(self, self.begin_suppress_tokens, scores), -float("inf"))

    return {SuppressTokensLogitsProcessor: Suppress, SuppressTokensAtBeginLogitsProcessor: SuppressAtBegin}


def _quantize_int8(model):
    """int8 weights and dynamically quantized activations for every Linear layer (fbgemm/oneDNN on x86).

    On CPU the decoder's matmuls (and the 51,865-way output projection at every step) dominate;
    int8 halves their cost. Convolutions, layer norms and attention stay fp32.
    """
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch marks its quantized tensor types deprecated (pytorch#184982); they remain the
        # maintained fast int8 path on CPU in this torch release
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# ------------------------------------------------------------- the engine

# Whisper's guard recipe (OpenAI's transcribe.py defaults).
COMPRESSION_RATIO_THRESHOLD = 2.4  # gzip ratio of the text above this: repetitive
LOGPROB_THRESHOLD = -1.0  # mean token log-probability below this: unlikely
NO_SPEECH_THRESHOLD = 0.6  # with an unlikely text, a no-speech probability above this is silence
TEMPERATURE_STEP = 0.2  # fallback temperatures: the request's, then +0.2 ... up to 1.0
BEST_OF = 5  # samples per piece once decoding samples; the likeliest that passes is kept
# OpenAI's sample_len: a 30 s window rarely needs more tokens, and a loop stops here.
MAX_NEW_TOKENS = 224
# Shorter clips get a smaller budget: fast speech is ~5 tokens a second, so a decode past
# 16 + 10 per second is a loop, and stopping it there saves most of its cost.
TOKENS_PER_SECOND = 10
MAX_PROMPT_TOKENS = 223  # Whisper keeps the last n_text_ctx/2 - 1 tokens of a prompt
# An n-gram repeated back to back at least 3 times over at least this many tokens is a loop
# ("the the the ..." or one sentence over and over), not speech.
LOOP_MIN_TOKENS = 20
SAMPLING_SEED = 0  # sampled decodes are reproducible (the global RNG is left as it was)

Verdict = Literal["ok", "no_speech", "failed"]


@dataclass(frozen=True, eq=False)
class PieceRequest:
    """One ≤30 s clip to decode, with everything that decides how."""

    clip: np.ndarray  # 16 kHz mono float32, at most 30 s
    task: str = "transcribe"
    language: str | None = None  # None: detect it on this clip
    prompt: str | None = None  # text the piece is conditioned on (spellings, names, style)
    temperature: float = 0.0  # of the first decode; 0 is greedy
    word_timestamps: bool = False


@dataclass
class PieceResult:
    """The decode that was kept for one piece, with Whisper's scores of it."""

    # ok: text to keep; no_speech: silence; failed: every temperature failed the checks, no text
    verdict: Verdict
    tokens: list[int]  # timestamp and text tokens as generated (no prompt, no end token)
    token_logprobs: list[float]  # log-probability of each token in `tokens`
    token_times: list[float] | None  # word timestamps asked: end time of each token, s into the clip
    text: str
    language: str | None
    language_probability: float | None  # when the language was detected on this piece
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    attempts: int  # decodes tried (temperatures)


@dataclass
class DecodeStats:
    """What decode_pieces did: one entry per generate() call, in call order."""

    pieces: list[int] = field(default_factory=list)  # pieces decoded by the call
    rows: list[int] = field(default_factory=list)  # sequences generated (pieces x BEST_OF when sampling)
    temperatures: list[float] = field(default_factory=list)
    retries: list[bool] = field(default_factory=list)  # the call decoded pieces that had failed a check
    oom_halvings: int = 0

    @property
    def generate_calls(self) -> int:
        return len(self.pieces)

    @property
    def pieces_per_call(self) -> float:
        return sum(self.pieces) / len(self.pieces) if self.pieces else 0.0

    @property
    def fallback_decodes(self) -> int:
        """Pieces decoded again at a higher temperature (once per retry)."""
        return sum(n for n, retry in zip(self.pieces, self.retries) if retry)

    def record(self, pieces: int, rows: int, temperature: float, retry: bool) -> None:
        self.pieces.append(pieces)
        self.rows.append(rows)
        self.temperatures.append(temperature)
        self.retries.append(retry)


@dataclass(eq=False)
class _State:
    """Where one request stands in the fallback loop."""

    request: PieceRequest
    temperatures: list[float]
    attempt: int = 0
    language: str | None = None
    language_probability: float | None = None
    no_speech_prob: float | None = None
    encoded: Any = None  # encoder output (1500 x d, on the device), kept while the piece is retried
    best: _Candidate | None = None  # the likeliest failed decode so far

    @property
    def temperature(self) -> float:
        return self.temperatures[self.attempt]


@dataclass
class _Candidate:
    tokens: list[int]
    token_logprobs: list[float]
    token_times: list[float] | None
    text: str
    avg_logprob: float
    compression_ratio: float
    looping: bool
    ended: bool  # generated its end token (False: stopped at MAX_NEW_TOKENS)
    temperature: float

    @property
    def passed(self) -> bool:
        return (
            self.ended
            and not self.looping
            and self.compression_ratio <= COMPRESSION_RATIO_THRESHOLD
            and self.avg_logprob >= LOGPROB_THRESHOLD
        )


def fallback_temperatures(first: float) -> list[float]:
    """The request's temperature, then +TEMPERATURE_STEP up to 1.0 (0 -> 0, 0.2, ..., 1.0)."""
    temps = [round(float(first), 4)]
    while temps[-1] + TEMPERATURE_STEP <= 1.0 + 1e-9:
        temps.append(round(temps[-1] + TEMPERATURE_STEP, 4))
    return temps


def token_budget(seconds: float) -> int:
    """Most tokens a decode of a clip this long may generate (timestamps included)."""
    return min(MAX_NEW_TOKENS, 16 + math.ceil(TOKENS_PER_SECOND * seconds))


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression (Whisper's repetition measure)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def is_looping(tokens: Sequence[int], min_tokens: int = LOOP_MIN_TOKENS) -> bool:
    """True when some n-gram repeats back to back ≥3 times, covering ≥ min_tokens tokens."""
    tokens = list(tokens)
    for n in range(1, len(tokens) // 3 + 1):
        needed = max(3, math.ceil(min_tokens / n))  # repetitions of an n-gram that make a loop
        if needed * n > len(tokens):
            continue
        for phase in range(n):  # blocks of n tokens starting at phase, phase + n, ...
            run = 1
            for i in range(phase + n, len(tokens) - n + 1, n):
                run = run + 1 if tokens[i : i + n] == tokens[i - n : i] else 1
                if run >= needed:
                    return True
    return False


def decode_pieces(
    wm: WhisperModel,
    requests: Sequence[PieceRequest],
    *,
    batch_size: int,
    on_done: OnDone | None = None,
    stats: DecodeStats | None = None,
) -> list[PieceResult]:
    """Decode pieces (of one job or of several) in as few generate() calls as the guards allow.

    Requests with the same task, prompt, word-timestamps flag and current temperature are
    compatible: they share generate() calls of at most `batch_size` sequences, longest
    first; their languages may differ (None: detected on each piece). Every decode is
    checked; the pieces that failed are decoded again, together, at their next temperature
    (BEST_OF samples each, their encoder output reused), until they pass or the
    temperatures run out. `on_done(indices, results)` gets the requests finished by each
    call. CUDA out of memory halves the call and retries it (OutOfMemory at one piece).
    `stats`, when given, records each generate() call. Returns results in request order.
    """
    import torch

    for r in requests:
        check_task_and_language(wm, r.task, r.language)
    stats = stats if stats is not None else DecodeStats()
    states = [_State(r, fallback_temperatures(r.temperature), language=r.language or _only_language(wm))
              for r in requests]  # fmt: skip
    results: list[PieceResult | None] = [None] * len(requests)
    limit = max(1, batch_size)  # sequences per generate() call
    pending = list(range(len(requests)))
    while pending:
        retry: list[int] = []
        groups: dict[tuple, list[int]] = {}
        for i in pending:
            s = states[i]
            groups.setdefault((s.request.task, s.request.prompt or "", s.request.word_timestamps, s.temperature),
                              []).append(i)  # fmt: skip
        for group in groups.values():
            group.sort(key=lambda i: -len(requests[i].clip))
            temperature = states[group[0]].temperature
            rows = BEST_OF if temperature > 0 else 1
            pos = 0
            while pos < len(group):
                idx = group[pos : pos + max(1, limit // rows)]
                try:
                    candidates = _decode_chunk(wm, [states[i] for i in idx])
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.empty_cache()
                    if len(idx) == 1:
                        raise OutOfMemory(f"GPU out of memory decoding a single 30 s piece: {e}") from e
                    limit = max(1, len(idx) // 2) * rows
                    stats.oom_halvings += 1
                    log.warning("CUDA out of memory: retrying with %d pieces per call", len(idx) // 2)
                    continue
                stats.record(len(idx), len(idx) * rows, temperature, retry=any(states[i].attempt for i in idx))
                finished = []
                for i, cand in zip(idx, candidates, strict=True):
                    s = states[i]
                    verdict = _verdict(cand, s.no_speech_prob)
                    if verdict == "retry":
                        if s.best is None or (cand.ended, cand.avg_logprob) > (s.best.ended, s.best.avg_logprob):
                            s.best = cand
                        if s.attempt + 1 < len(s.temperatures):
                            s.attempt += 1
                            retry.append(i)
                            continue
                        # Every temperature failed: the text is a loop or unlikely, and is given up
                        # (OpenAI keeps its last decode, and so prints loops on noise and music, or
                        # "but I'm sorry, but I'm sorry ..." for speech in another language).
                        cand, verdict = s.best, "failed"
                    results[i] = _result(s, cand, verdict)
                    s.encoded = None
                    finished.append(i)
                pos += len(idx)
                if finished and on_done:
                    on_done(finished, [results[i] for i in finished])
        pending = retry
    return results  # type: ignore[return-value]


def check_task_and_language(wm: WhisperModel, task: str, language: str | None) -> None:
    if not wm.multilingual:
        if task != "transcribe":
            raise InvalidSpec(f"model {wm.name!r} is English-only: it cannot translate (use a multilingual model)")
        if language not in (None, "en"):
            raise InvalidSpec(f"model {wm.name!r} is English-only: language {language!r} is not supported")
    elif language and f"<|{language}|>" not in wm.lang_to_id:
        raise InvalidSpec(f"model {wm.name!r} does not know language {language!r}")


def _only_language(wm: WhisperModel) -> str | None:
    return None if wm.multilingual else "en"


def _verdict(cand: _Candidate, no_speech_prob: float | None) -> str:
    # OpenAI: an unlikely text where no speech is likely is silence, and stops the fallback.
    if (no_speech_prob or 0.0) > NO_SPEECH_THRESHOLD and cand.avg_logprob < LOGPROB_THRESHOLD:
        return "no_speech"
    return "ok" if cand.passed else "retry"


def _result(s: _State, cand: _Candidate, verdict: Verdict) -> PieceResult:
    return PieceResult(
        verdict=verdict,
        tokens=cand.tokens,
        token_logprobs=cand.token_logprobs,
        token_times=cand.token_times,
        text=cand.text,
        language=s.language,
        language_probability=s.language_probability,
        temperature=cand.temperature,
        avg_logprob=cand.avg_logprob,
        compression_ratio=cand.compression_ratio,
        no_speech_prob=s.no_speech_prob if s.no_speech_prob is not None else 0.0,
        attempts=s.attempt + 1,
    )


def _features(wm: WhisperModel, clips: Sequence[np.ndarray]):
    fe = wm.processor.feature_extractor
    # On a GPU the STFT runs there too: on CPU it costs ~20 ms per 30 s window per core.
    out = fe(list(clips), sampling_rate=SAMPLE_RATE, return_tensors="pt", device=str(wm.device))
    return out.input_features.to(wm.device, wm.dtype)


def _prompt_ids(wm: WhisperModel, prompt: str | None) -> list[int] | None:
    """<|startofprev|> and the prompt's last MAX_PROMPT_TOKENS tokens (as OpenAI's initial_prompt)."""
    if not prompt or not prompt.strip():
        return None
    try:
        ids = [int(t) for t in wm.processor.get_prompt_ids(prompt)]
    except ValueError as e:  # special tokens such as <|en|> written in the prompt
        raise InvalidSpec(f"spec.prompt: {e}") from e
    return ids[:1] + ids[1:][-MAX_PROMPT_TOKENS:]


def _decode_chunk(wm: WhisperModel, states: Sequence[_State]) -> list[_Candidate]:
    """One generate() call for compatible pieces (same task, prompt, word flag, temperature)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.modeling_outputs import BaseModelOutput

    request = states[0].request
    temperature = states[0].temperature
    fresh = [s for s in states if s.encoded is None]
    if fresh:  # the encoder runs once per piece; a retried piece reuses its output
        with torch.inference_mode():
            encoded = wm.model.model.encoder(_features(wm, [s.request.clip for s in fresh])).last_hidden_state
        for s, e in zip(fresh, encoded, strict=True):
            s.encoded = e
    encoded = torch.stack([s.encoded for s in states])
    prompt = _prompt_ids(wm, request.prompt)
    first = [i for i, s in enumerate(states) if s.no_speech_prob is None]
    if first:
        _first_step(wm, [states[i] for i in first], encoded[first], prompt)

    rows = BEST_OF if temperature > 0 else 1
    recorder = _TokenScores()
    seen, picked = _recorder_classes()
    kwargs: dict[str, Any] = {
        "encoder_outputs": BaseModelOutput(last_hidden_state=encoded.repeat_interleave(rows, dim=0)),
        "return_timestamps": True,
        # one pass per piece: else generate() seeks on past the last timestamp like long-form audio
        "force_unique_generate_call": True,
        "max_new_tokens": token_budget(len(states[0].request.clip) / SAMPLE_RATE),
        "logits_processor": LogitsProcessorList([seen(recorder)]),
        "stopping_criteria": StoppingCriteriaList([picked(recorder)]),
    }
    if temperature > 0:
        kwargs |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_beams": 1}
    else:
        kwargs |= {"do_sample": False, "num_beams": 1}
    if wm.multilingual:
        kwargs |= {"language": [s.language for s in states for _ in range(rows)], "task": request.task}
    if prompt:
        kwargs["prompt_ids"] = torch.tensor(prompt, device=wm.device)
    # which mel frames hold audio: the word timestamps' DTW stops at each clip's real end (and
    # generate() wants a mask when its inputs are batched)
    frames = torch.tensor([min(len(s.request.clip) // HOP_LENGTH, N_FRAMES) for s in states for _ in range(rows)])
    kwargs["attention_mask"] = (torch.arange(N_FRAMES)[None, :] < frames[:, None]).long().to(wm.device)
    if request.word_timestamps:
        kwargs["return_token_timestamps"] = True
    attn = wm.model.config._attn_implementation
    try:
        with torch.inference_mode(), _seeded(wm.device, temperature > 0):
            out = wm.model.generate(**kwargs)
    finally:
        wm.model.config._attn_implementation = attn  # word timestamps switch the model to eager for good

    prefix = recorder.prefix
    ids = recorder.ids[:, prefix:].tolist()
    logprobs = torch.stack(recorder.logprobs, dim=1).tolist()
    times = out["token_timestamps"][:, prefix:].tolist() if request.word_timestamps else None
    candidates = []
    for p in range(len(states)):
        options = [_candidate(wm, ids[r], logprobs[r], times[r] if times else None, temperature)
                   for r in range(p * rows, (p + 1) * rows)]  # fmt: skip
        passing = [c for c in options if c.passed] or options
        candidates.append(max(passing, key=lambda c: c.avg_logprob))
    return candidates


HOP_LENGTH = 160  # samples per mel frame
N_FRAMES = 3000  # mel frames in a 30 s window


def _first_step(wm: WhisperModel, states: Sequence[_State], encoded, prompt: list[int] | None) -> None:
    """Once per piece: its no-speech probability and, when asked, its language (one decoder step)."""
    import torch

    gc = wm.model.generation_config
    sot = gc.decoder_start_token_id

    def next_token_logits(prefix: list[int]):
        ids = torch.tensor([prefix] * len(states), device=wm.device)
        with torch.inference_mode():
            out = wm.model(encoder_outputs=(encoded,), decoder_input_ids=ids, use_cache=False)
        return out.logits[:, -1].float()

    logits = next_token_logits([*(prompt or []), sot])
    # OpenAI: the probability of <|nospeech|> right after <|startoftranscript|>
    no_speech = torch.softmax(logits, dim=-1)[:, gc.no_timestamps_token_id - 1].tolist()
    detect = [i for i, s in enumerate(states) if s.language is None]
    if detect:
        if prompt:  # the language is detected on the audio alone, as OpenAI does
            logits = next_token_logits([sot])
        lang_tokens = list(wm.lang_to_id)
        lang_ids = torch.tensor([wm.lang_to_id[t] for t in lang_tokens], device=wm.device)
        probs = torch.softmax(logits[:, lang_ids], dim=-1)
        best_p, best = probs.max(dim=-1)
        for i in detect:
            states[i].language = lang_tokens[int(best[i])].strip("<|>")
            states[i].language_probability = float(best_p[i])
    for s, p in zip(states, no_speech, strict=True):
        s.no_speech_prob = float(p)


def _candidate(wm: WhisperModel, generated: list[int], logprobs: list[float], times, temperature) -> _Candidate:
    eot = _eot(wm)
    if eot in generated:
        end = generated.index(eot)
        tokens, scored, ended = generated[:end], logprobs[: end + 1], True  # the end token's log-prob counts
    else:
        tokens, scored, ended = generated, logprobs, False
    words = [t for t in tokens if t < eot]
    text = wm.processor.tokenizer.decode(words)
    return _Candidate(
        tokens=tokens,
        token_logprobs=logprobs[: len(tokens)],
        token_times=_aligned(times, len(tokens)) if times is not None else None,
        text=text,
        avg_logprob=sum(scored) / max(1, len(scored)),
        compression_ratio=compression_ratio(text),
        looping=is_looping(words),
        ended=ended,
        temperature=temperature,
    )


def _aligned(times: list[float], n: int) -> list[float]:
    times = times[:n]
    return times + [times[-1] if times else 0.0] * (n - len(times))


def _eot(wm: WhisperModel) -> int:
    eos = wm.model.generation_config.eos_token_id
    return eos if isinstance(eos, int) else eos[0]


@contextmanager
def _seeded(device, sampling: bool):
    """Sampled decodes start from a fixed seed, and leave the process's random state as it was."""
    if not sampling:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(SAMPLING_SEED)
        yield


class _TokenScores:
    """The tokens generate() picks and the log-probability of each, kept one step at a time.

    generate()'s own output_scores keeps every step's logits and, for Whisper, copies them and
    the KV cache to the host per sequence; OpenAI's avg_logprob needs only the picked tokens.
    """

    def __init__(self) -> None:
        self.prefix: int | None = None  # prompt + start tokens before the first generated one
        self.ids: Any = None  # (rows, prefix + generated) after the last step
        self.logprobs: list[Any] = []  # per step: (rows,)
        self.scores: Any = None
        self.lse: Any = None


@functools.cache
def _recorder_classes():
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class Seen(LogitsProcessor):
        """Runs after Whisper's own rules (timestamps, suppressed tokens), before the temperature."""

        def __init__(self, recorder: _TokenScores):
            self.recorder = recorder

        def __call__(self, input_ids, scores):
            r = self.recorder
            if r.prefix is None:
                r.prefix = input_ids.shape[1]
            r.scores = scores
            r.lse = torch.logsumexp(scores.float(), dim=-1)
            return scores

    class Picked(StoppingCriteria):
        """Sees each step's picked token (it never stops generation)."""

        def __init__(self, recorder: _TokenScores):
            self.recorder = recorder

        def __call__(self, input_ids, scores, **kwargs):
            r = self.recorder
            r.logprobs.append(r.scores.gather(1, input_ids[:, -1:]).squeeze(1).float() - r.lse)
            r.ids = input_ids
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Seen, Picked


# ------------------------------------------------------- tokens -> segments


def _words(wm: WhisperModel, tokens: list[int], ends: list[float], prev_end: float, language: str | None):
    """Group a segment's text tokens into words: (text, start, end, token indices); token i spans (ends[i-1], ends[i])."""
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
        text = tok.decode([tokens[j] for j in g])
        if text.strip():  # as Whisper wrote it: " Hello" (the original API's chunks keep the space)
            words.append((with_leading_space(text.rstrip(), language), ends[g[0] - 1] if g[0] > 0 else prev_end,
                          ends[g[-1]], g))  # fmt: skip
    return words


def _segments(wm: WhisperModel, piece: vad.Piece, result: PieceResult) -> list[Segment]:
    """Split one piece's tokens at timestamp tokens into segments with absolute times and the piece's scores."""
    gc = wm.model.generation_config
    eot = _eot(wm)
    ts_begin = gc.no_timestamps_token_id + 1
    tok = wm.processor.tokenizer
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
        if result.token_times is not None:
            ends = [min(max(result.token_times[p], start), end) for p in positions]
            ends = list(np.maximum.accumulate(ends)) if ends else ends
            words = []
            for w_text, w_start, w_end, group in _words(wm, toks, ends, start, result.language):
                w_start = max(w_start, start)
                w_end = max(w_end, w_start)
                probability = float(np.mean([math.exp(result.token_logprobs[positions[j]]) for j in group]))
                words.append(Word(start=_r(piece.start + w_start), end=_r(piece.start + w_end), text=w_text,
                                  probability=round(probability, 4)))  # fmt: skip
        logprobs = [round(result.token_logprobs[p], 4) for p in positions]
        # Whisper's leading space stays (" Hello."): the segments join into the text
        text = with_leading_space(body.rstrip(), result.language)
        segments.append(Segment(start=_r(piece.start + start), end=_r(piece.start + end), text=text,
                                words=words, tokens=toks, logprobs=logprobs, **scores))  # fmt: skip
        floor = end
    return segments


def _r(t: float) -> float:
    return round(float(t), 3)


# --------------------------------------------------------------- one job

# A piece with less speech than this, or detected with less confidence, takes the file's
# dominant language: one ambiguous second must not switch the language.
LANGUAGE_MIN_SPEECH_SECONDS = 2.0
LANGUAGE_MIN_PROBABILITY = 0.5
# A stretch of speech at least this long that no segment touches is decoded again on its own.
RETRY_MIN_SECONDS = 1.0


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
    wm: WhisperModel,
    *,
    task: str = "transcribe",
    language: str | None = None,
    batch_size: int = 24,
    timestamp: str = "chunk",
    prompt: str | None = None,
    temperature: float = 0.0,
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
    the text so far each time the pieces from the start on have grown (for streaming clients;
    the final text may still differ where later passes redo a piece).
    """
    if decode is None:

        def decode(requests: list[PieceRequest], done: OnDone | None) -> list[PieceResult]:
            return decode_pieces(wm, requests, batch_size=batch_size, on_done=done, stats=stats)

    duration = len(audio) / SAMPLE_RATE
    language = language or None
    check_task_and_language(wm, task, language)
    _prompt_ids(wm, prompt)  # a bad prompt fails before any decoding
    if pieces is None:
        pieces = vad.split_audio(audio)
    speech = [sum(b - a for a, b in speech_of(p)) for p in pieces]
    processed = duration - sum(p.duration for p in pieces)  # silence counts as done
    if on_progress:
        on_progress(processed, duration)
    if not pieces:
        return Transcript(text="", segments=[], task=task, timestamp=timestamp, language=language or _only_language(wm),
                          duration=_r(duration), model=wm.name, speech_seconds=0.0, text_seconds=0.0)  # fmt: skip

    decoded: dict[int, tuple[PieceResult, list[Segment]]] = {}  # piece -> its result and segments
    streamed = 0  # pieces[:streamed] are in the text so far

    def segments_of(i: int, r: PieceResult) -> list[Segment]:
        """A piece's segments, made once per result (streaming makes them as the pieces finish)."""
        if i not in decoded or decoded[i][0] is not r:
            decoded[i] = (r, _segments(wm, pieces[i], r) if r.verdict == "ok" else [])
        return decoded[i][1]

    def on_done(done: list[int], finished: list[PieceResult]) -> None:
        nonlocal processed, streamed
        processed += sum(pieces[i].duration for i in done)
        if on_text:
            for i, r in zip(done, finished, strict=True):
                segments_of(i, r)
            before = streamed
            while streamed in decoded:
                streamed += 1
            if streamed > before:
                on_text("".join(s.text for i in range(streamed) for s in decoded[i][1]))
        if on_progress:
            on_progress(min(processed, duration), duration)

    def request(piece: vad.Piece, lang: str | None) -> PieceRequest:
        clip = audio[int(piece.start * SAMPLE_RATE) : int(piece.end * SAMPLE_RATE)]
        return PieceRequest(clip, task, lang, prompt, temperature, timestamp == "word")

    requests = [request(p, language or _only_language(wm)) for p in pieces]
    if condition_on_previous:
        results = _decode_in_order(decode, requests, on_done)
    else:
        results = decode(requests, on_done)

    probability = None
    if language is None and wm.multilingual:
        language, probability, redo = settle_languages(speech, results)
        if redo:
            log.info("%d short or unsure pieces decoded again in the dominant language %s", len(redo), language)
            again = decode([request(pieces[i], language) for i in redo], None)
            for i, r in zip(redo, again, strict=True):
                results[i] = r
    language = language or _only_language(wm)

    per_piece = [list(segments_of(i, r)) for i, r in enumerate(results)]
    # Nothing dropped silently: speech that no segment covers is decoded again on its own.
    dropped = 0
    retries: list[tuple[int, vad.Piece]] = []
    for i, (piece, segs) in enumerate(zip(pieces, per_piece, strict=True)):
        regions = speech_of(piece)
        if segs:
            gaps = [(a, b) for a, b in regions if b - a >= RETRY_MIN_SECONDS and not _touched(a, b, segs)]
        elif len(regions) > 1:
            gaps = list(regions)  # cut smaller: each stretch of speech alone
        else:
            gaps = []
            dropped += 1  # nothing smaller to try: given up (counted)
        retries += [(i, vad.Piece(a, b, ((a, b),))) for a, b in gaps]
    if retries:
        again = decode([request(sub, results[i].language) for i, sub in retries], None)
        for (i, sub), r in zip(retries, again, strict=True):
            segs = _segments(wm, sub, r) if r.verdict == "ok" else []
            per_piece[i] += segs
            dropped += not segs
        log.info("%d stretches of speech without text decoded again; %d still without text", len(retries), dropped)

    segments = sorted((s for segs in per_piece for s in segs), key=lambda s: s.start)
    return Transcript(
        text="".join(s.text for s in segments),  # each carries its leading space
        segments=segments,
        task=task,
        timestamp=timestamp,
        language=language,
        language_probability=None if probability is None else round(probability, 4),
        duration=_r(duration),
        model=wm.name,
        speech_seconds=_r(sum(speech)),
        text_seconds=_r(_covered([r for p in pieces for r in speech_of(p)], segments)),
        dropped_pieces=dropped,
    )


def _decode_in_order(decode: Decode, requests: list[PieceRequest], on_done) -> list[PieceResult]:
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
