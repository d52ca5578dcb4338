"""Fixtures for the operator tests against the real test kube-apiserver.

The operator runs in-process (kopf.operator in a thread with its own event loop), watching only
the test's namespace, with short timings. There is no Job controller or kubelet: ``Sim`` plays
them by creating the Pods a Job controller would and patching Job and Pod status. ``Recorder``
watches the TranscriptionJobs, so a test can assert on every status they went through (a
phase that flapped), not just the last one.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ifw.core.contract import LABEL_JOB_UID
from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ifw.operator.config import OperatorSettings
from tests.waiting import wait_for

URL = "https://media.example.com/meeting.mp3"
REPO = Path(__file__).resolve().parents[2]


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")




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


SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY="
FAST = {"webhook": {"signing_secret": SECRET, "allowlist": ["127.0.0.0/8"], "timeout_seconds": 2,
                    "backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2, "max_attempts": 4}}


class Receiver:
    """A webhook receiver on loopback that records requests and answers from a script.

    ``port``: listen there (a receiver that comes up late); ``hold``: keep each request that
    arrives while it is clear unanswered until it is set (a delivery in flight). ``delivered``
    is what a receiver that drops a webhook-id it has seen would process: one per id.
    """

    def __init__(self, answers=(), port: int = 0, hold: threading.Event | None = None):
        self.requests: list[dict] = []
        self.answers = list(answers)
        self.arrived = threading.Event()  # a request came in
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                receiver.arrived.set()
                if hold is not None:
                    hold.wait(60)
                code = receiver.answers.pop(0) if receiver.answers else 200
                try:
                    self.send_response(code)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender is gone
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def delivered(self) -> dict[str, dict]:
        """webhook-id -> the first request with it."""
        out: dict[str, dict] = {}
        for request in self.requests:
            out.setdefault(request["headers"]["webhook-id"], request)
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(answers=(), **kwargs):
        made.append(Receiver(answers, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


class OperatorProcess:
    """``python -m ifw.operator`` as a process of its own (JSON logs in ``log``), to kill with SIGKILL."""

    def __init__(self, kubeconfig: str, namespace: str, log: Path, **env: str):
        self.kubeconfig, self.namespace, self.log, self.env = kubeconfig, namespace, log, env
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "OperatorProcess":
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "IFW_OPERATOR_NAMESPACES": json.dumps([self.namespace]),
            "IFW_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "IFW_OPERATOR_LIVENESS_PORT": str(self.liveness_port),
            "IFW_OPERATOR_RESYNC_INTERVAL_SECONDS": "0.5",
            "IFW_OPERATOR_LOG_FORMAT": "json",
            **self.env,
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ifw.operator"], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.liveness_port}/healthz"), timeout,
                 what=f"the operator's liveness probe (log: {self.tail()})")
        return self

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(15)


@pytest.fixture
def operator_process(kube, tj_crd, namespace, tmp_path) -> Iterator[Callable[..., OperatorProcess]]:
    made: list[OperatorProcess] = []

    def make(**env: str) -> OperatorProcess:
        made.append(OperatorProcess(kube.kubeconfig, namespace, tmp_path / "operator.log", **env))
        return made[-1]

    yield make
    for op in made:
        op.kill(signal.SIGTERM)


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

    def delete_pod(self, pod: dict) -> None:
        self.core.delete_namespaced_pod(pod["metadata"]["name"], self.ns, grace_period_seconds=0)


class Recorder:
    """Watches the namespace's TranscriptionJobs from a thread and keeps every version it sees."""

    def __init__(self, sim: Sim):
        self.sim = sim
        self.seen: list[tuple[str, dict]] = []  # (event type, object), in the order the watch sent them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        listing = sim.custom.list_namespaced_custom_object(GROUP, VERSION, sim.ns, PLURAL)
        self._rv = listing["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, name="tj-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.sim.custom.list_namespaced_custom_object, GROUP, VERSION, self.sim.ns,
                                           PLURAL, resource_version=self._rv, timeout_seconds=2):
                    obj = event["object"]
                    self._rv = obj["metadata"]["resourceVersion"]
                    with self._lock:
                        self.seen.append((event["type"], obj))
                    if self._stop.is_set():
                        break
            except Exception:  # the control plane restarting, or the test ending: watch again
                time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def versions(self, name: str) -> list[dict]:
        with self._lock:
            return [obj for _, obj in self.seen if obj["metadata"]["name"] == name]

    def phases(self, name: str) -> list[tuple[str | None, str | None]]:
        """(phase, reason) of every status the job had, a repeat collapsed."""
        out: list[tuple[str | None, str | None]] = []
        for obj in self.versions(name):
            status = obj.get("status") or {}
            now = (status.get("phase"), status.get("reason"))
            if status and (not out or out[-1] != now):
                out.append(now)
        return out

    def saw_deleted(self, name: str) -> bool:
        with self._lock:
            return any(kind == "DELETED" and obj["metadata"]["name"] == name for kind, obj in self.seen)

    def phases_through(self, name: str, phase: str, timeout: float = 10.0) -> list[tuple[str | None, str | None]]:
        """phases(name) once the watch has delivered `phase`: a GET can see a state before the
        watch does, and the watch delivers in order, so everything before it is there then."""
        return wait_for(lambda: (lambda seen: seen if phase in [p for p, _ in seen] else None)(self.phases(name)),
                        timeout, what=f"the recorder to see {name} {phase}")  # fmt: skip


@pytest.fixture
def recorder(sim) -> Iterator[Recorder]:
    rec = Recorder(sim)
    yield rec
    rec.stop()


@pytest.fixture
def sim(kube, namespace: str) -> Iterator[Sim]:
    sim = Sim(kube.api_client(), namespace)
    yield sim
    # The test server deletes no namespace's contents: leave no runner Job behind for a later test's
    # kubelet stand-in, which looks at the Jobs of every namespace.
    try:
        sim.batch.delete_collection_namespaced_job(namespace, label_selector=LABEL_JOB_UID,
                                                   propagation_policy="Background")
    except Exception:  # best effort, like the namespace's own deletion
        pass
