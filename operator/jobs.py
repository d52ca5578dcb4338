"""Manifests the operator creates for one TranscriptionJob (pure functions, no API calls).

Per TranscriptionJob ``<name>``:

- ``<name>-result``: an empty Secret the runner's Secret store fills (``create`` cannot be
  limited by resourceNames in RBAC, so the operator makes it and the runner only updates it);
- ``<name>-runner``: a ServiceAccount, a Role and a RoleBinding that let the runner pod read
  its own TranscriptionJob, write its own ``/status`` and its own result Secret, nothing else;
- a ``batch/v1`` Job ``<name[:54]>-<uid[:8]>`` that runs the runner image. The uid in the name
  makes it deterministic (a restarted operator finds the same Job) and unique per incarnation
  (a new TranscriptionJob with an old name never adopts the previous one's Job).

All of them carry a controller ownerReference to the TranscriptionJob, so a real cluster's
garbage collector removes them with it; the operator also deletes them itself on cancel/TTL.
"""

from __future__ import annotations

import json
from typing import Any

from ifw.core import contract, results, shards
from ifw.core.contract import (
    LABEL_KUEUE_QUEUE,
    RUNNER_CONTAINER,
    child_labels,
    child_metadata,
    fit_name,
    job_identity,
    owner_reference,
)
from ifw.core.runner_settings import RunnerSettings
from ifw.core.settings import field_ref
from ifw.crds.transcriptionjob import GROUP, PARALLELISM_AUTO, PLURAL
from ifw.operator.config import OperatorSettings

# Env the operator always sets; runner.env from config cannot override these.
RESERVED_ENV = frozenset(
    {*map(RunnerSettings.env_var, ("job_namespace", "job_name", "job_uid", "work_dir", "default_model",
                                   "shard_count", "shard_index", "shard_auto_above_seconds", "shard_min_seconds",
                                   "shard_max_count")),
     "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "HOME", "TMPDIR", "JOB_COMPLETION_INDEX"}
)


def job_name(name: str, uid: str, sharded: bool = False) -> str:
    """``<name>-<uid8>``; a sharded job's Indexed Job ``<name>-<uid8>-sh`` (a name of its own: an Auto job's
    first, single runner handed it back, and that Job may still be going away). Short enough that
    Kubernetes' pod hostname ``<job>-<index>`` stays within 63 characters."""
    if sharded:
        return f"{name[:46].rstrip('-.')}-{uid[:8]}-sh"
    return f"{name[:54].rstrip('-.')}-{uid[:8]}"


def shard_count(tj: dict[str, Any]) -> int:
    """How many shards the job runs as: spec.parallelism's number, or for Auto the count its first runner
    asked for when it handed the job back (status.shards.count); 1 until then."""
    wanted = (tj.get("spec") or {}).get("parallelism")
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        return max(1, wanted)
    if wanted == PARALLELISM_AUTO:
        return int((((tj.get("status") or {}).get("shards") or {}).get("count")) or 1)
    return 1


def is_sharded(job: dict[str, Any]) -> bool:
    return (job.get("spec") or {}).get("completionMode") == "Indexed"


def partial_secret(tj: dict[str, Any], index: int) -> dict[str, Any]:
    """Shard ``index``'s empty partial-result Secret: made by the operator, so that the runner's Role needs
    only get and patch on it by name (``create`` cannot be limited to names)."""
    name = shards.partial_secret_name(tj["metadata"]["name"], index)
    return {"apiVersion": "v1", "kind": "Secret", "type": shards.PARTIAL_SECRET_TYPE,
            "metadata": child_metadata(tj, name, "partial")}  # fmt: skip


def runner_account_name(name: str) -> str:
    return fit_name(f"{name}-runner", 253)


def runner_service_account(tj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": child_metadata(tj, runner_account_name(tj["metadata"]["name"]), "runner"),
        "automountServiceAccountToken": True,
    }


def runner_role_rules(name: str, partials: int = 0) -> list[dict[str, Any]]:
    """Least privilege: read this job, merge-patch this job's status, read and patch this job's result Secret
    and, for a job that may run as shards, the shards' partial-result Secrets (``partials`` of them)."""
    secrets = [results.secret_name(name), *(shards.partial_secret_name(name, i) for i in range(partials))]
    return [
        {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [name], "verbs": ["get"]},
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [name], "verbs": ["patch"]},
        # get: the store checks the Secret is this job's before it patches the data in.
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets, "verbs": ["get", "patch"]},
    ]


