"""The original API: POST /, GET /tasks, GET /status/{id}, DELETE /cancel/{id}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ifw.core.contract import phase_of
from ifw.gateway import results
from ifw.gateway.deps import Namespace, ServiceDep, TaskId
from ifw.gateway.errors import ERROR_RESPONSES, field_error, invalid
from ifw.gateway.models import (
    CancelResponse,
    CompletedResponse,
    Detail,
    Output,
    ProcessingResponse,
    ProgressOut,
    StatusResponse,
    TasksResponse,
    TranscribeFields,
    TranscribeRequest,
)

router = APIRouter()

FORM_FIELDS = set(TranscribeRequest.model_fields) | {"file"}
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


# ------------------------------------------------------------------ parsing


@dataclass
class Submission:
    """POST /'s body: the fields, and the audio as a url or an uploaded file."""

    req: TranscribeFields
    url: str | None
    upload: UploadFile | None


async def parse_submission(request: Request) -> Submission:
    """JSON ({url,...}) or multipart (file or url plus the same fields; webhook as JSON text)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _parse_form(request)
    if content_type not in ("", "application/json") and not content_type.endswith("+json"):
        raise field_error("content-type", "send application/json, or multipart/form-data with a file")
    body = await request.body()
    try:
        req = TranscribeRequest.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise invalid(exc) from None
    return Submission(req, req.url, None)


async def _parse_form(request: Request) -> Submission:
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS) + 4, max_part_size=64 * 1024)
    values: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key not in FORM_FIELDS:
            raise field_error(key, "unknown field", "extra_forbidden")
        if key != "file" and value != "":
            values[key] = value
    upload = form.get("file")
    if upload is not None and not isinstance(upload, UploadFile):
        raise field_error("file", "must be a file part (filename given)")
    if "webhook" in values:
        try:
            values["webhook"] = json.loads(values["webhook"])
        except ValueError:
            raise field_error("webhook", 'must be JSON: {"url": "...", "header": {...}}') from None
    url = values.pop("url", None)
    if (url is None) == (upload is None):
        raise field_error("file", "send either a file or a url")
    try:
        req = TranscribeRequest.model_validate({**values, "url": url}) if url else TranscribeFields.model_validate(values)
    except ValidationError as exc:
        raise invalid(exc) from None
    return Submission(req, url, upload)


Submitted = Annotated[Submission, Depends(parse_submission)]


def status_answer(task_id: str, tj: dict[str, Any]) -> StatusResponse:
    """GET /status's answer from the TranscriptionJob's status (the output is added by the route)."""
    status = tj.get("status") or {}
    phase = phase_of(tj)
    progress = status.get("progress") or {}
    audio = status.get("audio") or {}
    return StatusResponse(
        status={"Succeeded": "completed", "Failed": "error"}.get(phase or "", "processing"),
        task_id=task_id,
        phase=phase or "Pending",
        progress=ProgressOut(
            percent=progress.get("percent"),
            processed_seconds=progress.get("processedSeconds"),
            total_seconds=progress.get("totalSeconds"),
        )
        if progress
        else None,
        language=audio.get("language"),
        duration=audio.get("durationSeconds"),
        reason=status.get("reason"),
        message=status.get("message"),
    )


# ------------------------------------------------------------------ routes


@router.post(
    "/",
    summary="Transcribe audio from a URL or an upload",
    response_model=CompletedResponse | ProcessingResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=POST_BODY,
)
async def transcribe(body: Submitted, svc: ServiceDep, namespace: Namespace, request: Request) -> Any:
    req = body.req
    created = await svc.submit(namespace, req, body.url, body.upload, "async" if req.is_async else "sync")
    if req.is_async:
        return ProcessingResponse(task_id=created.name)
    output = await svc.result(created, request, "json")  # request: to notice the client leaving
    # Straight to JSON: the rendered output is already the original's shape, no need to validate it again.
    return JSONResponse({"output": output, "status": "completed", "task_id": created.name})


@router.get("/tasks", response_model=TasksResponse, summary="Tasks that have not finished", responses=ERROR_RESPONSES)
async def tasks(svc: ServiceDep, namespace: Namespace) -> TasksResponse:
    return TasksResponse(tasks=await svc.active(namespace))


@router.get(
    "/status/{task_id}",
    response_model=StatusResponse,
    response_model_exclude_none=True,
    summary="Status, progress and (once completed) the output",
    responses={**NOT_FOUND, **ERROR_RESPONSES},
)
async def task_status(task_id: TaskId, svc: ServiceDep, namespace: Namespace) -> StatusResponse:
    tj = await svc.get(namespace, task_id)
    answer = status_answer(task_id, tj)
    if answer.phase == "Succeeded":
        answer.output = Output.model_validate(await results.render(svc.kube, namespace, tj, "json"))
    return answer


@router.delete(
    "/cancel/{task_id}",
    response_model=CancelResponse,
    summary="Cancel a task (deletes its TranscriptionJob; the runner pod stops)",
    responses={**NOT_FOUND, **ERROR_RESPONSES},
)
async def cancel(task_id: TaskId, svc: ServiceDep, namespace: Namespace) -> CancelResponse:
    await svc.cancel(namespace, task_id)
    return CancelResponse()
