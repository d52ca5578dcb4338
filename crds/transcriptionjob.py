"""The TranscriptionJob API (ifw.dev/v1alpha1): the single source of truth.

These pydantic models define every field, its description, default, range and
the CEL rules the apiserver enforces. `crds/transcriptionjob.yaml` is generated
from them (`python -m ifw.crds`), and a test regenerates it and fails on any
difference, so the YAML and the Python types cannot drift.

Python-side validators mirror the CEL rules that can be checked without the
old object (the gateway validates before it creates anything); the contract
tests send the same invalid manifests to both and expect both to refuse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ifw.core.languages import WHISPER_LANGUAGES
from ifw.core.validators import MAX_URL_LENGTH, URL_PATTERN, check_http_url, check_speaker_hints

GROUP = "ifw.dev"
VERSION = "v1alpha1"
KIND = "TranscriptionJob"
PLURAL = "transcriptionjobs"
SINGULAR = "transcriptionjob"
SHORT_NAMES = ["tj"]
API_VERSION = f"{GROUP}/{VERSION}"

MAX_PROGRESS_TEXT = 16384  # characters: status stays small, every watcher receives each write
MAX_PROMPT_LENGTH = 2000  # characters; Whisper itself keeps the last 224 tokens of a prompt
URL_CEL = "self.matches('" + URL_PATTERN.replace("\\", "\\\\") + "')"
# A password in a URL would sit in the spec (readable by anyone who may read the job) and in logs.
NO_CREDENTIALS_CEL = "!self.matches('^https?://[^/?#]*@')"

Task = Literal["transcribe", "translate"]
Runtime = Literal["Auto", "Pool", "Job"]
ExecutionState = Literal["Running", "Succeeded", "Failed", "HandedBack"]
Timestamp = Literal["chunk", "word"]
Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]
ResultStoreKind = Literal["secret", "s3"]
ResultFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]

# Spec fields a user may change after creation; every other one is immutable.
MUTABLE_SPEC_FIELDS = frozenset({"suspend", "ttlSecondsAfterFinished"})


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# --------------------------------------------------------------------- spec


class AudioSource(_Model):
    url: str = Field(
        description="Where the runner downloads the audio: an http or https URL. Private, loopback and "
        "cloud-metadata addresses are refused unless the operator's allowlist permits them.",
        max_length=MAX_URL_LENGTH,
        json_schema_extra={"x-kubernetes-validations": [
            _cel(URL_CEL, "must be an http or https URL"),
            _cel(NO_CREDENTIALS_CEL, "must not carry credentials (user:password@host): use a pre-signed URL"),
        ]},  # fmt: skip
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value, "audio.url")


class SecretReference(_Model):
    name: str = Field(
        description="Name of a Secret in the TranscriptionJob's namespace.",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    )


class Diarization(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.numSpeakers) || (!has(self.minSpeakers) && !has(self.maxSpeakers))",
                    "numSpeakers cannot be combined with minSpeakers or maxSpeakers",
                    ".numSpeakers",
                ),
                _cel(
                    "!has(self.minSpeakers) || !has(self.maxSpeakers) || self.minSpeakers <= self.maxSpeakers",
                    "minSpeakers must be less than or equal to maxSpeakers",
                    ".minSpeakers",
                ),
            ]
        }
    )

    enabled: bool = Field(False, description="Split the transcript by speaker (pyannote diarization).")
    num_speakers: int | None = Field(
        None, ge=1, le=64, description="Exact number of speakers, when known. Excludes minSpeakers/maxSpeakers."
    )
    min_speakers: int | None = Field(None, ge=1, le=64, description="Lower bound on the number of speakers.")
    max_speakers: int | None = Field(None, ge=1, le=64, description="Upper bound on the number of speakers.")

    @model_validator(mode="after")
    def _hints(self) -> Diarization:
        check_speaker_hints(
            self.num_speakers, self.min_speakers, self.max_speakers,
            names=("diarization.numSpeakers", "diarization.minSpeakers", "diarization.maxSpeakers"),
        )  # fmt: skip
        return self


class Webhook(_Model):
    url: str = Field(
        description="Receives a POST when the job completes, fails or is cancelled (same payloads as the "
        "original API, signed per the Standard Webhooks spec). Must be http or https.",
        max_length=MAX_URL_LENGTH,
        json_schema_extra={"x-kubernetes-validations": [
            _cel(URL_CEL, "must be an http or https URL"),
            _cel(NO_CREDENTIALS_CEL, "must not carry credentials (user:password@host): use webhook.headersSecretRef"),
        ]},  # fmt: skip
    )
    headers_secret_ref: SecretReference | None = Field(
        None,
        description="A Secret whose keys and values are sent as extra HTTP headers (they often carry "
        "credentials, so they never live in the spec).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value, "webhook.url")


class TranscriptionJobSpec(_Model):
    

    audio: AudioSource = Field(description="The audio to transcribe.")
    task: Task = Field("transcribe", description="transcribe keeps the spoken language; translate outputs English.")
    language: str | None = Field(
        None,
        description="ISO code of the spoken language (e.g. en). Empty or absent: Whisper detects it and "
        "status.audio.language reports what it found.",
        json_schema_extra={"enum": ["", *WHISPER_LANGUAGES]},
    )
    model: str | None = Field(
        None,
        description="Whisper checkpoint to use (a hub id or a name from the operator's allowed list). "
        "Absent: the operator's default model.",
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=256,
        description="How many ≤30 s audio pieces Whisper decodes at once (64: the REST API's default, the "
        "original API's).",
    )
    timestamp: Timestamp = Field("chunk", description="chunk: one timestamp per segment; word: one per word.")
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_LENGTH,
        description="Initial prompt for every piece of the audio: vocabulary, names and spellings to "
        "prefer, or the style of the text (as OpenAI's prompt / Whisper's initial_prompt).",
    )
    temperature: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Sampling temperature of the first decode (absent: 0, greedy); pieces that fail "
        "Whisper's checks (repetition, low log-probability) are decoded again at higher temperatures, up to 1.",
    )
    diarization: Diarization = Field(
        default_factory=Diarization,
        description="Speaker diarization settings.",
        json_schema_extra={"default": {}},
    )
    webhook: Webhook | None = Field(None, description="Where to report completion, failure or cancellation.")
    suspend: bool = Field(
        False, description="While true the job does not start (or its pod is stopped); set false to run it."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=604800, description="Fail the job if it runs longer than this. Absent: no deadline."
    )
    backoff_limit: int = Field(2, ge=0, le=20, description="Retries after transient runner failures.")
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the finished job, its runner and its result this long after it ends. "
        "Absent: the operator's default (24 h).",
    )
    runtime: Runtime | None = Field(
        None,
        description="Where the job runs. Pool: a warm pool worker that already holds the model (no "
        "start-up per job); Job: its own batch/v1 Job (isolation, Kueue, very long audio); Auto (or "
        "absent): the pool when a ready worker serves the job's model, else a Job.",
    )
    queue_name: str | None = Field(
        None,
        description="Kueue LocalQueue for the runner Job (label kueue.x-k8s.io/queue-name); implies a Job.",
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    )

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        if value and value not in WHISPER_LANGUAGES:
            raise ValueError(f"language {value!r} is not a Whisper language code (e.g. 'en'); leave empty to detect")
        return value


# ------------------------------------------------------------------- status


class Condition(_Model):
    """One observation about the job, in the Kubernetes condition convention."""
    type: str = Field(description="Condition type: Ready, Queued, Running, Succeeded or Failed.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, description="CamelCase cause, e.g. InvalidAudio.", max_length=1024)
    message: str | None = Field(None, description="What happened, for people.", max_length=32768)
    last_transition_time: datetime | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, ge=0, description="The generation this condition reflects.")


class Progress(_Model):
    """How far the runner has got."""
    percent: float | None = Field(None, ge=0, le=100, description="Share of the audio transcribed, 0–100.")
    processed_seconds: float | None = Field(None, ge=0, description="Seconds of audio transcribed so far.")
    total_seconds: float | None = Field(None, ge=0, description="Seconds of audio in total.")
    last_update_time: datetime | None = Field(None, description="When the runner last reported progress.")
    text: str | None = Field(
        None,
        max_length=MAX_PROGRESS_TEXT,
        description="Streaming jobs only (annotation ifw.dev/stream): the text of the audio transcribed so "
        "far, from its start; it stops growing at the size limit (the result has all of it).",
    )


class AudioInfo(_Model):
    """Facts about the audio."""
    duration_seconds: float | None = Field(None, ge=0, description="Length of the decoded audio.")
    language: str | None = Field(None, max_length=16, description="Spoken language, given or detected.")
    language_probability: float | None = Field(None, ge=0, le=1, description="Confidence of the detection.")
    speech_seconds: float | None = Field(None, ge=0, description="Seconds of speech the voice detection found.")
    text_seconds: float | None = Field(None, ge=0, description="Seconds of the detected speech covered by text.")
    dropped_pieces: int | None = Field(
        None, ge=0, description="Pieces with speech that gave no text after every retry (0: nothing dropped)."
    )


class ResultRef(_Model):
    """A pointer to the stored transcript."""
    store: ResultStoreKind = Field(description="secret: a Secret owned by the job; s3: S3-compatible storage.")
    ref: str = Field(description="Secret name, or s3://bucket/key.", max_length=2048)
    size_bytes: int | None = Field(None, ge=0, description="Size of the stored (compressed) result.")
    sha256: str | None = Field(None, description="SHA-256 of the stored bytes.", max_length=64)
    formats: list[ResultFormat] = Field(
        default_factory=list, description="Formats the result can be rendered in.", max_length=8
    )


class WebhookDelivery(_Model):
    """What happened when the webhook was sent."""
    attempts: int = Field(0, ge=0, description="Delivery attempts so far.")
    delivered: bool = Field(False, description="The receiver answered 2xx.")
    last_attempt_time: datetime | None = Field(None, description="When the last attempt was made.")
    last_error: str | None = Field(None, description="Why the last attempt failed.", max_length=4096)


class Assignment(_Model):
    """The pool worker the operator gave the job to (pool mode). Written by the operator."""

    worker: str | None = Field(
        None, description="Name of the pool worker (its Lease); absent while the job waits for one.", max_length=253
    )
    attempt: int = Field(ge=1, description="Which attempt this is; each assignment is a new one.")
    retries: int = Field(
        0, ge=0, description="Attempts lost to a failure or a lost worker (hand-backs do not count); "
        "over spec.backoffLimit the job fails.",
    )
    time: datetime | None = Field(None, description="When the job was last assigned.")


class Execution(_Model):
    """What the pool worker reports about its attempt: pool mode's termination message. Written by the worker."""

    worker: str = Field(description="The pool worker that ran the attempt.", max_length=253)
    attempt: int = Field(ge=1, description="The assignment attempt this reports on.")
    state: ExecutionState = Field(
        description="Running; Succeeded (status.result is written); Failed (reason, message); HandedBack "
        "(the worker gave the job up unstarted or drained, e.g. the audio is too long for the pool)."
    )
    reason: str | None = Field(None, description="CamelCase cause of a failure or hand-back.", max_length=1024)
    message: str | None = Field(None, description="What happened, for people.", max_length=4096)
    bad_input: bool | None = Field(None, description="The failure is the input's: retrying cannot help.")
    start_time: datetime | None = Field(None, description="When the worker started the attempt.")
    finish_time: datetime | None = Field(None, description="When the attempt ended.")


