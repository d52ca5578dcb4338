"""Request and response bodies of the REST API.

Field names and defaults are the original Insanely Fast Whisper API's
(url, task, language="None", batch_size=64, timestamp, diarise_audio,
webhook{url, header}, is_async, managed_task_id); what it accepted but never
checked (enums, ranges, URL form, language) is enforced here, and each error
names its field. Fields it does not know are ignored as the original ignores
them, and reported (routes_api strips them before these models see the body).
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ifw.core.languages import normalize_language
from ifw.core.validators import MAX_URL_LENGTH, check_http_url, check_speaker_hints
from ifw.crds.transcriptionjob import (
    MAX_CHANNELS,
    MAX_HOTWORDS,
    MAX_KNOWN_SPEAKERS,
    MAX_PROMPT_LENGTH,
    MAX_SHARDS,
    MAX_SPEAKER_NAME_LENGTH,
    SHARDS_EXCLUDE,
    VAD_DEFAULT_PREFIX_PADDING_MS,
    VAD_DEFAULT_SILENCE_DURATION_MS,
    VAD_DEFAULT_THRESHOLD,
    VAD_MAX_PREFIX_PADDING_MS,
    VAD_MAX_SILENCE_DURATION_MS,
    Hotword,
    Task,
    Timestamp,
    check_hotwords,
    check_known_speaker_names,
    check_speaker_name,
)
from ifw.gateway.references import MAX_DATA_URL_LENGTH, check_reference
from ifw.gateway.taskids import MAX_TASK_ID, check_task_id, refused_character

# Webhook header names become Secret keys: both rules must hold.
HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

SPEAKER_HINTS = ("num_speakers", "min_speakers", "max_speakers")
ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json", "diarized_json"]


# Where credentials in a URL would go instead, per field.
CREDENTIALS_INSTEAD = {
    "url": "use a pre-signed URL (its signature in the query) instead",
    "webhook.url": "send them in webhook.header instead (kept in a Secret)",
}


def check_url(value: str, field: str) -> str:
    # Stored verbatim in the spec (and a webhook's is what the operator posts to): control and
    # invisible characters (bidi, zero-width) would be fetched, logged and shown as they are.
    if (c := refused_character(value.strip())) is not None:
        raise ValueError(
            f"{field} must not contain control or invisible characters (found U+{ord(c):04X}); percent-encode them"
        )
    value = check_http_url(value.strip(), field)
    # user:pass@ would be stored in the spec and printed by HTTP clients' logs: refused, never echoed.
    if "@" in urlsplit(value).netloc:
        raise ValueError(f"{field} must not carry credentials (user:password@host); {CREDENTIALS_INSTEAD[field]}")
    return value


def check_language(value: str | None) -> str | None:
    """The original's "None" (or empty) means detect; names like "English" map to codes."""
    return normalize_language(value)


class WebhookBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=MAX_URL_LENGTH, description="Receives a POST when the task completes or fails.")
    header: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra HTTP headers sent with the webhook (kept in a Secret, never in the TranscriptionJob spec).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value, "webhook.url")

    @field_validator("header")
    @classmethod
    def _header(cls, value: dict[str, str]) -> dict[str, str]:
        for name, content in value.items():
            if len(name) > 253 or not HEADER_NAME.match(name):
                raise ValueError(f"webhook.header name {name!r} must be letters, digits, '-', '_' or '.'")
            if len(content) > 8192 or refused_character(content, allow="\t") is not None:
                raise ValueError(
                    f"webhook.header {name!r} value must be one line of at most 8192 characters, "
                    "without control or invisible characters"
                )
        return value


