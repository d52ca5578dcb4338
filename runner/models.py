"""The Whisper model: which device, where the weights come from, loading once per process.

GPU runs fp16 with FlashAttention-2 when `flash_attn` is installed, else PyTorch SDPA; CPU
runs fp32 on pinned threads (IFW_CPU_INT8=true: int8 Linear layers, faster). A loaded model's
token-suppression steps are swapped for ones that keep their mask (see _keep_suppression_masks).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ifw.runner import vad, weights
from ifw.runner.errors import InvalidSpec, ModelHubUnavailable, ModelLoadFailed

if TYPE_CHECKING:
    import torch

    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)


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
