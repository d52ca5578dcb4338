"""The decode engine: ≤30 s pieces in, one checked decode per piece out.

`decode_pieces` decodes any pieces (of one job or of several) with
`WhisperForConditionalGeneration.generate`, up to `batch_size` pieces per call, longest first,
and applies Whisper's own guards to each piece (OpenAI's recipe): a decode whose text is
repetitive (gzip compression ratio > 2.4, or a loop of repeated n-grams) or unlikely (average
log-probability < -1) is decoded again at a higher temperature, sampling — only the pieces
that failed, together; a piece whose no-speech probability is > 0.6 while its text is
unlikely is silence. The thresholds and budgets are a `DecodeOptions`. When the GPU runs out
of memory the call is halved and retried.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ifw.runner import alignment
from ifw.runner.audio import SAMPLE_RATE
from ifw.runner.errors import DeviceFailed, InvalidSpec, OutOfMemory
from ifw.runner.models import WhisperModel, only_language

log = logging.getLogger(__name__)

HOP_LENGTH = 160  # samples per mel frame
N_FRAMES = 3000  # mel frames in a 30 s window
MAX_PROMPT_TOKENS = 223  # Whisper keeps the last n_text_ctx/2 - 1 tokens of a prompt

Verdict = Literal["ok", "no_speech", "failed"]
OnDone = Callable[[list[int], list["PieceResult"]], None]  # (request indices, their results) as they finish
# How a job gets its pieces decoded: (requests, on_done or None) -> results in request order.
# decode_pieces on the job alone, or a pool worker's SharedDecoder session, which batches the
# pieces with other jobs' (ifw.runner.batching).
Decode = Callable[[list["PieceRequest"], OnDone | None], list["PieceResult"]]


@dataclass(frozen=True)
class DecodeOptions:
    """How every piece is decoded and checked; the defaults are OpenAI's transcribe.py ones."""

    compression_ratio_threshold: float = 2.4  # gzip ratio of the text above this: repetitive
    logprob_threshold: float = -1.0  # mean token log-probability below this: unlikely
    no_speech_threshold: float = 0.6  # with an unlikely text, a no-speech probability above this is silence
    temperature_step: float = 0.2  # fallback temperatures: the request's, then +0.2 ... up to 1.0
    best_of: int = 5  # samples per piece once decoding samples; the likeliest that passes is kept
    # OpenAI's sample_len: a 30 s window rarely needs more tokens, and a loop stops here.
    max_new_tokens: int = 224
    # Shorter clips get a smaller budget: fast speech is ~5 tokens a second, so a decode past
    # 16 + 10 per second is a loop, and stopping it there saves most of its cost.
    tokens_per_second: int = 10
    # An n-gram repeated back to back at least 3 times over at least this many tokens is a loop
    # ("the the the ..." or one sentence over and over), not speech.
    loop_min_tokens: int = 20
    sampling_seed: int = 0  # sampled decodes are reproducible (the global RNG is left as it was)

    def fallback_temperatures(self, first: float) -> list[float]:
        """The request's temperature, then +temperature_step up to 1.0 (0 -> 0, 0.2, ..., 1.0)."""
        temps = [round(float(first), 4)]
        while temps[-1] + self.temperature_step <= 1.0 + 1e-9:
            temps.append(round(temps[-1] + self.temperature_step, 4))
        return temps

    def token_budget(self, seconds: float) -> int:
        """Most tokens a decode of a clip this long may generate (timestamps included)."""
        return min(self.max_new_tokens, 16 + math.ceil(self.tokens_per_second * seconds))

    def rows(self, temperature: float) -> int:
        """Sequences generated per piece: one greedy decode, or best_of samples."""
        return self.best_of if temperature > 0 else 1


DEFAULT_OPTIONS = DecodeOptions()


@dataclass(frozen=True, eq=False)
class PieceRequest:
    """One ≤30 s clip to decode, with everything that decides how."""

    clip: np.ndarray  # 16 kHz mono float32, at most 30 s
    task: str = "transcribe"
    language: str | None = None  # None: detect it on this clip
    prompt: str | None = None  # text the piece is conditioned on (spellings, names, style)
    temperature: float = 0.0  # of the first decode; 0 is greedy
    word_timestamps: bool = False
    # terms placed before the prompt (faster-whisper's hotwords), joined: see prompt_ids
    hotwords: str | None = None
    # Keep this clip's Encoding on its result when the language detected on it is less likely than
    # this (math.inf: whenever detected; 0: never), for a later decode of the same clip in another
    # language (ifw.runner.asr keeps the pieces that settling the file's language may decode again).
    keep_encoding_below: float = 0.0
    # What an earlier decode of this very clip computed (its result's encoding): no features, no encoder.
    encoding: Encoding | None = None


