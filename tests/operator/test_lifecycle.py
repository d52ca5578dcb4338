"""The operator against the real test kube-apiserver: the life of a TranscriptionJob."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.operator.conftest import wait_for, wait_reconciled

pytestmark = pytest.mark.cluster


def test_success_path(run_operator, sim):
    run_operator()
    tj = sim.create_tj("hello", backoffLimit=3, activeDeadlineSeconds=600, model="openai/whisper-tiny")
    job = sim.job_of(tj)
    status = sim.wait_phase("hello", "Pending")
    assert status["jobName"] == job["metadata"]["name"]
    assert status["model"] == "openai/whisper-tiny"
    assert status["observedGeneration"] == tj["metadata"]["generation"]

    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("TranscriptionJob", "hello", tj["metadata"]["uid"])
    assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["activeDeadlineSeconds"] == 600

    pod = sim.create_pod(job)
    sim.pod_running(pod)
    status = sim.wait_phase("hello", "Running")
    assert status["startTime"]
    conds = sim.conditions("hello")
    assert conds["Running"]["status"] == "True" and conds["Queued"]["status"] == "False"

    sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached")
    status = sim.wait_phase("hello", "Succeeded")
    assert status["completionTime"] and status["reason"] == "Completed"
    conds = sim.conditions("hello")
    assert conds["Succeeded"]["status"] == "True" and conds["Running"]["status"] == "False"
    assert all(c["observedGeneration"] == tj["metadata"]["generation"] for c in conds.values())
    assert len(sim.jobs(tj["metadata"]["uid"])) == 1
    # kopf wrote nothing of its own on the objects: no finalizers, no progress or last-handled annotations.
    for meta in (sim.tj("hello")["metadata"], sim.read_job(job["metadata"]["name"])["metadata"]):
        assert not meta.get("finalizers") and not [k for k in meta.get("annotations") or {} if "kopf" in k], meta


FAILURES = [
    # (case, pod exit code, terminated reason, termination message, Job condition reason, expected reason)
    ("runner termination message", 2, "Error", '{"reason": "InvalidAudio", "message": "not an audio file"}',
     "PodFailurePolicy", "InvalidAudio"),
    ("OOMKilled", 137, "OOMKilled", None, "BackoffLimitExceeded", "OutOfMemory"),
    ("deadline", None, None, None, "DeadlineExceeded", "DeadlineExceeded"),
    ("retries exhausted", 1, "Error", None, "BackoffLimitExceeded", "BackoffLimitExceeded"),
]


@pytest.mark.parametrize("case,exit_code,term_reason,term_message,job_reason,expected", FAILURES,
                         ids=[f[0] for f in FAILURES])
def test_job_failure_surfaces_its_cause(run_operator, sim, case, exit_code, term_reason, term_message, job_reason,
                                        expected):
    run_operator()
    tj = sim.create_tj("fails", activeDeadlineSeconds=30)
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("fails", "Running")
    if exit_code is not None:
        sim.pod_terminated(pod, exit_code, reason=term_reason, message=term_message)
    sim.set_job_condition(job, "Failed", job_reason, "from the Job controller", failed=1)
    status = sim.wait_phase("fails", "Failed", expected)
    assert status["completionTime"]
    conds = sim.conditions("fails")
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == expected
    assert conds["Running"]["status"] == "False" and conds["Succeeded"]["status"] == "False"
    if expected == "InvalidAudio":
        assert status["message"] == "not an audio file"
    if expected == "DeadlineExceeded":
        assert "activeDeadlineSeconds=30" in status["message"]
    if expected == "BackoffLimitExceeded":
        assert "last exit code 1" in status["message"]


def test_failed_attempt_with_retries_left_is_pending_retrying(run_operator, sim):
    run_operator()
    tj = sim.create_tj("retry", backoffLimit=2)
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_terminated(pod, 1, message='{"reason": "AudioFetchFailed", "message": "server said 503"}')
    status = sim.wait_phase("retry", "Pending", "Retrying")
    assert "AudioFetchFailed: server said 503" in status["message"]
    second = sim.create_pod(job)
    sim.pod_running(second)
    sim.wait_phase("retry", "Running")


def test_image_pull_failure_fails_the_job_and_stops_it(run_operator, sim):
    run_operator(image_pull_grace_seconds=1)
    tj = sim.create_tj("pull")
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_status(pod, {"phase": "Pending", "containerStatuses": [{
        "name": "runner", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]})
    # (Pending/ImagePullBackOff during the grace period is covered by the unit tests.)
    status = sim.wait_phase("pull", "Failed", "ImagePullFailed", timeout=15)
    assert "ImagePullBackOff" in status["message"]
    # The operator decided the failure itself, so it stops the Job (no GC needed).
    wait_for(lambda: not sim.jobs(tj["metadata"]["uid"]), 15, what="the Job deleted")
    wait_for(lambda: not sim.pods(tj["metadata"]["uid"]), 15, what="the pod deleted")


def test_unschedulable_is_queued_then_startup_deadline_fails_it(run_operator, sim):
    # The deadline must outlast a slow machine's pod round trip, or Queued is never seen before Failed.
    run_operator(startup_deadline_seconds=6)
    tj = sim.create_tj("nogpu")
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_status(pod, {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
    status = sim.wait_phase("nogpu", "Queued", "Unschedulable", timeout=6)
    assert "Insufficient nvidia.com/gpu" in status["message"]
    status = sim.wait_phase("nogpu", "Failed", "StartupDeadlineExceeded", timeout=20)
    assert "did not start within 6s" in status["message"] and "Insufficient nvidia.com/gpu" in status["message"]
    wait_for(lambda: not sim.jobs(tj["metadata"]["uid"]), 15, what="the Job deleted")
    wait_for(lambda: not sim.pods(tj["metadata"]["uid"]), 15, what="the pod deleted")


def test_runner_written_status_survives_operator_reconciles(run_operator, sim):
    op = run_operator()
    tj = sim.create_tj("fields")
    job = sim.job_of(tj)
    sim.wait_phase("fields", "Pending")
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("fields", "Running")
    # What the runner writes on /status while it works, then at the end.
    sim.patch_tj_status("fields", {"progress": {"percent": 42.0, "processedSeconds": 21.0, "totalSeconds": 50.0},
                                   "audio": {"durationSeconds": 50.0, "language": "en"}})
    sim.patch_tj_status("fields", {"speakers": 2, "result": {"store": "secret", "ref": "fields-result",
                                                             "sizeBytes": 1234, "formats": ["json"]}})
    sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached")
    sim.wait_phase("fields", "Succeeded")
    wait_reconciled(op, tj["metadata"]["uid"])  # the operator looks at the finished job again
    status = sim.status("fields")
    assert status["progress"]["percent"] == 42.0 and status["audio"]["language"] == "en"
    assert status["speakers"] == 2 and status["result"]["ref"] == "fields-result"
    assert status["phase"] == "Succeeded"


def test_events_record_each_transition(run_operator, sim):
    run_operator()
    tj = sim.create_tj("evented")
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("evented", "Running")
    sim.pod_terminated(pod, 2, message='{"reason": "InvalidAudio", "message": "no audio stream"}')
    sim.set_job_condition(job, "Failed", "PodFailurePolicy", failed=1)
    sim.wait_phase("evented", "Failed", "InvalidAudio")

    def events():
        items = sim.core.list_namespaced_event(sim.ns).items
        return [(e.type, e.reason) for e in items if e.involved_object.uid == tj["metadata"]["uid"]]

    got = wait_for(lambda: (lambda e: e if ("Warning", "InvalidAudio") in e else None)(events()), 15,
                   what="the failure event")
    assert ("Normal", "Running") in got


def _count_writes(op) -> list[tuple[str, str]]:
    """Record (method, resource) of every write the operator's own client sends (kopf writes nothing)."""
    api = op.controller.kube.api
    request, writes = api.request, []

    def counting(method, url, *args, **kwargs):
        if method != "GET":
            path = url.split("?")[0].rstrip("/").split("/")
            at = path.index("namespaces") + 2  # .../namespaces/<ns>/<resource>[/<name>[/status]]
            writes.append((method, path[at] + ("/status" if path[-1] == "status" else "")))
        return request(method, url, *args, **kwargs)

    api.request = counting
    return writes


