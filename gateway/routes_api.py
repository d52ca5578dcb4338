"""The original API: POST /, GET /tasks, GET /status/{id}, DELETE /cancel/{id}.

As in the original, fields of the JSON body that the API does not know are ignored (it used
FastAPI Body() fields); here they are also logged and named in the response header
X-Ignored-Fields, so a misspelt field can be found. Multipart uploads (ifw's own) refuse them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import quote

import pydantic_core
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ifw.core import formats
from ifw.core.contract import phase_of
from ifw.core.redact import redact_opt
from ifw.crds.transcriptionjob import MAX_HOTWORDS, MAX_KNOWN_SPEAKERS
from ifw.gateway import results
from ifw.gateway.deps import Namespace, ServiceDep, TaskId
from ifw.gateway.errors import ERROR_RESPONSES, InvalidUrl, field_error, invalid
from ifw.gateway.models import (
    CancelResponse,
    CompletedResponse,
    Detail,
    ProcessingResponse,
    ProgressOut,
    StatusResponse,
    TasksResponse,
    TranscribeFields,
    TranscribeRequest,
    WebhookBody,
    WebhookState,
)
from ifw.gateway.pushing import json_answer
from ifw.gateway.references import MAX_DATA_URL_LENGTH
from ifw.gateway.service import Created, Service

log = logging.getLogger("ifw.gateway")
router = APIRouter()

IGNORED_HEADER = "X-Ignored-Fields"
MAX_IGNORED_LISTED = 20
BODY_FIELDS = frozenset(TranscribeRequest.model_fields)
WEBHOOK_FIELDS = frozenset(WebhookBody.model_fields)
FORM_FIELDS = set(TranscribeRequest.model_fields) | {"file", "hotwords[]"}
MAX_FORM_PART = 64 * 1024  # characters of a text field; known_speakers may carry inline clips:
MAX_KNOWN_SPEAKERS_PART = MAX_KNOWN_SPEAKERS * (MAX_DATA_URL_LENGTH + 1024)  # clips, names and JSON
JSON_FORM_FIELDS = {"webhook": '{"url": "...", "header": {...}}', "vad": '{"threshold": 0.5, "silence_duration_ms": 500}'}
POST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/TranscribeRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/TranscribeUpload"}},
        },
    }
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Detail, "description": "Task not found"}}
IGNORED_DOC = {
    IGNORED_HEADER: {
        "description": "Body fields the API does not know and ignored (comma-separated), as the original "
        "API ignored them; absent when there were none.",
        "schema": {"type": "string"},
    }
}


# ------------------------------------------------------------------ parsing


@dataclass
class Submission:
    """POST /'s body: the fields, the audio as a url or an uploaded file, and what was ignored."""

    req: TranscribeFields
    url: str | None
    upload: UploadFile | None
    ignored: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        if not self.ignored:
            return {}
        # Names are the client's: percent-encode anything odd (a header is one line of ASCII) and
        # keep the header short, as proxies limit header sizes.
        names = [quote(name, safe="[]._-") for name in self.ignored[:MAX_IGNORED_LISTED]]
        more = len(self.ignored) - len(names)
        return {IGNORED_HEADER: ", ".join(names)[:1024] + (f", ... ({more} more)" if more else "")}


