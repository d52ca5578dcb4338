"""Operator configuration: a YAML file (the ConfigMap the Helm chart renders) plus env overrides.

Sources, highest priority first:

1. environment variables with the prefix ``IFW_OPERATOR_`` (nested fields with ``__``:
   ``IFW_OPERATOR_RUNNER__IMAGE=...``, ``IFW_OPERATOR_MAX_ACTIVE_JOBS=4``);
   secrets such as the webhook signing key come this way, from a Secret;
2. the YAML file named by ``IFW_OPERATOR_CONFIG_FILE`` (default ``/etc/ifw/operator.yaml``,
   ignored when absent);
3. the defaults below.

File format: the keys are the field names below in snake_case; values that are Kubernetes
objects (``resources``, ``tolerations``, ``affinity``, ``security_context``, ``volume``, ...)
are written verbatim in Kubernetes' own camelCase. Example::

    max_active_jobs: 8
    max_active_jobs_per_namespace: 4
    default_ttl_seconds_after_finished: 86400
    startup_deadline_seconds: 900
    runner:
      image: ghcr.io/example/ifw-runner:0.1.0
      resources:
        requests: {cpu: "4", memory: 16Gi}
        limits: {nvidia.com/gpu: "1", memory: 32Gi}
      node_selector: {nvidia.com/gpu.present: "true"}
      tolerations:
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      runtime_class_name: nvidia
      model_cache:
        volume: {persistentVolumeClaim: {claimName: whisper-models, readOnly: true}}
      hf_token_secret: {name: hf-token, key: token}
      env:
        IFW_DEFAULT_MODEL: openai/whisper-large-v3
    webhook:
      timeout_seconds: 10
      max_attempts: 5
      allowlist: [10.0.0.0/8]          # private receivers webhooks may reach (SSRF guard)
    sharding:                          # spec.parallelism: what Auto means, the least audio per shard
      auto_above_seconds: 1800
      min_shard_seconds: 300
      max_shards: 8
    gitops:                            # how a job kept in the cluster by Argo CD / Flux is recognised
      labels: [app.kubernetes.io/instance, kustomize.toolkit.fluxcd.io/name, helm.toolkit.fluxcd.io/name]
      annotations: [argocd.argoproj.io/tracking-id]
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ifw.core.contract import DEFAULT_MODEL, RUNNER_COMMAND

CONFIG_FILE_ENV = "IFW_OPERATOR_CONFIG_FILE"
DEFAULT_CONFIG_FILE = Path("/etc/ifw/operator.yaml")

# Pod and container security defaults: the "restricted" Pod Security Standard.
DEFAULT_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretKey(_Section):
    """One key of a Secret in the TranscriptionJob's namespace (pods can only read their own namespace)."""

    name: str
    key: str
    optional: bool = Field(True, description="Start the pod even when the Secret is missing.")


class ModelCache(_Section):
    """Where the runner finds Whisper / pyannote weights (mounted at HF_HOME)."""

    mount_path: str = "/models"
    volume: dict[str, Any] | None = Field(
        None,
        description="A Kubernetes volume source without its name, e.g. {persistentVolumeClaim: {claimName: x}} "
        "or {hostPath: {path: /var/cache/hf}}. None: an emptyDir (weights downloaded per pod).",
    )
    read_only: bool = True
    hub_offline: bool = Field(True, description="HF_HUB_OFFLINE=1: a warm cache makes no network calls.")


class RunnerPod(_Section):
    """The pod template of every runner Job."""

    image: str = "ghcr.io/ifw/ifw-runner:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    command: list[str] = Field(default_factory=lambda: list(RUNNER_COMMAND))
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"nvidia.com/gpu": "1", "memory": "32Gi"},
        },
        description="Container resources, Kubernetes shape. GPUs are limits (nvidia.com/gpu).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    affinity: dict[str, Any] | None = None
    runtime_class_name: str | None = None
    priority_class_name: str | None = None
    pod_security_context: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_POD_SECURITY_CONTEXT))
    security_context: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_CONTAINER_SECURITY_CONTEXT))
    termination_grace_period_seconds: int = Field(30, ge=0)
    work_dir: str = Field("/tmp/ifw", description="Scratch emptyDir for downloads (IFW_WORK_DIR).")
    work_dir_size_limit: str | None = Field("20Gi", description="emptyDir sizeLimit of the scratch space.")
    model_cache: ModelCache = Field(default_factory=ModelCache)
    hf_token_secret: SecretKey | None = Field(None, description="HF_TOKEN for gated pyannote weights.")
    s3_credentials_secret: str | None = Field(
        None, description="Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) become env (envFrom)."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for the runner (its IFW_* settings: IFW_DEFAULT_MODEL, IFW_RESULT_STORE, ...).",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")


class WebhookSettings(_Section):
    signing_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing key ('whsec_' + base64). Give it through the environment "
        "(IFW_OPERATOR_WEBHOOK__SIGNING_SECRET from a Secret), never the ConfigMap.",
    )
    timeout_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)
    backoff_initial_seconds: float = Field(1.0, ge=0)
    backoff_max_seconds: float = Field(30.0, ge=0)
    allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDRs webhooks may reach although private (the SSRF guard refuses them). "
        "Helm: operator.webhook.allowlist.",
    )