def max_partials(tj: dict[str, Any], settings: OperatorSettings | None = None) -> int:
    """Partial-result Secrets the job's runners may write: its shard count; for Auto the most it can become
    (the Role is made once, before the first runner decides)."""
    if (tj.get("spec") or {}).get("parallelism") == PARALLELISM_AUTO:
        return max((settings or OperatorSettings()).sharding.max_shards, shard_count(tj))
    count = shard_count(tj)
    return count if count > 1 else 0


def runner_role(tj: dict[str, Any], settings: OperatorSettings | None = None) -> dict[str, Any]:
    name = tj["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": child_metadata(tj, runner_account_name(name), "runner"),
        "rules": runner_role_rules(name, max_partials(tj, settings)),
    }


def runner_role_binding(tj: dict[str, Any]) -> dict[str, Any]:
    namespace, name, _ = job_identity(tj)
    account = runner_account_name(name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": child_metadata(tj, account, "runner"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }


def _runner_env(tj: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    namespace, name, uid = job_identity(tj)
    pod = settings.runner
    env: list[dict[str, Any]] = [
        {"name": key, "value": value} for key, value in sorted(pod.env.items()) if key not in RESERVED_ENV
    ]
    env += RunnerSettings.k8s_env(
        # The runner reads its own TranscriptionJob (checking the uid): the spec has one source of truth.
        job_namespace=namespace, job_name=name, job_uid=uid,
        # Who did the work, for the result and the webhook (the original API's fly_machine_id).
        pod_name=field_ref("metadata.name"), node_name=field_ref("spec.nodeName"),
        default_model=settings.default_model, work_dir=pod.work_dir,
        # What spec.parallelism Auto means: the runner decides on the audio it has (handing it back to be sharded).
        shard_auto_above_seconds=settings.sharding.auto_above_seconds,
        shard_min_seconds=settings.sharding.min_shard_seconds, shard_max_count=settings.sharding.max_shards,
    )
    count = shard_count(tj)
    if count > 1:  # a shard: its index is the Indexed Job's JOB_COMPLETION_INDEX, set by Kubernetes
        env += RunnerSettings.k8s_env(shard_count=count)
    env += [
        # Read-only root FS: everything that writes goes to the scratch emptyDir at /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HF_HOME", "value": pod.model_cache.mount_path},
        {"name": "HF_HUB_OFFLINE", "value": "1" if pod.model_cache.hub_offline else "0"},
    ]
    if pod.hf_token_secret:
        ref = pod.hf_token_secret
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": ref.optional}},
            }
        )
    return env


def _volumes(settings: OperatorSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    pod = settings.runner
    scratch: dict[str, Any] = {}
    if pod.work_dir_size_limit:
        scratch["sizeLimit"] = pod.work_dir_size_limit
    cache = pod.model_cache
    volumes = [
        {"name": "tmp", "emptyDir": scratch},
        {"name": "model-cache", **(cache.volume or {"emptyDir": {}})},
    ]
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "model-cache", "mountPath": cache.mount_path, "readOnly": cache.read_only and bool(cache.volume)},
    ]
    return volumes, mounts


