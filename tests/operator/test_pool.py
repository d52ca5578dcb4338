"""Pool mode end to end on the real apiserver: the operator assigns jobs to real warm workers.

The operator runs in-process (kopf), pool workers run in-process with the packaged tiny.en
model on CPU, audio is spoken by espeak-ng and served on loopback. Job mode, for comparison,
runs the real runner as a process through the kubelet stand-in.
"""

from __future__ import annotations

import functools
import http.server
import threading
import uuid

import pytest

from ifw.core import results
from ifw.runner.config import RunnerSettings, WorkerSettings
from ifw.runner.worker import Worker
from tests.operator.conftest import wait_for
from tests.speaking import speak

pytestmark = [pytest.mark.cluster, pytest.mark.model]

SHORT = "Please call me tomorrow morning. The weather is very nice today."
LONG = " ".join(["The meeting starts at nine in the morning and the report is due on Friday."] * 8)
RUNNER_ENV = {"IFW_DEVICE": "cpu", "IFW_CPU_THREADS": "2", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
              "IFW_FETCH_ALLOWLIST": '["127.0.0.1"]'}  # fmt: skip


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Two spoken clips on a loopback HTTP server: (base URL, {name: file})."""
    root = tmp_path_factory.mktemp("pool-audio")
    for name, text in (("short.wav", SHORT), ("long.wav", LONG)):
        speak(text, root / name, rate=150)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def workers(kube, namespace, tmp_path):
    """start(name) -> a running pool Worker serving tiny.en in the test's namespace."""
    started: list[Worker] = []

    def start(name: str | None = None, **overrides) -> Worker:
        settings = WorkerSettings(name=name or f"worker-{uuid.uuid4().hex[:6]}", namespace=namespace,
                                  watch_namespaces=[namespace], lease_duration_seconds=3, renew_interval_seconds=0.5,
                                  health_port=None, **overrides)  # fmt: skip
        runner = RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2, work_dir=tmp_path / "work",
                                fetch_allowlist=["127.0.0.1"], progress_interval_seconds=0.3)  # fmt: skip
        worker = Worker(settings, runner, kube.api_client()).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if not worker.stopped.is_set():
            worker.stop()


def die(worker: Worker) -> None:
    """What a killed pod does: nothing more — no Lease renewal, no writes, no goodbye."""
    worker.stopped.set()
    for watcher in worker._watchers:
        watcher.stop()
    for run in list(worker.runs.values()):
        run.cancel.set()


def transcript_of(sim, name: str):
    tj = sim.tj(name)
    return results.load_result(tj["status"]["result"], sim.ns, job_uid=tj["metadata"]["uid"], core_v1=sim.core)


def test_auto_runs_in_the_warm_pool_and_matches_job_mode(kube, run_operator, sim, workers, audio, tmp_path):
    from ifw.local.standin import KubeletStandIn

    run_operator(default_model="tiny.en", runner={"env": RUNNER_ENV})
    worker = workers("warm")
    sim.create_tj("in-pool", audio={"url": f"{audio}/short.wav"})
    status = sim.wait_phase("in-pool", "Succeeded", timeout=120)
    assert status["runtime"] == "Pool" and status["assignment"]["worker"] == "warm"
    assert status["assignment"]["attempt"] == 1 and "jobName" not in status
    assert status["execution"]["state"] == "Succeeded" and status["startTime"] and status["completionTime"]
    conditions = sim.conditions("in-pool")
    assert conditions["Succeeded"]["status"] == "True" and conditions["Running"]["status"] == "False"
    assert sim.jobs(sim.tj("in-pool")["metadata"]["uid"]) == []  # no batch Job was made
    assert not worker.runs

    (tmp_path / "pods").mkdir()
    with KubeletStandIn(kube.kubeconfig, log_dir=tmp_path / "pods"):
        sim.create_tj("in-job", audio={"url": f"{audio}/short.wav"}, runtime="Job")
        status = sim.wait_phase("in-job", "Succeeded", timeout=180)
    assert status["runtime"] == "Job" and status["jobName"] and "assignment" not in status

    pooled, alone = transcript_of(sim, "in-pool"), transcript_of(sim, "in-job")
    assert pooled.text == alone.text and "tomorrow" in pooled.text.lower()
    assert [(s.start, s.end, s.text) for s in pooled.segments] == [(s.start, s.end, s.text) for s in alone.segments]
    assert sim.status("in-pool")["audio"] == sim.status("in-job")["audio"]


