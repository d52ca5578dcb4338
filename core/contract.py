"""The contract between the operator, the runner and the gateway: one copy of every shared name.

Everything here is data or a pure function (no Kubernetes client, no torch), so each side
imports the same constant instead of spelling it again. Changing a value here changes both
sides at once, which is the point: the runner and the operator can never disagree about an
exit code, a label key or the shape of a termination message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND

# ------------------------------------------------------------------ the runner's environment

# Set by the operator in every runner pod; the runner reads its own TranscriptionJob with them.
ENV_JOB_NAMESPACE = "IFW_JOB_NAMESPACE"
ENV_JOB_NAME = "IFW_JOB_NAME"
ENV_JOB_UID = "IFW_JOB_UID"
# Where the runner writes its termination message; only overridden outside a pod (the kubelet stand-in).
ENV_TERMINATION_MESSAGE_PATH = "IFW_TERMINATION_MESSAGE_PATH"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The runner pod's name and node (downward API): reported as the transcript's processed_by.
ENV_POD_NAME = "IFW_POD_NAME"
ENV_NODE_NAME = "IFW_NODE_NAME"
RUNNER_CONTAINER = "runner"
# The model a job gets when spec.model is absent (the operator's and the runner's default).
DEFAULT_MODEL = "openai/whisper-large-v3"
RUNNER_COMMAND = ("python", "-m", "ifw.runner", "job")

# ------------------------------------------------------------------ the warm pool

# A pool worker (`ifw-runner serve`) holds one Lease in its own namespace while it can take work;
# the operator assigns jobs only to workers whose Lease is fresh and that are not draining.
ENV_WORKER_NAME = "IFW_WORKER_NAME"  # the pod's name (downward API); also the Lease's name
ENV_WORKER_NAMESPACE = "IFW_WORKER_NAMESPACE"  # where the Lease lives
LABEL_POOL_WORKER = f"{GROUP}/pool-worker"  # on worker Leases: "true"
ANNOTATION_WORKER_MODELS = f"{GROUP}/models"  # JSON list of the models the worker holds
ANNOTATION_WORKER_CAPACITY = f"{GROUP}/capacity"  # jobs it runs at once
ANNOTATION_WORKER_DRAINING = f"{GROUP}/draining"  # "true": finishing its jobs, take no more
ANNOTATION_WORKER_NODE = f"{GROUP}/node"  # the node the worker runs on
REASON_HANDED_BACK_TOO_LONG = "AudioTooLongForPool"

# ------------------------------------------------------------------ exit codes

EXIT_OK = 0
EXIT_TRANSIENT = 1  # retried up to spec.backoffLimit
EXIT_BAD_INPUT = 2  # the Job's podFailurePolicy fails the job at once: retrying cannot help

# ------------------------------------------------------------------ failure reasons

# Reasons a runner reports for input that no retry can fix. The gateway answers a sync request
# whose job failed with one of these with a 4xx (the client's fault), anything else with a 5xx.
BAD_INPUT_REASONS = frozenset(
    {"AudioFetchFailed", "InvalidAudio", "AudioTooLarge", "InvalidSpec", "ModelLoadFailed", "ResultTooLarge"}
)
HTTP_STATUS_BY_REASON: Mapping[str, int] = {reason: 422 for reason in BAD_INPUT_REASONS} | {"AudioTooLarge": 413}


def http_status_for_reason(reason: str | None) -> int:
    """The HTTP status a failed job's reason maps to: 4xx for bad input, else 500."""
    return HTTP_STATUS_BY_REASON.get(reason or "", 500)


class Failure(Exception):
    """A failure with a CamelCase reason a person can act on, and the exit code a runner leaves with.

    The runner's errors and the result stores' errors derive from it, so a runner pod turns any
    of them into the same termination message and exit code.
    """

    reason = "RunnerFailed"
    exit_code = EXIT_TRANSIENT

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def termination_message(self) -> str:
        return termination_message(self.reason, self.message)


# ------------------------------------------------------------------ termination message

REASON_PATTERN = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")
MAX_TERMINATION_MESSAGE = 3500  # the kubelet keeps at most 4096 bytes
MAX_MESSAGE = 4096


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def termination_message(reason: str, message: str) -> str:
    """The one line of JSON a failed runner leaves in its pod's termination message."""
    return json.dumps({"reason": reason, "message": message[:MAX_TERMINATION_MESSAGE]})


