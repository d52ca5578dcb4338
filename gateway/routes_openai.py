"""OpenAI-compatible audio routes: POST /v1/audio/transcriptions and /v1/audio/translations.

Same multipart fields as OpenAI's API, so the official SDKs work when pointed
at the gateway. Each request becomes a sync TranscriptionJob on the uploaded
file. The runner decodes greedily and has no prompt input yet, so a `prompt` or a
`temperature` above 0 is refused with a 422 naming the field rather than ignored.
Errors come in OpenAI's shape (ifw.gateway.errors does that for every /v1/ path).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from ifw.core.formats import MEDIA_TYPES
from ifw.gateway.config import GatewaySettings
from ifw.gateway.deps import Namespace, ServiceDep
from ifw.gateway.errors import ERROR_RESPONSES, field_error, invalid
from ifw.gateway.models import OpenAIError, OpenAIText, ResponseFormat, TranscribeFields, check_language
from ifw.gateway.service import Service

router = APIRouter(prefix="/v1/audio", tags=["openai"])

Granularity = Literal["word", "segment"]
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/OpenAIText"}},
            "text/plain": {"schema": {"type": "string"}},
        },
        "description": "json: {text}; verbose_json: task, language, duration, text, segments (words); "
        "text, srt, vtt: plain text",
    },
    **{code: {**spec, "model": OpenAIError} for code, spec in ERROR_RESPONSES.items()},
}


def _fields(
    settings: GatewaySettings,
    task: str,
    model: str,
    language: str | None,
    response_format: str,
    granularities: list[str],
    prompt: str | None,
    temperature: float | None,
) -> TranscribeFields:
    """OpenAI's form as our request; what the runner cannot honour is refused, naming the field."""
    if prompt:
        raise field_error("prompt", "prompts are not supported by this server yet; send the request without one")
    if temperature:
        raise field_error("temperature", "only 0 is supported (the runner decodes greedily)")
    try:
        language = check_language(language)
    except ValueError as exc:
        raise field_error("language", str(exc)) from None
    if "word" in granularities and response_format != "verbose_json":
        raise field_error("timestamp_granularities[]", "word timestamps need response_format=verbose_json")
    try:
        return TranscribeFields(
            task=task,
            language=language,
            # OpenAI names (whisper-1) mean the default model; anything else is a spec.model.
            model=settings.model_aliases.get(model, model),
            timestamp="word" if "word" in granularities else "chunk",
        )
    except ValidationError as exc:
        raise invalid(exc) from None


async def _transcribe(
    svc: Service, namespace: str, request: Request, req: TranscribeFields, file: UploadFile, response_format: str
) -> Response:
    created = await svc.submit(namespace, req, None, file, "openai")
    output = await svc.result(created, request, "openai_json" if response_format == "json" else response_format)
    if isinstance(output, str):
        return PlainTextResponse(output, media_type=MEDIA_TYPES[response_format])
    return JSONResponse(output)


FileField = Annotated[UploadFile, File(description="The audio file")]
ModelField = Annotated[
    str, Form(max_length=256, description="whisper-1 (the default model) or a checkpoint the operator allows")
]
FormatField = Annotated[ResponseFormat, Form(description="json, text, srt, vtt or verbose_json")]
PromptField = Annotated[str | None, Form(max_length=4096, description="Not supported yet: must be empty")]
TemperatureField = Annotated[float | None, Form(ge=0, le=1, description="Only 0 (greedy decoding) is supported")]


@router.post("/transcriptions", summary="OpenAI-compatible transcription", responses=RESPONSES, response_model=None)
async def transcriptions(
    request: Request,
    svc: ServiceDep,
    namespace: Namespace,
    file: FileField,
    model: ModelField = "whisper-1",
    language: Annotated[str | None, Form(max_length=32, description="ISO code; empty detects")] = None,
    prompt: PromptField = None,
    response_format: FormatField = "json",
    temperature: TemperatureField = None,
    timestamp_granularities: Annotated[
        list[Granularity], Form(alias="timestamp_granularities[]", description="word and/or segment")
    ] = [],  # noqa: B006 - FastAPI copies defaults
) -> Response:
    req = _fields(
        svc.settings, "transcribe", model, language, response_format, timestamp_granularities, prompt, temperature
    )
    return await _transcribe(svc, namespace, request, req, file, response_format)


@router.post("/translations", summary="OpenAI-compatible translation to English", responses=RESPONSES, response_model=None)
async def translations(
    request: Request,
    svc: ServiceDep,
    namespace: Namespace,
    file: FileField,
    model: ModelField = "whisper-1",
    prompt: PromptField = None,
    response_format: FormatField = "json",
    temperature: TemperatureField = None,
) -> Response:
    req = _fields(svc.settings, "translate", model, None, response_format, [], prompt, temperature)
    return await _transcribe(svc, namespace, request, req, file, response_format)


__all__ = ["OpenAIText", "router"]
