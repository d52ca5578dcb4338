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

import hashlib
import json
from typing import Any

from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL
from ifw.operator.config import OperatorSettings
from ifw.runner import stores  # light: no torch; shares the result Secret's name and type

# Labels: the uid label is the operator's key for Jobs and Pods (names can exceed the 63-char
# limit of label values, uids never do); the name label is for people and selectors.
LABEL_UID = f"{GROUP}/job-uid"
LABEL_NAME = f"{GROUP}/job-name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_RESUMED_AT = f"{GROUP}/resumed-at"
MANAGED_BY = "ifw-operator"
# The runner's Secret store writes this type (ifw.runner.stores.SECRET_TYPE); a Secret's type is
# immutable, so the empty Secret the operator pre-creates must already have it.
RESULT_SECRET_TYPE = stores.SECRET_TYPE
RUNNER_CONTAINER = "runner"

# Env the operator always sets; runner.env from config cannot override these.
RESERVED_ENV = frozenset(
    {"IFW_JOB_NAMESPACE", "IFW_JOB_NAME", "IFW_JOB_UID", "IFW_WORK_DIR", "IFW_DEFAULT_MODEL", "HF_HOME",
     "HF_HUB_OFFLINE", "HF_TOKEN", "HOME", "TMPDIR"}
)


def _hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _fit(name: str, limit: int) -> str:
    """A name cut to ``limit`` characters, unique thanks to a hash suffix when it had to be cut."""
    if len(name) <= limit:
        return name
    head = name[: limit - 9].rstrip("-.")
    return f"{head}-{_hash(name)}"


def label_value(text: str) -> str:
    """Label values are at most 63 characters, alphanumeric at both ends."""
    return _fit(text, 63).strip("-._") or "x"


def job_name(name: str, uid: str) -> str:
    return f"{name[:54].rstrip('-.')}-{uid[:8]}"


def result_secret_name(name: str) -> str:
    # The runner's Secret store writes to exactly this name (the Role allows only it): one function.
    return stores.secret_name(name)


def runner_account_name(name: str) -> str:
    return _fit(f"{name}-runner", 253)


def _meta(tj: dict[str, Any]) -> tuple[str, str, str]:
    meta = tj["metadata"]
    return meta["namespace"], meta["name"], meta["uid"]


def owner_reference(tj: dict[str, Any]) -> dict[str, Any]:
    _, name, uid = _meta(tj)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(tj: dict[str, Any], component: str) -> dict[str, str]:
    _, name, uid = _meta(tj)
    return {
        LABEL_NAME: label_value(name),
        LABEL_UID: uid,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def _object_meta(tj: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    namespace, _, _ = _meta(tj)
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(tj, component),
        "ownerReferences": [owner_reference(tj)],
    }


def result_secret(tj: dict[str, Any]) -> dict[str, Any]:
    """Empty; the runner's Secret store updates it with the compressed transcript."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": RESULT_SECRET_TYPE,
        "metadata": _object_meta(tj, result_secret_name(tj["metadata"]["name"]), "result"),
    }


def runner_service_account(tj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _object_meta(tj, runner_account_name(tj["metadata"]["name"]), "runner"),
        "automountServiceAccountToken": True,
    }


def runner_role_rules(name: str) -> list[dict[str, Any]]:
    """Least privilege: this job's object, this job's status, this job's result Secret."""
    return [
        {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [name], "verbs": ["get"]},
        {
            "apiGroups": [GROUP],
            "resources": [f"{PLURAL}/status"],
            "resourceNames": [name],
            "verbs": ["get", "patch", "update"],
        },
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [result_secret_name(name)],
            "verbs": ["get", "update", "patch"],
        },
    ]


def runner_role(tj: dict[str, Any]) -> dict[str, Any]:
    name = tj["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _object_meta(tj, runner_account_name(name), "runner"),
        "rules": runner_role_rules(name),
    }


def runner_role_binding(tj: dict[str, Any]) -> dict[str, Any]:
    namespace, name, _ = _meta(tj)
    account = runner_account_name(name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _object_meta(tj, account, "runner"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }


def _runner_env(tj: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    namespace, name, uid = _meta(tj)
    pod = settings.runner
    env: list[dict[str, Any]] = [
        {"name": key, "value": value} for key, value in sorted(pod.env.items()) if key not in RESERVED_ENV
    ]
    env += [
        # The runner reads its own TranscriptionJob (checking the uid): the spec has one source of truth.
        {"name": "IFW_JOB_NAMESPACE", "value": namespace},
        {"name": "IFW_JOB_NAME", "value": name},
        {"name": "IFW_JOB_UID", "value": uid},
        {"name": "IFW_DEFAULT_MODEL", "value": settings.default_model},
        {"name": "IFW_WORK_DIR", "value": pod.work_dir},
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


def runner_job(tj: dict[str, Any], settings: OperatorSettings, *, suspend: bool = False) -> dict[str, Any]:
    """The batch/v1 Job that runs the runner for ``tj`` (a TranscriptionJob as a dict)."""
    namespace, name, uid = _meta(tj)
    spec = tj.get("spec") or {}
    pod = settings.runner
    volumes, mounts = _volumes(settings)

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
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if pod.s3_credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": pod.s3_credentials_secret}}]

    pod_labels = {**pod.labels, **labels(tj, "runner")}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are the Job's
        "serviceAccountName": runner_account_name(name),
        "automountServiceAccountToken": True,  # the runner writes its status through the API
        "enableServiceLinks": False,
        "securityContext": dict(pod.pod_security_context),
        "terminationGracePeriodSeconds": pod.termination_grace_period_seconds,
        "containers": [container],
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

    job_labels = labels(tj, "runner")
    queue_name = spec.get("queueName")
    if queue_name:
        # Kueue manages a labelled Job as its own Workload: it is created suspended and
        # Kueue unsuspends it on admission.
        job_labels[LABEL_KUEUE_QUEUE] = queue_name
        suspend = True

    job_spec: dict[str, Any] = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": spec.get("backoffLimit", 2),
        "suspend": suspend,
        "podFailurePolicy": {
            "rules": [
                # Preemption, eviction, node drain: not the runner's fault, costs no retry.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Bad input: retrying cannot help.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": RUNNER_CONTAINER,
                        "operator": "In",
                        "values": [pod.bad_input_exit_code],
                    },
                },
            ]
        },
        "template": {
            "metadata": {"labels": pod_labels, **({"annotations": dict(pod.annotations)} if pod.annotations else {})},
            "spec": pod_spec,
        },
    }
    if spec.get("activeDeadlineSeconds"):
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, uid),
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": [owner_reference(tj)],
        },
        "spec": job_spec,
    }


def children(tj: dict[str, Any]) -> list[dict[str, Any]]:
    """What must exist before the Job (its pod needs the account, the runner needs the Secret)."""
    return [runner_service_account(tj), runner_role(tj), runner_role_binding(tj), result_secret(tj)]