class VadBody(BaseModel):
    """Voice activity detection settings: OpenAI's server_vad names, the CRD's bounds (spec.vad)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None, ge=0, le=1,
        description=f"Speech probability above which audio is speech (default {VAD_DEFAULT_THRESHOLD}); "
        "higher for noisy audio.",
    )  # fmt: skip
    prefix_padding_ms: int | None = Field(
        None, ge=0, le=VAD_MAX_PREFIX_PADDING_MS,
        description=f"Audio kept around each stretch of speech, ms (default {VAD_DEFAULT_PREFIX_PADDING_MS}).",
    )  # fmt: skip
    silence_duration_ms: int | None = Field(
        None, ge=0, le=VAD_MAX_SILENCE_DURATION_MS,
        description=f"Shortest pause that ends a stretch of speech, ms (default {VAD_DEFAULT_SILENCE_DURATION_MS}).",
    )  # fmt: skip


class KnownSpeakerBody(BaseModel):
    """A person to name: their name and a 2-10 s clip of their voice (an http(s) URL, or a data URL)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_SPEAKER_NAME_LENGTH, description="How the transcript names them.")
    url: str = Field(
        max_length=MAX_DATA_URL_LENGTH,
        description="Their reference clip (2-10 s of them speaking): an http(s) URL the runner fetches, or a "
        "base64 data URL (data:audio/wav;base64,...) of at most 1 MiB, kept by the gateway for the runner.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_speaker_name(value, "name")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_reference(value, "url")


class TranscribeFields(BaseModel):
    """Everything of POST / but the audio (a URL in JSON, a file in multipart)."""

    model_config = ConfigDict(extra="forbid")

    task: Task = Field("transcribe", description="transcribe keeps the spoken language; translate outputs English.")
    language: str | None = Field(
        "None",
        max_length=32,
        validate_default=True,
        description='Spoken language: an ISO code ("en") or name ("english"); "None" or empty detects it.',
    )
    batch_size: int = Field(64, ge=1, le=256, description="How many 30 s windows Whisper decodes at once.")
    timestamp: Timestamp = Field("chunk", description="chunk: a timestamp per segment; word: one per word.")
    diarise_audio: bool = Field(False, description="Split the transcript by speaker (output.speakers).")
    webhook: WebhookBody | None = Field(None, description="Required when is_async is true.")
    is_async: bool = Field(False, description="Answer at once and deliver the result to the webhook.")
    managed_task_id: str | None = Field(
        None,
        max_length=MAX_TASK_ID,
        description="Your id for the task, any printable text (e.g. crm:call/8812); default: a new uuid4. "
        "Use it URL-encoded in /status and /cancel.",
    )
    # Beyond the original API.
    model: str | None = Field(
        None, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", description="Whisper checkpoint to use."
    )
    num_speakers: int | None = Field(None, ge=1, le=64, description="Exact number of speakers, when known.")
    min_speakers: int | None = Field(None, ge=1, le=64, description="Lower bound on the number of speakers.")
    max_speakers: int | None = Field(None, ge=1, le=64, description="Upper bound on the number of speakers.")
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_LENGTH,
        description="Vocabulary, names and spellings to prefer, or the style of the text (Whisper's initial prompt).",
    )
    temperature: float | None = Field(
        None, ge=0, le=1, description="Sampling temperature of the first decode (absent: 0, greedy, then Whisper's fallback)."
    )
    hotwords: list[Hotword] | None = Field(
        None,
        max_length=MAX_HOTWORDS,
        description="Terms to prefer (names, jargon, spellings), placed before the prompt of every piece "
        "(faster-whisper's hotwords); combinable with prompt.",
    )
    vad: VadBody | None = Field(None, description="Voice activity detection settings (where the audio is cut).")
    multichannel: bool = Field(
        False,
        description="Transcribe each channel on its own, the channel as the speaker (CHANNEL_0, ... or a known "
        "speaker's name), merged in time order (AssemblyAI's and Deepgram's multichannel). The audio must have "
        f"2-{MAX_CHANNELS} channels. Excludes diarise_audio.",
    )
    known_speakers: list[KnownSpeakerBody] | None = Field(
        None,
        max_length=MAX_KNOWN_SPEAKERS,
        description="People to name in the transcript (OpenAI's known_speaker_names[] / known_speaker_references[]): "
        "a diarized speaker (or, with multichannel, a channel) whose voice matches a reference takes its name; "
        "unmatched ones keep SPEAKER_NN. Needs diarise_audio (or multichannel).",
    )

    # int | str, checked below: a form sends "4", and one message names the field (not each union member)
    parallelism: int | str | None = Field(
        None,
        description=f"ifw's field: shards of the audio transcribed at once by their own runners and merged "
        f"(spec.parallelism): 1-{MAX_SHARDS}, or Auto (only audio longer than the operator's threshold). "
        "Excludes multichannel and known_speakers.",
    )

    @field_validator("parallelism")
    @classmethod
    def _parallelism(cls, value: int | str | None, info: ValidationInfo) -> int | str | None:
        # the same rules as the CRD's spec.parallelism; known_speakers and multichannel come before it
        if isinstance(value, str) and value != "Auto":
            if not value.isdecimal():
                raise ValueError(f"parallelism must be an integer from 1 to {MAX_SHARDS}, or Auto")
            value = int(value)
        if isinstance(value, int) and not 1 <= value <= MAX_SHARDS:
            raise ValueError(f"parallelism must be from 1 to {MAX_SHARDS}, or Auto")
        if isinstance(value, int) and value > 1 and (info.data.get("multichannel") or info.data.get("known_speakers")):
            raise ValueError(SHARDS_EXCLUDE.replace("diarization.knownSpeakers", "known_speakers"))
        return value

    @field_validator("multichannel")
    @classmethod
    def _multichannel(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("diarise_audio"):
            raise ValueError("multichannel makes each channel a speaker: it cannot be combined with diarise_audio")
        return value

    @field_validator("known_speakers")
    @classmethod
    def _known_speakers(cls, value: list[KnownSpeakerBody] | None, info: ValidationInfo) -> list | None:
        if not value:
            return None
        if not (info.data.get("diarise_audio") or info.data.get("multichannel")):
            raise ValueError("known_speakers needs diarise_audio: true (or multichannel: true)")
        check_known_speaker_names([k.name for k in value], "known_speakers")
        return value

    @field_validator("hotwords")
    @classmethod
    def _hotwords(cls, value: list[str] | None) -> list[str] | None:
        return check_hotwords(value, "hotwords") or None

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        return check_language(value)

    @field_validator("managed_task_id")
    @classmethod
    def _task_id(cls, value: str | None) -> str | None:
        return None if value is None else check_task_id(value)

    @field_validator("num_speakers", "min_speakers", "max_speakers")
    @classmethod
    def _speakers(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Fields validate in order, so the ones named here are already in info.data.
        if value is None:
            return value
        if not info.data.get("diarise_audio"):
            raise ValueError(f"{info.field_name} needs diarise_audio: true")
        # The hints given so far plus this one, checked by the rule the CRD applies too.
        hints = {name: info.data.get(name) for name in SPEAKER_HINTS} | {info.field_name: value}
        check_speaker_hints(*(hints[name] for name in SPEAKER_HINTS), names=SPEAKER_HINTS)
        return value


class TranscribeRequest(TranscribeFields):
    """POST / as JSON — the original API's body, checked."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"url": "https://example.com/a.mp3"}})

    url: str = Field(max_length=MAX_URL_LENGTH, description="http(s) URL of the audio file.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value, "url")


# ----------------------------------------------------------------- responses


class Chunk(BaseModel):
    timestamp: tuple[float, float | None]
    text: str = Field(description='As Whisper wrote it, leading space included (" Hello"): the chunks join into the text.')


class SpeakerChunk(BaseModel):
    speaker: str | None = Field(description="SPEAKER_00, ...; null only when diarization found no speaker at all.")
    timestamp: tuple[float, float | None]
    text: str


class Output(BaseModel):
    """The original API's output: text, chunks and (when diarized) speakers, one per chunk."""

    model_config = ConfigDict(extra="allow")

    text: str
    chunks: list[Chunk]
    speakers: list[SpeakerChunk] | None = Field(
        None, description="When diarized: each chunk's speaker, in chunk order (zip it with chunks)."
    )
    speaker_turns: list[SpeakerChunk] | None = Field(
        None, description="When diarized: the speaker turns, consecutive chunks of one speaker merged (ifw's addition)."
    )
    word_probabilities: list[float | None] | None = Field(
        None,
        description="With timestamp=word: each word's probability (0-1), one per chunk in chunk order (zip it with "
        "chunks); beside the chunks so the chunks keep the original's keys (ifw's addition).",
    )


class ProcessedBy(BaseModel):
    """The machine that did the work (the original reported fly_machine_id)."""

    pod: str | None = None
    node: str | None = None
    runtime: str | None = Field(None, description="Pool (a warm worker), Job (its own batch/v1 Job) or Local.")
    device: str | None = Field(None, description="cpu, or the GPU the model ran on (cuda).")
    dtype: str | None = Field(None, description="float32, float16, bfloat16, or int8 (CPU).")
    attention: str | None = Field(None, description="flash_attention_2, sdpa or eager: what the model ran with.")


class CompletedResponse(BaseModel):
    output: Output
    status: Literal["completed"] = "completed"
    task_id: str
    processed_by: ProcessedBy | None = None


class ProcessingResponse(BaseModel):
    detail: str = "Task is being processed in the background"
    status: Literal["processing"] = "processing"
    task_id: str


class TasksResponse(BaseModel):
    tasks: list[str]


class ProgressOut(BaseModel):
    percent: float | None = None
    processed_seconds: float | None = None
    total_seconds: float | None = None
    text: str | None = Field(None, description="Streaming tasks only: the text transcribed so far.")


class WebhookState(BaseModel):
    """How the delivery of the task's webhook went (the operator sends it, with retries)."""

    attempts: int = Field(0, description="Delivery attempts so far (0: not sent yet; it goes once the task finishes).")
    delivered: bool = Field(False, description="The receiver answered 2xx.")
    last_error: str | None = Field(None, description="Why the last attempt failed.")
    last_attempt_time: str | None = Field(None, description="When the last attempt was made (RFC 3339).")


class StatusResponse(BaseModel):
    status: Literal["processing", "completed", "error", "cancelled"] = Field(
        description="cancelled: deleted before it finished (still there while its cancelled webhook goes out)."
    )
    task_id: str
    phase: str | None = Field(None, description="Pending, Queued, Running, Succeeded or Failed.")
    progress: ProgressOut | None = None
    language: str | None = Field(None, description="Spoken language, given or detected.")
    duration: float | None = Field(None, description="Seconds of audio.")
    reason: str | None = None
    message: str | None = None
    output: Output | None = Field(None, description="Present once completed, until the TranscriptionJob's TTL removes it.")
    processed_by: ProcessedBy | None = Field(None, description="Once completed: the pod and node that did the work.")
    webhook: WebhookState | None = Field(None, description="Tasks with a webhook: its delivery so far.")


class ReadyResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(
        description='Each check ("apiserver", "watch"; "gateway" while it shuts down): "ok", or why not.'
    )


class CancelResponse(BaseModel):
    status: Literal["cancelled"] = "cancelled"


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='Where the bad value is, e.g. ["body", "batch_size"].')
    msg: str
    type: str


class Detail(BaseModel):
    """Every error answer: `detail` says what is wrong (a list naming each bad field for 422s);
    answers about a task add its status, task_id and the task's reason and message."""

    detail: str | list[FieldError]
    status: Literal["error", "processing", "cancelled"] | None = None
    task_id: str | None = None
    reason: str | None = Field(None, description="CamelCase cause of a failed task, e.g. InvalidAudio.")
    message: str | None = None


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error or server_error.")
    param: str | None = Field(None, description="The bad field, when one is to blame.")
    code: str | None = Field(None, description="The failed task's reason, e.g. InvalidAudio.")
    task_id: str | None = Field(None, description="The task, when one was created (poll /status/{task_id}).")


class OpenAIError(BaseModel):
    """Errors on /v1 routes, in OpenAI's shape (its SDKs show error.message)."""

    error: OpenAIErrorInfo


class OpenAIText(BaseModel):
    text: str
    usage: dict[str, Any] | None = None


class ModelObject(BaseModel):
    """One model, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ifw"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
