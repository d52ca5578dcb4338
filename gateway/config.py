"""Gateway configuration, from the environment (env prefix IFW_GATEWAY_).

The original API's variables work as they did: `ADMIN_KEY` as IFW_GATEWAY_ADMIN_KEY, and
`HF_TOKEN` turns diarization on (on one machine the gateway and the runner share the env);
IFW_GATEWAY_DIARIZATION_AVAILABLE, when set, decides instead (the Helm chart sets it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from ifw.core.settings import EnvNamed


class GatewaySettings(EnvNamed):
    model_config = SettingsConfigDict(env_prefix="IFW_GATEWAY_", extra="ignore")

    # --- HTTP server ---
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line, with task_id.")

    # --- Kubernetes ---
    namespace: str = Field("default", description="Where TranscriptionJobs are created and watched.")
    kube_threads: int = Field(
        32, ge=1, le=512, description="Threads (and pooled connections) used for calls to the kube-apiserver."
    )
    watch_server_timeout: int = Field(
        240, ge=10, description="Seconds the apiserver keeps one watch open before we resume it (stale watches)."
    )
    kube_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest one Kubernetes API call waits for a free connection (a burst queues), and then "
        "for its answer; then 503 \"the Kubernetes API is unavailable\" (an unreachable apiserver or a "
        "stalled etcd must not hold requests for a minute).",
    )
    readiness_timeout_seconds: float = Field(
        3.0, gt=0, description="Longest /readyz waits for the apiserver (below the probe's timeoutSeconds)."
    )
    delete_propagation: Literal["Background", "Foreground"] = Field(
        "Background", description="How DELETE /cancel removes the TranscriptionJob's children (its batch/v1 Job, pods)."
    )

    # --- auth ---
    admin_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("IFW_GATEWAY_ADMIN_KEY", "ADMIN_KEY"),
        description="When set, every API route requires the header x-admin-api-key with this value.",
    )
    tenant_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Optional multi-tenancy: JSON {"<namespace>": "<key>"}; a request carrying that key '
        "works in that namespace only. The admin key keeps the default namespace.",
    )

    # --- TranscriptionJob defaults ---
    diarization_available: bool | None = Field(
        None,
        description="The runners have diarization configured (the chart's diarization.enabled). "
        "Unset: true exactly when HF_TOKEN is set, as in the original API.",
    )
    hf_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("IFW_GATEWAY_HF_TOKEN", "HF_TOKEN"),
        description="Only its presence counts (diarization_available); the gateway never uses the token.",
    )
    default_model: str | None = Field(None, description="spec.model when the request names none.")
    allowed_models: list[str] = Field(
        default_factory=list,
        description="The models jobs may name (the operator's default model and the runners' allowed ones); "
        "listed by GET /v1/models. Empty: not known here, any model is passed on to the runner to judge.",
    )
    model_aliases: dict[str, str | None] = Field(
        default_factory=lambda: {"whisper-1": None, "gpt-4o-transcribe-diarize": None},
        description="OpenAI model names mapped to a spec.model (null: the default model).",
    )
    queue_name: str | None = Field(None, description="Kueue LocalQueue put on every TranscriptionJob.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="spec.activeDeadlineSeconds of every TranscriptionJob.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="spec.ttlSecondsAfterFinished; also how long /status keeps returning the output."
    )
    url_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs allowed in url although private or loopback: the runner's "
        "IFW_FETCH_ALLOWLIST (the chart gives the gateway that very list).",
    )
    webhook_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs allowed in webhook.url although private or loopback: the operator's "
        "webhook allowlist (the chart gives the gateway operator.webhook.allowlist).",
    )

    # --- sync requests ---
    sync_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="Cap on how long a sync request waits (then 504 with the task_id to poll). Unset: as long "
        "as the job runs, like the original API (the job's activeDeadlineSeconds bounds it).",
    )
    keepalive_seconds: float = Field(
        30.0,
        ge=0,
        description="A sync JSON answer not ready after this long starts as 200 and sends a space every "
        "keepalive_seconds until the JSON body, so proxies keep the connection; 0: never.",
    )
    shutdown_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM the waiting sync requests are answered at once (503, their task goes on); "
        "other requests in flight get this long to finish before they are cut.",
    )
    cancel_on_disconnect: bool = Field(
        False, description="Delete the TranscriptionJob when a sync client disconnects before the result is ready."
    )

    # --- request size ---
    max_json_bytes: int = Field(64 * 1024, ge=1024, description="Largest JSON body accepted.")
    max_upload_bytes: int = Field(
        512 * 1024**2, ge=1024, description="Largest multipart upload accepted (the OpenAI API allows 25 MB)."
    )

    # --- uploads: stored by the gateway and served to the runner with a token per upload ---
    internal_url: str | None = Field(
        None,
        description="Base URL under which runner pods reach this gateway (e.g. http://ifw-gateway.ifw.svc:8000). "
        "Unset: uploads are refused with 503.",
    )
    upload_dir: Path = Field(Path("/tmp/ifw-uploads"), description="Volume where uploads wait for their runner.")

    @model_validator(mode="after")
    def _diarization(self) -> GatewaySettings:
        if self.diarization_available is None:
            self.diarization_available = self.hf_token is not None
        return self

    @field_validator("internal_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    def namespaces(self) -> list[str]:
        """Every namespace the gateway serves (one watch each)."""
        return sorted({self.namespace, *self.tenant_keys})


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()