@dataclass(frozen=True, eq=False)
class Encoding:
    """What decoding a clip computed that does not depend on the language it is decoded in: its
    encoder output, its no-speech probability (after `prompt`) and the language detected on it.

    A later decode of the same clip starts from it (asr's dominant-language redo): it skips the
    log-mel features and the encoder, and the first decoder step when the prompt is the same.
    On the model's device: ~3.8 MB for large-v3 in fp16, so it is kept only where asked for
    (PieceRequest.keep_encoding_below) and dropped by whoever asked once it is of no more use."""

    hidden: Any  # encoder output, 1500 x d, on the model's device, in its dtype
    prompt: tuple[int, ...] | None  # the prompt_ids the no-speech probability was measured after
    no_speech_prob: float
    language: str | None  # detected on the clip (None: the request gave it)
    language_probability: float | None


@dataclass
class PieceResult:
    """The decode that was kept for one piece, with Whisper's scores of it."""

    # ok: text to keep; no_speech: silence; failed: every temperature failed the checks, no text
    verdict: Verdict
    tokens: list[int]  # timestamp and text tokens as generated (no prompt, no end token)
    token_logprobs: list[float]  # log-probability of each token in `tokens`
    # word timestamps asked and verdict ok: the alignment heads' attention over `tokens` (tokens x
    # audio frames, float32); the piece's segments turn it into word times (alignment.token_times)
    alignment: np.ndarray | None
    text: str
    language: str | None
    language_probability: float | None  # when the language was detected on this piece
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    attempts: int  # decodes tried (temperatures)
    # asked for (PieceRequest.keep_encoding_below): what the next decode of this clip may start from
    encoding: Encoding | None = None


