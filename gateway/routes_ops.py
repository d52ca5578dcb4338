"""Open routes: probes, metrics, and the upload route runners fetch audio from."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ifw.gateway import metrics
from ifw.gateway.deps import ServiceDep
from ifw.gateway.errors import UploadNotFound
from ifw.gateway.kube import KubeError
from ifw.gateway.models import ReadyResponse
from ifw.gateway.service import Service

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _apiserver_check(svc: Service) -> str:
    try:
        # Listing one TranscriptionJob proves the apiserver answers, the CRD is served and RBAC lets us read.
        await svc.kube.list_tjs(svc.settings.namespace, limit=1)
    except KubeError as exc:
        return "TranscriptionJob CRD not installed" if exc.status == 404 else f"error {exc.status}: {exc.message}"
    return "ok"


@router.get(
    "/readyz",
    summary="Readiness: apiserver reachable, CRD installed, watch synced",
    responses={503: {"model": ReadyResponse, "description": "Not ready; checks says why"}},
)
async def readyz(svc: ServiceDep, response: Response) -> ReadyResponse:
    checks = {"apiserver": await _apiserver_check(svc), "watch": "ok" if svc.watch.synced else "not synced yet"}
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