def test_a_lost_worker_hands_its_job_to_another(run_operator, sim, workers, audio):
    run_operator(default_model="tiny.en")
    first = workers("first")
    # One piece per batch: the job runs long enough to lose its worker in the middle.
    sim.create_tj("long", audio={"url": f"{audio}/long.wav"}, batchSize=1, backoffLimit=1)
    wait_for(lambda: (sim.status("long").get("progress") or {}).get("processedSeconds"), 120, what="progress")
    assert sim.status("long")["phase"] == "Running"
    die(first)
    workers("second")
    status = sim.wait_phase("long", "Succeeded", timeout=180)
    assignment = status["assignment"]
    assert (assignment["worker"], assignment["attempt"], assignment["retries"]) == ("second", 2, 1)
    assert status["execution"]["worker"] == "second"
    assert "meeting" in transcript_of(sim, "long").text.lower()


def test_a_forced_pool_job_waits_for_a_worker(run_operator, sim, workers, audio):
    run_operator(default_model="tiny.en")
    sim.create_tj("patient", audio={"url": f"{audio}/short.wav"}, runtime="Pool")
    status = sim.wait_phase("patient", "Queued", "WaitingForWorker")
    assert status["runtime"] == "Pool" and not (status.get("assignment") or {}).get("worker")
    workers("late")
    status = sim.wait_phase("patient", "Succeeded", timeout=120)
    assert status["assignment"]["worker"] == "late"


def test_bad_input_fails_in_the_pool_without_a_retry_and_cancel_stops_the_worker(run_operator, sim, workers, audio):
    run_operator(default_model="tiny.en")
    worker = workers()
    sim.create_tj("missing", audio={"url": f"{audio}/no-such-file.wav"})
    status = sim.wait_phase("missing", "Failed", timeout=60)
    assert status["reason"] == "AudioFetchFailed" and "404" in status["message"]
    assert status["assignment"]["attempt"] == 1 and status["assignment"].get("retries", 0) == 0

    tj = sim.create_tj("cancelled", audio={"url": f"{audio}/long.wav"}, batchSize=1)
    sim.wait_phase("cancelled", "Running", timeout=120)
    sim.delete_tj("cancelled")
    wait_for(lambda: not worker.runs, 60, what="the worker to stop the deleted job")
    wait_for(lambda: not sim.core.list_namespaced_secret(
        sim.ns, label_selector=f"ifw.dev/job-uid={tj['metadata']['uid']}").items, 10, what="the result Secret removed")


def test_auto_without_a_worker_waits_then_takes_a_job(run_operator, sim):
    # The wait is counted from creationTimestamp (whole seconds), so it must outlast a slow machine's
    # status round trip for the checks below to run inside it.
    op = run_operator(default_model="tiny.en", pool={"wait_seconds": 8})
    sim.create_tj("cold", audio={"url": "https://media.example.com/a.mp3"})
    status = sim.wait_phase("cold", "Queued", "WaitingForWorker")
    assert "a Job takes it after 8 s" in status["message"] and "runtime" not in status
    # It is demand for the pool meanwhile: the autoscaler's metric wakes a pool scaled to zero.
    # (Waited for: the test can read the status from the apiserver before the operator has its answer.)
    wait_for(lambda: op.controller.pool_stats()["waiting"] == 1, 5, what="the cold job counted as waiting")
    assert "runtime" not in sim.status("cold")
    job = sim.job_of(sim.tj("cold"), timeout=20)
    assert job["metadata"]["labels"]["ifw.dev/job-uid"] == sim.tj("cold")["metadata"]["uid"]
    wait_for(lambda: sim.status("cold").get("runtime") == "Job", 10, what="runtime Job")


def test_an_auto_job_whose_only_worker_is_gone_runs_in_its_own_job(kube, run_operator, sim, workers, audio, tmp_path):
    """The only worker for the model dies mid-job and never comes back: the job, decided Pool when
    it started, does not wait for ever; after pool.wait_seconds it runs in its own Job."""
    from ifw.local.standin import KubeletStandIn

    run_operator(default_model="tiny.en", runner={"env": RUNNER_ENV}, pool={"wait_seconds": 2})
    only = workers("only")
    sim.create_tj("orphan", audio={"url": f"{audio}/long.wav"}, batchSize=1)
    wait_for(lambda: (sim.status("orphan").get("progress") or {}).get("processedSeconds"), 120, what="progress")
    die(only)
    (tmp_path / "pods").mkdir()
    with KubeletStandIn(kube.kubeconfig, log_dir=tmp_path / "pods"):
        status = sim.wait_phase("orphan", "Succeeded", timeout=240)
    assert status["runtime"] == "Job" and status["jobName"] and "assignment" not in status
    assert transcript_of(sim, "orphan").text.strip()
