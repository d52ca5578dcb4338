"""The original API: POST /, GET /tasks, GET /status/{id}, DELETE /cancel/{id}."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ifw.core.contract import is_terminal, phase_of
from ifw.gateway import metrics, results
from ifw.gateway.errors import field_error, invalid
from ifw.gateway.kube import KubeError
from ifw.gateway.models import (
    DNS1123_LABEL,
    CancelResponse,
    CompletedResponse,
    Detail,
    Output,
    ProcessingResponse,
    ProgressOut,
    StatusResponse,
    TaskError,
    TasksResponse,
    TranscribeFields,
    TranscribeRequest,
)
from ifw.gateway.service import ClientGone, Created, JobGone, Service, failure_status
from ifw.gateway.uploads import Staged
from ifw.gateway.urlcheck import url_problem

log = logging.getLogger("ifw.gateway")
router = APIRouter()

NOT_FOUND = {"detail": "Task not found"}
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
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Detail, "description": "Async without webhook; diarization not available"},
    401: {"model": Detail, "description": "Missing or wrong x-admin-api-key"},
    409: {"model": Detail, "description": "A task with this managed_task_id exists"},
    413: {"model": Detail, "description": "Body or file too large"},
    422: {"model": Detail, "description": "Invalid field, or the job failed on bad input"},
    500: {"model": Detail, "description": "The job failed on a server fault"},
    502: {"model": Detail, "description": "The Kubernetes API or the result store failed"},
    503: {"model": Detail, "description": "Uploads or the Kubernetes API unavailable"},
    504: {"model": Detail, "description": "Sync wait timed out; poll /status/{task_id}"},
}


def service(request: Request) -> Service:
    return request.app.state.service


def namespace(request: Request) -> str:
    return request.state.namespace


# ------------------------------------------------------------------ parsing


async def parse_request(request: Request) -> tuple[TranscribeFields, str | None, UploadFile | None]:
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
    return req, req.url, None


async def _parse_form(request: Request) -> tuple[TranscribeFields, str | None, UploadFile | None]:
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
    return req, url, upload


def check_request(request: Request, req: TranscribeFields, url: str | None, upload: UploadFile | None) -> JSONResponse | None:
    """Checks that need the settings; same error shapes as the original where it had one."""
    svc = service(request)
    allow = request.app.state.url_allowlist
    if url is not None and (problem := url_problem(url, allow)):
        raise field_error("url", f"url is not allowed: it {problem}")
    if req.webhook is not None and (problem := url_problem(req.webhook.url, allow)):
        raise field_error("webhook.url", f"webhook.url is not allowed: it {problem}")
    if req.is_async and req.webhook is None:
        return JSONResponse({"detail": "Webhook is required for async tasks"}, status_code=400)
    if req.diarise_audio and not svc.settings.diarization_available:
        return JSONResponse(
            {"detail": "diarise_audio: diarization is not configured on this server (no HF_TOKEN or weights)"},
            status_code=400,
        )
    if upload is not None and not svc.uploads.enabled:
        return JSONResponse(
            {"detail": "file: uploads are not enabled on this server (IFW_GATEWAY_INTERNAL_URL unset); send a url"},
            status_code=503,
        )
    return None


async def create_job(
    request: Request, req: TranscribeFields, url: str | None, upload: UploadFile | None, mode: str
) -> Created | JSONResponse:
    svc = service(request)
    staged: Staged | None = None
    if upload is not None:
        staged = await svc.uploads.stage(upload.file, upload.filename or "audio", svc.settings.max_upload_bytes)
    try:
        return await svc.create(namespace(request), req, audio_url=url, staged=staged, mode=mode)
    except KubeError as exc:
        if exc.status == 409:
            return JSONResponse({"detail": f"Task {req.managed_task_id} already exists"}, status_code=409)
        raise


def task_error(status: int, task_id: str, detail: str, kind: str, reason: str | None = None, message: str | None = None) -> JSONResponse:
    body = TaskError(detail=detail, status=kind, task_id=task_id, reason=reason, message=message)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


async def wait_for_result(request: Request, created: Created, fmt: str) -> Any | JSONResponse:
    """The rendered result of a sync job, or the error response that replaces it."""
    svc = service(request)
    task_id = created.name
    try:
        job = await svc.wait(created, request)
    except TimeoutError:
        return task_error(
            504, task_id, f"Task is still running after {svc.settings.sync_timeout_seconds:g} s; "
            f"poll /status/{task_id}", "processing"
        )
    except JobGone:
        return task_error(409, task_id, "Task was cancelled", "cancelled")
    except ClientGone:
        return JSONResponse({"detail": "client disconnected"}, status_code=499)
    status = job.get("status") or {}
    if status.get("phase") == "Failed":
        reason, message = status.get("reason"), status.get("message")
        detail = f"{reason or 'Failed'}: {message or 'the job failed'}"
        return task_error(failure_status(reason), task_id, detail, "error", reason, message)
    prefetched = svc.prefetcher.take((created.namespace, created.name, created.uid), job)
    output = await results.render_job(svc.kube, created.namespace, job, fmt, prefetched)
    seen = svc.watch.finished_at.pop((created.namespace, created.name, created.uid), None)
    if seen is not None:
        metrics.COMPLETION_TO_RESPONSE.observe(time.monotonic() - seen)
    return output


# ------------------------------------------------------------------ routes


@router.post(
    "/",
    summary="Transcribe audio from a URL or an upload",
    response_model=CompletedResponse | ProcessingResponse,
    responses=ERRORS,
    openapi_extra=POST_BODY,
)
async def transcribe(request: Request) -> Any:
    req, url, upload = await parse_request(request)
    if (refused := check_request(request, req, url, upload)) is not None:
        return refused
    created = await create_job(request, req, url, upload, "async" if req.is_async else "sync")
    if isinstance(created, JSONResponse):
        return created
    if req.is_async:
        return ProcessingResponse(task_id=created.name)
    output = await wait_for_result(request, created, "json")
    if isinstance(output, JSONResponse):
        return output
    return JSONResponse({"output": output, "status": "completed", "task_id": created.name})


@router.get("/tasks", response_model=TasksResponse, summary="Tasks that have not finished", responses=ERRORS)
async def tasks(request: Request) -> TasksResponse:
    svc = service(request)
    ns = namespace(request)
    if svc.watch.synced and ns in svc.watch.namespaces:
        return TasksResponse(tasks=svc.watch.active(ns))
    listed = await svc.kube.list_jobs(ns)
    items = sorted(listed["items"], key=lambda o: o["metadata"].get("creationTimestamp") or "")
    return TasksResponse(tasks=[o["metadata"]["name"] for o in items if not is_terminal(o)])


@router.get(
    "/status/{task_id}",
    response_model=StatusResponse,
    response_model_exclude_none=True,
    summary="Status, progress and (once completed) the output",
    responses={404: {"model": Detail, "description": "Task not found"}, **ERRORS},
)
async def task_status(task_id: str, request: Request) -> Any:
    svc = service(request)
    if not DNS1123_LABEL.match(task_id) or len(task_id) > 63:
        return JSONResponse(NOT_FOUND, status_code=404)
    job = await svc.kube.get_job(namespace(request), task_id)
    if job is None:
        return JSONResponse(NOT_FOUND, status_code=404)
    status = job.get("status") or {}
    phase = phase_of(job)
    progress = status.get("progress") or {}
    audio = status.get("audio") or {}
    answer = StatusResponse(
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
    if phase == "Succeeded":
        output = await results.render_job(svc.kube, namespace(request), job, "json")
        if isinstance(output, JSONResponse):
            return output
        answer.output = Output.model_validate(output)
    return answer


@router.delete(
    "/cancel/{task_id}",
    response_model=CancelResponse,
    summary="Cancel a task (deletes its TranscriptionJob; the runner pod stops)",
    responses={404: {"model": Detail, "description": "Task not found"}, **ERRORS},
)
async def cancel(task_id: str, request: Request) -> Any:
    svc = service(request)
    if not DNS1123_LABEL.match(task_id) or len(task_id) > 63:
        return JSONResponse(NOT_FOUND, status_code=404)
    if not await svc.kube.delete_job(namespace(request), task_id, svc.settings.delete_propagation):
        return JSONResponse(NOT_FOUND, status_code=404)
    log.info("cancelled task %s/%s", namespace(request), task_id, extra={"task_id": task_id})
    return CancelResponse()
