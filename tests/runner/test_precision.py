"""The dtype and the attention a runner really runs with: IFW_DTYPE, the attention proven at load
(and its fallback), the metrics and processed_by that report them.

float16 and bfloat16 run here on CPU (torch has both), on the real Harvard conversation, against
float32. Measured (tiny.en, CPU, 2 threads): the same text, word for word, for every Harvard
sentence and the conversation; the conversation's 10 chunk timestamps identical, its 73 word
times within 0.02 s (bfloat16; float16 identical). The tests allow one word and 0.1 s.
"""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from pydantic import ValidationError

from ifw.core import results
from ifw.core.contract import Runtime
from ifw.core.transcript import ProcessedBy, Transcript
from ifw.crds.transcriptionjob import TranscriptionJobSpec
from ifw.runner import asr, execute, models, pipeline
from ifw.runner.config import RunnerSettings
from ifw.runner.errors import ModelLoadFailed

pytestmark = pytest.mark.model


def settings(**kw) -> RunnerSettings:
    return RunnerSettings(**{"default_model": "tiny.en", "device": "cpu", "cpu_threads": 2, **kw})


def info(model: str, dtype: str, attention: str) -> float | None:
    labels = {"model": model, "device": "cpu", "dtype": dtype, "attention": attention}
    return REGISTRY.get_sample_value("ifw_runner_model_info", labels)


@pytest.fixture
def fresh(monkeypatch):
    """No model loaded yet in this process, no model reported."""
    monkeypatch.setattr(models, "_models", {})
    models.MODEL_INFO.clear()
    yield
    models.MODEL_INFO.clear()


# ------------------------------------------------------------ (a) half precision on real speech


@pytest.fixture(scope="module")
def float32_run(conversation):
    return asr.transcribe(conversation.audio(), models.load_model("tiny.en", settings()), batch_size=8)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_real_speech_matches_float32(conversation, float32_run, wer, dtype):
    whisper = models.load_model("tiny.en", settings(dtype=dtype))
    assert next(whisper.model.parameters()).dtype == getattr(torch, dtype)
    t = asr.transcribe(conversation.audio(), whisper, batch_size=8)
    ref = float32_run
    words = len(ref.text.split())
    # at most one word differs from float32 (measured: none), and no worse against what was said
    assert wer(ref.text, t.text) <= 1 / words, (ref.text, t.text)
    assert wer(conversation.text, t.text) <= wer(conversation.text, ref.text) + 1 / words, t.text
    # the same chunks, each starting and ending within 0.1 s of float32's (measured: identical)
    assert len(t.segments) == len(ref.segments) == len(conversation.utterances)
    for a, b in zip(ref.segments, t.segments, strict=True):
        assert abs(a.start - b.start) <= 0.1 and abs(a.end - b.end) <= 0.1, (a, b)
    assert t.dropped_pieces == 0 and t.text_seconds == pytest.approx(ref.text_seconds, abs=0.1)


def test_a_static_decoder_cache_decodes_real_speech_as_the_dynamic_one(conversation, float32_run):
    """IFW_DECODER_CACHE=static: transformers' StaticCache in every generate() call, the same tokens."""
    whisper = models.load_model("tiny.en", settings(decoder_cache="static"))
    assert whisper.decoder_cache == "static" and whisper.model.generation_config.cache_implementation == "static"
    t = asr.transcribe(conversation.audio(), whisper, batch_size=8)
    assert [(s.start, s.end, s.text) for s in t.segments] == [(s.start, s.end, s.text) for s in float32_run.segments]
    with pytest.raises(ValidationError, match="decoder_cache"):
        settings(decoder_cache="paged")


# ------------------------------------------------------------ (b) the attention, proven at load


def test_flash_attention_on_cpu_falls_back_to_sdpa_and_says_why(fresh, caplog):
    with caplog.at_level(logging.WARNING, logger="ifw.runner.models"):
        whisper = models.load_model("tiny.en", settings(attention="flash_attention_2"))
    assert whisper.attention == "sdpa" and whisper.model.config._attn_implementation == "sdpa"
    assert "flash_attention_2 does not run here (FlashAttention-2 needs a CUDA device); falling back to sdpa" in caplog.text
    assert info("tiny.en", "float32", "sdpa") == 1 and info("tiny.en", "float32", "flash_attention_2") is None
    assert REGISTRY.get_sample_value("ifw_runner_model_load_seconds", {"model": "tiny.en"}) > 0


