"""Every error the gateway answers, and the one place that turns them into responses.

Routes, dependencies and the service raise these; the handlers `install` adds
answer each in the original API's body shape (`{"detail": ...}`, plus `status`,
`task_id`, `reason` and `message` where they apply) or, under /v1/, in OpenAI's
(`{"error": {message, type, param, code}}`). Bad fields keep FastAPI's shape (loc
names the field). Nothing ends as a bare 500 without a body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ifw.core.contract import http_status_for_reason
from ifw.core.redact import redact
from ifw.gateway.kube import KubeError, KubeUnavailable
from ifw.gateway.models import Detail

log = logging.getLogger("ifw.gateway")

OPENAI_PREFIX = "/v1/"


class ApiError(StarletteHTTPException):
    """An error answer: its HTTP status, `detail`, and further body fields (None ones left out).

    A Starlette HTTPException, so FastAPI lets it through unchanged when it is raised
    while FastAPI reads the body (BodyTooLarge), instead of calling it a parse error.
    """

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None, **fields: str | None):
        # Texts from other components (a runner's message naming an upload URL) lose their secrets here.
        super().__init__(status_code, redact(detail), headers)
        self.fields = {k: redact(v) for k, v in fields.items() if v is not None}

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, **self.fields}


# ------------------------------------------------------------ the request


class Unauthorized(ApiError):
    def __init__(self) -> None:
        super().__init__(401, "Unauthorized")


class BadContentLength(ApiError):
    def __init__(self) -> None:
        super().__init__(400, "Content-Length header is not a number")


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class UploadTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"file: file is larger than {limit} bytes")


class InvalidUrl(ApiError):
    """The original API's answer to a url that does not start with "http"."""

    def __init__(self) -> None:
        super().__init__(400, "Invalid URL")


class WebhookRequired(ApiError):
    def __init__(self) -> None:
        super().__init__(400, "Webhook is required for async tasks")


class DiarizationUnavailable(ApiError):
    """The original answered 500 "Missing Hugging Face Token"; a request this server cannot serve is a 400."""

    def __init__(self, field: str = "diarise_audio") -> None:
        super().__init__(400, f"{field}: diarization is not configured on this server (no HF_TOKEN or weights)")


class UploadsDisabled(ApiError):
    def __init__(self) -> None:
        super().__init__(
            503, "file: uploads are not enabled on this server (IFW_GATEWAY_INTERNAL_URL unset); send a url"
        )


class UploadNotFound(ApiError):
    """No upload at this path with this token (the same answer for both, on purpose)."""

    def __init__(self) -> None:
        super().__init__(404, "Not found")


# ------------------------------------------------------------ the task


class TaskNotFound(ApiError):
    def __init__(self) -> None:
        super().__init__(404, "Task not found")


class ModelNotFound(ApiError):
    """GET /v1/models/{id} of a model this server does not offer (OpenAI's code: model_not_found)."""

    def __init__(self, model: str):
        super().__init__(404, f"The model '{model}' does not exist", reason="model_not_found", param="model")


class TaskExists(ApiError):
    def __init__(self, task_id: str):
        super().__init__(409, f"Task {task_id} already exists")


class TaskFailed(ApiError):
    """The TranscriptionJob failed: its reason picks the status (4xx bad input, 5xx our fault)."""

    def __init__(self, task_id: str, reason: str | None, message: str | None):
        super().__init__(
            http_status_for_reason(reason),
            f"{reason or 'Failed'}: {message or 'the job failed'}",
            status="error",
            task_id=task_id,
            reason=reason,
            message=message,
        )


class TaskStillRunning(ApiError):
    """A sync wait ran out; the task goes on and the client polls it."""

    def __init__(self, task_id: str, waited: float):
        detail = f"Task is still running after {waited:g} s; poll /status/{task_id}"
        super().__init__(504, detail, status="processing", task_id=task_id)


