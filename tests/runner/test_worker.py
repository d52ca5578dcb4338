"""Pool mode against the real test kube-apiserver: a warm worker takes the jobs assigned to it.

The operator's part (creating the result Secret, writing status.assignment) is played here;
the worker runs in-process with the packaged tiny.en model on CPU and audio served on loopback.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
import uuid

import pytest

from ifw.core import contract, results
from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ifw.runner.config import RunnerSettings, WorkerSettings
from ifw.runner.worker import Cancelled, PoolAttempt, Run, Worker
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster




@pytest.fixture(scope="module")
def audio_server(speech):
    short = speech([("en-us", "Please open the window because it is very warm in here.", 0.5)])
    long = speech([("en-us", text, 1.0) for text in [
        "The meeting starts at nine in the morning.", "Bring the report and the budget figures.",
        "We will discuss the new office in the afternoon.", "Lunch is served in the main hall.",
        "The train to London leaves from the main platform.", "Our team finished the project early.",
    ] * 3], name="long")  # fmt: skip

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(short.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", short, long
    server.shutdown()


@pytest.fixture
def api(kube, tj_crd):
    with kube.api_client() as client:
        yield client


class Cluster:
    """The operator's side of the pool contract, and reads for the asserts."""

    def __init__(self, api, namespace: str):
        from kubernetes import client

        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)

    def create(self, url: str, annotations: dict | None = None, **spec) -> dict:
        meta = {"name": f"tj-{uuid.uuid4().hex[:8]}", "annotations": annotations or {}}
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta,
                "spec": {"audio": {"url": url}, **spec}}  # fmt: skip
        tj = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        self.core.create_namespaced_secret(self.ns, results.result_secret(tj))
        return tj

    def assign(self, tj: dict, worker: str, attempt: int = 1) -> None:
        status = {"runtime": "Pool", "assignment": {"worker": worker, "attempt": attempt, "time": contract.now_string()}}
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.ns, PLURAL, tj["metadata"]["name"], {"status": status}
        )

    def status(self, tj: dict) -> dict:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, tj["metadata"]["name"])
        return obj.get("status") or {}

    def execution(self, tj: dict, state: str) -> dict | None:
        execution = self.status(tj).get("execution") or {}
        return execution if execution.get("state") == state else None


@pytest.fixture
def cluster(api, namespace) -> Cluster:
    return Cluster(api, namespace)


@pytest.fixture
def worker(api, namespace, tmp_path):
    settings = WorkerSettings(name=f"worker-{uuid.uuid4().hex[:6]}", namespace=namespace,
                              watch_namespaces=[namespace], renew_interval_seconds=0.5,
                              lease_duration_seconds=3, health_port=None)  # fmt: skip
    runner = RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2, work_dir=tmp_path / "work",
                            fetch_allowlist=["127.0.0.1"], progress_interval_seconds=0.2)  # fmt: skip
    started = Worker(settings, runner, api).start()
    yield started
    started.stop()


