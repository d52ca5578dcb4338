"""Read a finished job's stored transcript and render it (ifw.core.results and ifw.core.formats)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from fastapi.responses import JSONResponse

from ifw.core import formats, results
from ifw.core.transcript import Transcript
from ifw.gateway.kube import Kube

log = logging.getLogger("ifw.gateway")


class ResultUnavailable(Exception):
    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@functools.lru_cache(maxsize=1)
def _s3() -> Any:
    """One boto3 client for S3-stored results (IFW_S3_* settings, AWS_* credentials), made on first use."""
    return results.s3_client(results.ResultSettings())


async def load(kube: Kube, namespace: str, job: dict[str, Any]) -> Transcript:
    ref = (job.get("status") or {}).get("result")
    if not ref:
        raise ResultUnavailable("the job succeeded but reports no result")
    s3 = await kube.call(_s3) if ref.get("store") == "s3" else None
    try:
        return await kube.call(
            results.load_result, ref, namespace, job_uid=job["metadata"].get("uid"), core_v1=kube.core, s3=s3
        )
    except results.ResultNotFound as exc:  # removed on TTL: gone for good
        raise ResultUnavailable(exc.message, 410) from exc
    except results.ResultStoreFailed as exc:
        raise ResultUnavailable(exc.message, 502) from exc


async def render_job(
    kube: Kube, namespace: str, job: dict[str, Any], fmt: str, prefetched: asyncio.Future[Transcript] | None = None
) -> Any:
    """The job's result as `fmt` (json/verbose_json as objects, others as text), or an error response.

    `prefetched`: the same result already being read (see Prefetcher); used when it succeeded.
    """
    name = job["metadata"]["name"]
    try:
        transcript = None
        if prefetched is not None:
            try:
                transcript = await prefetched
            except Exception:  # noqa: BLE001 - read it again below, with the job's final ref
                transcript = None
        if transcript is None:
            transcript = await load(kube, namespace, job)
    except ResultUnavailable as exc:
        log.warning("result of %s/%s unavailable: %s", namespace, name, exc, extra={"task_id": name})
        body = {"detail": f"the result of task {name} is unavailable: {exc}", "status": "error", "task_id": name}
        return JSONResponse(body, status_code=exc.status)
    if fmt == "openai_json":
        return formats.to_openai_json(transcript)
    return formats.render_object(transcript, fmt)


class Prefetcher:
    """Reads a waited-on job's result as soon as the runner reports it (status.result),
    before the operator marks the job Succeeded, so the answer needs no further
    round trip when it does. Only for jobs a sync request waits on; a waiter that
    leaves drops its read."""

    def __init__(self, kube: Kube, has_waiters: Any):
        self.kube = kube
        self.has_waiters = has_waiters
        self.reads: dict[tuple[str, str, str], tuple[str | None, asyncio.Future[Transcript]]] = {}

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"], meta.get("uid"))
        if kind == "DELETED":
            self.drop(key)
            return
        ref = (obj.get("status") or {}).get("result")
        if not ref or not self.has_waiters(key[0], key[1]):
            return
        current = self.reads.get(key)
        if current is not None and current[0] == ref.get("sha256"):
            return
        self.drop(key)
        self.reads[key] = (ref.get("sha256"), asyncio.ensure_future(load(self.kube, key[0], obj)))

    def take(self, key: tuple[str, str, str], job: dict[str, Any]) -> asyncio.Future[Transcript] | None:
        """The read for this job, if it is of the job's final result."""
        entry = self.reads.pop(key, None)
        ref = (job.get("status") or {}).get("result") or {}
        if entry is None:
            return None
        if entry[0] != ref.get("sha256"):
            entry[1].cancel()
            return None
        return entry[1]

    def drop(self, key: tuple[str, str, str]) -> None:
        entry = self.reads.pop(key, None)
        if entry is not None:
            entry[1].cancel()