def test_a_flash_attention_that_breaks_at_the_first_forward_falls_back(fresh, monkeypatch, caplog):
    """As on a GPU whose flash_attn was built against another torch: it imports, then the first
    encoder call raises. Also the ImportError transformers raises when flash_attn is missing."""
    real = models._forward_with
    tried = []

    def broken_extension(whisper, attention):
        tried.append(attention)
        if attention == "flash_attention_2":
            raise RuntimeError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
        return real(whisper, attention)

    monkeypatch.setattr(models, "_unfit", lambda *args: None)  # as if on an sm80+ GPU with flash_attn installed
    monkeypatch.setattr(models, "_forward_with", broken_extension)
    with caplog.at_level(logging.WARNING, logger="ifw.runner.models"):
        whisper = models.load_model("tiny.en", settings(dtype="bfloat16", attention="flash_attention_2"))
    assert tried == ["flash_attention_2", "sdpa"] and whisper.attention == "sdpa"
    assert "RuntimeError: flash_attn_2_cuda.so: undefined symbol" in caplog.text
    assert info("tiny.en", "bfloat16", "sdpa") == 1

    # transformers' own check, for real: flash_attn is not installed here
    monkeypatch.setattr(models, "_forward_with", real)
    monkeypatch.setattr(models, "_models", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ifw.runner.models"):
        assert models.load_model("tiny.en", settings(dtype="bfloat16", attention="flash_attention_2")).attention == "sdpa"
    assert "ImportError" in caplog.text and "falling back to sdpa" in caplog.text


def test_sdpa_failing_falls_back_to_eager(fresh, monkeypatch):
    real = models._forward_with

    def no_sdpa(whisper, attention):
        if attention == "sdpa":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(whisper, attention)

    monkeypatch.setattr(models, "_forward_with", no_sdpa)
    whisper = models.load_model("tiny.en", settings())
    assert whisper.attention == "eager" and whisper.model.model.encoder.config._attn_implementation == "eager"
    assert info("tiny.en", "float32", "eager") == 1 and info("tiny.en", "float32", "sdpa") is None
    # and it transcribes with it
    assert asr.transcribe(np.zeros(16000, np.float32), whisper).text == ""


def test_no_attention_that_runs_is_a_clear_model_load_failure(fresh, monkeypatch):
    def nothing_runs(whisper, attention):
        raise ImportError(f"cannot import the {attention} kernels")

    monkeypatch.setattr(models, "_forward_with", nothing_runs)
    with pytest.raises(ModelLoadFailed) as failed:
        models.load_model("tiny.en", settings(attention="flash_attention_2"))
    message = failed.value.message
    assert "'tiny.en' runs with no attention implementation on cpu in float32" in message
    assert "flash_attention_2: FlashAttention-2 needs a CUDA device" in message
    assert "sdpa: ImportError: cannot import the sdpa kernels" in message and "eager: ImportError" in message
    assert not models._models and info("tiny.en", "float32", "sdpa") is None


def test_out_of_memory_in_the_proof_is_not_blamed_on_the_attention(fresh, monkeypatch):
    def oom(whisper, attention):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(models, "_forward_with", oom)
    with pytest.raises(torch.OutOfMemoryError):  # transient: retried, not a bad-input ModelLoadFailed
        models.load_model("tiny.en", settings())


def test_fallback_order():
    assert models.attention_order("auto") == ["sdpa", "eager"]
    assert models.attention_order("flash_attention_2") == ["flash_attention_2", "sdpa", "eager"]
    assert models.attention_order("eager") == ["eager"]


# ------------------------------------------------------------ (c) IFW_DTYPE


def test_dtype_setting_is_validated_and_read_from_the_env(monkeypatch):
    assert RunnerSettings.env_var("dtype") == "IFW_DTYPE" and RunnerSettings.env_var("attention") == "IFW_ATTENTION"
    monkeypatch.setenv("IFW_DTYPE", "bfloat16")
    monkeypatch.setenv("IFW_ATTENTION", "eager")
    assert RunnerSettings().dtype == "bfloat16" and RunnerSettings().attention == "eager"
    monkeypatch.setenv("IFW_DTYPE", "fp8")
    with pytest.raises(ValidationError) as bad:
        RunnerSettings()
    assert bad.value.errors()[0]["loc"] == ("dtype",) and "float16" in str(bad.value)
    monkeypatch.delenv("IFW_DTYPE")
    monkeypatch.setenv("IFW_ATTENTION", "flash")
    with pytest.raises(ValidationError) as bad:
        RunnerSettings()
    assert bad.value.errors()[0]["loc"] == ("attention",)


def test_auto_dtype_per_device():
    auto = settings()
    assert models.select_dtype(auto, torch.device("cpu")) == torch.float32
    assert models.select_dtype(auto, torch.device("cuda")) == torch.float16
    assert models.select_dtype(settings(dtype="bfloat16"), torch.device("cuda")) == torch.bfloat16


def test_float16_on_cpu_loads_float16_weights_and_int8_stays_float32_only(fresh, caplog):
    with caplog.at_level(logging.WARNING, logger="ifw.runner.models"):
        whisper = models.load_model("tiny.en", settings(dtype="float16", cpu_int8=True))
    assert not whisper.int8 and "IFW_CPU_INT8 applies to float32 only" in caplog.text
    assert whisper.dtype == torch.float16 and whisper.dtype_name == "float16"
    assert {p.dtype for p in whisper.model.parameters()} == {torch.float16}
    assert info("tiny.en", "float16", "sdpa") == 1
    int8 = models.load_model("tiny.en", settings(cpu_int8=True))
    assert int8.int8 and int8.dtype_name == "int8" and info("tiny.en", "int8", "sdpa") == 1


def test_torch_threads_are_pinned_on_a_gpu_pod_too(monkeypatch):
    """load_model pins threads before it looks at the device: CUDA faked, the pin is what counts."""
    pinned = []
    monkeypatch.setattr(models, "select_device", lambda s: torch.device("cuda"))
    monkeypatch.setattr(models, "pin_cpu_threads", lambda s: pinned.append(s.cpu_threads) or s.cpu_threads)
    monkeypatch.setattr(models, "resolve_model", lambda name, s: "/nonexistent")
    monkeypatch.setattr(models, "_models", {})
    with pytest.raises(ModelLoadFailed):  # no such folder: fails after the pin
        models.load_model("tiny.en", settings(cpu_threads=3))
    assert pinned == [3]
    # and pin_cpu_threads itself takes the cgroup quota when cpu_threads is not set
    monkeypatch.undo()
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(models.vad, "usable_cpus", lambda: 1)
        assert models.pin_cpu_threads(RunnerSettings(device="cuda")) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------ (d) processed_by


class FakeAttempt(execute.Attempt):
    runtime = Runtime.Job

    def __init__(self, audio: np.ndarray):
        self.samples = audio
        self.finished: dict | None = None

    def write(self, status):
        pass

    def fail(self, failure):
        raise AssertionError(failure)

    def finish(self, final):
        self.finished = final

    def audio(self, spec, settings):
        return self.samples

    @property
    def processed_by(self) -> ProcessedBy:
        return ProcessedBy(pod="tj-talk-runner-x7k2p", node="gpu-node-3", runtime="Job")


def test_processed_by_says_how_the_model_ran_through_a_real_run(harvard, monkeypatch):
    from tests.runner.conftest import read_wav

    audio = read_wav(harvard[0].path)
    spec = TranscriptionJobSpec.model_validate({"audio": {"url": "https://example.com/a.wav"}, "model": "tiny.en"})
    t = pipeline.run(spec, audio, settings())
    assert t.processed_by == ProcessedBy(device="cpu", dtype="float32", attention="sdpa")

    # the runtime adds who ran it; the stored result carries both
    stored = []
    monkeypatch.setattr(results, "store_result", lambda transcript, *a, **k: stored.append(transcript) or {"ref": "x"})
    tj = {"metadata": {"namespace": "ns", "name": "talk", "uid": "u1"},
          "spec": {"audio": {"url": "https://example.com/a.wav"}, "model": "tiny.en"}}  # fmt: skip
    attempt = FakeAttempt(audio)
    execute.transcribe(tj, attempt, settings(), results.ResultSettings(), core_v1=None)
    assert attempt.finished is not None and "small dog" in stored[0].text.lower()
    by = results.decode(results.encode(stored[0])).processed_by
    assert by == ProcessedBy(pod="tj-talk-runner-x7k2p", node="gpu-node-3", runtime="Job",
                             device="cpu", dtype="float32", attention="sdpa")  # fmt: skip


def test_a_result_stored_before_these_fields_still_loads():
    old = {"text": " Hello.", "segments": [{"start": 0.0, "end": 1.0, "text": " Hello."}], "model": "tiny.en",
           "processed_by": {"pod": "tj-x-runner-abcde", "node": "gpu-1", "runtime": "Job"}}  # fmt: skip
    t = results.decode(gzip.compress(json.dumps(old).encode()))
    assert t.processed_by == ProcessedBy(pod="tj-x-runner-abcde", node="gpu-1", runtime="Job")
    assert t.processed_by.device is None and t.processed_by.dtype is None and t.processed_by.attention is None
    from ifw.core import formats

    # the answers' processed_by keeps the original shape for it; a new one adds the three
    assert formats.processed_by(t) == {"pod": "tj-x-runner-abcde", "node": "gpu-1", "runtime": "Job"}
    t.processed_by = t.processed_by.model_copy(update={"device": "cuda", "dtype": "float16", "attention": "sdpa"})
    assert formats.processed_by(Transcript.model_validate_json(t.model_dump_json()))["attention"] == "sdpa"