class GitOpsSettings(_Section):
    """How the operator recognises a TranscriptionJob that a GitOps tool keeps in the cluster.

    Such a tool re-creates a deleted object (self-heal), so deleting a finished job at its TTL
    would only run it again. A job carrying any of these labels or annotations (with a value) is
    never deleted by its TTL: only its runner Job, pods and runner account are removed.
    """

    labels: list[str] = Field(
        default_factory=lambda: ["app.kubernetes.io/instance", "kustomize.toolkit.fluxcd.io/name",
                                 "helm.toolkit.fluxcd.io/name"],
        description="Label keys of GitOps tracking: Argo CD's label tracking (its application.instanceLabelKey, "
        "also what Helm puts on a chart's objects), Flux's Kustomization and HelmRelease.",
    )
    annotations: list[str] = Field(
        default_factory=lambda: ["argocd.argoproj.io/tracking-id"],
        description="Annotation keys of GitOps tracking: Argo CD's annotation tracking.",
    )


class PoolSettings(_Section):
    """The warm pool of runner workers (their Leases tell the operator who is ready for what)."""

    wait_seconds: float = Field(
        0, ge=0, description="A runtime-Auto job that finds no ready worker for its model waits this long for "
        "one (a pool scaled to zero is starting) before it runs in its own Job. 0: a Job at once.",
    )
    ack_seconds: float = Field(
        30, ge=0, description="A worker that has not reported starting its assignment this long after it is "
        "assigned (it missed it, or is stuck) loses it: the job is assigned again, preferably elsewhere. 0: never.",
    )


class ShardingSettings(_Section):
    """What spec.parallelism means: Auto's rule, and the least audio a shard gets.

    The runner applies it (the operator renders it into the runner's env): an Auto job starts as one
    runner, which hands the job back to run as shards only when its audio is longer than
    ``auto_above_seconds`` — short audio never pays for sharding.
    """

    auto_above_seconds: float = Field(
        1800, gt=0, description="Auto: shard audio longer than this (30 min); shorter audio runs as one runner."
    )
    min_shard_seconds: float = Field(
        300, gt=30, description="Every shard gets at least this much audio (5 min; more than the 30 s searched "
        "for a pause at each cut): fewer shards on shorter "
        "audio, for Auto and for an explicit count alike (indexes beyond finish at once).",
    )
    max_shards: int = Field(8, ge=1, le=64, description="Auto: at most this many shards.")


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IFW_OPERATOR_", env_nested_delimiter="__", extra="forbid")

    # --- scope ---
    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; empty: all.")

    # --- admission ---
    max_active_jobs: int | None = Field(8, ge=1, description="Runner Jobs running at once, cluster-wide. None: no cap.")
    max_active_jobs_per_namespace: int | None = Field(None, ge=1, description="Same, per namespace. None: no cap.")

    # --- lifecycle ---
    default_ttl_seconds_after_finished: int | None = Field(
        86400, ge=0, description="TTL when spec.ttlSecondsAfterFinished is absent. None: keep forever. "
        "A job managed by GitOps (see gitops) is kept at its TTL; only its runner is removed.",
    )
    startup_deadline_seconds: float = Field(
        900, gt=0, description="Fail with StartupDeadlineExceeded when the pod is not running this long after the Job."
    )
    image_pull_grace_seconds: float = Field(
        120, ge=0, description="Fail with ImagePullFailed when the image cannot be pulled for this long."
    )
    default_model: str = Field(DEFAULT_MODEL, description="Reported in status.model when spec.model is absent.")

    # --- timing ---
    resync_interval_seconds: float = Field(10, gt=0, description="Periodic level-based pass over all jobs.")
    watch_server_timeout_seconds: int = Field(300, gt=0, description="Server-side watch timeout (stale watches).")
    watch_client_timeout_seconds: float = Field(330, gt=0, description="Client-side watch timeout, > server's.")
    api_threads: int = Field(64, ge=1, description="Threads for blocking Kubernetes API calls.")
    concurrent_starts: int = Field(16, ge=1, description="Jobs being created at once (each makes 5 objects).")
    admission_settle_seconds: float = Field(
        0.2, ge=0, le=10,
        description="While a cap is set, a new job waits this long before it may take capacity, so jobs "
        "created in the same instant (seen out of order) still start in creation order.",
    )

    # --- operations ---
    liveness_port: int = Field(8080, ge=1, le=65535, description="kopf liveness probe at /healthz.")
    metrics_port: int | None = Field(9090, ge=1, le=65535, description="Prometheus /metrics. None: off.")
    log_format: Literal["plain", "full", "json"] = "json"
    event_component: str = "ifw-operator"

    runner: RunnerPod = Field(default_factory=RunnerPod)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    gitops: GitOpsSettings = Field(default_factory=GitOpsSettings)
    sharding: ShardingSettings = Field(default_factory=ShardingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get(CONFIG_FILE_ENV) or DEFAULT_CONFIG_FILE)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path.is_file():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        elif os.environ.get(CONFIG_FILE_ENV):
            raise FileNotFoundError(f"{CONFIG_FILE_ENV}={path} does not exist")
        return tuple(sources)


@lru_cache
def get_settings() -> OperatorSettings:
    return OperatorSettings()
