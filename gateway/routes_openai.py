"""OpenAI-compatible routes: POST /v1/audio/transcriptions, /v1/audio/translations, GET /v1/models.

The same multipart fields as OpenAI's API, so the official SDKs work when pointed at the
gateway. Each request becomes a TranscriptionJob on the uploaded file:

- `prompt` and `temperature` become spec.prompt and spec.temperature (Whisper's temperature
  fallback starts there); `hotwords` (repeated, or `hotwords[]` as the SDK's extra_body sends a
  list) becomes spec.hotwords: terms placed before the prompt, as faster-whisper/speaches take them.
- `chunking_strategy`: `auto` (ifw always cuts at voice-activity pauses) or OpenAI's server_vad
  object `{"type": "server_vad", "threshold", "prefix_padding_ms", "silence_duration_ms"}`, as JSON
  text or as the SDK sends it (`chunking_strategy[threshold]=...`): spec.vad, the CRD's bounds.
- response_format json ({text, usage}), text, srt, vtt, verbose_json (the stored per-segment
  scores), diarized_json (speaker segments, as gpt-4o-transcribe-diarize answers).
- Diarization: response_format=diarized_json turns it on; `diarize=true` (ifw's field) turns it
  on for the other formats (speaker names in srt/vtt cues and verbose_json segments).
- `include[]=logprobs` (json only): each stored token's log-probability; the gateway has no
  tokenizer, so `token` and `bytes` are null and `token_id` names the Whisper token.
- `stream=true` (json, text, diarized_json): server-sent events, transcript.text.delta as the
  runner's status.progress.text grows, then (diarized_json) transcript.text.segment events, then
  transcript.text.done with the whole text and usage. An error after the stream started comes
  as an event {"error": {...}}, which the SDKs raise.

- Known speakers: `known_speaker_names[]` with `known_speaker_references[]` (data URLs of 2-10 s
  clips, as OpenAI's gpt-4o-transcribe-diarize takes them) turn diarization on and name the
  speakers whose voice matches (spec.diarization.knownSpeakers; the clips are kept beside the
  upload and served to the runner by URL). `multichannel=true` (ifw's field): each channel on its
  own, the channel as the speaker (spec.multichannel); a mono WAV/FLAC is refused here.

Any other field (other chunking_strategy keys, an SDK's extra_body, ...)
is refused with a 422 naming it, never ignored. Errors come in OpenAI's shape (errors.py does
that for every /v1/ path).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError

from ifw.core import formats
from ifw.core.formats import MEDIA_TYPES
from ifw.crds.transcriptionjob import (
    MAX_KNOWN_SPEAKERS,
    MAX_PROMPT_LENGTH,
    MAX_SPEAKER_NAME_LENGTH,
    check_known_speaker_names,
    check_speaker_name,
)
from ifw.gateway.deps import Namespace, ServiceDep
from ifw.gateway.errors import ERROR_RESPONSES, DiarizationUnavailable, ModelNotFound, field_error, invalid, late_body
from ifw.gateway.models import (
    KnownSpeakerBody,
    ModelList,
    ModelObject,
    OpenAIError,
    OpenAIText,
    VadBody,
    check_language,
)
from ifw.gateway.models import TranscribeFields as Fields
from ifw.gateway.pushing import SSE_KEEPALIVE, PushedResponse, json_answer, sse
from ifw.gateway.references import MAX_DATA_URL_LENGTH, is_data_url
from ifw.gateway.service import Created, Service

log = logging.getLogger(__name__)
# Form fields (not files) may be as long as an inline reference clip, with room to spare so that one
# somewhat over the limit gets the 422 naming known_speaker_references[] (references.py), not
# Starlette's default 1 MiB part limit and its 400 naming nothing; beyond this: errors.too_large_part.
MAX_FORM_PART_BYTES = 2 * MAX_DATA_URL_LENGTH
router = APIRouter(prefix="/v1", tags=["openai"], form_limits={"max_part_size": MAX_FORM_PART_BYTES})

Granularity = Literal["word", "segment"]
TranscriptionFormat = Literal["json", "text", "srt", "vtt", "verbose_json", "diarized_json"]
TranslationFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
JSON_FORMATS = frozenset({"json", "verbose_json", "diarized_json"})
STREAM_FORMATS = frozenset({"json", "text", "diarized_json"})
TRANSCRIPTION_FIELDS = frozenset({
    "file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
    "include[]", "stream", "chunking_strategy", "diarize", "hotwords", "hotwords[]",
    "known_speaker_names[]", "known_speaker_references[]", "multichannel", "parallelism",
})  # fmt: skip
VAD_KEYS = frozenset({"type", "threshold", "prefix_padding_ms", "silence_duration_ms"})
CHUNKING_FORM = "chunking_strategy["  # the SDK's form encoding of the object: chunking_strategy[threshold]=0.5
TRANSLATION_FIELDS = frozenset({"file", "model", "prompt", "response_format", "temperature"})

SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "contentMediaType": "application/json"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/OpenAIText"}},
            "text/plain": {"schema": {"type": "string"}},
            "application/x-subrip": {"schema": {"type": "string"}},
            "text/vtt": {"schema": {"type": "string"}},
            # one event (before OpenAPI 3.2's itemSchema, `schema` describes each event): its data is
            # JSON, a transcript.text.delta / .segment / .done event or {error}
            "text/event-stream": {"schema": SSE_EVENT},
        },
        "description": "json: {text, usage}; verbose_json: task, language, duration, text, segments (words), usage; "
        "diarized_json: task, duration, text, segments (speaker, start, end, text), usage; text, srt, vtt: "
        "plain text; stream=true: server-sent events. A JSON answer that takes longer than the keep-alive "
        "interval starts with spaces, and an error after that point is its body ({error}).",
    },
    **{code: {**spec, "model": OpenAIError} for code, spec in ERROR_RESPONSES.items()},
}


# ------------------------------------------------------------------ the request


async def _refuse_unknown(request: Request, known: frozenset[str]) -> None:
    """FastAPI's Form() ignores fields it has no parameter for: refuse them instead, by name."""
    form = await request.form()  # the form FastAPI already parsed (cached on the request)
    for key in form:
        if key not in known and not (key.startswith(CHUNKING_FORM) and "chunking_strategy" in known):
            raise field_error(key, "not supported by this server", "extra_forbidden")


