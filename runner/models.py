"""The Whisper model: which device, dtype and attention, where the weights come from, loading once per process.

IFW_DTYPE (auto: float16 on CUDA, float32 on CPU; IFW_CPU_INT8=true adds int8 Linear layers to
float32 on CPU) and IFW_ATTENTION (auto: PyTorch SDPA; see the README's settings) choose how it
runs. The attention is proven at load: one real forward pass (the encoder on a second of silence,
one decoder step); one that fails falls back flash_attention_2 -> sdpa -> eager, saying why, so
a broken CUDA extension fails the load, not every job. torch's threads are pinned to the pod's
cores on every device. A loaded model's token-suppression steps are swapped for ones that keep
their mask (see _keep_suppression_masks).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge

from ifw.runner import vad, weights
from ifw.runner.errors import InvalidSpec, ModelHubUnavailable, ModelLoadFailed

if TYPE_CHECKING:
    import torch

    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)

# The fallback order: a failing attention gives way to the next one.
ATTENTIONS = ("flash_attention_2", "sdpa", "eager")

MODEL_INFO = Gauge("ifw_runner_model_info", "A loaded Whisper model and what it runs with (always 1).",
                   ["model", "device", "dtype", "attention"])  # fmt: skip
MODEL_LOAD_SECONDS = Gauge("ifw_runner_model_load_seconds",
                           "Seconds the model took to load: weights, move to the device, attention proof.",
                           ["model"])  # fmt: skip


@dataclass
class WhisperModel:
    name: str  # as asked for (spec.model or the default)
    source: str  # what from_pretrained loaded: a folder or a hub id
    model: Any  # WhisperForConditionalGeneration
    processor: Any  # WhisperProcessor
    device: torch.device
    dtype: torch.dtype
    int8: bool = False  # Linear layers dynamically quantized (CPU)
    attention: str = "sdpa"  # the attn_implementation proven to run at load
    decoder_cache: str = "dynamic"  # RunnerSettings.decoder_cache, as set by use_decoder_cache

    @property
    def dtype_name(self) -> str:
        """As reported (processed_by, metrics): float32, float16, bfloat16, or int8 (int8 Linear layers, fp32 rest)."""
        return "int8" if self.int8 else str(self.dtype).removeprefix("torch.")

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    @property
    def lang_to_id(self) -> dict[str, int]:
        return dict(getattr(self.model.generation_config, "lang_to_id", None) or {})

    @property
    def eot(self) -> int:
        """The end-of-text token."""
        eos = self.model.generation_config.eos_token_id
        return eos if isinstance(eos, int) else eos[0]


def only_language(whisper: WhisperModel) -> str | None:
    """The language an English-only model decodes in; None for a multilingual one (detect it)."""
    return None if whisper.multilingual else "en"


def select_device(settings: RunnerSettings) -> torch.device:
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadFailed("IFW_DEVICE=cuda but no CUDA device is visible to this process")
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def select_dtype(settings: RunnerSettings, device: torch.device) -> torch.dtype:
    """IFW_DTYPE; auto: float16 on CUDA, float32 on CPU (fp16 matmuls are slow or missing there)."""
    import torch

    if settings.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, settings.dtype)


def pin_cpu_threads(settings: RunnerSettings) -> int:
    """Use the cores this process may run on (or cpu_threads); more threads than cores thrash.

    On a GPU pod too: its host-side work (features, the generate() loop) would else start one
    thread per core of the node, not of the pod's CPU quota."""
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


_models: dict[tuple[str, str, bool], WhisperModel] = {}
_models_lock = threading.Lock()


