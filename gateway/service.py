"""What the routes do: check requests, create TranscriptionJobs, wait for them, read results.

Kept apart from the HTTP layer so the original API's routes and the
OpenAI-compatible ones share one path from request to TranscriptionJob to
result. Every refusal is raised as an ifw.gateway.errors exception.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from starlette.datastructures import UploadFile

from ifw.core import contract
from ifw.core.netguard import Allowlist
from ifw.core.transcript import Transcript
from ifw.crds.transcriptionjob import (
    API_VERSION,
    KIND,
    AudioSource,
    Diarization,
    KnownSpeaker,
    SecretReference,
    TranscriptionJobSpec,
    Vad,
    Webhook,
)
from ifw.gateway import metrics, results
from ifw.gateway.config import GatewaySettings
from ifw.gateway.errors import (
    ClientDisconnected,
    DiarizationUnavailable,
    GatewayRestarting,
    ShuttingDown,
    TaskCancelled,
    TaskExists,
    TaskFailed,
    TaskNotFound,
    TaskStillRunning,
    UploadsDisabled,
    WebhookRequired,
    field_error,
)
from ifw.gateway.kube import Kube, KubeError
from ifw.gateway.models import TranscribeFields
from ifw.gateway.references import channels_of, decode_data_url, is_data_url
from ifw.gateway.taskids import annotations_for, is_object_name, is_own_name, object_name, task_id_of
from ifw.gateway.uploads import AUDIO, Staged, Uploads
from ifw.gateway.urlcheck import url_problem
from ifw.gateway.watch import TjGone, TjWatch

log = logging.getLogger("ifw.gateway")


@dataclass
class Created:
    namespace: str
    name: str  # the TranscriptionJob's
    uid: str  # the object itself is not kept here: the watch holds its current state
    task_id: str  # the client's (managed_task_id or a uuid4)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.namespace, self.name, self.uid


class Service:
    def __init__(self, settings: GatewaySettings, kube: Kube, watch: TjWatch, uploads: Uploads):
        self.settings = settings
        self.kube = kube
        self.watch = watch
        self.uploads = uploads
        # The lists of the components that connect: the runner fetches url, the operator posts webhooks.
        self.url_allowlist = Allowlist(settings.url_allowlist)
        self.webhook_allowlist = Allowlist(settings.webhook_allowlist)
        self.prefetcher = results.Prefetcher(kube, watch.has_waiters)
        watch.listeners.append(self.prefetcher.on_event)
        # Set on SIGTERM: every sync wait ends at once with its task_id, and nothing new starts.
        self._draining = asyncio.Event()

    # ------------------------------------------------------------ shutdown

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        """The server is stopping: answer every waiting sync request now (503 with its task_id;
        the task goes on) and refuse new ones, so the process exits in bounded time."""
        if not self.draining:
            log.info("shutting down: answering the waiting sync requests; their tasks go on")
            self._draining.set()

    # -------------------------------------------------------------- check

    def check(self, req: TranscribeFields, url: str | None, with_file: bool) -> None:
        """Refusals that need the settings; the original API's bodies where it had one."""
        if url is not None and (problem := url_problem(url, self.url_allowlist)):
            raise field_error("url", f"url is not allowed: it {problem}")
        if req.webhook is not None and (problem := url_problem(req.webhook.url, self.webhook_allowlist)):
            raise field_error("webhook.url", f"webhook.url is not allowed: it {problem}")
        if req.is_async and req.webhook is None:
            raise WebhookRequired()
        if req.diarise_audio and not self.settings.diarization_available:
            raise DiarizationUnavailable()
        if req.known_speakers and not self.settings.diarization_available:  # the diarization's embeddings
            raise DiarizationUnavailable("known_speakers")
        for i, known in enumerate(req.known_speakers or []):
            if not is_data_url(known.url) and (problem := url_problem(known.url, self.url_allowlist)):
                raise field_error(f"known_speakers.{i}.url", f"known_speakers[{i}].url is not allowed: it {problem}")
        if any(is_data_url(k.url) for k in req.known_speakers or []) and not self.uploads.enabled:
            raise UploadsDisabled()
        allowed = self.settings.allowed_models
        if req.model and allowed and req.model not in allowed:
            raise field_error("model", f"model {req.model!r} is not offered here; offered: {', '.join(allowed)}")
        if with_file and not self.uploads.enabled:
            raise UploadsDisabled()

    # -------------------------------------------------------------- create

    def build_tj(
        self, req: TranscribeFields, task_id: str, audio_url: str, secret: str | None, stream: bool = False,
        reference_urls: list[str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
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
            prompt=req.prompt or None,
            temperature=req.temperature,
            hotwords=req.hotwords or None,
            vad=Vad(**req.vad.model_dump(exclude_none=True)) if req.vad else None,
            diarization=Diarization(
                enabled=req.diarise_audio,
                num_speakers=req.num_speakers,
                min_speakers=req.min_speakers,
                max_speakers=req.max_speakers,
                known_speakers=[
                    KnownSpeaker(name=k.name, audio=AudioSource(url=url))
                    for k, url in zip(req.known_speakers or [], reference_urls or [], strict=True)
                ] or None,
            ),
            multichannel=req.multichannel,
            parallelism=req.parallelism,
            webhook=webhook,
            active_deadline_seconds=s.active_deadline_seconds,
            ttl_seconds_after_finished=s.ttl_seconds_after_finished,
            queue_name=s.queue_name,
        )
        metadata: dict[str, Any] = {
            "name": object_name(task_id),
            "labels": {contract.LABEL_CREATED_BY: contract.CREATED_BY_GATEWAY},
        }
        annotations = annotations_for(task_id)
        if stream:  # the runner then reports the text so far in status.progress.text
            annotations[contract.ANNOTATION_STREAM] = "true"
        if annotations:
            metadata["annotations"] = annotations
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": metadata,
            "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        }

    async def submit(
        self,
        namespace: str,
        req: TranscribeFields,
        url: str | None,
        upload: UploadFile | None,
        mode: str,
        stream: bool = False,
    ) -> Created:
        """Check the request, stage its file (if any), create its TranscriptionJob."""
        self.check(req, url, upload is not None)
        staged = None
        if upload is not None:
            staged = await self.uploads.stage(upload.file, upload.filename or "audio", self.settings.max_upload_bytes)
            if staged.size == 0:  # said now, not after a runner pod started for nothing
                self.uploads.discard(staged)
                raise field_error("file", "the file is empty (0 bytes)")
            if req.multichannel and channels_of(staged.dir / AUDIO) == 1:  # WAV/FLAC say; the runner checks the rest
                self.uploads.discard(staged)
                raise field_error("multichannel", "the file has one channel (mono): multichannel needs one channel "
                                  "per speaker (or leave it off; diarize splits one channel by speaker)")  # fmt: skip
        for known in req.known_speakers or []:  # inline references: kept beside the upload
            if is_data_url(known.url):
                staged = await self.uploads.stage_reference(staged, decode_data_url(known.url, "url"))
        if self.draining:  # the body may have taken a while: a stopping gateway starts nothing
            if staged is not None:
                self.uploads.discard(staged)
            raise ShuttingDown()
        return await self.create(namespace, req, audio_url=url, staged=staged, mode=mode, stream=stream)

    async def create(
        self,
        namespace: str,
        req: TranscribeFields,
        audio_url: str | None = None,
        staged: Staged | None = None,
        mode: str = "sync",
        stream: bool = False,
    ) -> Created:
        """Create the TranscriptionJob (and its webhook-headers Secret); undo everything on failure."""
        task_id = req.managed_task_id or str(uuid.uuid4())
        name = object_name(task_id)
        if staged is not None and audio_url is None:
            audio_url = self.uploads.url_for(namespace, name, staged)
        assert audio_url is not None
        inline = iter(staged.references if staged is not None else [])
        reference_urls = [self.uploads.url_for(namespace, name, staged, next(inline)) if is_data_url(k.url) else k.url
                          for k in req.known_speakers or []]  # fmt: skip
        secret = None
        tj: dict[str, Any] | None = None
        headers = req.webhook.header if req.webhook else {}
        try:
            if headers:
                # A random suffix: a duplicate task id must never touch the first task's Secret.
                secret = f"{name}-webhook-{secrets.token_hex(3)}"
                labels = {contract.LABEL_CREATED_BY: contract.CREATED_BY_GATEWAY, contract.LABEL_TASK_ID: name}
                await self.kube.create_secret(namespace, secret, headers, labels)
            tj = await self._create_tj(namespace, task_id, self.build_tj(req, task_id, audio_url, secret, stream,
                                                                           reference_urls))
            uid = tj["metadata"]["uid"]
            if secret:
                await self.kube.own_secret(namespace, secret, tj)
            if staged is not None:
                await anyio.to_thread.run_sync(self.uploads.commit, staged, namespace, name, uid)
        except BaseException:
            await self._undo(namespace, name, secret, staged, tj)
            raise
        self.watch.created(tj)
        metrics.TJS_CREATED.labels(mode).inc()
        log.info("created task %s as %s/%s (%s)", task_id, namespace, name, mode, extra={"task_id": task_id})
        return Created(namespace, name, uid, task_id)

    async def _create_tj(self, namespace: str, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.kube.create_tj(namespace, body)
        except KubeError as exc:
            if exc.status == 409:  # never overwrite: the original API silently did
                raise TaskExists(task_id) from exc
            raise

    async def _undo(
        self, namespace: str, name: str, secret: str | None, staged: Staged | None, tj: dict[str, Any] | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if tj is not None:
                    await self.kube.delete_tj(namespace, name, self.settings.delete_propagation)
                if secret:
                    await self.kube.delete_secret(namespace, secret)
            except KubeError as exc:
                log.warning("cleanup after failed create of %s/%s: %s", namespace, name, exc, extra={"task_id": name})
            if staged is not None:
                self.uploads.discard(staged)

    # ---------------------------------------------------------------- wait

    async def transcript(self, created: Created, request: Request | None) -> Transcript:
        """The stored transcript of a sync task once it is done. Raises TaskFailed, ResultUnavailable
        and what `wait` raises."""
        return await self.finished(created, await self.wait(created, request))

    async def finished(self, created: Created, tj: dict[str, Any]) -> Transcript:
        """The transcript of a finished TranscriptionJob. Raises TaskFailed, ResultUnavailable."""
        status = tj.get("status") or {}
        if status.get("phase") == "Failed":
            raise TaskFailed(created.task_id, status.get("reason"), status.get("message"))
        transcript = await results.read(self.kube, created.namespace, tj, self.prefetcher.take(created.key, tj))
        seen = self.watch.finished_at.pop(created.key, None)
        if seen is not None:
            metrics.COMPLETION_TO_RESPONSE.observe(time.monotonic() - seen)
        return transcript

    async def wait(self, created: Created, request: Request | None) -> dict[str, Any]:
        """The finished TranscriptionJob. Raises TaskStillRunning (only with a cap configured),
        TaskCancelled or ClientDisconnected."""
        cap = self.settings.sync_timeout_seconds
        started = asyncio.get_running_loop().time()
        waiter = asyncio.ensure_future(self.watch.wait_terminal(created.namespace, created.name, created.uid, cap))
        disconnect = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        draining = asyncio.ensure_future(self._draining.wait())
        outcome = "error"
        try:
            await asyncio.wait({waiter, draining} | ({disconnect} if disconnect else set()),
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not waiter.done() and draining.done():
                outcome = "shutdown"
                raise GatewayRestarting(created.task_id)
            if not waiter.done():
                outcome = "disconnected"
                await self._client_left(created)
                raise ClientDisconnected()
            tj = waiter.result()
            outcome = (tj.get("status") or {}).get("phase", "unknown").lower()
            return tj
        except TimeoutError:
            outcome = "timeout"
            raise TaskStillRunning(created.task_id, cap or 0) from None
        except TjGone:
            outcome = "cancelled"
            raise TaskCancelled(created.task_id) from None
        finally:
            if outcome != "succeeded":  # only a succeeded task's waiter takes the read
                self.prefetcher.drop(created.key)
            for fut in (waiter, disconnect, draining):
                if fut is not None and not fut.done():
                    fut.cancel()
            metrics.SYNC_WAIT_SECONDS.labels(outcome).observe(asyncio.get_running_loop().time() - started)

    async def progress(self, created: Created, request: Request | None) -> AsyncIterator[tuple[str, Any]]:
        """A streaming task as it runs: ("delta", text) each time status.progress.text grows,
        ("idle", None) after keepalive_seconds without news, and last ("end", the finished
        TranscriptionJob). Raises TaskCancelled, TaskStillRunning (with a cap), ClientDisconnected,
        GatewayRestarting."""
        loop = asyncio.get_running_loop()
        cap = self.settings.sync_timeout_seconds
        deadline = loop.time() + cap if cap else None
        queue = self.watch.subscribe(created.namespace, created.name, created.uid)
        disconnect = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        draining = asyncio.ensure_future(self._draining.wait())
        sent = ""
        try:
            while True:
                timeouts = [self.settings.keepalive_seconds or None, deadline and max(deadline - loop.time(), 0.0)]
                timeout = min((t for t in timeouts if t is not None), default=None)
                event = asyncio.ensure_future(queue.get())
                waits = {event, draining} | ({disconnect} if disconnect else set())
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if event not in done:
                    event.cancel()
                    if draining in done:
                        raise GatewayRestarting(created.task_id)
                    if disconnect is not None and disconnect in done:
                        await self._client_left(created)
                        raise ClientDisconnected()
                    if deadline is not None and loop.time() >= deadline:
                        raise TaskStillRunning(created.task_id, cap or 0)
                    yield "idle", None
                    continue
                kind, tj = event.result()
                if kind == "DELETED":
                    raise TaskCancelled(created.task_id)
                # The text of the audio so far; a runner retry that starts over is not news until
                # it has passed what was sent (a delta is never taken back).
                # (OpenAI's text has no leading space: Whisper's first one is dropped.)
                text = (((tj.get("status") or {}).get("progress") or {}).get("text") or "").lstrip()
                if len(text) > len(sent) and text.startswith(sent):
                    yield "delta", text[len(sent):]
                    sent = text
                if contract.is_terminal(tj):
                    yield "end", tj
                    return
        finally:
            self.watch.unsubscribe(created.namespace, created.name, queue)
            for fut in (disconnect, draining):
                if fut is not None and not fut.done():
                    fut.cancel()

    async def _client_left(self, created: Created) -> None:
        if self.settings.cancel_on_disconnect:
            await self.kube.delete_tj(created.namespace, created.name, self.settings.delete_propagation)
            log.info("client left: cancelled %s/%s", created.namespace, created.name, extra={"task_id": created.task_id})

    # --------------------------------------------------------------- tasks

    async def active(self, namespace: str) -> list[str]:
        """Ids of the tasks not finished, oldest first: from the watch's cache once it has synced."""
        if self.watch.synced and namespace in self.watch.namespaces:
            return self.watch.active(namespace)
        listed = await self.kube.list_tjs(namespace)
        items = sorted(listed["items"], key=lambda o: o["metadata"].get("creationTimestamp") or "")
        return [task_id_of(o) for o in items if not contract.is_terminal(o)]

    async def get(self, namespace: str, task_id: str) -> dict[str, Any]:
        """The task's TranscriptionJob. Raises TaskNotFound."""
        tj = await self.kube.get_tj(namespace, object_name(task_id))
        if tj is None and is_object_name(task_id) and not is_own_name(task_id):
            # Made before such ids were hashed too (their object is named by the id itself): found
            # until their TTL ends, so an upgrade loses no task.
            tj = await self.kube.get_tj(namespace, task_id)
        # A name is shared by one id only: another id's object (or a kubectl one) is not this task.
        if tj is None or task_id_of(tj) != task_id:
            raise TaskNotFound()
        return tj

    async def cancel(self, namespace: str, task_id: str) -> dict[str, Any] | None:
        """Delete the task's TranscriptionJob if it has not finished (its batch/v1 Job and pod go
        with it) and return None; a finished one is kept, its transcript with it, and returned.
        Raises TaskNotFound."""
        for _ in range(5):
            tj = await self.get(namespace, task_id)
            if contract.is_terminal(tj):
                return tj
            try:
                # Only the version just read: a task finishing meanwhile is kept and answered.
                deleted = await self.kube.delete_tj(
                    namespace, tj["metadata"]["name"], self.settings.delete_propagation,
                    tj["metadata"].get("resourceVersion"),
                )  # fmt: skip
            except KubeError as exc:
                if exc.status == 409:
                    continue
                raise
            if not deleted:
                raise TaskNotFound()
            log.info("cancelled task %s in %s", task_id, namespace, extra={"task_id": task_id})
            return None
        raise KubeError(409, f"task {task_id} kept changing while it was being cancelled; try again")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


__all__ = ["Created", "Service"]