async def _chunking(request: Request, raw: str | None) -> VadBody | None:
    """OpenAI's chunking_strategy: "auto" (None: the default VAD), or a server_vad object as JSON
    text or in the SDK's form encoding (chunking_strategy[type]=server_vad, ...[threshold]=0.5)."""
    form = await request.form()
    nested = {k[len(CHUNKING_FORM) : -1]: v for k, v in form.multi_items() if k.startswith(CHUNKING_FORM)}
    if nested and raw is not None:
        raise field_error("chunking_strategy", "send it once: as JSON text or as chunking_strategy[...] fields")
    value: Any = nested or None
    if raw is not None:
        if raw.strip() == "auto":
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if value == "auto":
            return None
        if not isinstance(value, dict):
            raise field_error("chunking_strategy", 'must be "auto" or a JSON object {"type": "server_vad", ...}')
    if value is None:
        return None
    if value.get("type") != "server_vad":
        raise field_error("chunking_strategy.type", 'must be "server_vad" (or send chunking_strategy=auto)')
    for key in value:
        if key not in VAD_KEYS:
            raise field_error(f"chunking_strategy.{key}", "not supported by this server", "extra_forbidden")
    try:
        return VadBody.model_validate({k: v for k, v in value.items() if k != "type"})
    except ValidationError as exc:
        raise invalid(exc, ("body", "chunking_strategy")) from None