def parse_termination_message(text: str | None) -> tuple[str | None, str | None]:
    """The runner's {"reason", "message"}; anything else (a crash's log tail) is kept as a message."""
    if not text or not text.strip():
        return None, None
    try:
        data = json.loads(text.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None, clip(text)
    if not isinstance(data, dict):
        return None, clip(text)
    reason = data.get("reason")
    # The pod's output lands in our status: accept only a well-formed CamelCase reason.
    if not isinstance(reason, str) or not REASON_PATTERN.match(reason):
        reason = None
    message = data.get("message")
    return reason, clip(str(message)) if message else None


# ------------------------------------------------------------------ labels and annotations

# The uid label is the key of every child object (names can exceed the 63 characters of a
# label value; uids never do). The name label is for people and selectors.
LABEL_JOB_UID = f"{GROUP}/job-uid"
LABEL_JOB_NAME = f"{GROUP}/job-name"
LABEL_TASK_ID = f"{GROUP}/task-id"  # the gateway's managed_task_id
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_CREATED_BY = "app.kubernetes.io/created-by"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
MANAGED_BY_OPERATOR = "ifw-operator"
CREATED_BY_GATEWAY = "ifw-gateway"
ANNOTATION_RESUMED_AT = f"{GROUP}/resumed-at"  # when the operator last unsuspended a runner Job
ANNOTATION_RESULT_SHA256 = f"{GROUP}/sha256"  # on the result Secret, written with its data
# The operator's finalizer, on jobs it must clean up after (S3 result, a cancelled webhook owed).
FINALIZER = f"{GROUP}/cleanup"
# "true" on a TranscriptionJob whose client streams it: the runner reports the text so far in
# status.progress.text as pieces finish (the gateway's server-sent events are fed from it).
ANNOTATION_STREAM = f"{GROUP}/stream"
# The client's own task id (any string) when it is not a valid object name; see gateway.
ANNOTATION_TASK_ID = f"{GROUP}/task-id"


def _hash(text: str, length: int = 8) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fit_name(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters, kept unique by a hash suffix when it had to be cut."""
    if len(name) <= limit:
        return name
    head = name[: limit - 9].rstrip("-.")
    return f"{head}-{_hash(name)}"


def label_value(text: str) -> str:
    """A valid label value (≤63 characters, alphanumeric at both ends); a long or odd one keeps a hash."""
    if len(text) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", text):
        return text
    head = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:54].strip("-_.")
    return f"{head}-{_hash(text)}" if head else _hash(text)


def job_identity(tj: Mapping[str, Any]) -> tuple[str, str, str]:
    """(namespace, name, uid) of a TranscriptionJob as read from the API."""
    meta = tj["metadata"]
    return meta["namespace"], meta["name"], meta["uid"]


def owner_reference(tj: Mapping[str, Any], *, controller: bool = True) -> dict[str, Any]:
    """The ownerReference every child of a TranscriptionJob carries (garbage-collected with it)."""
    _, name, uid = job_identity(tj)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": controller,
        "blockOwnerDeletion": controller,
    }


def child_labels(tj: Mapping[str, Any], component: str) -> dict[str, str]:
    """The labels of every object the operator makes for a TranscriptionJob."""
    _, name, uid = job_identity(tj)
    return {
        LABEL_JOB_NAME: label_value(name),
        LABEL_JOB_UID: uid,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY_OPERATOR,
    }


def child_metadata(tj: Mapping[str, Any], name: str, component: str) -> dict[str, Any]:
    namespace, _, _ = job_identity(tj)
    return {
        "name": name,
        "namespace": namespace,
        "labels": child_labels(tj, component),
        "ownerReferences": [owner_reference(tj)],
    }


# ------------------------------------------------------------------ phases and times

PHASES = ("Pending", "Queued", "Running", "Succeeded", "Failed")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # RFC 3339, seconds, UTC: what metav1.Time serialises to


def phase_of(tj: Mapping[str, Any]) -> str | None:
    return (tj.get("status") or {}).get("phase")


def is_terminal(tj: Mapping[str, Any]) -> bool:
    return phase_of(tj) in TERMINAL_PHASES


def format_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).strftime(TIME_FORMAT)


def now_string() -> str:
    return datetime.now(timezone.utc).strftime(TIME_FORMAT)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
