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

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ifw.core.languages import WHISPER_LANGUAGES
from ifw.core.validators import MAX_URL_LENGTH, URL_PATTERN, check_http_url, check_speaker_hints
from ifw.crds.vad_defaults import (  # noqa: F401 - re-exported: the gateway reads them here
    VAD_DEFAULT_PREFIX_PADDING_MS,
    VAD_DEFAULT_SILENCE_DURATION_MS,
    VAD_DEFAULT_THRESHOLD,
    VAD_MAX_PREFIX_PADDING_MS,
    VAD_MAX_SILENCE_DURATION_MS,
)

GROUP = "ifw.dev"
VERSION = "v1alpha1"
KIND = "TranscriptionJob"
PLURAL = "transcriptionjobs"
SINGULAR = "transcriptionjob"
SHORT_NAMES = ["tj"]
API_VERSION = f"{GROUP}/{VERSION}"

MAX_PROGRESS_TEXT = 16384  # characters: status stays small, every watcher receives each write
MAX_PROMPT_LENGTH = 2000  # characters; Whisper itself keeps the last 224 tokens of a prompt
# Hotwords (key terms): Deepgram's keyterm takes up to 100; the runner keeps them whole before the
# prompt, inside Whisper's 223-token prompt budget (the prompt gets what is left).
MAX_HOTWORDS = 100
MAX_HOTWORD_LENGTH = 100  # characters per term
HOTWORD_SPECIAL = r"<\|[^|]*\|>"  # Whisper's special tokens (<|en|>) cannot be prompted
# Voice activity detection (OpenAI's server_vad names), the bounds every entry point applies.
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

SHARDS_EXCLUDE = "parallelism above 1 cannot be combined with multichannel or diarization.knownSpeakers"
MAX_SHARDS = 64  # spec.parallelism's upper bound: one Indexed Job's pods, one status map's keys
PARALLELISM_AUTO = "Auto"
# An int-or-string field: CEL sees its dynamic type (a structural schema cannot bound each branch).
PARALLELISM_CEL = f"type(self) == string ? self == 'Auto' : (self >= 1 && self <= {MAX_SHARDS})"


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


# Known speakers (OpenAI's known_speaker_names[] / known_speaker_references[]; OpenAI takes up to 4).
MAX_KNOWN_SPEAKERS = 8
MAX_SPEAKER_NAME_LENGTH = 64
# A known name may not look like a label the runner gives (SPEAKER_00, CHANNEL_0): it would be ambiguous.
RESERVED_SPEAKER_NAME = r"^(SPEAKER|CHANNEL)_[0-9]+$"
# Multichannel: each channel transcribed as its own speaker, at most this many channels.
MAX_CHANNELS = 8


def check_speaker_name(value: str, field: str) -> str:
    """A name as transcripts show it: one line, no control characters, not a runner's own label."""
    if value != value.strip() or not value:
        raise ValueError(f"{field} must not be blank or start or end with whitespace")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field} must not contain control characters")
    if re.match(RESERVED_SPEAKER_NAME, value):
        raise ValueError(f"{field} {value!r} looks like a label the runner gives (SPEAKER_00, CHANNEL_0): choose another")
    return value


def check_known_speaker_names(names: list[str], field: str) -> None:
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{i}] {name!r} is given twice: each known speaker needs its own name")
        seen.add(name)