def _fields(
    svc: Service,
    task: str,
    model: str,
    language: str | None,
    response_format: str,
    granularities: list[str],
    prompt: str | None,
    temperature: float | None,
    diarize: bool,
    hotwords: list[str] | None = None,
    vad: VadBody | None = None,
) -> Fields:
    """OpenAI's form as our request; what the runner cannot honour is refused, naming the field."""
    try:
        language = check_language(language)
    except ValueError as exc:
        raise field_error("language", str(exc)) from None
    if "word" in granularities and response_format != "verbose_json":
        raise field_error("timestamp_granularities[]", "word timestamps need response_format=verbose_json")
    if diarize and not svc.settings.diarization_available:
        raise DiarizationUnavailable("response_format=diarized_json" if response_format == "diarized_json" else "diarize")
    try:
        return Fields(
            task=task,
            language=language,
            # OpenAI names (whisper-1) mean the default model; anything else is a spec.model.
            model=svc.settings.model_aliases.get(model, model),
            timestamp="word" if "word" in granularities else "chunk",
            diarise_audio=diarize,
            prompt=prompt or None,
            temperature=temperature,
            hotwords=hotwords or None,
            vad=vad,
        )
    except ValidationError as exc:
        raise invalid(exc) from None


def _known_speakers(req: Fields, names: list[str], references: list[str], multichannel: bool) -> Fields:
    """OpenAI's known_speaker_names[] / known_speaker_references[] (and ifw's multichannel) on the request,
    each refusal naming OpenAI's field."""
    if not (names or references or multichannel):
        return req
    if len(names) != len(references):
        raise field_error("known_speaker_references[]", f"{len(references)} references for {len(names)} "
                          "known_speaker_names[]: give one reference per name, in the same order")  # fmt: skip
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise field_error("known_speaker_names[]", f"at most {MAX_KNOWN_SPEAKERS} known speakers, got {len(names)}")
    known = []
    for i, (name, reference) in enumerate(zip(names, references, strict=True)):
        try:
            check_speaker_name(name, f"known_speaker_names[{i}]")
            if len(name) > MAX_SPEAKER_NAME_LENGTH:
                raise ValueError(f"known_speaker_names[{i}] is longer than {MAX_SPEAKER_NAME_LENGTH} characters")
        except ValueError as exc:
            raise field_error("known_speaker_names[]", str(exc)) from None
        if not is_data_url(reference):
            raise field_error("known_speaker_references[]", f"known_speaker_references[{i}] must be a data URL "
                              "(data:audio/wav;base64,...), as OpenAI takes them")  # fmt: skip
        try:
            known.append(KnownSpeakerBody(name=name, url=reference))
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ").replace("url", f"known_speaker_references[{i}]", 1)
            raise field_error("known_speaker_references[]", message) from None
    try:
        check_known_speaker_names(names, "known_speaker_names")
    except ValueError as exc:
        raise field_error("known_speaker_names[]", str(exc)) from None
    return req.model_copy(update={"known_speakers": known or None, "multichannel": multichannel})


# ------------------------------------------------------------------ the answer


async def _answer(
    svc: Service,
    namespace: str,
    request: Request,
    req: Fields,
    file: UploadFile,
    response_format: str,
    logprobs: bool = False,
    stream: bool = False,
) -> Response:
    created = await svc.submit(namespace, req, None, file, "openai", stream=stream)
    path = request.url.path
    if stream:
        return PushedResponse(_events(svc, created, request, response_format, logprobs), "text/event-stream",
                              {"Cache-Control": "no-cache"})  # fmt: skip

    async def rendered() -> Any:
        return formats.render_openai(await svc.transcript(created, request), response_format, logprobs)

    if response_format in JSON_FORMATS:
        return await json_answer(path, rendered(), svc.settings.keepalive_seconds)
    # Text formats cannot take leading whitespace: they wait without keep-alive.
    return PlainTextResponse(await rendered(), media_type=MEDIA_TYPES[response_format])


