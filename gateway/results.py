"""Read a finished job's stored transcript and render it (torch-free runner modules)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from ifw.gateway.kube import Kube, KubeError
from ifw.runner import formats
from ifw.runner.result import Transcript

log = logging.getLogger("ifw.gateway")


class ResultUnavailable(Exception):
    pass


async def load(kube: Kube, namespace: str, job: dict[str, Any]) -> Transcript:
    ref = (job.get("status") or {}).get("result")
    if not ref:
        raise ResultUnavailable("the job succeeded but reports no result")
    from ifw.runner import stores  # noqa: PLC0415 - written by the runner side

    try:
        return await kube.call(stores.load_result, ref, namespace=namespace, api_client=kube.api_client)
    except KubeError:
        raise
    except Exception as exc:  # a missing Secret/object (TTL reached) or an unreadable one
        raise ResultUnavailable(str(exc)) from exc


async def render_job(kube: Kube, namespace: str, job: dict[str, Any], fmt: str) -> Any:
    """The job's result as `fmt` (json/verbose_json as objects, others as text), or an error response."""
    name = job["metadata"]["name"]
    try:
        transcript = await load(kube, namespace, job)
    except ResultUnavailable as exc:
        log.warning("result of %s/%s unavailable: %s", namespace, name, exc)
        body = {"detail": f"the result of task {name} is unavailable: {exc}", "status": "error", "task_id": name}
        return JSONResponse(body, status_code=500)
    if fmt == "openai_json":
        return formats.to_openai_json(transcript)
    return formats.render_object(transcript, fmt)
