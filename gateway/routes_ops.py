"""Open routes: probes, metrics, and the upload route runners fetch audio from."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ifw.gateway import metrics
from ifw.gateway.kube import KubeError

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: apiserver reachable, CRD installed, watch synced",
    responses={503: {"description": "Not ready; checks says why"}},
)
async def readyz(request: Request) -> JSONResponse:
    svc = request.app.state.service
    checks: dict[str, str] = {}
    try:
        # Listing one job proves the apiserver answers, the CRD is served and RBAC lets us read.
        await svc.kube.list_jobs(svc.settings.namespace, limit=1)
        checks["apiserver"] = "ok"
    except KubeError as exc:
        checks["apiserver"] = (
            "TranscriptionJob CRD not installed" if exc.status == 404 else f"error {exc.status}: {exc.message}"
        )
    checks["watch"] = "ok" if svc.watch.synced else "not synced yet"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)


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
    summary="An uploaded file, for the job's runner (per-job token)",
    include_in_schema=False,
)
async def upload(namespace: str, name: str, token: str, request: Request) -> Response:
    path = request.app.state.service.uploads.find(namespace, name, token)
    if path is None or not path.is_file():
        return JSONResponse({"detail": "Not found"}, status_code=404)
    return FileResponse(path, media_type="application/octet-stream")