async def _events(
    svc: Service, created: Created, request: Request, response_format: str, logprobs: bool
) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream, fed by the job's real progress."""
    sent = ""
    try:
        finished = None
        async for kind, value in svc.progress(created, request):
            if kind == "idle":
                yield SSE_KEEPALIVE
            elif kind == "delta":
                sent += value
                yield sse({"type": "transcript.text.delta", "delta": value})
            else:
                finished = value
        assert finished is not None
        transcript = await svc.finished(created, finished)
        text = formats.openai_text(transcript)
        # The exact rest of the text, so that the deltas add up to it: the runner streams only text
        # that cannot change any more (its final text starts with it), capped in size, and the
        # pieces after the last report come here. Only a retried attempt that heard otherwise than
        # the one that streamed (another device) can break that; a delta cannot be taken back.
        if text.startswith(sent):
            if len(text) > len(sent):
                yield sse({"type": "transcript.text.delta", "delta": text[len(sent) :]})
        else:
            log.warning("task %s: the streamed text is not the start of the final text (a retried attempt "
                        "heard otherwise); the deltas do not add up to it", created.task_id)  # fmt: skip
        if response_format == "diarized_json":
            for segment in formats.to_diarized_segments(transcript):
                yield sse(segment)
        done: dict[str, Any] = {"type": "transcript.text.done", "text": text}
        if logprobs:
            done["logprobs"] = formats.to_logprobs(transcript)
        done["usage"] = formats.usage(transcript)
        yield sse(done)
    except Exception as exc:  # noqa: BLE001 - the 200 is sent: the error is the last event
        yield sse(late_body(request.url.path, exc))


# ------------------------------------------------------------------ routes

FileField = Annotated[UploadFile, File(description="The audio file")]
ModelField = Annotated[
    str, Form(max_length=256, description="whisper-1 (the default model) or a model GET /v1/models lists")
]
PromptField = Annotated[
    str | None, Form(max_length=MAX_PROMPT_LENGTH, description="Vocabulary, names or style to prefer (spec.prompt)")
]
TemperatureField = Annotated[
    float | None, Form(ge=0, le=1, description="Temperature of the first decode; Whisper's fallback goes up from it")
]


@router.post("/audio/transcriptions", summary="OpenAI-compatible transcription", responses=RESPONSES, response_model=None)
async def transcriptions(
    request: Request,
    svc: ServiceDep,
    namespace: Namespace,
    file: FileField,
    model: ModelField = "whisper-1",
    language: Annotated[str | None, Form(max_length=32, description="ISO code; empty detects")] = None,
    prompt: PromptField = None,
    response_format: Annotated[TranscriptionFormat, Form(description="json, text, srt, vtt, verbose_json or diarized_json")] = "json",
    temperature: TemperatureField = None,
    timestamp_granularities: Annotated[
        list[Granularity], Form(alias="timestamp_granularities[]", description="word and/or segment")
    ] = [],  # noqa: B006 - FastAPI copies defaults
    include: Annotated[
        list[Literal["logprobs"]], Form(alias="include[]", description="logprobs (response_format json only)")
    ] = [],  # noqa: B006
    stream: Annotated[bool, Form(description="Server-sent events as the text arrives (json, text, diarized_json)")] = False,
    chunking_strategy: Annotated[
        str | None,
        Form(max_length=1024, description='auto (cut at voice-activity pauses), or OpenAI\'s server_vad object '
             'as JSON: {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200, "silence_duration_ms": '
             '500} (spec.vad); the SDK\'s chunking_strategy[...] form fields are taken too'),
    ] = None,
    hotwords: Annotated[
        list[str], Form(alias="hotwords[]", description="ifw's field: terms to prefer (names, jargon), one per part")
    ] = [],  # noqa: B006
    hotwords_repeated: Annotated[
        list[str], Form(alias="hotwords", description="the same as hotwords[] (faster-whisper/speaches' name)")
    ] = [],  # noqa: B006
    diarize: Annotated[
        bool, Form(description="ifw's field: split by speaker (implied by response_format=diarized_json)")
    ] = False,
    known_speaker_names: Annotated[
        list[str], Form(alias="known_speaker_names[]", description="Names of known speakers (OpenAI's field), "
                        f"at most {MAX_KNOWN_SPEAKERS}, each with a reference in known_speaker_references[]")
    ] = [],  # noqa: B006
    known_speaker_references: Annotated[
        list[str], Form(alias="known_speaker_references[]", description="Each known speaker's reference clip, "
                        "2-10 s of them speaking, as a data URL (data:audio/wav;base64,...), at most 1 MiB each")
    ] = [],  # noqa: B006
    multichannel: Annotated[
        bool, Form(description="ifw's field: each channel transcribed on its own, the channel as the speaker")
    ] = False,
    parallelism: Annotated[
        str | None, Form(max_length=8, description="ifw's field: shards transcribed at once, 1-64 or Auto "
                         "(spec.parallelism)")
    ] = None,
) -> Response:
    await _refuse_unknown(request, TRANSCRIPTION_FIELDS)
    if include and response_format != "json":
        raise field_error("include[]", "logprobs come with response_format=json only")
    if stream and response_format not in STREAM_FORMATS:
        raise field_error("stream", "streaming is offered for response_format json, text and diarized_json")
    if multichannel and diarize:
        raise field_error("multichannel", "multichannel makes each channel a speaker: it cannot be combined with diarize")
    # The channels are the speakers of a multichannel job (diarized_json shows them); known speakers imply diarization.
    diarize = (diarize or response_format == "diarized_json" or bool(known_speaker_names)) and not multichannel
    vad = await _chunking(request, chunking_strategy)
    req = _fields(svc, "transcribe", model, language, response_format, timestamp_granularities, prompt, temperature,
                  diarize, [*hotwords, *hotwords_repeated], vad)  # fmt: skip
    req = _known_speakers(req, known_speaker_names, known_speaker_references, multichannel)
    if parallelism is not None:
        try:  # validated as POST /'s field, against the fields already set
            req = Fields.model_validate({**req.model_dump(exclude_unset=True), "parallelism": parallelism})
        except ValidationError as exc:
            raise invalid(exc) from None
    return await _answer(svc, namespace, request, req, file, response_format, bool(include), stream)


