"""An in-memory fake of the operator's Kubernetes API, for fast unit tests of the reconciler.

``FakeKube`` implements the async interface of ``ifw.operator.kube.Kube`` (create, read,
read_tj, patch_job, patch_tj_status, patch_tj_metadata, delete, delete_labelled, delete_tj,
event) on dicts: it assigns uids, resourceVersions and creation times as the apiserver does,
applies merge patches and JSON patches, honours uid preconditions and finalizers (a deleted
object with finalizers gets a deletionTimestamp and goes when the last one is removed), and
answers 404/409/422 the way the real client does. Each change is queued as a watch event.

``Harness`` wires a real ``Controller`` to it and plays kopf: it hands the queued events to the
controller, filling the Job and Pod indexes as it goes, so the indexes lag behind the writes as
kopf's do. The test plays the user, the Job controller and the kubelet through ``FakeKube.add``,
``update`` and ``remove``. Only the real-apiserver tests (the other modules here) show that the
operator works against Kubernetes; these show what a reconcile decides, in milliseconds.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.exceptions import ApiException

from ifw.core.contract import LABEL_JOB_UID
from ifw.crds.transcriptionjob import API_VERSION, KIND
from ifw.operator.config import OperatorSettings
from ifw.operator.controller import Controller
from ifw.operator.jobstate import JobState
from ifw.operator.webhooks import WebhookSender
from tests.operator.conftest import URL, operator_settings

NAMESPACE = "ns"
API_VERSIONS = {"Job": "batch/v1", "Role": "rbac.authorization.k8s.io/v1",
                "RoleBinding": "rbac.authorization.k8s.io/v1", KIND: API_VERSION}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what the operator sends as application/merge-patch+json)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _unpointer(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove/test on a copy of ``doc``; a failed test or a missing path is the apiserver's 422."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [_unpointer(p) for p in op["path"].split("/")[1:]]
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.get(part)
            if target is None:
                raise ApiException(status=422, reason=f"path {op['path']} does not exist")
        if op["op"] == "test":
            found = (target[int(last)] if int(last) < len(target) else None) if isinstance(target, list) \
                else target.get(last)
            if found != op["value"]:
                raise ApiException(status=422, reason=f"test of {op['path']} failed")
        elif op["op"] == "add":
            if isinstance(target, list):
                target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                target[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            if isinstance(target, list):
                target.pop(int(last))
            else:
                target.pop(last)
    return doc


def uid_of(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("labels") or {}).get(LABEL_JOB_UID)


@dataclass
class Fault:
    verb: str
    kind: str | None
    status: int
    times: int


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name) -> object
        self.calls: list[tuple[str, str, str]] = []  # the operator's calls, in order: (verb, kind, name)
        self.events: list[dict[str, Any]] = []  # core/v1 Events the operator posted
        self.watch: list[tuple[str, dict[str, Any]]] = []  # changes not yet handed to the controller
        self.faults: list[Fault] = []
        self._revision = itertools.count(1)

    # ------------------------------------------------------------ the test's side

    def fail(self, verb: str, *, kind: str | None = None, status: int = 500, times: int = 1) -> None:
        """Make the operator's next ``times`` calls of ``verb`` (on ``kind``) answer HTTP ``status``."""
        self.faults.append(Fault(verb, kind, status, times))

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create as the apiserver does; raises 409 if it exists."""
        stored = copy.deepcopy(obj)
        meta = stored["metadata"]
        meta.setdefault("namespace", NAMESPACE)
        key = (obj["kind"], meta["namespace"], meta["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        stored.setdefault("apiVersion", API_VERSIONS.get(obj["kind"], "v1"))
        meta.update(uid=str(uuid.uuid4()), generation=1,
                                  creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        return self._store(key, stored, "ADDED")

    def update(self, kind: str, name: str, patch: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
        """A merge patch; raises 404 if absent. A spec change moves metadata.generation, as for a CR."""
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        stored = merge_patch(self.objects[key], patch)
        if "spec" in patch:
            stored["metadata"]["generation"] += 1
        return self._store(key, stored, "MODIFIED")

    def remove(self, kind: str, name: str, namespace: str = NAMESPACE) -> bool:
        """Delete as the apiserver does: an object with finalizers only gets its deletionTimestamp."""
        key = (kind, namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            return False
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._store(key, obj, "MODIFIED")
            return True
        del self.objects[key]
        self.watch.append(("DELETED", copy.deepcopy(obj)))
        return True

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def owned_by(self, uid: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Objects labelled with a TranscriptionJob's uid."""
        return [copy.deepcopy(obj) for (k, _, _), obj in sorted(self.objects.items())
                if uid_of(obj) == uid and kind in (None, k)]

    def _store(self, key: tuple[str, str, str], obj: dict[str, Any], event: str) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self._revision))
        self.objects[key] = obj
        self.watch.append((event, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    # -------------------------------------------------- the operator's interface

    async def _call(self, verb: str, kind: str, name: str) -> None:
        await asyncio.sleep(0)  # the real calls run in a thread: other work interleaves
        self.calls.append((verb, kind, name))
        for fault in self.faults:
            if fault.verb == verb and fault.kind in (None, kind) and fault.times > 0:
                fault.times -= 1
                raise ApiException(status=fault.status, reason=f"injected HTTP {fault.status}")

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        await self._call("create", obj["kind"], obj["metadata"]["name"])
        try:
            return self.add(obj)
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        await self._call("read", kind, name)
        return self.get(kind, name, namespace)

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        await self._call("patch", "Job", name)
        return self.update("Job", name, patch, namespace)

    async def read_tj(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self._call("read", KIND, name)
        return self.get(KIND, name, namespace)

    async def patch_tj_metadata(self, tj: dict[str, Any], build: Callable[[dict[str, Any]], Any]) -> Any:
        """As Kube.patch_tj_metadata: a JSON patch, built again from a fresh read when a test fails."""
        meta = tj["metadata"]
        key = (KIND, meta["namespace"], meta["name"])
        for _ in range(5):
            ops = build(tj)
            if ops is None:
                return tj
            await self._call("patch", KIND, meta["name"])
            if key not in self.objects:
                return None
            try:
                patched = json_patch(self.objects[key], ops)
            except ApiException:
                tj = self.get(KIND, meta["name"], meta["namespace"])
                if tj is None or tj["metadata"]["uid"] != meta["uid"]:
                    return None
                continue
            stored = self._store(key, patched, "MODIFIED")
            if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get("finalizers"):
                self.remove(KIND, meta["name"], meta["namespace"])  # the last finalizer went: now it goes
            return stored
        raise RuntimeError("metadata kept changing")

    async def patch_tj_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        await self._call("patch_status", KIND, name)
        key = (KIND, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        # The status subresource: the spec (and generation) stay as they are.
        return self._store(key, merge_patch(self.objects[key], {"status": patch}), "MODIFIED")

    async def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> bool:
        await self._call("delete", kind, name)
        obj = self.objects.get((kind, namespace, name))
        if obj is None or (uid and obj["metadata"]["uid"] != uid):
            return False  # 404, or 409 on the uid precondition
        return self.remove(kind, name, namespace)

    async def delete_labelled(self, kind: str, namespace: str, selector: str) -> None:
        await self._call("deletecollection", kind, selector)
        label, _, value = selector.partition("=")
        for (k, ns, name), obj in list(self.objects.items()):
            if k == kind and ns == namespace and (obj["metadata"].get("labels") or {}).get(label) == value:
                self.remove(k, name, ns)

    async def delete_tj(self, namespace: str, name: str, uid: str) -> bool:
        return await self.delete(KIND, namespace, name, uid=uid)

    async def event(self, tj: dict[str, Any], *, type_: str, reason: str, message: str, component: str) -> None:
        await self._call("create", "Event", reason)
        self.events.append({"uid": tj["metadata"]["uid"], "type": type_, "reason": reason, "message": message})

    def close(self) -> None:
        pass


def _index(index: dict[str, list[dict[str, Any]]], event: str, body: dict[str, Any]) -> None:
    """What kopf's index does with a watch event: tj uid -> the bodies carrying that label."""
    uid = uid_of(body)
    bodies = [b for b in index.get(uid, []) if b["metadata"]["name"] != body["metadata"]["name"]]
    if event != "DELETED":
        bodies.append(body)
    if bodies:
        index[uid] = bodies
    else:
        index.pop(uid, None)


class Harness:
    """A real Controller on a FakeKube, with kopf's part (watch events, indexes) played by hand."""

    def __init__(self, *, webhooks: Callable[[OperatorSettings, FakeKube], Any] = WebhookSender, **settings: Any):
        """``webhooks``: builds the sender from the settings and the API, as handlers.make_controller does."""
        self.kube = FakeKube()
        self.settings = operator_settings(**{"admission_settle_seconds": 0, **settings})
        self._webhooks = webhooks
        self.restart()

    def restart(self) -> None:
        """A new Controller on the same API, as a restarted operator: kopf lists every object first
        (the indexes), then hands each one over as an event, in no particular order (here: by name,
        backwards)."""
        self.jobs_index: dict[str, list[dict[str, Any]]] = {}
        self.pods_index: dict[str, list[dict[str, Any]]] = {}
        for (kind, _, _), obj in sorted(self.kube.objects.items(), reverse=True):
            if kind in ("Job", "Pod") and uid_of(obj):
                _index(self.jobs_index if kind == "Job" else self.pods_index, "ADDED", copy.deepcopy(obj))
        self.controller = Controller(self.settings, self.kube, self._webhooks(self.settings, self.kube))
        self.controller.bind_indexes(self.jobs_index, self.pods_index)
        self.kube.watch = [("ADDED", copy.deepcopy(obj)) for (kind, _, _), obj in
                           sorted(self.kube.objects.items(), reverse=True) if kind == KIND]

    # ------------------------------------------------------------------ running

    def deliver(self) -> bool:
        """Hand the queued watch events to the controller, as kopf's handlers do."""
        events, self.kube.watch = self.kube.watch, []
        for event, body in events:
            if body["kind"] == KIND:
                self.controller.observe(event, body)
            elif body["kind"] == "Job" and uid_of(body):
                _index(self.jobs_index, event, body)
                self.controller.observe_job(event, body)
            elif body["kind"] == "Pod" and uid_of(body):
                _index(self.pods_index, event, body)
                self.controller.poke(uid_of(body))
        return bool(events)

    async def drain(self) -> None:
        """Deliver events and wait for the reconciles (and Event posts) they start, until none are left."""
        while True:
            delivered = self.deliver()
            await asyncio.sleep(0)
            # Reconciles, and the Event posts they leave behind (the webhook tasks are the tests' to await).
            busy = [s.task for s in self.controller.states.values() if s.task] + list(self.controller._background)
            if busy:
                await asyncio.gather(*busy, return_exceptions=True)
            elif not delivered and not self.kube.watch:
                return

    async def settle(self, horizon: float = 0.5) -> None:
        """``drain``, and let timers due within ``horizon`` seconds fire (settling, retries, short TTLs)."""
        loop = asyncio.get_running_loop()
        while True:
            await self.drain()
            due = [s.timer.when() for s in self.controller.states.values() if s.timer]
            if not due or min(due) > loop.time() + horizon:
                return
            await asyncio.sleep(max(0.0, min(due) - loop.time()) + 0.001)

    async def tick(self) -> None:
        """Wait for the next timer of any job to fire, then ``drain``."""
        loop = asyncio.get_running_loop()
        due = min(s.timer.when() for s in self.controller.states.values() if s.timer)
        await asyncio.sleep(max(0.0, due - loop.time()) + 0.001)
        await self.drain()

    # ------------------------------------------------- the user, Job controller, kubelet

    def add_tj(self, name: str, **spec: Any) -> dict[str, Any]:
        return self.kube.add({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
                              "spec": {"audio": {"url": URL}, **spec}})

    def tj(self, name: str) -> dict[str, Any] | None:
        return self.kube.get(KIND, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.tj(name) or {}).get("status") or {}

    def state(self, tj: dict[str, Any]) -> JobState:
        return self.controller.states[tj["metadata"]["uid"]]

    def job_of(self, tj: dict[str, Any]) -> dict[str, Any] | None:
        (job,) = self.kube.owned_by(tj["metadata"]["uid"], "Job") or [None]
        return job

    def run_pod(self, job: dict[str, Any], **status: Any) -> dict[str, Any]:
        """The Job controller makes a pod, the kubelet reports it (Running unless told otherwise)."""
        template = job["spec"]["template"]
        pod = {"kind": "Pod", "metadata": {"name": f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}",
                                           "labels": dict(template["metadata"]["labels"])},
               "spec": template["spec"]}
        created = self.kube.add(pod)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = status or {"phase": "Running", "containerStatuses": [
            {"name": "runner", "state": {"running": {"startedAt": now}}}]}
        return self.kube.update("Pod", created["metadata"]["name"], {"status": status})

    def finish_job(self, job: dict[str, Any], ctype: str, reason: str) -> dict[str, Any]:
        """The Job controller marks the Job Complete or Failed."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {"type": ctype, "status": "True", "reason": reason, "lastTransitionTime": now}
        status: dict[str, Any] = {"conditions": [condition]}
        if ctype == "Complete":
            status.update(completionTime=now, succeeded=1)
        else:
            status.update(failed=1)
        return self.kube.update("Job", job["metadata"]["name"], {"status": status})
