"""Open routes: probes, metrics, and the upload route runners fetch audio from."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ifw.gateway import metrics
from ifw.gateway.deps import ServiceDep
from ifw.gateway.errors import UNAVAILABLE_STATUSES, UploadNotFound
from ifw.gateway.kube import KubeError, KubeUnavailable
from ifw.gateway.models import ReadyResponse
from ifw.gateway.service import Service

log = logging.getLogger("ifw.gateway")
router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _apiserver_check(svc: Service) -> str:
    """The check's answer: "ok", or why not in words fit for anyone who reaches the probe (details: the log)."""
    try:
        # Listing one TranscriptionJob proves the apiserver answers, the CRD is served and RBAC lets us read.
        await svc.kube.list_tjs(svc.settings.namespace, limit=1, timeout=svc.settings.readiness_timeout_seconds)
    except KubeError as exc:
        log.warning("readiness: the Kubernetes API check failed: %s %s", exc.status, exc.message)
        if exc.status == 404:
            return "TranscriptionJob CRD not installed"
        if exc.status in (401, 403):
            return "not permitted to list TranscriptionJobs (RBAC)"
        if isinstance(exc, KubeUnavailable) or exc.status in UNAVAILABLE_STATUSES:
            return "the Kubernetes API is unavailable"
        return f"the Kubernetes API answered HTTP {exc.status}"
    return "ok"


@router.get(
    "/readyz",
    summary="Readiness: apiserver reachable, CRD installed, watch connected and synced",
    responses={503: {"model": ReadyResponse, "description": "Not ready; checks says why"}},
)
async def readyz(svc: ServiceDep, response: Response) -> ReadyResponse:
    checks = {"apiserver": await _apiserver_check(svc), "watch": svc.watch.problem() or "ok"}
    if svc.draining:
        checks["gateway"] = "shutting down"
    ready = all(v == "ok" for v in checks.values())
    if not ready:
        response.status_code = 503  # a probe's answer, not an error: the same body either way
    return ReadyResponse(status="ok" if ready else "unavailable", checks=checks)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def prometheus() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/internal/uploads/{namespace}/{name}/{token}",
    summary="An uploaded file, for the task's runner (its own token)",
    include_in_schema=False,
)
async def upload(namespace: str, name: str, token: str, svc: ServiceDep) -> FileResponse:
    path = svc.uploads.find(namespace, name, token)
    if path is None or not path.is_file():
        raise UploadNotFound()
    return FileResponse(path, media_type="application/octet-stream")