def _drop_unknown(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The body without the fields the original API would ignore, and their names."""
    ignored = [name for name in body if name not in BODY_FIELDS]
    kept = {k: v for k, v in body.items() if k in BODY_FIELDS}
    hook = kept.get("webhook")
    if isinstance(hook, dict):  # the original's WebhookBody ignored unknown keys too
        ignored += [f"webhook.{name}" for name in hook if name not in WEBHOOK_FIELDS]
        kept["webhook"] = {k: v for k, v in hook.items() if k in WEBHOOK_FIELDS}
    return kept, ignored


def _not_http(url: Any) -> bool:
    """The original's URL check, `url.lower().startswith("http")`, failed."""
    return isinstance(url, str) and not url.strip().lower().startswith("http")


def _validate(model: type[TranscribeFields], values: dict[str, Any]) -> TranscribeFields:
    """The model, or the original API's 400 Invalid URL when a url not starting with http is
    all that is wrong, or a 422 naming every bad field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        url_only = all(tuple(e["loc"][:1]) == ("url",) for e in exc.errors())
        if url_only and _not_http(values.get("url")):
            raise InvalidUrl() from None
        raise invalid(exc) from None


async def parse_submission(request: Request) -> Submission:
    """JSON ({url,...}) or multipart (file or url plus the same fields; webhook as JSON text)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _parse_form(request)
    if content_type not in ("", "application/json") and not content_type.endswith("+json"):
        raise field_error("content-type", "send application/json, or multipart/form-data with a file")
    try:
        # pydantic's parser, as FastAPI's: it refuses what JSON forbids (lone surrogates, ...).
        body = pydantic_core.from_json(await request.body() or b"null")
    except ValueError as exc:
        raise field_error("body", f"not valid JSON: {exc}", "json_invalid") from None
    if not isinstance(body, dict):
        raise field_error("body", "must be a JSON object such as {\"url\": \"https://...\"}", "model_attributes_type")
    kept, ignored = _drop_unknown(body)
    if ignored:
        log.info("POST / ignored unknown fields: %s", ", ".join(repr(name) for name in ignored[:MAX_IGNORED_LISTED]))
    req = _validate(TranscribeRequest, kept)
    assert isinstance(req, TranscribeRequest)
    return Submission(req, req.url, None, ignored)


async def _parse_form(request: Request) -> Submission:
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS) + MAX_HOTWORDS + 4,
                              max_part_size=MAX_KNOWN_SPEAKERS_PART)  # fmt: skip
    values: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key not in FORM_FIELDS:
            raise field_error(key, "unknown field", "extra_forbidden")
        if isinstance(value, str) and key != "known_speakers" and len(value) > MAX_FORM_PART:
            raise field_error(key, f"longer than {MAX_FORM_PART} characters", "too_long")
        if key in ("hotwords", "hotwords[]"):  # one part per term, repeated
            values.setdefault("hotwords", []).append(value)
        elif key != "file" and value != "":
            values[key] = value
    upload = form.get("file")
    if upload is not None and not isinstance(upload, UploadFile):
        raise field_error("file", "must be a file part (filename given)")
    for name, example in JSON_FORM_FIELDS.items():
        if name in values:
            try:
                values[name] = json.loads(values[name])
            except ValueError:
                raise field_error(name, f"must be JSON: {example}") from None
    if "known_speakers" in values:  # as webhook: JSON text in a form
        try:
            values["known_speakers"] = json.loads(values["known_speakers"])
        except ValueError:
            raise field_error("known_speakers", 'must be JSON: [{"name": "...", "url": "..."}]') from None
    url = values.pop("url", None)
    if (url is None) == (upload is None):
        raise field_error("file", "send either a file or a url")
    req = _validate(TranscribeRequest, {**values, "url": url}) if url else _validate(TranscribeFields, values)
    return Submission(req, url, upload)


Submitted = Annotated[Submission, Depends(parse_submission)]


def status_answer(task_id: str, tj: dict[str, Any]) -> StatusResponse:
    """GET /status's answer from the TranscriptionJob's status (the output is added by the route)."""
    status = tj.get("status") or {}
    phase = phase_of(tj)
    progress = status.get("progress") or {}
    audio = status.get("audio") or {}
    state = {"Succeeded": "completed", "Failed": "error"}.get(phase or "", "processing")
    if state == "processing" and tj["metadata"].get("deletionTimestamp"):
        state = "cancelled"  # the operator's finalizer holds it until the cancelled webhook is sent
    return StatusResponse(
        status=state,
        task_id=task_id,
        phase=phase or "Pending",
        progress=ProgressOut(
            percent=progress.get("percent"),
            processed_seconds=progress.get("processedSeconds"),
            total_seconds=progress.get("totalSeconds"),
            text=progress.get("text"),
        )
        if progress
        else None,
        language=audio.get("language"),
        duration=audio.get("durationSeconds"),
        reason=status.get("reason"),
        message=redact_opt(status.get("message")),  # a runner's message may name the upload URL
        webhook=webhook_state(tj),
    )