class TranscriptionJobStatus(_Model):
    phase: Phase | None = Field(None, description="Summary of the conditions, for display.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard Kubernetes conditions: Ready (kstatus: True once Succeeded), Queued, Running, "
        "Succeeded, Failed.",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="The generation the operator last acted on.")
    start_time: datetime | None = Field(None, description="When the runner pod started running.")
    completion_time: datetime | None = Field(None, description="When the job succeeded or failed.")
    job_name: str | None = Field(None, description="The batch/v1 Job that runs the runner.", max_length=63)
    runtime: Literal["Pool", "Job"] | None = Field(None, description="Where the operator runs the job.")
    assignment: Assignment | None = Field(None, description="Pool mode: the worker the job is assigned to.")
    execution: Execution | None = Field(None, description="Pool mode: the worker's report on its attempt.")
    model: str | None = Field(None, description="The Whisper model actually used.", max_length=256)
    progress: Progress | None = Field(None, description="Written by the runner while it works.")
    audio: AudioInfo | None = Field(None, description="Facts about the audio, written by the runner.")
    speakers: int | None = Field(None, ge=0, description="Speakers found by diarization.")
    result: ResultRef | None = Field(None, description="Where the transcript is stored (never inline).")
    webhook: WebhookDelivery | None = Field(None, description="Webhook delivery state.")
    reason: str | None = Field(None, description="CamelCase reason of the current phase.", max_length=1024)
    message: str | None = Field(None, description="Human-readable detail of the current phase.", max_length=32768)


class TranscriptionJob(BaseModel):
    """A whole object as read from the API (metadata kept as a plain dict)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    api_version: Literal["ifw.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["TranscriptionJob"] = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: TranscriptionJobSpec
    status: TranscriptionJobStatus = Field(default_factory=TranscriptionJobStatus)


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Summary of the conditions"},
    {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent done"},
    {"name": "Language", "type": "string", "jsonPath": ".status.audio.language", "description": "Spoken language"},
    {"name": "Duration", "type": "number", "jsonPath": ".status.audio.durationSeconds", "description": "Audio seconds"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".status.model", "priority": 1},
    {"name": "Runtime", "type": "string", "jsonPath": ".status.runtime", "priority": 1},
    {"name": "Worker", "type": "string", "jsonPath": ".status.assignment.worker", "priority": 1},
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
]