@dataclass
class DecodeStats:
    """What decode_pieces did: one entry per generate() call, in call order."""

    pieces: list[int] = field(default_factory=list)  # pieces decoded by the call
    rows: list[int] = field(default_factory=list)  # sequences generated (pieces x best_of when sampling)
    temperatures: list[float] = field(default_factory=list)
    retries: list[bool] = field(default_factory=list)  # the call decoded pieces that had failed a check
    oom_halvings: int = 0

    @property
    def generate_calls(self) -> int:
        return len(self.pieces)

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
    alignment: np.ndarray | None  # see PieceResult.alignment
    text: str
    avg_logprob: float
    compression_ratio: float
    looping: bool
    ended: bool  # generated its end token (False: stopped at the token budget)
    temperature: float

    def passes(self, options: DecodeOptions) -> bool:
        return (
            self.ended
            and not self.looping
            and self.compression_ratio <= options.compression_ratio_threshold
            and self.avg_logprob >= options.logprob_threshold
        )


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression (Whisper's repetition measure)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def is_looping(tokens: Sequence[int], min_tokens: int) -> bool:
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
    whisper: WhisperModel,
    requests: Sequence[PieceRequest],
    *,
    batch_size: int,
    on_done: OnDone | None = None,
    stats: DecodeStats | None = None,
    options: DecodeOptions = DEFAULT_OPTIONS,
) -> list[PieceResult]:
    """Decode pieces (of one job or of several) in as few generate() calls as the guards allow.

    Requests with the same task, prompt, word-timestamps flag and current temperature are
    compatible: they share generate() calls of at most `batch_size` sequences, longest
    first; their languages may differ (None: detected on each piece). Every decode is
    checked; the pieces that failed are decoded again, together, at their next temperature
    (best_of samples each, their encoder output reused), until they pass or the
    temperatures run out. A request that carries an `encoding` (an earlier decode of the same
    clip) skips the features and the encoder, and batches with the others as usual; one that
    asks (keep_encoding_below) gets its Encoding back on its result. `on_done(indices, results)`
    gets the requests finished by each call. CUDA out of memory halves the call and retries it (OutOfMemory at one piece), and
    the halved size holds for later calls (BatchLimits); a CUDA error that breaks the context
    is DeviceFailed (the process must restart).
    `stats`, when given, records each generate() call. Returns results in request order.
    """
    import torch

    for r in requests:
        check_task_and_language(whisper, r.task, r.language)
    stats = stats if stats is not None else DecodeStats()
    states = [_start(whisper, r, options) for r in requests]
    results: list[PieceResult | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    while pending:
        retry: list[int] = []
        groups: dict[tuple, list[int]] = {}
        for i in pending:
            s = states[i]
            groups.setdefault((s.request.task, s.request.prompt or "", s.request.hotwords or "",
                               s.request.word_timestamps, s.temperature), []).append(i)  # fmt: skip
        for group in groups.values():
            group.sort(key=lambda i: -len(requests[i].clip))
            temperature = states[group[0]].temperature
            rows = options.rows(temperature)
            pos = 0
            while pos < len(group):
                # batch_size pieces per call, sampled ones too (best_of rows each): a decoder step costs
                # nearly the same for 24 rows as for 120 on a GPU, so a fallback of batch_size // best_of
                # pieces per call would waste most of it. Memory decides the rest (BatchLimits, in rows).
                limit = BATCH_LIMITS.rows(whisper, max(1, batch_size) * rows)  # sequences per call
                idx = group[pos : pos + max(1, limit // rows)]
                try:
                    candidates = _decode_chunk(whisper, [states[i] for i in idx], options)
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.empty_cache()
                    if len(idx) == 1:
                        raise OutOfMemory(f"GPU out of memory decoding a single 30 s piece: {e}") from e
                    BATCH_LIMITS.out_of_memory(whisper, max(1, len(idx) // 2) * rows)
                    stats.oom_halvings += 1
                    log.warning("CUDA out of memory: retrying with %d pieces per call", len(idx) // 2)
                    continue
                except Exception as e:
                    if device_failed(e):  # the CUDA context is gone: no later call on this process can work
                        raise DeviceFailed(f"the GPU failed while decoding ({type(e).__name__}: {e}); "
                                           "the process must restart") from e  # fmt: skip
                    raise
                BATCH_LIMITS.fitted(whisper, len(idx) * rows)
                stats.record(len(idx), len(idx) * rows, temperature, retry=any(states[i].attempt for i in idx))
                finished = []
                for i, cand in zip(idx, candidates, strict=True):
                    s = states[i]
                    verdict = _verdict(cand, s.no_speech_prob, options)
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
                    results[i].encoding = _kept(whisper, s)
                    s.encoded = None
                    finished.append(i)
                pos += len(idx)
                if finished and on_done:
                    on_done(finished, [results[i] for i in finished])
        pending = retry
    return results  # type: ignore[return-value]


def _start(whisper: WhisperModel, request: PieceRequest, options: DecodeOptions) -> _State:
    """A request's state before its first decode: from its Encoding, when it has one, the encoder
    output, the detected language (when it is to be detected) and, after the same prompt, the
    no-speech probability (the first decoder step is then skipped as well)."""
    s = _State(request, options.fallback_temperatures(request.temperature),
               language=request.language or only_language(whisper))  # fmt: skip
    known = request.encoding
    if known is not None:
        s.encoded = known.hidden
        if s.language is None and known.language is not None:
            s.language, s.language_probability = known.language, known.language_probability
        if s.language is not None and known.prompt == _prompt_key(whisper, request):
            s.no_speech_prob = known.no_speech_prob
    return s


def _kept(whisper: WhisperModel, s: _State) -> Encoding | None:
    """The finished piece's Encoding when its request asked for it (see keep_encoding_below)."""
    r = s.request
    if (r.language is not None or s.language_probability is None or s.encoded is None
            or s.no_speech_prob is None or s.language_probability >= r.keep_encoding_below):  # fmt: skip
        return None
    hidden = s.encoded
    if hidden.untyped_storage().nbytes() > hidden.nbytes:  # a row of the batch's output: keep only the row
        hidden = hidden.clone()
    return Encoding(hidden, _prompt_key(whisper, r), s.no_speech_prob, s.language, s.language_probability)


def _prompt_key(whisper: WhisperModel, request: PieceRequest) -> tuple[int, ...] | None:
    ids = prompt_ids(whisper, request.prompt, request.hotwords)
    return tuple(ids) if ids else None


class BatchLimits:
    """The most sequences per generate() call that fit, learned per model, device and kind of decode.

    An out-of-memory halves the call; the halved size is remembered, so the next call (the pool's
    shared decoder makes one per round) does not run out of memory again. It grows back slowly:
    after GROW_AFTER calls that fit at the limit, by a quarter, never past what was asked for.
    (Word timestamps keep nothing per step any more: their alignment pass is sized on its own,
    runner/alignment.py, so one limit serves both.)
    """

    GROW_AFTER = 32

    def __init__(self) -> None:
        self._limits: dict[tuple[Any, ...], list[int]] = {}  # key -> [limit, calls that fit at it]
        self._lock = threading.Lock()

    @staticmethod
    def _key(whisper: WhisperModel) -> tuple[Any, ...]:
        return (getattr(whisper, "source", whisper.name), str(getattr(whisper, "device", "")),
                str(getattr(whisper, "dtype", "")))  # fmt: skip

    def rows(self, whisper: WhisperModel, wanted: int) -> int:
        with self._lock:
            entry = self._limits.get(self._key(whisper))
            return min(wanted, entry[0]) if entry else wanted

    def out_of_memory(self, whisper: WhisperModel, rows: int) -> None:
        with self._lock:
            self._limits[self._key(whisper)] = [max(1, rows), 0]

    def fitted(self, whisper: WhisperModel, rows: int) -> None:
        with self._lock:
            entry = self._limits.get(self._key(whisper))
            if entry is None or rows < entry[0]:
                return
            entry[1] += 1
            if entry[1] >= self.GROW_AFTER:
                entry[0], entry[1] = entry[0] + max(1, entry[0] // 4), 0
                log.info("batch limit for %s grows back to %d sequences per call", whisper.name, entry[0])


BATCH_LIMITS = BatchLimits()

# What a CUDA error that leaves the context unusable says (an out-of-memory is not one of them).
_DEVICE_FAILURES = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "CUDNN_STATUS",
                    "unspecified launch failure", "an illegal instruction")


def device_failed(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in _DEVICE_FAILURES))


def check_task_and_language(whisper: WhisperModel, task: str, language: str | None) -> None:
    if not whisper.multilingual:
        if task != "transcribe":
            raise InvalidSpec(f"model {whisper.name!r} is English-only: it cannot translate (use a multilingual model)")
        if language not in (None, "en"):
            raise InvalidSpec(f"model {whisper.name!r} is English-only: language {language!r} is not supported")
    elif language and f"<|{language}|>" not in whisper.lang_to_id:
        raise InvalidSpec(f"model {whisper.name!r} does not know language {language!r}")


def prompt_ids(whisper: WhisperModel, prompt: str | None, hotwords: str | None = None) -> list[int] | None:
    """<|startofprev|>, the hotwords, then the prompt's last tokens, MAX_PROMPT_TOKENS in all.

    The hotwords come first and are kept whole (they are bounded well inside the budget); the
    prompt (and, conditioning on previous text, the piece before) gets the rest, its end kept as
    OpenAI's initial_prompt is. faster-whisper places its hotwords the same way."""
    hot = _text_ids(whisper, hotwords, "spec.hotwords")[:MAX_PROMPT_TOKENS]
    text = _text_ids(whisper, prompt, "spec.prompt")
    room = MAX_PROMPT_TOKENS - len(hot)
    ids = hot + (text[-room:] if room > 0 and text else [])
    if not ids:
        return None
    return [_startofprev(whisper), *ids]


def join_hotwords(terms: Sequence[str]) -> str | None:
    """The terms as the text placed before the prompt: comma-separated, as a list of names reads."""
    kept = [t.strip() for t in terms if t and t.strip()]
    return ", ".join(kept) or None


def _text_ids(whisper: WhisperModel, text: str | None, field: str) -> list[int]:
    """The tokens of " text" (as Whisper's prompt spells it), without <|startofprev|>."""
    if not text or not text.strip():
        return []
    try:
        return [int(t) for t in whisper.processor.get_prompt_ids(text)][1:]
    except ValueError as e:  # special tokens such as <|en|> written in the text
        raise InvalidSpec(f"{field}: {e}") from e


def _startofprev(whisper: WhisperModel) -> int:
    return int(whisper.processor.tokenizer.convert_tokens_to_ids("<|startofprev|>"))


def _verdict(cand: _Candidate, no_speech_prob: float | None, options: DecodeOptions) -> str:
    # OpenAI: an unlikely text where no speech is likely is silence, and stops the fallback.
    if (no_speech_prob or 0.0) > options.no_speech_threshold and cand.avg_logprob < options.logprob_threshold:
        return "no_speech"
    return "ok" if cand.passes(options) else "retry"


def _result(s: _State, cand: _Candidate, verdict: Verdict) -> PieceResult:
    return PieceResult(
        verdict=verdict,
        tokens=cand.tokens,
        token_logprobs=cand.token_logprobs,
        alignment=cand.alignment,
        text=cand.text,
        language=s.language,
        language_probability=s.language_probability,
        temperature=cand.temperature,
        avg_logprob=cand.avg_logprob,
        compression_ratio=cand.compression_ratio,
        no_speech_prob=s.no_speech_prob if s.no_speech_prob is not None else 0.0,
        attempts=s.attempt + 1,
    )


# ------------------------------------------------------- one generate() call


class _BudgetWarning(logging.Filter):
    """_decode_chunk gives every generate() call its token budget (max_new_tokens); transformers
    then warns, once per call, that the checkpoint's max_length is set too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Both `max_new_tokens`")


logging.getLogger("transformers.generation.utils").addFilter(_BudgetWarning())


def _features(whisper: WhisperModel, clips: Sequence[np.ndarray]):
    fe = whisper.processor.feature_extractor
    # On a GPU the STFT runs there too: on CPU it costs ~20 ms per 30 s window per core.
    out = fe(list(clips), sampling_rate=SAMPLE_RATE, return_tensors="pt", device=str(whisper.device))
    return out.input_features.to(whisper.device, whisper.dtype)


def generate_inputs(whisper: WhisperModel, states: Sequence[_State],
                    options: DecodeOptions) -> tuple[dict[str, Any], _TokenScores, int, list[int]]:  # fmt: skip
    """What one generate() call for ``states`` takes (their encoder output, first step and language
    included): its kwargs, the recorder of picked tokens, rows per piece, each piece's mel frames."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.modeling_outputs import BaseModelOutput

    request = states[0].request
    temperature = states[0].temperature
    fresh = [s for s in states if s.encoded is None]
    if fresh:  # the encoder runs once per piece; a retried piece reuses its output
        with torch.inference_mode():
            encoded = whisper.model.model.encoder(_features(whisper, [s.request.clip for s in fresh])).last_hidden_state
        for s, e in zip(fresh, encoded, strict=True):
            s.encoded = e
    encoded = torch.stack([s.encoded for s in states])
    prompt = prompt_ids(whisper, request.prompt, request.hotwords)
    first = [i for i, s in enumerate(states) if s.no_speech_prob is None]
    if first:
        _first_step(whisper, [states[i] for i in first], encoded[first], prompt)

    rows = options.rows(temperature)
    recorder = _TokenScores()
    seen, picked = _recorder_classes()
    kwargs: dict[str, Any] = {
        "encoder_outputs": BaseModelOutput(last_hidden_state=encoded.repeat_interleave(rows, dim=0)),
        "return_timestamps": True,
        # one pass per piece: else generate() seeks on past the last timestamp like long-form audio
        "force_unique_generate_call": True,
        "max_new_tokens": options.token_budget(len(states[0].request.clip) / SAMPLE_RATE),
        "logits_processor": LogitsProcessorList([seen(recorder)]),
        "stopping_criteria": StoppingCriteriaList([picked(recorder)]),
    }
    if temperature > 0:
        kwargs |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_beams": 1}
    else:
        kwargs |= {"do_sample": False, "num_beams": 1}
    if whisper.multilingual:
        kwargs |= {"language": [s.language for s in states for _ in range(rows)], "task": request.task}
    if prompt:
        kwargs["prompt_ids"] = torch.tensor(prompt, device=whisper.device)
    # which mel frames hold audio (generate() wants a mask when its inputs are batched); word
    # timestamps stop at each clip's real end too
    mel_frames = [min(len(s.request.clip) // HOP_LENGTH, N_FRAMES) for s in states]
    frames = torch.tensor([f for f in mel_frames for _ in range(rows)])
    kwargs["attention_mask"] = (torch.arange(N_FRAMES)[None, :] < frames[:, None]).long().to(whisper.device)
    return kwargs, recorder, rows, mel_frames


def _decode_chunk(whisper: WhisperModel, states: Sequence[_State], options: DecodeOptions) -> list[_Candidate]:
    """One generate() call for compatible pieces (same task, prompt, word flag, temperature)."""
    import torch

    request, temperature = states[0].request, states[0].temperature
    kwargs, recorder, rows, mel_frames = generate_inputs(whisper, states, options)
    # No return_token_timestamps: it keeps every step's cross-attention of every row (see ifw.runner.alignment).
    with torch.inference_mode(), _seeded(whisper.device, temperature > 0, options.sampling_seed):
        whisper.model.generate(**kwargs)

    prefix = recorder.prefix
    ids = recorder.ids[:, prefix:].tolist()
    logprobs = torch.stack(recorder.logprobs, dim=1).tolist()
    candidates, kept_rows = [], []
    for p in range(len(states)):
        samples = [_candidate(whisper, ids[r], logprobs[r], temperature, options)
                   for r in range(p * rows, (p + 1) * rows)]  # fmt: skip
        passing = [k for k, c in enumerate(samples) if c.passes(options)] or range(rows)
        best = max(passing, key=lambda k: samples[k].avg_logprob)
        candidates.append(samples[best])
        kept_rows.append(p * rows + best)
    if request.word_timestamps:
        encoded = torch.stack([s.encoded for s in states])  # kept on the states by generate_inputs
        _align(whisper, states, candidates, recorder.ids[kept_rows, :prefix].tolist(), mel_frames, encoded, options)
    return candidates


def _align(whisper: WhisperModel, states: Sequence[_State], candidates: list[_Candidate], starts: list[list[int]],
           mel_frames: list[int], encoded, options: DecodeOptions) -> None:  # fmt: skip
    """Word timestamps: the alignment heads' attention over each candidate that will be kept with
    text (verdict ok; a retried, silent or failed one has no words), from one teacher-forced pass."""
    ok = [p for p, c in enumerate(candidates) if _verdict(c, states[p].no_speech_prob, options) == "ok"]
    if not ok:
        return
    rows = []
    for p in ok:
        c = candidates[p]
        # generate() never feeds back its last token: an unended decode times all but its last
        fed = c.tokens if c.ended else c.tokens[:-1]
        rows.append((starts[p] + fed, len(starts[p]), mel_frames[p] // 2))
    for p, matrix in zip(ok, alignment.matrices(whisper, encoded[ok], rows), strict=True):
        candidates[p].alignment = matrix


def _first_step(whisper: WhisperModel, states: Sequence[_State], encoded, prompt: list[int] | None) -> None:
    """Once per piece: its no-speech probability and, when asked, its language (one decoder step)."""
    import torch

    gc = whisper.model.generation_config
    sot = gc.decoder_start_token_id

    def next_token_logits(prefix: list[int]):
        ids = torch.tensor([prefix] * len(states), device=whisper.device)
        with torch.inference_mode():
            out = whisper.model(encoder_outputs=(encoded,), decoder_input_ids=ids, use_cache=False)
        return out.logits[:, -1].float()

    logits = next_token_logits([*(prompt or []), sot])
    # OpenAI: the probability of <|nospeech|> right after <|startoftranscript|>
    no_speech = torch.softmax(logits, dim=-1)[:, gc.no_timestamps_token_id - 1].tolist()
    detect = [i for i, s in enumerate(states) if s.language is None]
    if detect:
        if prompt:  # the language is detected on the audio alone, as OpenAI does
            logits = next_token_logits([sot])
        lang_tokens = list(whisper.lang_to_id)
        lang_ids = torch.tensor([whisper.lang_to_id[t] for t in lang_tokens], device=whisper.device)
        probs = torch.softmax(logits[:, lang_ids], dim=-1)
        best_p, best = probs.max(dim=-1)
        for i in detect:
            states[i].language = lang_tokens[int(best[i])].strip("<|>")
            states[i].language_probability = float(best_p[i])
    for s, p in zip(states, no_speech, strict=True):
        s.no_speech_prob = float(p)


def _candidate(whisper: WhisperModel, generated: list[int], logprobs: list[float], temperature,
               options: DecodeOptions) -> _Candidate:  # fmt: skip
    eot = whisper.eot
    if eot in generated:
        end = generated.index(eot)
        tokens, scored, ended = generated[:end], logprobs[: end + 1], True  # the end token's log-prob counts
    else:
        tokens, scored, ended = generated, logprobs, False
    words = [t for t in tokens if t < eot]
    text = whisper.processor.tokenizer.decode(words)
    return _Candidate(
        tokens=tokens,
        token_logprobs=logprobs[: len(tokens)],
        alignment=None,  # _align, for the candidates kept with text
        text=text,
        avg_logprob=sum(scored) / max(1, len(scored)),
        compression_ratio=compression_ratio(text),
        looping=is_looping(words, options.loop_min_tokens),
        ended=ended,
        temperature=temperature,
    )


@contextmanager
def _seeded(device, sampling: bool, seed: int):
    """Sampled decodes start from a fixed seed, and leave the process's random state as it was."""
    if not sampling:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
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