@pytest.mark.model
def test_worker_runs_its_jobs_keeps_bad_input_to_the_job_and_holds_a_lease(worker, cluster, audio_server, wer):
    base, short, _ = audio_server
    name = worker.settings.name
    lease = cluster.leases.read_namespaced_lease(name, cluster.ns)
    annotations = lease.metadata.annotations
    assert lease.spec.holder_identity == name and lease.metadata.labels[contract.LABEL_POOL_WORKER] == "true"
    assert annotations[contract.ANNOTATION_WORKER_MODELS] == '["tiny.en"]'
    assert annotations[contract.ANNOTATION_WORKER_DRAINING] == "false"

    # A poison job first: bad input fails that job only, with the runner's reason.
    broken = cluster.create(f"{base}/no-such-file.wav")
    cluster.assign(broken, name)
    failed = wait_for(lambda: cluster.execution(broken, "Failed"), 60, "the bad job's failure report")
    assert failed["reason"] == "AudioFetchFailed" and failed["badInput"] is True and "404" in failed["message"]
    assert failed["worker"] == name and failed["attempt"] == 1 and failed["startTime"] and failed["finishTime"]

    # A streaming job (the gateway's stream=true): its text so far is in status.progress.text.
    tj = cluster.create(f"{base}/{short.path.name}", annotations={contract.ANNOTATION_STREAM: "true"}, timestamp="word")
    cluster.assign(tj, name)
    texts = []
    while not cluster.execution(tj, "Succeeded"):
        texts.append(cluster.status(tj).get("progress", {}).get("text"))
        assert len(texts) < 1200, "no success report"
        time.sleep(0.1)
    status = cluster.status(tj)
    assert status["progress"]["percent"] == 100.0
    assert status["audio"]["durationSeconds"] == pytest.approx(short.duration, abs=0.05)
    assert status["audio"]["language"] == "en"
    transcript = results.load_result(status["result"], cluster.ns, job_uid=tj["metadata"]["uid"], core_v1=cluster.core)
    assert wer(short.text, transcript.text) <= 0.2, transcript.text
    assert status["progress"]["text"] == transcript.text
    seen = [t for t in texts if t]
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen  # it only grows
    assert all(segment.words for segment in transcript.segments)
    # The worker wrote only its own fields: the operator's stay as they were.
    assert status["assignment"]["worker"] == name and "phase" not in status and "conditions" not in status

    renewed = lease.spec.renew_time
    wait_for(lambda: cluster.leases.read_namespaced_lease(name, cluster.ns).spec.renew_time > renewed, 15,
             "a Lease renewal")  # fmt: skip


def test_a_write_for_an_attempt_that_is_no_longer_this_workers_is_refused(api, cluster, namespace, tmp_path):
    tj = cluster.create("https://media.example.com/a.mp3")
    cluster.assign(tj, "another-worker", attempt=2)
    settings = WorkerSettings(name="stale-worker", namespace=namespace, health_port=None)
    stale = Worker(settings, RunnerSettings(default_model="tiny.en"), api)
    run = Run(namespace, tj["metadata"]["name"], tj["metadata"]["uid"], attempt=1)
    with pytest.raises(Cancelled):
        PoolAttempt(stale, run).write({"progress": {"percent": 50.0}})
    assert run.cancel.is_set()
    status = cluster.status(tj)
    assert "progress" not in status and status["assignment"]["worker"] == "another-worker"
    # The same worker's own attempt is written (the test is on worker *and* attempt).
    cluster.assign(tj, "stale-worker", attempt=1)
    own = Run(namespace, tj["metadata"]["name"], tj["metadata"]["uid"], attempt=1)
    PoolAttempt(stale, own).write({"progress": {"percent": 5.0}})
    assert cluster.status(tj)["progress"]["percent"] == 5.0


@pytest.mark.model
def test_worker_hands_back_a_model_it_does_not_hold_and_stops_a_deleted_job(worker, cluster, audio_server):
    base, short, long = audio_server
    other = cluster.create(f"{base}/{short.path.name}", model="base")
    cluster.assign(other, worker.settings.name)
    handed = wait_for(lambda: cluster.execution(other, "HandedBack"), 30, "the hand-back")
    assert handed["reason"] == "ModelNotServed" and "tiny.en" in handed["message"]

    # One piece per batch, so the run reaches a piece boundary soon after the deletion.
    tj = cluster.create(f"{base}/{long.path.name}", batchSize=1)
    cluster.assign(tj, worker.settings.name)
    wait_for(lambda: (cluster.status(tj).get("progress") or {}).get("processedSeconds"), 120, "progress")
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, tj["metadata"]["name"])
    wait_for(lambda: not worker.runs, 60, "the worker to stop the deleted job")