def _container(tj: dict[str, Any], settings: OperatorSettings, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    pod = settings.runner
    container: dict[str, Any] = {
        "name": RUNNER_CONTAINER,
        "image": pod.image,
        "imagePullPolicy": pod.image_pull_policy,
        "command": list(pod.command),
        "env": _runner_env(tj, settings),
        "resources": json.loads(json.dumps(pod.resources)),
        "securityContext": dict(pod.security_context),
        "volumeMounts": mounts,
        # The runner writes {"reason","message"} there; a crash before that leaves the log tail.
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if pod.s3_credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": pod.s3_credentials_secret}}]
    return container


def _pod_spec(tj: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    pod = settings.runner
    volumes, mounts = _volumes(settings)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are the Job's
        "serviceAccountName": runner_account_name(tj["metadata"]["name"]),
        "automountServiceAccountToken": True,  # the runner writes its status through the API
        "enableServiceLinks": False,
        "securityContext": dict(pod.pod_security_context),
        "terminationGracePeriodSeconds": pod.termination_grace_period_seconds,
        "containers": [_container(tj, settings, mounts)],
        "volumes": volumes,
    }
    if pod.node_selector:
        pod_spec["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in pod.tolerations]
    if pod.affinity:
        pod_spec["affinity"] = pod.affinity
    if pod.runtime_class_name:
        pod_spec["runtimeClassName"] = pod.runtime_class_name
    if pod.priority_class_name:
        pod_spec["priorityClassName"] = pod.priority_class_name
    if pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in pod.image_pull_secrets]
    return pod_spec


POD_FAILURE_POLICY: dict[str, Any] = {
    "rules": [
        # Preemption, eviction, node drain: not the runner's fault, costs no retry.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # Bad input: retrying cannot help.
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": RUNNER_CONTAINER, "operator": "In", "values": [contract.EXIT_BAD_INPUT]},
        },
    ]
}


def runner_job(tj: dict[str, Any], settings: OperatorSettings, *, suspend: bool = False) -> dict[str, Any]:
    """The batch/v1 Job that runs the runner for ``tj`` (a TranscriptionJob as a dict)."""
    namespace, name, uid = job_identity(tj)
    spec = tj.get("spec") or {}
    pod = settings.runner
    job_labels = child_labels(tj, "runner")
    queue_name = spec.get("queueName")
    if queue_name:
        # Kueue manages a labelled Job as its own Workload: it is created suspended and
        # Kueue unsuspends it on admission.
        job_labels[LABEL_KUEUE_QUEUE] = queue_name
        suspend = True

    template_meta: dict[str, Any] = {"labels": {**pod.labels, **child_labels(tj, "runner")}}
    if pod.annotations:
        template_meta["annotations"] = dict(pod.annotations)
    count = shard_count(tj)
    job_spec: dict[str, Any] = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": spec.get("backoffLimit", 2),
        "suspend": suspend,
        "podFailurePolicy": json.loads(json.dumps(POD_FAILURE_POLICY)),  # a copy per Job
        "template": {"metadata": template_meta, "spec": _pod_spec(tj, settings)},
    }
    if count > 1:
        # One Indexed Job: Kueue admits all shards as one workload; a failed shard is retried alone
        # (backoffLimitPerIndex), and any shard that runs out of retries fails the whole job
        # (maxFailedIndexes 0) — a transcript with a hole is no result. Bad input still fails it at once.
        del job_spec["backoffLimit"]  # per index instead (Kubernetes then caps the total at MaxInt32)
        job_spec.update({"completionMode": "Indexed", "completions": count, "parallelism": count,
                         "backoffLimitPerIndex": spec.get("backoffLimit", 2), "maxFailedIndexes": 0})  # fmt: skip
    if spec.get("activeDeadlineSeconds"):
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, uid, sharded=count > 1),
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": [owner_reference(tj)],
        },
        "spec": job_spec,
    }


def pool_children(tj: dict[str, Any]) -> list[dict[str, Any]]:
    """What must exist before a pool worker takes the job: only the result Secret it patches."""
    return [results.result_secret(tj)]


def children(tj: dict[str, Any], settings: OperatorSettings | None = None) -> list[dict[str, Any]]:
    """What must exist before the Job (its pod needs the account, the runner needs the Secret; a sharded
    job's runners their partial-result Secrets, and the operator the result Secret it merges into)."""
    count = shard_count(tj)
    partials = [partial_secret(tj, i) for i in range(count)] if count > 1 else []
    return [runner_service_account(tj), runner_role(tj, settings), runner_role_binding(tj), results.result_secret(tj),
            *partials]  # fmt: skip
