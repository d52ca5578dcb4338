"""What the routes do: create TranscriptionJobs, wait for them, read results.

Kept apart from the HTTP layer so the original API's routes and the
OpenAI-compatible ones share one path from request to job to result.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request

from ifw.core import contract
from ifw.crds.transcriptionjob import (
    API_VERSION,
    KIND,
    AudioSource,
    Diarization,
    SecretReference,
    TranscriptionJobSpec,
    Webhook,
)
from ifw.gateway import metrics
from ifw.gateway.config import GatewaySettings
from ifw.gateway.kube import Kube, KubeError
from ifw.gateway.models import TranscribeFields
from ifw.gateway.results import Prefetcher
from ifw.gateway.uploads import Staged, Uploads
from ifw.gateway.watch import JobGone, JobWatch

log = logging.getLogger("ifw.gateway")

# A failed job's reason decides the HTTP status of a sync answer: the runner's bad-input
# reasons are the client's fault (4xx), the rest are ours (one table, in the contract).
failure_status = contract.http_status_for_reason


class ClientGone(Exception):
    """The HTTP client disconnected while its request waited."""


@dataclass
class Created:
    namespace: str
    name: str
    uid: str
    job: dict[str, Any]


class Service:
    def __init__(self, settings: GatewaySettings, kube: Kube, watch: JobWatch, uploads: Uploads):
        self.settings = settings
        self.kube = kube
        self.watch = watch
        self.uploads = uploads
        self.prefetcher = Prefetcher(kube, watch.has_waiters)
        watch.listeners.append(self.prefetcher.on_event)

    # -------------------------------------------------------------- create

    def build_job(self, req: TranscribeFields, name: str, audio_url: str, secret: str | None) -> dict[str, Any]:
        s = self.settings
        webhook = None
        if req.webhook is not None:
            ref = SecretReference(name=secret) if secret else None
            webhook = Webhook(url=req.webhook.url, headers_secret_ref=ref)
        spec = TranscriptionJobSpec(
            audio=AudioSource(url=audio_url),
            task=req.task,
            language=req.language,
            model=req.model or s.default_model,
            batch_size=req.batch_size,
            timestamp=req.timestamp,
            diarization=Diarization(
                enabled=req.diarise_audio,
                num_speakers=req.num_speakers,
                min_speakers=req.min_speakers,
                max_speakers=req.max_speakers,
            ),
            webhook=webhook,
            active_deadline_seconds=s.active_deadline_seconds,
            ttl_seconds_after_finished=s.ttl_seconds_after_finished,
            queue_name=s.queue_name,
        )
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "labels": {contract.LABEL_CREATED_BY: contract.CREATED_BY_GATEWAY}},
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        }

    async def create(
        self,
        namespace: str,
        req: TranscribeFields,
        audio_url: str | None = None,
        staged: Staged | None = None,
        mode: str = "sync",
    ) -> Created:
        """Create the job (and its webhook-headers Secret); undo everything on failure."""
        name = req.managed_task_id or str(uuid.uuid4())
        if staged is not None:
            audio_url = self.uploads.url_for(namespace, name, staged)
        assert audio_url is not None
        secret = None
        job: dict[str, Any] | None = None
        headers = req.webhook.header if req.webhook else {}
        try:
            if headers:
                # A random suffix: a duplicate task id must never touch the first job's Secret.
                secret = f"{name}-webhook-{secrets.token_hex(3)}"
                labels = {contract.LABEL_CREATED_BY: contract.CREATED_BY_GATEWAY, contract.LABEL_TASK_ID: name}
                await self.kube.create_secret(namespace, secret, headers, labels)
            job = await self.kube.create_job(namespace, self.build_job(req, name, audio_url, secret))
            uid = job["metadata"]["uid"]
            if secret:
                await self.kube.own_secret(namespace, secret, job)
            if staged is not None:
                await anyio.to_thread.run_sync(self.uploads.commit, staged, namespace, name, uid)
        except BaseException:
            await self._undo(namespace, name, secret, staged, job)
            raise
        metrics.JOBS_CREATED.labels(mode).inc()
        log.info("created task %s/%s (%s)", namespace, name, mode, extra={"task_id": name})
        return Created(namespace, name, uid, job)

    async def _undo(
        self, namespace: str, name: str, secret: str | None, staged: Staged | None, job: dict[str, Any] | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if job is not None:
                    await self.kube.delete_job(namespace, name, self.settings.delete_propagation)
                if secret:
                    await self.kube.delete_secret(namespace, secret)
            except KubeError as exc:
                log.warning("cleanup after failed create of %s/%s: %s", namespace, name, exc, extra={"task_id": name})
            if staged is not None:
                self.uploads.discard(staged)

    # ---------------------------------------------------------------- wait

    async def wait(self, created: Created, request: Request | None) -> dict[str, Any]:
        """The finished job. Raises TimeoutError, JobGone or ClientGone."""
        started = asyncio.get_running_loop().time()
        waiter = asyncio.ensure_future(
            self.watch.wait_terminal(created.namespace, created.name, created.uid, self.settings.sync_timeout_seconds)
        )
        disconnect = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        outcome = "error"
        try:
            pending = {waiter} | ({disconnect} if disconnect else set())
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                outcome = "disconnected"
                waiter.cancel()
                if self.settings.cancel_on_disconnect:
                    await self.kube.delete_job(created.namespace, created.name, self.settings.delete_propagation)
                    log.info("client left: cancelled %s/%s", created.namespace, created.name, extra={"task_id": created.name})
                raise ClientGone(created.name)
            job = waiter.result()
            outcome = (job.get("status") or {}).get("phase", "unknown").lower()
            return job
        except TimeoutError:
            outcome = "timeout"
            raise
        except JobGone:
            outcome = "cancelled"
            raise
        finally:
            if outcome != "succeeded":  # only a succeeded job's waiter takes the read
                self.prefetcher.drop((created.namespace, created.name, created.uid))
            for fut in (waiter, disconnect):
                if fut is not None and not fut.done():
                    fut.cancel()
            metrics.SYNC_WAIT_SECONDS.labels(outcome).observe(asyncio.get_running_loop().time() - started)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


__all__ = ["ClientGone", "Created", "JobGone", "Service", "failure_status"]