def test_draining_worker_marks_its_lease_and_removes_it(api, cluster, namespace, tmp_path):
    settings = WorkerSettings(name=f"drainer-{uuid.uuid4().hex[:6]}", namespace=namespace, watch_namespaces=[namespace],
                              renew_interval_seconds=0.5, health_port=None, drain_seconds=0)  # fmt: skip
    drainer = Worker(settings, RunnerSettings(default_model="tiny.en", device="cpu"), api)
    drainer.warm_up = lambda: None  # no job runs here: the Lease is what is under test
    drainer.start()
    seen: list[str] = []
    original = drainer._write_lease

    def record(create: bool = False) -> None:
        seen.append(drainer._lease_body()["metadata"]["annotations"][contract.ANNOTATION_WORKER_DRAINING])
        original(create)

    drainer._write_lease = record
    drainer.drain()
    assert seen and seen[-1] == "true"
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as gone:
        cluster.leases.read_namespaced_lease(settings.name, namespace)
    assert gone.value.status == 404


@pytest.mark.model
def test_a_restarted_worker_fails_the_attempt_its_previous_process_was_running(api, cluster, namespace, tmp_path):
    # A container restart keeps the pod's name: the new process holds the same Lease and finds the
    # job assigned to it, reported Running by "itself". Skipping it as already run would leave it
    # Running forever; it must be given back to the operator as a failed (retryable) attempt.
    name = f"restarted-{uuid.uuid4().hex[:6]}"
    tj = cluster.create("https://media.example.com/a.mp3")
    cluster.assign(tj, name, attempt=1)
    cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, tj["metadata"]["name"], {
        "status": {"execution": {"worker": name, "attempt": 1, "state": "Running",
                                 "startTime": contract.now_string()}}})  # fmt: skip
    settings = WorkerSettings(name=name, namespace=namespace, watch_namespaces=[namespace],
                              renew_interval_seconds=0.5, health_port=None)  # fmt: skip
    runner = RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2, work_dir=tmp_path / "work",
                            fetch_allowlist=["127.0.0.1"])  # fmt: skip
    restarted = Worker(settings, runner, api).start()
    try:
        failed = wait_for(lambda: cluster.execution(tj, "Failed"), 30, "the lost attempt reported")
        assert failed["reason"] == "WorkerRestarted" and failed["attempt"] == 1 and not failed.get("badInput")
        assert name in failed["message"] and not restarted.runs
        # The operator's retry is a new attempt: this worker runs that one.
        cluster.assign(tj, name, attempt=2)
        wait_for(lambda: cluster.execution(tj, "Failed") and cluster.status(tj)["execution"]["attempt"] == 2, 60,
                 "attempt 2 run (and failed: the URL is not allowlisted)")  # fmt: skip
    finally:
        restarted.stop()


@pytest.mark.model
def test_a_newer_attempt_for_the_same_worker_starts_once_the_old_one_stops(worker, cluster, audio_server):
    """The operator may give a job back to the worker that holds it (a retry, a lost report): the
    worker stops the old attempt and must then start the new one by itself — no later event comes."""
    base, _, long = audio_server
    tj = cluster.create(f"{base}/{long.path.name}", batchSize=1)  # one piece per call: boundaries come often
    cluster.assign(tj, worker.settings.name, attempt=1)
    wait_for(lambda: (cluster.status(tj).get("progress") or {}).get("processedSeconds"), 120, "attempt 1's progress")
    lease = cluster.leases.read_namespaced_lease(worker.settings.name, cluster.ns)
    assert lease.metadata.annotations[contract.ANNOTATION_WORKER_RUNNING] == "1"  # what it holds, for the operator

    cluster.assign(tj, worker.settings.name, attempt=2)
    done = wait_for(lambda: cluster.execution(tj, "Succeeded"), 240, "attempt 2 to run to the end")
    assert done["attempt"] == 2 and done["worker"] == worker.settings.name
    assert cluster.status(tj)["result"]["sha256"] and not worker.runs
