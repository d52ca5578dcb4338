"""OpenAI-compatible audio routes: POST /v1/audio/transcriptions and /v1/audio/translations.

Same multipart fields as OpenAI's API, so the official SDKs work when pointed
at the gateway. Each request becomes a sync TranscriptionJob on the uploaded
file. The runner decodes greedily and has no prompt input yet, so a `prompt` or a
`temperature` above 0 is refused with a 400 naming the field rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from ifw.core.formats import MEDIA_TYPES
from ifw.gateway.errors import field_error, invalid, openai_style
from ifw.gateway.models import OpenAIError, OpenAIText, ResponseFormat, TranscribeFields, check_language
from ifw.gateway.routes_api import ERRORS, check_request, create_job, service, wait_for_result

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
    **{code: {**spec, "model": OpenAIError} for code, spec in ERRORS.items()},
}


def _model(request: Request, model: str) -> str | None:
    """OpenAI names (whisper-1) mean the default model; anything else is a spec.model."""
    settings = service(request).settings
    if model in settings.model_aliases:
        return settings.model_aliases[model]
    return model


async def _run(
    request: Request,
    task: str,
    file: UploadFile,
    model: str,
    language: str | None,
    response_format: str,
    granularities: list[str],
    prompt: str | None = None,
    temperature: float | None = None,
) -> Any:
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
        req = TranscribeFields(
            task=task,
            language=language,
            model=_model(request, model),
            timestamp="word" if "word" in granularities else "chunk",
        )
    except ValidationError as exc:
        raise invalid(exc) from None
    if (refused := check_request(request, req, None, file)) is not None:
        return openai_style(refused)
    created = await create_job(request, req, None, file, "openai")
    if isinstance(created, JSONResponse):
        return openai_style(created)
    fmt = "openai_json" if response_format == "json" else response_format
    output = await wait_for_result(request, created, fmt)
    if isinstance(output, JSONResponse):
        return openai_style(output)
    if isinstance(output, str):
        return PlainTextResponse(output, media_type=MEDIA_TYPES[response_format])
    return JSONResponse(output)


ModelField = Annotated[
    str, Form(max_length=256, description="whisper-1 (the default model) or a checkpoint the operator allows")
]
FormatField = Annotated[ResponseFormat, Form(description="json, text, srt, vtt or verbose_json")]
PromptField = Annotated[str | None, Form(max_length=4096, description="Not supported yet: must be empty")]
TemperatureField = Annotated[float | None, Form(ge=0, le=1, description="Only 0 (greedy decoding) is supported")]


@router.post("/transcriptions", summary="OpenAI-compatible transcription", responses=RESPONSES, response_model=None)
async def transcriptions(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio file")],
    model: ModelField = "whisper-1",
    language: Annotated[str | None, Form(max_length=32, description="ISO code; empty detects")] = None,
    prompt: PromptField = None,
    response_format: FormatField = "json",
    temperature: TemperatureField = None,
    timestamp_granularities: Annotated[
        list[Granularity], Form(alias="timestamp_granularities[]", description="word and/or segment")
    ] = [],  # noqa: B006 - FastAPI copies defaults
) -> Any:
    return await _run(
        request, "transcribe", file, model, language, response_format, timestamp_granularities, prompt, temperature
    )


@router.post("/translations", summary="OpenAI-compatible translation to English", responses=RESPONSES, response_model=None)
async def translations(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio file")],
    model: ModelField = "whisper-1",
    prompt: PromptField = None,
    response_format: FormatField = "json",
    temperature: TemperatureField = None,
) -> Any:
    return await _run(request, "translate", file, model, None, response_format, [], prompt, temperature)


__all__ = ["OpenAIText", "router"]