class TaskCancelled(ApiError):
    """The TranscriptionJob was deleted while a sync request waited for it."""

    def __init__(self, task_id: str):
        super().__init__(409, "Task was cancelled", status="cancelled", task_id=task_id)


class GatewayRestarting(ApiError):
    """SIGTERM while a sync request waited: the answer comes now, the task goes on."""

    def __init__(self, task_id: str):
        detail = f"the gateway is restarting; the task goes on: poll /status/{task_id}"
        super().__init__(503, detail, status="processing", task_id=task_id)


class ShuttingDown(ApiError):
    """A new request reached a gateway that is stopping (on a connection opened before): nothing was made."""

    def __init__(self) -> None:
        super().__init__(503, "the gateway is shutting down; send the request again", {"Retry-After": "1"})


class ClientDisconnected(ApiError):
    """The client left while its sync request waited (499: nobody reads it; the log and metrics do)."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected")


class ResultUnavailable(ApiError):
    """A succeeded task's stored result cannot be read: 410 once its TTL removed it, 502 when
    the store fails, 500 when the TranscriptionJob names none."""

    def __init__(self, task_id: str, why: str, status_code: int = 500):
        detail = f"the result of task {task_id} is unavailable: {why}"
        super().__init__(status_code, detail, status="error", task_id=task_id)
        self.why = why


# ------------------------------------------------------------ the Kubernetes API


# Statuses that mean the apiserver (or its etcd) cannot serve now: worth a retry. An etcd that
# stalls shows as 500 "etcdserver: request timed out" or 504 "Timeout: request did not complete".
UNAVAILABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
KUBE_UNAVAILABLE = "the Kubernetes API is unavailable; try again shortly"


class KubernetesError(ApiError):
    """What an apiserver failure means to the client. Only the apiserver's refusals of the
    client's own input are quoted; failures are told in fixed words, and their details (the
    apiserver's address, socket and etcd errors) go to the log."""

    @classmethod
    def of(cls, exc: KubeError) -> KubernetesError:
        if exc.status in (400, 422):  # the apiserver's schema or CEL refused the TranscriptionJob
            return cls(422, f"refused by the Kubernetes API: {exc.message}")
        if exc.status == 409:
            return cls(409, f"conflict: {exc.message}")
        if exc.status in (401, 403):
            log.error("the gateway's service account may not do this: %s", exc.message)
            return cls(500, "the gateway is not permitted to do this (RBAC)")
        if isinstance(exc, KubeUnavailable) or exc.status in UNAVAILABLE_STATUSES:
            log.warning("the Kubernetes API is unavailable: %s %s", exc.status, exc.message)
            return cls(503, KUBE_UNAVAILABLE, {"Retry-After": "5"})
        log.error("kube-apiserver error %s: %s", exc.status, exc.message)
        return cls(502, f"the Kubernetes API answered HTTP {exc.status}; see the gateway's log")


# What the routes document (OpenAPI); every one is an ApiError above or a bad field.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Detail, "description": "Async without webhook; diarization not available"},
    401: {"model": Detail, "description": "Missing or wrong x-admin-api-key"},
    409: {"model": Detail, "description": "A task with this managed_task_id exists, or it was cancelled"},
    413: {"model": Detail, "description": "Body or file too large"},
    422: {"model": Detail, "description": "Invalid field, or the task failed on bad input"},
    500: {"model": Detail, "description": "The task failed on a server fault"},
    502: {"model": Detail, "description": "The Kubernetes API or the result store failed"},
    503: {"model": Detail, "description": "Uploads or the Kubernetes API unavailable"},
    504: {"model": Detail, "description": "Sync wait timed out; poll /status/{task_id}"},
}


# ------------------------------------------------------------ field errors