def load_model(name: str, settings: RunnerSettings) -> WhisperModel:
    """Load (once per process) the Whisper model `name` on the configured device, dtype and attention."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    device = select_device(settings)
    dtype = select_dtype(settings, device)
    source = resolve_model(name, settings)
    int8 = device.type == "cpu" and settings.cpu_int8 and dtype == torch.float32
    key = (source, str(device), str(dtype), int8, settings.attention, settings.decoder_cache)
    with _models_lock:
        if key in _models:
            return _models[key]
        if device.type == "cpu" and settings.cpu_int8 and not int8:
            log.warning("IFW_CPU_INT8 applies to float32 only: %s runs in %s without int8 layers", name, settings.dtype)
        threads = pin_cpu_threads(settings)
        started = time.monotonic()
        order = attention_order(settings.attention)
        try:
            # Loaded with a torch-native attention; the requested one is switched on and proven below.
            model = WhisperForConditionalGeneration.from_pretrained(
                source, dtype=dtype, attn_implementation="eager" if order[0] == "eager" else "sdpa"
            )
            processor = WhisperProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadFailed(f"could not load Whisper model {name!r} from {source}: {e}") from e
        model.to(device).eval()
        if model.generation_config.is_multilingual and not getattr(model.generation_config, "task", None):
            model.generation_config.task = "transcribe"  # else it may loop when no language is given
        if int8:
            model = _quantize_int8(model)
        _keep_suppression_masks(model)
        whisper = WhisperModel(name, source, model, processor, device, dtype, int8)
        whisper.attention = choose_attention(whisper, order)
        use_decoder_cache(whisper, settings.decoder_cache)
        seconds = time.monotonic() - started
        MODEL_INFO.labels(name, device.type, whisper.dtype_name, whisper.attention).set(1)
        MODEL_LOAD_SECONDS.labels(name).set(seconds)
        log.info("loaded %s from %s in %.1f s: device %s, dtype %s, attention %s, %s decoder cache, %d torch threads",
                 name, source, seconds, _describe_device(device), whisper.dtype_name, whisper.attention,
                 whisper.decoder_cache, threads)  # fmt: skip
        _models[key] = whisper
        return whisper


def use_decoder_cache(whisper: WhisperModel, cache: str) -> None:
    """Set the KV cache generate() decodes with (RunnerSettings.decoder_cache).

    static: transformers allocates the cache once per generate() call at its token budget instead of
    growing it every step; compile: also torch.compile the decoder step (generate() does it itself on
    CUDA, and replays CUDA graphs; on CPU it has to be asked for). Each new batch shape compiles again."""
    gc = whisper.model.generation_config
    whisper.decoder_cache = cache
    if cache == "dynamic":
        gc.cache_implementation = None
        return
    gc.cache_implementation = "static"
    gc.disable_compile = cache == "static"
    if cache == "compile" and whisper.device.type != "cuda":
        from transformers import CompileConfig

        gc.compile_config = CompileConfig()
        gc.compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told


def _describe_device(device: torch.device) -> str:
    import torch

    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda ({torch.cuda.get_device_name(device)}, sm{major}{minor})"


def attention_order(requested: str) -> list[str]:
    """The attentions to try, best first: the requested one and those after it in ATTENTIONS.

    auto is SDPA on every device: on sm80+ GPUs PyTorch's SDPA runs its own FlashAttention-2
    (or cuDNN) kernels for Whisper's unmasked fp16/bf16 attention, without the flash_attn
    extension's ABI ties to one torch build (runner/README.md, Settings)."""
    first = "sdpa" if requested == "auto" else requested
    return list(ATTENTIONS[ATTENTIONS.index(first) :])


def choose_attention(whisper: WhisperModel, order: list[str]) -> str:
    """The first attention in `order` that runs this model here; ModelLoadFailed when none does."""
    failures = []
    for i, attention in enumerate(order):
        why = _unfit(attention, whisper.device, whisper.dtype) or _prove(whisper, attention)
        if why is None:
            return attention
        failures.append(f"{attention}: {why}")
        then = f"falling back to {order[i + 1]}" if i + 1 < len(order) else "no attention left"
        log.warning("%s: attention %s does not run here (%s); %s", whisper.name, attention, why, then)
    raise ModelLoadFailed(f"Whisper model {whisper.name!r} runs with no attention implementation on "
                          f"{whisper.device} in {whisper.dtype_name}: {'; '.join(failures)}")  # fmt: skip


def _unfit(attention: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `attention` cannot run here, known without trying (FlashAttention-2's requirements); else None."""
    import torch

    if attention != "flash_attention_2":
        return None
    if device.type != "cuda":
        return "FlashAttention-2 needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-2 needs float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"FlashAttention-2 needs compute capability 8.0 or newer (Ampere+), this GPU has {major}.{minor}"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed"
    return None


def _prove(whisper: WhisperModel, attention: str) -> str | None:
    """Why `attention` failed a real forward pass of this model; None when it ran."""
    import torch

    try:
        _forward_with(whisper, attention)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # not the attention's fault: the load fails as it would without the proof (retried)
    except Exception as e:  # noqa: BLE001 - a broken CUDA extension raises anything: RuntimeError, ImportError, OSError
        message = " ".join(str(e).split())
        return f"{type(e).__name__}: {message[:300]}"
    return None


def _forward_with(whisper: WhisperModel, attention: str) -> None:
    """Switch the model to `attention`; run the encoder on a second of silence and one decoder step."""
    import numpy as np
    import torch

    from ifw.runner.audio import SAMPLE_RATE

    model = whisper.model
    model.set_attn_implementation(attention)
    features = whisper.processor.feature_extractor(np.zeros(SAMPLE_RATE, np.float32), sampling_rate=SAMPLE_RATE,
                                                   return_tensors="pt").input_features  # fmt: skip
    start = torch.tensor([[model.config.decoder_start_token_id]], device=whisper.device)
    with torch.inference_mode():
        logits = model(input_features=features.to(whisper.device, whisper.dtype), decoder_input_ids=start).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the forward pass gave non-finite logits in {whisper.dtype_name}")


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
