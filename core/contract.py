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
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND

# ------------------------------------------------------------------ the runner's environment

# The runner's environment is named by its settings classes (ifw.core.runner_settings).

# Where the runner writes its termination message; only overridden outside a pod (the kubelet stand-in).
ENV_TERMINATION_MESSAGE_PATH = "IFW_TERMINATION_MESSAGE_PATH"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
RUNNER_CONTAINER = "runner"
# The model a job gets when spec.model is absent (the operator's and the runner's default).
DEFAULT_MODEL = "openai/whisper-large-v3"
RUNNER_COMMAND = ("python", "-m", "ifw.runner", "job")

# ------------------------------------------------------------------ the warm pool

# A pool worker (`ifw-runner serve`) holds one Lease in its own namespace while it can take work;
# the operator assigns jobs only to workers whose Lease is fresh and that are not draining.
LABEL_POOL_WORKER = f"{GROUP}/pool-worker"  # on worker Leases: "true"
ANNOTATION_WORKER_MODELS = f"{GROUP}/models"  # JSON list of the models the worker holds
ANNOTATION_WORKER_CAPACITY = f"{GROUP}/capacity"  # jobs it runs at once
ANNOTATION_WORKER_DRAINING = f"{GROUP}/draining"  # "true": finishing its jobs, take no more
ANNOTATION_WORKER_NODE = f"{GROUP}/node"  # the node the worker runs on
# Jobs the worker holds now, stopping ones included: the operator assigns no more than it has room for.
ANNOTATION_WORKER_RUNNING = f"{GROUP}/running"

# ------------------------------------------------------------------ exit codes

EXIT_TRANSIENT = 1  # retried up to spec.backoffLimit
EXIT_BAD_INPUT = 2  # the Job's podFailurePolicy fails the job at once: retrying cannot help

# ------------------------------------------------------------------ failure reasons


@dataclass(frozen=True)
class _Meaning:
    bad_input: bool = False  # no retry can fix it: exit code 2, the job fails at once, HTTP 4xx
    http_status: int = 500  # what the gateway answers a sync request whose job failed with it
    needs_own_job: bool = False  # a pool hand-back: an Auto job then runs in its own Job


_TRANSIENT = _Meaning()
_BAD_INPUT = _Meaning(bad_input=True, http_status=422)


class Reason(StrEnum):
    """Every reason a failure or a pool hand-back crosses a process boundary with, and what it means.

    The runner leaves with the exit code it implies, the operator retries (or sends a pool job to
    its own Job) by it, and the gateway answers with its HTTP status: a reason added here is
    honoured everywhere. The other CamelCase reasons of conditions (Retrying, PodStarting...)
    describe a state, not a failure, and stay with the code that derives them.
    """

    _meaning: _Meaning

    def __new__(cls, value: str, meaning: _Meaning = _TRANSIENT) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member._meaning = meaning
        return member

    @property
    def bad_input(self) -> bool:
        return self._meaning.bad_input

    @property
    def http_status(self) -> int:
        return self._meaning.http_status

    @property
    def needs_own_job(self) -> bool:
        return self._meaning.needs_own_job

    @classmethod
    def of(cls, text: str | None) -> Reason | None:
        """The Reason a status or termination message names; None for any other text."""
        try:
            return cls(text)
        except ValueError:
            return None

    # What the runner reports for input no retry can fix.
    AudioFetchFailed = "AudioFetchFailed", _BAD_INPUT  # a 5xx or a timeout of the host is retried (errors.py)
    InvalidAudio = "InvalidAudio", _BAD_INPUT
    NotMultichannel = "NotMultichannel", _BAD_INPUT  # spec.multichannel on a mono file
    AudioTooLarge = "AudioTooLarge", _Meaning(bad_input=True, http_status=413)
    InvalidSpec = "InvalidSpec", _BAD_INPUT
    ModelLoadFailed = "ModelLoadFailed", _BAD_INPUT  # an unreachable hub is retried (errors.py)
    ResultTooLarge = "ResultTooLarge", _BAD_INPUT
    # What the runner reports for failures worth a retry.
    RunnerFailed = "RunnerFailed"
    OutOfMemory = "OutOfMemory"
    DeviceFailed = "DeviceFailed"  # a CUDA error broke the process's context: the worker restarts
    ResultStoreFailed = "ResultStoreFailed"
    ResultNotFound = "ResultNotFound"
    # A pool worker's: a lost attempt, and the jobs it gives back unrun.
    WorkerRestarted = "WorkerRestarted"
    WorkerLost = "WorkerLost"
    WorkerFull = "WorkerFull"
    WorkerDraining = "WorkerDraining"
    HandedBack = "HandedBack"
    ModelNotServed = "ModelNotServed", _Meaning(needs_own_job=True)
    AudioTooLongForPool = "AudioTooLongForPool", _Meaning(needs_own_job=True)
    # spec.parallelism Auto and audio over the operator's threshold: run it again as shards (one Indexed Job).
    ShardingRequired = "ShardingRequired", _Meaning(needs_own_job=True)
    # The operator's own verdicts.
    DeadlineExceeded = "DeadlineExceeded"
    StartupDeadlineExceeded = "StartupDeadlineExceeded"
    BackoffLimitExceeded = "BackoffLimitExceeded"
    ImagePullFailed = "ImagePullFailed"
    JobDeleted = "JobDeleted"
    JobCreateFailed = "JobCreateFailed"
    JobFailed = "JobFailed"
    ShardMergeFailed = "ShardMergeFailed"  # a sharded job's partial results disagree (the operator's merge)