@router.post("/audio/translations", summary="OpenAI-compatible translation to English", responses=RESPONSES,
             response_model=None)  # fmt: skip
async def translations(
    request: Request,
    svc: ServiceDep,
    namespace: Namespace,
    file: FileField,
    model: ModelField = "whisper-1",
    prompt: PromptField = None,
    response_format: Annotated[TranslationFormat, Form(description="json, text, srt, vtt or verbose_json")] = "json",
    temperature: TemperatureField = None,
) -> Response:
    await _refuse_unknown(request, TRANSLATION_FIELDS)
    req = _fields(svc, "translate", model, None, response_format, [], prompt, temperature, False)
    return await _answer(svc, namespace, request, req, file, response_format)


def _models(svc: Service) -> list[str]:
    """OpenAI names first (whisper-1), then the models this server allows (or its default)."""
    s = svc.settings
    offered = s.allowed_models or ([s.default_model] if s.default_model else [])
    return list(dict.fromkeys([*s.model_aliases, *offered]))


@router.get("/models", summary="The models this server offers (OpenAI's list)", response_model=ModelList,
            responses={code: {**spec, "model": OpenAIError} for code, spec in ERROR_RESPONSES.items()})  # fmt: skip
async def models(svc: ServiceDep) -> ModelList:
    return ModelList(data=[ModelObject(id=name) for name in _models(svc)])


@router.get(
    "/models/{model_id:path}",
    summary="One model (ids may hold slashes: openai/whisper-large-v3)",
    response_model=ModelObject,
    responses={404: {"model": OpenAIError, "description": "No such model"},
               **{code: {**spec, "model": OpenAIError} for code, spec in ERROR_RESPONSES.items()}},
)  # fmt: skip
async def model(model_id: str, svc: ServiceDep) -> ModelObject:
    if model_id not in _models(svc):
        raise ModelNotFound(model_id)
    return ModelObject(id=model_id)


__all__ = ["OpenAIText", "router"]
