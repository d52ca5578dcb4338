"""Fixtures for the operator tests against the real test kube-apiserver.

The operator runs in-process (kopf.operator in a thread with its own event loop), watching only
the test's namespace, with short timings. There is no Job controller or kubelet: ``Sim`` plays
them by creating the Pods a Job controller would and patching Job and Pod status.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from ifw.core.contract import LABEL_JOB_UID
from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ifw.operator.config import OperatorSettings

URL = "https://media.example.com/meeting.mp3"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last value: {last!r}")


def wait_reconciled(op: "OperatorThread", *uids: str, passes: int = 2, timeout: float = 10.0) -> None:
    """Wait until the operator has finished ``passes`` more reconciles of each job.

    Two by default: the first may have begun before this call looked. After the second, whatever
    a reconcile would do about the state the caller saw has been done, so a test can then assert
    that something did *not* happen, without sleeping a guessed time.
    """

    def count(uid: str) -> int:
        state = op.controller.states.get(uid)
        return state.reconciles if state else 0

    start = {uid: count(uid) for uid in uids}
    wait_for(lambda: all(count(uid) >= start[uid] + passes for uid in uids), timeout,
             what=f"{passes} more reconciles of {len(uids)} job(s)")


def operator_settings(**overrides: Any) -> OperatorSettings:
    base: dict[str, Any] = {
        "max_active_jobs": None,
        "resync_interval_seconds": 0.5,
        "startup_deadline_seconds": 60,
        "image_pull_grace_seconds": 30,
        "metrics_port": None,
        "log_format": "plain",
        "api_threads": 8,
    }
    base.update(overrides)
    return OperatorSettings(**base)


class OperatorThread:
    """kopf.operator() in a daemon thread; ``stop()`` asks it to exit and waits."""

    def __init__(self, namespace: str, config: OperatorSettings):
        import kopf

        import ifw.operator.handlers  # noqa: F401  (registers the handlers)

        self.namespace = namespace
        self.config = config
        self.memo = kopf.Memo(config=config)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"operator-{namespace}", daemon=True)

    def _run(self) -> None:
        import kopf

        try:
            asyncio.run(
                kopf.operator(
                    namespaces=[self.namespace],
                    standalone=True,
                    memo=self.memo,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                )
            )
        except BaseException as error:  # surfaced by stop()
            self.error = error

    def start(self) -> "OperatorThread":
        self.thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"operator not ready in 30s: {self.error!r}")
        return self

    @property
    def controller(self):
        return self.memo.controller

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)
        if self.thread.is_alive():
            raise RuntimeError("operator thread did not stop within 30s")
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_operator(namespace: str, tj_crd) -> Iterator[Callable[..., OperatorThread]]:
    started: list[OperatorThread] = []

    def start(**overrides: Any) -> OperatorThread:
        op = OperatorThread(namespace, operator_settings(**overrides)).start()
        started.append(op)
        return op

    yield start
    for op in started:
        if op.thread.is_alive():
            op.stop()


class Sim:
    """The test's API access, and the parts of Kubernetes the test server lacks."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.api_client = api_client

    # --- TranscriptionJobs
    def create_tj(self, name: str | None = None, **spec: Any) -> dict:
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name or f"tj-{uuid.uuid4().hex[:8]}"},
            "spec": {"audio": {"url": URL}, **spec},
        }
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def tj(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, name: str) -> dict:
        return (self.tj(name) or {}).get("status") or {}

    def conditions(self, name: str) -> dict[str, dict]:
        return {c["type"]: c for c in self.status(name).get("conditions") or []}

    def patch_tj(self, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, patch)

    def patch_tj_status(self, name: str, status: dict) -> dict:
        return self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, PLURAL, name, {"status": status}
        )

    def delete_tj(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def wait_phase(self, name: str, phase: str, reason: str | None = None, timeout: float = 10.0) -> dict:
        def check():
            status = self.status(name)
            if status.get("phase") == phase and (reason is None or status.get("reason") == reason):
                return status
            return None

        return wait_for(check, timeout, what=f"{name} phase={phase} reason={reason} (now {self.status(name)})")

    # --- Jobs (the Job controller's part)
    def jobs(self, uid: str | None = None) -> list[dict]:
        selector = f"{LABEL_JOB_UID}={uid}" if uid else LABEL_JOB_UID
        items = self.batch.list_namespaced_job(self.ns, label_selector=selector).items
        return [self.api_client.sanitize_for_serialization(item) for item in items]

    def job_of(self, tj: dict, timeout: float = 10.0) -> dict:
        uid = tj["metadata"]["uid"]
        jobs = wait_for(lambda: self.jobs(uid), timeout, what=f"a Job for {tj['metadata']['name']}")
        assert len(jobs) == 1, f"expected exactly one Job, got {[j['metadata']['name'] for j in jobs]}"
        return jobs[0]

    def read_job(self, name: str) -> dict:
        return self.api_client.sanitize_for_serialization(self.batch.read_namespaced_job(name, self.ns))

    def set_job_condition(self, job: dict, ctype: str, reason: str, message: str = "", **status: Any) -> None:
        now = now_rfc3339()
        conditions = [{"type": ctype, "status": "True", "reason": reason, "message": message,
                       "lastProbeTime": now, "lastTransitionTime": now}]
        body = {"status": {"conditions": conditions, **status}}
        if ctype == "Complete":
            body["status"].setdefault("completionTime", now)
            body["status"].setdefault("succeeded", 1)
        self.batch.patch_namespaced_job_status(job["metadata"]["name"], self.ns, body)

    # --- Pods (the Job controller's and the kubelet's part)
    def create_pod(self, job: dict, suffix: str | None = None) -> dict:
        template = copy.deepcopy(job["spec"]["template"])
        meta = template.get("metadata") or {}
        meta["name"] = f"{job['metadata']['name']}-{suffix or uuid.uuid4().hex[:5]}"
        meta["namespace"] = self.ns
        meta["labels"] = {**(meta.get("labels") or {}), "job-name": job["metadata"]["name"],
                          "batch.kubernetes.io/controller-uid": job["metadata"]["uid"]}
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                    "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}
        created = self.core.create_namespaced_pod(self.ns, pod)
        return self.api_client.sanitize_for_serialization(created)

    def pod_status(self, pod: dict, status: dict) -> None:
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], self.ns, {"status": status})

    def pod_running(self, pod: dict) -> None:
        now = now_rfc3339()
        self.pod_status(pod, {
            "phase": "Running", "startTime": now,
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "runner", "ready": True, "restartCount": 0, "image": "x", "imageID": "",
                                   "state": {"running": {"startedAt": now}}}],
        })

    def pod_terminated(self, pod: dict, exit_code: int, *, reason: str = "Error", message: str | None = None) -> None:
        now = now_rfc3339()
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": now, "finishedAt": now}
        if message is not None:
            terminated["message"] = message
        self.pod_status(pod, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "runner", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                                   "state": {"terminated": terminated}}],
        })

    def pods(self, uid: str) -> list[dict]:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"{LABEL_JOB_UID}={uid}").to_dict()["items"]


@pytest.fixture
def sim(kube, namespace: str) -> Sim:
    return Sim(kube.api_client(), namespace)