def http_status_for_reason(reason: str | None) -> int:
    """The HTTP status a failed job's reason maps to: 4xx for bad input, else 500."""
    known = Reason.of(reason)
    return known.http_status if known else 500


class Failure(Exception):
    """A failure with a CamelCase reason a person can act on, and the exit code a runner leaves with.

    The runner's errors and the result stores' errors derive from it, so a runner pod turns any
    of them into the same termination message and exit code. ``retryable`` marks a cause worth a
    retry behind a reason that usually means bad input (a media host's 5xx is AudioFetchFailed).
    """

    reason: Reason = Reason.RunnerFailed
    retryable: bool = False

    def __init__(self, message: str, reason: Reason | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    @property
    def bad_input(self) -> bool:
        return self.reason.bad_input and not self.retryable

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_INPUT if self.bad_input else EXIT_TRANSIENT

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

class Phase(StrEnum):
    """status.phase (the CRD's Phase literal says the same; a test keeps them equal)."""

    Pending = "Pending"
    Queued = "Queued"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"


PHASES = tuple(Phase)
TERMINAL_PHASES = frozenset({Phase.Succeeded, Phase.Failed})


class ConditionType(StrEnum):
    """The conditions the operator writes: True for the phase that holds (Pending has none), and
    Ready (kstatus: True once Succeeded) for kubectl wait and GitOps health checks."""

    Queued = "Queued"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Ready = "Ready"


class Runtime(StrEnum):
    """spec.runtime (Auto: the pool when a ready worker serves the model) and where a job ran."""

    Auto = "Auto"
    Pool = "Pool"
    Job = "Job"


class ExecutionState(StrEnum):
    """A pool worker's report on its attempt (status.execution.state)."""

    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    HandedBack = "HandedBack"


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # RFC 3339, seconds, UTC: what metav1.Time serialises to
MICRO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime (a Lease's renewTime)


def phase_of(tj: Mapping[str, Any]) -> str | None:
    return (tj.get("status") or {}).get("phase")


def is_terminal(tj: Mapping[str, Any]) -> bool:
    return phase_of(tj) in TERMINAL_PHASES


def format_time(value: datetime | None, *, micro: bool = False) -> str | None:
    """A time as the API serialises it: seconds (metav1.Time), or microseconds (MicroTime)."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).strftime(MICRO_TIME_FORMAT if micro else TIME_FORMAT)


def now_string(*, micro: bool = False) -> str:
    return format_time(datetime.now(timezone.utc), micro=micro)  # type: ignore[return-value]


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