def webhook_state(tj: dict[str, Any]) -> WebhookState | None:
    """status.webhook of a task that has a webhook, so an async client learns a failed delivery."""
    if not (tj.get("spec") or {}).get("webhook"):
        return None
    delivery = (tj.get("status") or {}).get("webhook") or {}
    return WebhookState(
        attempts=delivery.get("attempts") or 0,
        delivered=bool(delivery.get("delivered")),
        last_error=redact_opt(delivery.get("lastError")),
        last_attempt_time=delivery.get("lastAttemptTime"),
    )


async def full_status(svc: Service, namespace: str, task_id: str, tj: dict[str, Any]) -> JSONResponse:
    """The status, and once completed the output and who made it: the sync answer's shapes."""
    answer = status_answer(task_id, tj).model_dump(exclude_none=True)
    if answer["phase"] == "Succeeded":
        transcript = await results.read(svc.kube, namespace, tj)
        # As rendered, not through the model: a speaker entry keeps "speaker": null when no one was heard.
        answer["output"] = formats.to_original_json(transcript)
        if (machine := formats.processed_by(transcript)) is not None:
            answer["processed_by"] = machine
    return JSONResponse(answer)


async def completed(svc: Service, created: Created, request: Request) -> dict[str, Any]:
    """The sync answer: {"output", "status": "completed", "task_id"} (+ processed_by)."""
    transcript = await svc.transcript(created, request)  # request: to notice the client leaving
    answer: dict[str, Any] = {"output": formats.to_original_json(transcript), "status": "completed",
                              "task_id": created.task_id}  # fmt: skip
    if (machine := formats.processed_by(transcript)) is not None:
        answer["processed_by"] = machine
    return answer


# ------------------------------------------------------------------ routes


@router.post(
    "/",
    summary="Transcribe audio from a URL or an upload",
    response_model=CompletedResponse | ProcessingResponse,
    responses={200: {"headers": IGNORED_DOC}, **ERROR_RESPONSES},
    openapi_extra=POST_BODY,
)
async def transcribe(body: Submitted, svc: ServiceDep, namespace: Namespace, request: Request) -> Any:
    req = body.req
    created = await svc.submit(namespace, req, body.url, body.upload, "async" if req.is_async else "sync")
    if req.is_async:
        return JSONResponse(ProcessingResponse(task_id=created.task_id).model_dump(), headers=body.headers())
    # Straight to JSON: the rendered output is already the original's shape, no need to validate it again.
    return await json_answer(
        request.url.path, completed(svc, created, request), svc.settings.keepalive_seconds, body.headers()
    )


@router.get("/tasks", response_model=TasksResponse, summary="Tasks that have not finished", responses=ERROR_RESPONSES)
async def tasks(svc: ServiceDep, namespace: Namespace) -> TasksResponse:
    return TasksResponse(tasks=await svc.active(namespace))


@router.get(
    "/status/{task_id:path}",
    response_model=StatusResponse,
    response_model_exclude_none=True,
    summary="Status, progress and (once completed) the output",
    responses={**NOT_FOUND, **ERROR_RESPONSES},
)
async def task_status(task_id: TaskId, svc: ServiceDep, namespace: Namespace) -> JSONResponse:
    return await full_status(svc, namespace, task_id, await svc.get(namespace, task_id))


@router.delete(
    "/cancel/{task_id:path}",
    response_model=CancelResponse | StatusResponse,
    response_model_exclude_none=True,
    summary="Cancel a task that has not finished (deletes its TranscriptionJob; the runner pod stops); "
    "a finished one is kept and answered as /status answers it",
    responses={**NOT_FOUND, **ERROR_RESPONSES},
)
async def cancel(task_id: TaskId, svc: ServiceDep, namespace: Namespace) -> CancelResponse | JSONResponse:
    finished = await svc.cancel(namespace, task_id)
    if finished is None:
        return CancelResponse()
    # As the original answers a done task: {"status": "completed", "output": ...}, the job kept.
    return await full_status(svc, namespace, task_id, finished)