class KnownSpeaker(_Model):
    """A person to recognise: their name, and a short clip of their voice (2-10 s of them speaking)."""

    name: str = Field(
        description="How the transcript names this person where a diarized speaker (or a channel) matches "
        "the reference (e.g. agent, Alice). Not SPEAKER_NN or CHANNEL_N.",
        min_length=1,
        max_length=MAX_SPEAKER_NAME_LENGTH,
        pattern=r"^[^\s\x00-\x1f\x7f]([^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$",
        json_schema_extra={"x-kubernetes-validations": [
            _cel("!self.matches('" + RESERVED_SPEAKER_NAME + "')",
                 "must not look like a label the runner gives (SPEAKER_00, CHANNEL_0)"),
        ]},  # fmt: skip
    )
    audio: AudioSource = Field(
        description="The reference clip: 2-10 s of this person speaking, any format the main audio may have, "
        "fetched like the main audio (http or https)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_speaker_name(value, "name")


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
    known_speakers: list[KnownSpeaker] | None = Field(
        None,
        max_length=MAX_KNOWN_SPEAKERS,
        description="People to name in the transcript (OpenAI's known_speaker_names[] and "
        "known_speaker_references[]): each found speaker (or, with multichannel, each channel) whose voice "
        "matches a reference by the diarization's speaker embeddings takes its name; one name per speaker, "
        "the closest match first, above a similarity threshold. Unmatched speakers keep SPEAKER_NN. Needs "
        "enabled (or spec.multichannel).",
        json_schema_extra={"x-kubernetes-validations": [
            _cel("self.all(a, self.exists_one(b, b.name == a.name))", "names must be unique"),
        ]},  # fmt: skip
    )

    @model_validator(mode="after")
    def _hints(self) -> Diarization:
        if self.known_speakers:
            check_known_speaker_names([k.name for k in self.known_speakers], "diarization.knownSpeakers")
        check_speaker_hints(
            self.num_speakers, self.min_speakers, self.max_speakers,
            names=("diarization.numSpeakers", "diarization.minSpeakers", "diarization.maxSpeakers"),
        )  # fmt: skip
        return self


def check_hotwords(terms: list[str] | None, field: str) -> list[str] | None:
    """Terms as Whisper can take them: no special tokens, no control characters, no blank term."""
    if terms is None:
        return None
    for i, term in enumerate(terms):
        if not term.strip():
            raise ValueError(f"{field}[{i}] is blank")
        if any(ord(c) < 32 or ord(c) == 127 for c in term):
            raise ValueError(f"{field}[{i}] must not contain control characters")
        if re.search(HOTWORD_SPECIAL, term):
            raise ValueError(f"{field}[{i}] must not contain a Whisper special token such as <|en|>")
    return terms


Hotword = Annotated[str, StringConstraints(min_length=1, max_length=MAX_HOTWORD_LENGTH)]


class Vad(_Model):
    """How the audio is cut into pieces at pauses (OpenAI's server_vad settings, Silero's VAD)."""

    threshold: float | None = Field(
        None, ge=0, le=1, description="Speech probability above which a frame is speech (absent: "
        f"{VAD_DEFAULT_THRESHOLD}); higher for noisy audio, lower for quiet speech.",
    )
    prefix_padding_ms: int | None = Field(
        None, ge=0, le=VAD_MAX_PREFIX_PADDING_MS, description="Audio kept before and after each stretch of "
        f"speech, in ms (absent: {VAD_DEFAULT_PREFIX_PADDING_MS}).",
    )
    silence_duration_ms: int | None = Field(
        None, ge=0, le=VAD_MAX_SILENCE_DURATION_MS, description="Shortest pause that ends a stretch of speech, "
        f"in ms (absent: {VAD_DEFAULT_SILENCE_DURATION_MS}); shorter pauses stay inside it. Lower for fast talkers.",
    )


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
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.multichannel) || !self.multichannel || !has(self.diarization) "
                    "|| !has(self.diarization.enabled) || !self.diarization.enabled",
                    "multichannel makes each channel a speaker: it cannot be combined with diarization.enabled",
                    ".multichannel",
                ),
                _cel(
                    "!has(self.parallelism) || type(self.parallelism) == string || self.parallelism <= 1 "
                    "|| ((!has(self.multichannel) || !self.multichannel) "
                    "&& (!has(self.diarization) || !has(self.diarization.knownSpeakers)))",
                    SHARDS_EXCLUDE,
                    ".parallelism",
                ),
                _cel(
                    "!has(self.diarization) || !has(self.diarization.knownSpeakers) "
                    "|| (has(self.diarization.enabled) && self.diarization.enabled) "
                    "|| (has(self.multichannel) && self.multichannel)",
                    "diarization.knownSpeakers needs diarization.enabled (or multichannel)",
                    ".diarization",
                ),
            ]
        }
    )

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
    hotwords: list[Hotword] | None = Field(
        None,
        max_length=MAX_HOTWORDS,
        description="Terms to prefer (names, jargon, spellings): placed before the prompt of every piece, "
        "as faster-whisper's hotwords, and combinable with prompt.",
        json_schema_extra={"x-kubernetes-validations": [
            _cel("self.all(w, !w.matches('" + HOTWORD_SPECIAL.replace("\\", "\\\\") + "'))",
                 "must not contain a Whisper special token such as <|en|>"),
        ]},  # fmt: skip
    )
    vad: Vad | None = Field(None, description="Voice activity detection settings (absent: the defaults).")
    diarization: Diarization = Field(
        default_factory=Diarization,
        description="Speaker diarization settings.",
        json_schema_extra={"default": {}},
    )
    multichannel: bool = Field(
        False,
        description="Transcribe each audio channel on its own, the channel as the speaker (CHANNEL_0, ... or a "
        "known speaker's name), merged in time order (AssemblyAI's and Deepgram's multichannel). The audio "
        f"must have 2-{MAX_CHANNELS} channels: a mono file fails with NotMultichannel. Excludes diarization.enabled.",
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
    parallelism: int | Literal["Auto"] | None = Field(
        None,
        description="Shards of the audio transcribed at once, each by its own runner, merged into one "
        "transcript: an integer 1-64, or Auto (shard only audio longer than the operator's threshold). "
        "Absent: 1. More than 1 (or Auto on long audio) runs the job as one Indexed Job.",
        json_schema_extra={"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [
            _cel(PARALLELISM_CEL, "must be an integer from 1 to 64, or Auto"),
        ]},  # fmt: skip
    )

    @field_validator("parallelism")
    @classmethod
    def _parallelism(cls, value: int | str | None, info: ValidationInfo) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= MAX_SHARDS:
            raise ValueError(f"parallelism must be from 1 to {MAX_SHARDS}, or Auto")
        # multichannel and diarization come before parallelism, so they are validated already
        diarization = info.data.get("diarization")
        if isinstance(value, int) and value > 1 and (
                info.data.get("multichannel") or (diarization is not None and diarization.known_speakers)):
            raise ValueError(SHARDS_EXCLUDE)
        return value

    @field_validator("hotwords")
    @classmethod
    def _hotwords(cls, value: list[str] | None) -> list[str] | None:
        return check_hotwords(value, "hotwords")

    @model_validator(mode="after")
    def _channels_and_speakers(self) -> TranscriptionJobSpec:
        if self.multichannel and self.diarization.enabled:
            raise ValueError("multichannel makes each channel a speaker: it cannot be combined with diarization.enabled")
        if self.diarization.known_speakers and not (self.diarization.enabled or self.multichannel):
            raise ValueError("diarization.knownSpeakers needs diarization.enabled (or multichannel)")
        return self

    @property
    def shardable(self) -> bool:
        """Whether the audio may be cut into shards: channels and known names are decided over the whole
        file (an Auto job with them always runs whole)."""
        return not (self.multichannel or self.diarization.known_speakers)

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
    cut_short: bool | None = Field(
        None, description="The audio ends before its container says it does (a file cut off): it was transcribed "
        "as far as it goes (durationSeconds). Damage with audio after it fails the job (InvalidAudio) instead."
    )
    stated_seconds: float | None = Field(None, ge=0, description="With cutShort: the length the container states.")
    note: str | None = Field(None, max_length=1024, description="With cutShort: why, in words.")


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