def test_a_job_started_at_once_costs_one_write_per_object_and_status_change(run_operator, sim):
    # Under a cap far from full: admitted at once, so no queue-order annotation (it orders waiting jobs).
    op = run_operator(max_active_jobs=100)
    writes = _count_writes(op)
    tj = sim.create_tj("frugal")
    job = sim.job_of(tj)
    sim.wait_phase("frugal", "Pending")
    wait_reconciled(op, tj["metadata"]["uid"])
    # Its four runner objects and the Job, one status patch (Pending with jobName), the Event of it.
    # Before: one more, a metadata patch for the queue-order annotation.
    expected = {("POST", kind): 1 for kind in ("serviceaccounts", "roles", "rolebindings", "secrets", "jobs", "events")}
    wait_for(lambda: ("POST", "events") in writes, 10, what="the Pending event")
    assert Counter(writes) == {**expected, ("PATCH", "transcriptionjobs/status"): 1}, writes

    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("frugal", "Running")
    sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached")
    sim.wait_phase("frugal", "Succeeded")
    wait_reconciled(op, tj["metadata"]["uid"])
    later = Counter(writes[7:])
    # One patch per state seen on the way: PodStarting, Running, RunnerFinished, Succeeded (the first
    # and third only when the pod or the Job is seen in between, as here), and no metadata write.
    assert 2 <= later[("PATCH", "transcriptionjobs/status")] <= 4, writes
    assert set(later) <= {("PATCH", "transcriptionjobs/status"), ("POST", "events")}, writes
