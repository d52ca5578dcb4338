"""The operator's Kubernetes writes, as coroutines.

kopf watches; this module writes. It uses the official ``kubernetes`` client (already a
dependency) in a bounded thread pool, with plain dict bodies and raw JSON responses
(``_preload_content=False``): deserialising into the client's model classes costs more CPU
than the request itself, and the operator has to keep up with hundreds of jobs on two cores.
TranscriptionJobs go through ifw.core's one client (``TranscriptionJobs``), run in the same pool.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import uuid4

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ifw.core.contract import now_string
from ifw.core.kube import MERGE_PATCH, TranscriptionJobs
from ifw.crds.transcriptionjob import GROUP, VERSION


class Kube:
    def __init__(self, api: client.ApiClient, threads: int):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.tjs = TranscriptionJobs(api)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        # Events are for people: two threads of their own, so a burst of them never queues
        # ahead of the Job creations and status writes on the main pool.
        self._events = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kube-events")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._events.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    async def _call(self, fn, *args, _pool: ThreadPoolExecutor | None = None, **kwargs) -> Any:
        kwargs.setdefault("_preload_content", False)
        kwargs.setdefault("_request_timeout", (10, 60))  # (connect, read): a dead connection never hangs a job
        # The body is read (and the connection handed back to the pool) in the worker thread, not on
        # the event loop.
        data = await self._run(lambda: fn(*args, **kwargs).data, pool=_pool)
        return json.loads(data) if data else None

    async def _run(self, fn: Callable[[], Any], pool: ThreadPoolExecutor | None = None) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool or self._pool, fn)

    # ------------------------------------------------------------------ create

    _CREATE = {
        "Secret": lambda self: self.core.create_namespaced_secret,
        "ServiceAccount": lambda self: self.core.create_namespaced_service_account,
        "Role": lambda self: self.rbac.create_namespaced_role,
        "RoleBinding": lambda self: self.rbac.create_namespaced_role_binding,
        "Job": lambda self: self.batch.create_namespaced_job,
    }

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create ``obj``; None when it already exists (the operator's names are deterministic)."""
        fn = self._CREATE[obj["kind"]](self)
        try:
            return await self._call(fn, obj["metadata"]["namespace"], obj)
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    _READ = {
        "Secret": lambda self: self.core.read_namespaced_secret,
        "ServiceAccount": lambda self: self.core.read_namespaced_service_account,
        "Role": lambda self: self.rbac.read_namespaced_role,
        "RoleBinding": lambda self: self.rbac.read_namespaced_role_binding,
        "Job": lambda self: self.batch.read_namespaced_job,
    }

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self._READ[kind](self), name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def get_tj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._run(lambda: self.tjs.get(namespace, name))

    # ------------------------------------------------------------------ patch

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.batch.patch_namespaced_job, name, namespace, patch, _content_type=MERGE_PATCH)

    async def patch_tj_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A merge patch of /status with only the operator's fields (the runner owns the others)."""
        return await self._run(lambda: self.tjs.patch_status(namespace, name, patch))

    async def patch_tj_metadata(
        self, tj: dict[str, Any], build: Callable[[dict[str, Any]], list[dict[str, Any]] | None]
    ) -> dict[str, Any] | None:
        """Apply the JSON patch ``build(body)`` makes (None: nothing to do); the updated body.

        Its tests fail when the metadata changed meanwhile: read again, build again.
        None: the job is gone (or the name is a new job's now).
        """
        meta = tj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        for _ in range(5):
            ops = build(tj)
            if ops is None:
                return tj
            patched = await self._run(lambda: self.tjs.json_patch(namespace, name, ops))
            if patched is not None:
                return patched
            tj = await self.get_tj(namespace, name)
            if tj is None or tj["metadata"]["uid"] != uid:
                return None
        raise RuntimeError(f"the metadata of TranscriptionJob {namespace}/{name} kept changing; retrying")

    # ------------------------------------------------------------------ delete

    # One at a time only what stop_job removes (a Job the operator failed, its Pods); cleanup goes by label.
    _DELETE = {
        "Job": lambda self: self.batch.delete_namespaced_job,
        "Pod": lambda self: self.core.delete_namespaced_pod,
    }

    async def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete now, background propagation (never wait on a garbage collector). False if absent.

        ``uid`` makes it a precondition: never delete a newer object that reuses the name.
        """
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call(self._DELETE[kind](self), name, namespace, body=body)
            return True
        except ApiException as error:
            if error.status in (404, 409):
                return False
            raise

    _DELETE_COLLECTION = {
        "Secret": lambda self: self.core.delete_collection_namespaced_secret,
        "ServiceAccount": lambda self: self.core.delete_collection_namespaced_service_account,
        "Role": lambda self: self.rbac.delete_collection_namespaced_role,
        "RoleBinding": lambda self: self.rbac.delete_collection_namespaced_role_binding,
        "Job": lambda self: self.batch.delete_collection_namespaced_job,
        "Pod": lambda self: self.core.delete_collection_namespaced_pod,
    }

    async def delete_labelled(self, kind: str, namespace: str, selector: str) -> None:
        """Delete every ``kind`` matching ``selector`` (by uid label: never a namesake's objects)."""
        await self._call(
            self._DELETE_COLLECTION[kind](self), namespace, label_selector=selector, propagation_policy="Background"
        )

    async def delete_tj(self, namespace: str, name: str, uid: str) -> bool:
        """False when it is gone, or the name is a newer job's (the uid precondition)."""
        try:
            return await self._run(lambda: self.tjs.delete(namespace, name, uid=uid))
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    # ------------------------------------------------------------------ events

    async def event(
        self, tj: dict[str, Any], *, type_: str, reason: str, message: str, component: str
    ) -> None:
        """A core/v1 Event on the TranscriptionJob (``kubectl describe tj`` shows them)."""
        meta = tj["metadata"]
        now = now_string()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name'][:200]}.{uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TranscriptionJob",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": os.environ.get("HOSTNAME", component),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(self.core.create_namespaced_event, meta["namespace"], event, _pool=self._events)