ShardState = Literal["Running", "Succeeded", "Failed", "Unused"]


class ShardStatus(_Model):
    """One shard's report, written by its runner (a merge patch of its own key only)."""

    state: ShardState | None = Field(
        None, description="Running; Succeeded (its partial result is stored); Failed; Unused (the audio was too "
        "short for this many shards: nothing to do)."
    )
    processed_seconds: float | None = Field(None, ge=0, description="Seconds of its stretch transcribed so far.")
    total_seconds: float | None = Field(None, ge=0, description="Seconds of audio in its stretch.")
    start: float | None = Field(None, ge=0, description="Where its stretch starts, in seconds of the file.")
    end: float | None = Field(None, ge=0, description="Where its stretch ends, in seconds of the file.")
    pod: str | None = Field(None, description="The pod (or worker) that ran it.", max_length=253)
    node: str | None = Field(None, description="The node it ran on.", max_length=253)
    last_update_time: datetime | None = Field(None, description="When the shard last reported.")
    text: str | None = Field(
        None, max_length=MAX_PROGRESS_TEXT, description="A streaming job (annotation ifw.dev/stream): its "
        "stretch's text so far, at most the progress text's size cap divided by the shard count. The operator "
        "shows the shards' texts in shard order in status.progress.text, each once the shards before it finished."
    )
    text_cut: bool | None = Field(
        None, description="Its stretch's text is longer than text: the shards after it are not shown before the merge."
    )


class Shards(_Model):
    """How a sharded job is split and how far each shard got."""

    count: int = Field(ge=1, le=MAX_SHARDS, description="How many shards the job runs as (the Indexed Job's completions).")
    succeeded: int | None = Field(None, ge=0, description="Shards finished (written by the operator).")
    items: dict[str, ShardStatus] = Field(
        default_factory=dict,
        description="Each shard's report, keyed by its index (\"0\", \"1\", ...): a map, so that the shards' "
        "concurrent merge patches never overwrite each other.",
        json_schema_extra={"maxProperties": MAX_SHARDS},
    )


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
    shards: Shards | None = Field(
        None, description="A sharded job (spec.parallelism): the shard count, and each shard's progress. "
        "status.progress is then the operator's sum over the shards."
    )
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
    {"name": "Shards", "type": "integer", "jsonPath": ".status.shards.count", "description": "Shards run in parallel"},
    {"name": "Language", "type": "string", "jsonPath": ".status.audio.language", "description": "Spoken language"},
    {"name": "Duration", "type": "number", "jsonPath": ".status.audio.durationSeconds", "description": "Audio seconds"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".status.model", "priority": 1},
    {"name": "Runtime", "type": "string", "jsonPath": ".status.runtime", "priority": 1},
    {"name": "Worker", "type": "string", "jsonPath": ".status.assignment.worker", "priority": 1},
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
]
