"""Read a finished job's stored transcript and render it (torch-free runner modules)."""

from __future__ import annotations

import functools
import logging
from typing import Any

from fastapi.responses import JSONResponse

from ifw.gateway.kube import Kube
from ifw.runner import formats, stores
from ifw.runner.errors import RunnerError
from ifw.runner.result import Transcript

log = logging.getLogger("ifw.gateway")


class ResultUnavailable(Exception):
    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@functools.lru_cache(maxsize=1)
def _s3() -> Any:
    """One boto3 client for S3-stored results (IFW_S3_* settings, AWS_* credentials), made on first use."""
    from ifw.runner.config import RunnerSettings

    return stores.s3_client(RunnerSettings())


async def load(kube: Kube, namespace: str, job: dict[str, Any]) -> Transcript:
    ref = (job.get("status") or {}).get("result")
    if not ref:
        raise ResultUnavailable("the job succeeded but reports no result")
    s3 = await kube.call(_s3) if ref.get("store") == "s3" else None
    try:
        return await kube.call(
            stores.load_result, ref, namespace, job_uid=job["metadata"].get("uid"), core_v1=kube.core, s3=s3
        )
    except stores.ResultNotFound as exc:  # removed on TTL: gone for good
        raise ResultUnavailable(exc.message, 410) from exc
    except RunnerError as exc:
        raise ResultUnavailable(exc.message, 502) from exc


async def render_job(kube: Kube, namespace: str, job: dict[str, Any], fmt: str) -> Any:
    """The job's result as `fmt` (json/verbose_json as objects, others as text), or an error response."""
    name = job["metadata"]["name"]
    try:
        transcript = await load(kube, namespace, job)
    except ResultUnavailable as exc:
        log.warning("result of %s/%s unavailable: %s", namespace, name, exc)
        body = {"detail": f"the result of task {name} is unavailable: {exc}", "status": "error", "task_id": name}
        return JSONResponse(body, status_code=exc.status)
    if fmt == "openai_json":
        return formats.to_openai_json(transcript)
    return formats.render_object(transcript, fmt)
