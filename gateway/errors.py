"""Error bodies: FastAPI's validation shape (loc names the field), never a bare 500."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ifw.gateway.kube import KubeError
from ifw.gateway.middleware import BodyTooLarge
from ifw.gateway.uploads import UploadTooLarge

log = logging.getLogger("ifw.gateway")


def _clean(errors: list[dict[str, Any]], prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    # Only loc, msg and type: pydantic's "input" would echo webhook header values (secrets).
    out = []
    for e in errors:
        loc = list(prefix) + [p for p in e.get("loc", ()) if p != "__root__"]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        out.append({"loc": loc, "msg": msg, "type": e.get("type", "value_error")})
    return out


def invalid(errors: list[dict[str, Any]] | ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    """A 422 whose detail lists each bad field (loc) and why (msg)."""
    if isinstance(errors, ValidationError):
        errors = errors.errors(include_url=False, include_input=False)
    return RequestValidationError(_clean(list(errors), prefix))


def field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ["body", *field.split(".")], "msg": msg, "type": kind}])


def openai_style(response: JSONResponse) -> JSONResponse:
    """Our error body in OpenAI's shape ({"error": {message, type, param, code}}), which its SDKs show."""
    body = json.loads(bytes(response.body))
    detail = body.get("detail")
    param = None
    if isinstance(detail, list):
        fields = [".".join(str(p) for p in d["loc"][1:]) or "body" for d in detail]
        message = "; ".join(f"{f}: {d['msg']}" for f, d in zip(fields, detail, strict=True))
        param = fields[0] if fields else None
    else:
        message = str(detail)
    kind = "invalid_request_error" if response.status_code < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": body.get("reason")}
    if body.get("task_id"):
        error["task_id"] = body["task_id"]
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse({"error": error}, status_code=response.status_code, headers=headers)


def _shaped(request: Request, response: JSONResponse) -> JSONResponse:
    return openai_style(response) if request.url.path.startswith("/v1/") else response


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _shaped(request, JSONResponse({"detail": _clean(list(exc.errors()))}, status_code=422))

    @app.exception_handler(KubeError)
    async def _kube(request: Request, exc: KubeError) -> JSONResponse:
        if exc.status in (400, 422):  # the apiserver's schema or CEL refused the job
            return _shaped(request, JSONResponse({"detail": f"refused by the Kubernetes API: {exc.message}"}, status_code=422))
        if exc.status == 409:
            return _shaped(request, JSONResponse({"detail": f"conflict: {exc.message}"}, status_code=409))
        if exc.status in (401, 403):
            log.error("the gateway's service account may not do this: %s", exc.message)
            return _shaped(request, JSONResponse({"detail": "the gateway is not permitted to do this (RBAC)"}, status_code=500))
        if exc.status == 503:
            return _shaped(request, JSONResponse({"detail": exc.message}, status_code=503))
        log.error("kube-apiserver error %s: %s", exc.status, exc.message)
        return _shaped(request, JSONResponse({"detail": f"kube-apiserver error: {exc.message}"}, status_code=502))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _shaped(request, JSONResponse({"detail": "request body is larger than the limit"}, status_code=413))

    @app.exception_handler(UploadTooLarge)
    async def _upload_too_large(request: Request, exc: UploadTooLarge) -> JSONResponse:
        return _shaped(request, JSONResponse({"detail": f"file: {exc}"}, status_code=413))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _shaped(request, JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _shaped(request, JSONResponse({"detail": "internal error"}, status_code=500))