def _clean(errors: list[dict[str, Any]], prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    # Only loc, msg and type: pydantic's "input" would echo webhook header values (secrets).
    out = []
    for e in errors:
        loc = list(prefix) + [p for p in e.get("loc", ()) if p != "__root__"]
        msg = redact(str(e.get("msg", "")).removeprefix("Value error, "))
        out.append({"loc": loc, "msg": msg, "type": e.get("type", "value_error")})
    return out


def invalid(errors: list[dict[str, Any]] | ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    """A 422 whose detail lists each bad field (loc) and why (msg)."""
    if isinstance(errors, ValidationError):
        errors = errors.errors(include_url=False, include_input=False)
    return RequestValidationError(_clean(list(errors), prefix))


def field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ["body", *field.split(".")], "msg": msg, "type": kind}])


# ------------------------------------------------------------ responses


def openai_body(status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """Our error body in OpenAI's shape ({"error": {message, type, param, code}}), which its SDKs show."""
    detail = body.get("detail")
    param = None
    if isinstance(detail, list):
        fields = [".".join(str(p) for p in d["loc"][1:]) or "body" for d in detail]
        message = "; ".join(f"{f}: {d['msg']}" for f, d in zip(fields, detail, strict=True))
        param = fields[0] if fields else None
    else:
        message = str(detail)
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param or body.get("param"), "code": body.get("reason")}
    if body.get("task_id"):
        error["task_id"] = body["task_id"]
    return {"error": error}


def respond(path: str, status_code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    """The one place an error becomes a response: OpenAI's shape under /v1/, the original's elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        body = openai_body(status_code, body)
    return JSONResponse(body, status_code=status_code, headers=headers)


def late_body(path: str, exc: BaseException) -> dict[str, Any]:
    """The body of an error found after a 200 has started (keep-alive whitespace, a stream):
    the answer it would have been, shaped by path. `status` says it is no success."""
    if isinstance(exc, ApiError):
        body = exc.body()
        code = exc.status_code
    elif isinstance(exc, KubeError):
        error = KubernetesError.of(exc)
        body, code = error.body(), error.status_code
    else:
        log.error("unexpected error on %s after the answer started", path, exc_info=exc)
        body, code = {"detail": "internal error"}, 500
    body.setdefault("status", "error")
    if path.startswith(OPENAI_PREFIX):
        return openai_body(code, body)
    return body


def early_response(path: str, exc: ApiError) -> JSONResponse:
    """For the ASGI middleware, which answers before any route runs. A 401 is the original's
    `{"detail": "Unauthorized"}` on every path, docs included; the rest are shaped by path."""
    if isinstance(exc, Unauthorized):
        return JSONResponse(exc.body(), status_code=exc.status_code)
    return respond(path, exc.status_code, exc.body(), exc.headers)


PART_TOO_LARGE = "Part exceeded maximum size"  # Starlette's words for a form field over the route's limit


def too_large_part(path: str) -> RequestValidationError:
    """A form field longer than the route allows. Starlette does not say which field; the only
    long ones are inline reference clips, so the message names them and their limit."""
    from ifw.gateway.references import MAX_REFERENCE_BYTES

    field = "known_speaker_references[]" if path.startswith(OPENAI_PREFIX) else "known_speakers"
    return field_error(field, f"a form field is too long: {field} entries may hold at most "
                       f"{MAX_REFERENCE_BYTES} bytes of audio (2-10 s of speech) as a data URL; other "
                       "fields are short text", "too_long")  # fmt: skip


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)  # every ApiError; unknown routes, wrong methods
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if not isinstance(exc, ApiError) and str(exc.detail).startswith(PART_TOO_LARGE):
            return await _validation(request, too_large_part(request.url.path))
        body = exc.body() if isinstance(exc, ApiError) else {"detail": exc.detail}
        return respond(request.url.path, exc.status_code, body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request.url.path, 422, {"detail": _clean(list(exc.errors()))})

    @app.exception_handler(KubeError)
    async def _kube(request: Request, exc: KubeError) -> JSONResponse:
        error = KubernetesError.of(exc)
        return respond(request.url.path, error.status_code, error.body(), error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return respond(request.url.path, 500, {"detail": "internal error"})
