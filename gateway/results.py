"""Read a finished TranscriptionJob's stored transcript (ifw.core.results); the routes render it (ifw.core.formats)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from ifw.core import results
from ifw.core.transcript import Transcript
from ifw.gateway.errors import ResultUnavailable
from ifw.gateway.kube import Kube
from ifw.gateway.taskids import task_id_of

log = logging.getLogger("ifw.gateway")


@functools.lru_cache(maxsize=1)
def _s3() -> Any:
    """One boto3 client for S3-stored results (IFW_S3_* settings, AWS_* credentials), made on first use."""
    return results.s3_client(results.ResultSettings())


async def load(kube: Kube, namespace: str, tj: dict[str, Any]) -> Transcript:
    """The TranscriptionJob's stored transcript. Raises ResultUnavailable."""
    name = task_id_of(tj)
    ref = (tj.get("status") or {}).get("result")
    if not ref:
        raise ResultUnavailable(name, "the job succeeded but reports no result")
    s3 = await kube.call(_s3) if ref.get("store") == "s3" else None
    try:
        return await kube.call(
            results.load_result, ref, namespace, job_uid=tj["metadata"].get("uid"), core_v1=kube.core, s3=s3
        )
    except results.ResultNotFound as exc:  # removed on TTL: gone for good
        raise ResultUnavailable(name, exc.message, 410) from exc
    except results.ResultStoreFailed as exc:
        raise ResultUnavailable(name, exc.message, 502) from exc


async def read(
    kube: Kube, namespace: str, tj: dict[str, Any], prefetched: asyncio.Future[Transcript] | None = None
) -> Transcript:
    """The TranscriptionJob's stored transcript, for the routes to render (ifw.core.formats).

    `prefetched`: the same result already being read (see Prefetcher); used when it succeeded.
    Raises ResultUnavailable.
    """
    if prefetched is not None:
        try:
            return await prefetched
        except Exception:  # noqa: BLE001 - read it again below, with the final ref
            pass
    try:
        return await load(kube, namespace, tj)
    except ResultUnavailable as exc:
        name = task_id_of(tj)
        log.warning("result of %s/%s unavailable: %s", namespace, name, exc.why, extra={"task_id": name})
        raise


class Prefetcher:
    """Reads a waited-on TranscriptionJob's result as soon as the runner reports it
    (status.result), before the operator marks it Succeeded, so the answer needs no
    further round trip when it does. Only for TranscriptionJobs a sync request waits
    on; a waiter that leaves drops its read."""

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

    def take(self, key: tuple[str, str, str], tj: dict[str, Any]) -> asyncio.Future[Transcript] | None:
        """The read for this TranscriptionJob, if it is of its final result."""
        entry = self.reads.pop(key, None)
        ref = (tj.get("status") or {}).get("result") or {}
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
