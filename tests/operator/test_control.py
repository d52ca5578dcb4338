"""Suspend/resume, TTL, cancel, the concurrency cap, and a restart of the operator."""

from __future__ import annotations

import json

import pytest

from tests.operator.conftest import http_get, wait_for, wait_reconciled

pytestmark = pytest.mark.cluster


def _children(sim, uid: str) -> dict[str, list[str]]:
    sel = f"ifw.dev/job-uid={uid}"
    return {
        "jobs": [j.metadata.name for j in sim.batch.list_namespaced_job(sim.ns, label_selector=sel).items],
        "pods": [p.metadata.name for p in sim.core.list_namespaced_pod(sim.ns, label_selector=sel).items],
        "secrets": [s.metadata.name for s in sim.core.list_namespaced_secret(sim.ns, label_selector=sel).items],
        "serviceaccounts": [s.metadata.name for s in
                            sim.core.list_namespaced_service_account(sim.ns, label_selector=sel).items],
        "roles": [r.metadata.name for r in sim.rbac.list_namespaced_role(sim.ns, label_selector=sel).items],
        "rolebindings": [r.metadata.name for r in
                         sim.rbac.list_namespaced_role_binding(sim.ns, label_selector=sel).items],
    }


def _none_left(sim, uid):
    left = _children(sim, uid)
    return not any(left.values()) or None


def test_suspend_and_resume(run_operator, sim):
    op = run_operator()
    tj = sim.create_tj("later", suspend=True)
    status = sim.wait_phase("later", "Queued", "Suspended")
    assert "suspend" in status["message"]
    wait_reconciled(op, tj["metadata"]["uid"])
    assert sim.jobs(tj["metadata"]["uid"]) == []  # suspended before it started: no Job at all

    sim.patch_tj("later", {"spec": {"suspend": False}})
    job = sim.job_of(tj)
    assert job["spec"]["suspend"] is False
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("later", "Running")

    # Suspending a running job suspends its Job (the Job controller then removes the pod).
    sim.patch_tj("later", {"spec": {"suspend": True}})
    sim.wait_phase("later", "Queued", "Suspended")
    wait_for(lambda: sim.read_job(job["metadata"]["name"])["spec"]["suspend"] is True, 15, what="Job suspended")
    sim.core.delete_namespaced_pod(pod["metadata"]["name"], sim.ns)  # the Job controller's part

    sim.patch_tj("later", {"spec": {"suspend": False}})
    wait_for(lambda: sim.read_job(job["metadata"]["name"])["spec"]["suspend"] is False, 15, what="Job resumed")
    status = sim.wait_phase("later", "Pending")
    assert status["jobName"] == job["metadata"]["name"]
    assert len(sim.jobs(tj["metadata"]["uid"])) == 1
    sim.pod_running(sim.create_pod(job))
    sim.wait_phase("later", "Running")


def test_ttl_deletes_the_finished_job_and_its_children(run_operator, sim, recorder):
    run_operator()
    tj = sim.create_tj("short-lived", ttlSecondsAfterFinished=1)
    uid = tj["metadata"]["uid"]
    job = sim.job_of(tj)
    children = wait_for(lambda: (lambda c: c if all(c[k] for k in c if k != "pods") else None)(_children(sim, uid)),
                        5, what="all children")
    assert children["secrets"] == ["short-lived-result"]
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached")
    # Succeeded for only a second: the recorder sees it, a poll might not.
    wait_for(lambda: sim.tj("short-lived") is None, 10, what="the TranscriptionJob deleted by its TTL")
    assert recorder.phases_through("short-lived", "Succeeded")[-1] == ("Succeeded", "Completed")
    wait_for(lambda: _none_left(sim, uid), 15, what=f"children deleted (left: {_children(sim, uid)})")


def test_default_ttl_comes_from_config(run_operator, sim):
    run_operator(default_ttl_seconds_after_finished=0)
    tj = sim.create_tj("default-ttl")
    job = sim.job_of(tj)
    sim.set_job_condition(job, "Failed", "BackoffLimitExceeded", failed=3)
    wait_for(lambda: sim.tj("default-ttl") is None, 15, what="deleted with the default TTL of 0")


def test_cancel_deletes_the_job_and_stops_the_pod(run_operator, sim):
    run_operator()
    tj = sim.create_tj("cancel-me")
    uid = tj["metadata"]["uid"]
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("cancel-me", "Running")
    sim.delete_tj("cancel-me")
    # No garbage collector on the test server: only the operator can have removed these.
    wait_for(lambda: _none_left(sim, uid), 15, what=f"Job, pod and children deleted (left: {_children(sim, uid)})")


def test_a_new_job_with_a_reused_name_keeps_its_children(run_operator, sim):
    op = run_operator()
    first = sim.create_tj("again")
    sim.job_of(first)
    sim.delete_tj("again")
    second = sim.create_tj("again")
    # Its children wait for the first one's to go (the operator retries with a growing delay), which
    # under a loaded CI run has taken over 10 s: what counts here is that they come, and are its own.
    job = sim.job_of(second, timeout=45)
    wait_for(lambda: _none_left(sim, first["metadata"]["uid"]), 15, what="the first one's children deleted")
    # The first one's record goes only when its cleanup has finished; the second is looked at again after.
    wait_for(lambda: first["metadata"]["uid"] not in op.controller.states, 15, what="the first one's cleanup done")
    wait_reconciled(op, second["metadata"]["uid"])
    assert _children(sim, second["metadata"]["uid"])["secrets"] == ["again-result"]
    assert sim.read_job(job["metadata"]["name"])["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]


def test_concurrency_cap_holds_and_drains_in_creation_order(run_operator, sim):
    cap = 3
    op = run_operator(max_active_jobs=cap)
    names = [f"q{i:02d}" for i in range(20)]
    uids = {}
    for name in names:
        uids[name] = sim.create_tj(name)["metadata"]["uid"]
    by_uid = {uid: name for name, uid in uids.items()}

    def started() -> list[str]:
        jobs = sim.batch.list_namespaced_job(sim.ns, label_selector="ifw.dev/job-uid").items
        return sorted((j.metadata.creation_timestamp, by_uid[j.metadata.labels["ifw.dev/job-uid"]]) for j in jobs)

    wait_for(lambda: len(started()) >= cap, 10, what="the first jobs")
    # Every other job was held back, and looked at twice more since: none of them may have started.
    for name in names[cap:]:
        sim.wait_phase(name, "Queued", "ConcurrencyLimit")
    wait_reconciled(op, *uids.values())
    assert [n for _, n in started()] == names[:cap]
    status = sim.wait_phase(names[cap], "Queued", "ConcurrencyLimit")
    assert f"{cap}/{cap} runner jobs active" in status["message"]

    # Finish the oldest running job; exactly one waiting job must take its place, the oldest.
    order = [n for _, n in started()]
    done: set[str] = set()
    while len(done) < len(names):
        running = [n for n in order if n not in done]
        assert len(running) <= cap
        sim.set_job_condition(sim.jobs(uids[running[0]])[0], "Complete", "CompletionsReached")
        done.add(running[0])
        expected = min(cap, len(names) - len(done))
        seen = wait_for(lambda: (lambda s: s if len(s - done) >= expected else None)({n for _, n in started()}),
                        10, what=f"capacity refilled after {running[0]}")
        assert len(seen - done) == expected, f"cap exceeded: {sorted(seen - done)}"
        order += [n for n in names if n in seen and n not in order]
    assert order == names, f"drained out of creation order: {order}"
    for name in names:
        sim.wait_phase(name, "Succeeded")


def test_operator_killed_mid_job_restarts_without_a_second_job(operator_process, sim):
    op = operator_process().start()
    tj = sim.create_tj("survivor")
    job = sim.job_of(tj, timeout=30)
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("survivor", "Running", timeout=30)
    # The gauge is the operator's view, which can be a moment behind the GET above.
    running = 'ifw_operator_jobs{phase="Running"} 1.0'
    metrics = wait_for(lambda: (lambda m: m if running in m else None)(http_get(f"http://127.0.0.1:{op.metrics_port}/metrics")),
                       10, what="the Running gauge")  # fmt: skip
    assert "ifw_operator_job_create_seconds_count 1.0" in metrics
    op.kill()

    # While it is down, the runner finishes.
    sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached")
    op.start()
    status = sim.wait_phase("survivor", "Succeeded", timeout=30)
    assert status["jobName"] == job["metadata"]["name"]
    assert [j["metadata"]["uid"] for j in sim.jobs(tj["metadata"]["uid"])] == [job["metadata"]["uid"]]

    # Structured logs: one JSON object per line. The line follows the status write, so wait for it.
    def logged() -> bool:
        lines = [ln for ln in op.log.read_text().splitlines() if ln.startswith("{")]
        return any(json.loads(ln).get("message", "").startswith(f"{sim.ns}/survivor: Succeeded") for ln in lines)

    wait_for(logged, 10, what="the Succeeded transition in the JSON log")


def test_ttl_deletes_an_s3_result(run_operator, sim, monkeypatch):
    from ifw.core import results
    from ifw.core.transcript import Segment, Transcript
    from tests.core.s3server import SeaweedS3

    with SeaweedS3() as s3:
        s3.create_bucket("results")
        # The operator reads the same IFW_S3_* settings as the runner (the chart sets both).
        for key, value in {"IFW_RESULT_STORE": "s3", "IFW_S3_BUCKET": "results", "IFW_S3_ENDPOINT_URL": s3.endpoint_url,
                           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
            monkeypatch.setenv(key, value)
        run_operator()
        tj = sim.create_tj("in-s3", ttlSecondsAfterFinished=1)
        job = sim.job_of(tj)
        transcript = Transcript(text=" hi", segments=[Segment(start=0, end=1, text=" hi")])
        ref = results.store_result(transcript, tj, results.ResultSettings())
        assert ref["store"] == "s3"
        bucket, key = results.parse_s3_ref(ref["ref"])
        s3.client().head_object(Bucket=bucket, Key=key)
        sim.patch_tj_status("in-s3", {"result": ref})
        sim.set_job_condition(job, "Complete", "CompletionsReached")
        wait_for(lambda: sim.tj("in-s3") is None, 10, what="TTL deletion")

        def gone():
            listing = s3.client().list_objects_v2(Bucket=bucket)
            return not listing.get("Contents")

        wait_for(gone, 10, what="the S3 object deleted")


def test_kueue_queue_name_hands_admission_to_kueue(run_operator, sim):
    op = run_operator(max_active_jobs=1)
    busy = sim.create_tj("busy")
    sim.job_of(busy)  # takes the operator's only slot
    tj = sim.create_tj("kq", queueName="gpu-queue")
    job = sim.job_of(tj)  # created anyway: Kueue, not the operator's cap, admits it
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    status = sim.wait_phase("kq", "Queued", "QueuedInKueue")
    assert "gpu-queue" in status["message"]
    # Kueue admits the Workload: it unsuspends the Job; the operator leaves suspend to Kueue.
    sim.batch.patch_namespaced_job(job["metadata"]["name"], sim.ns, {"spec": {"suspend": False}})
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.wait_phase("kq", "Running")
    wait_reconciled(op, tj["metadata"]["uid"])
    assert sim.read_job(job["metadata"]["name"])["spec"]["suspend"] is False


def test_restarted_operator_counts_existing_jobs_before_admitting(run_operator, sim):
    op = run_operator(max_active_jobs=1)
    first = sim.create_tj("first")
    job = sim.job_of(first)
    op.stop()
    second = sim.create_tj("second")  # arrives while the operator is down
    restarted = run_operator(max_active_jobs=1)
    sim.wait_phase("second", "Queued", "ConcurrencyLimit")
    wait_reconciled(restarted, second["metadata"]["uid"])
    assert sim.jobs(second["metadata"]["uid"]) == []  # the running Job was counted on start
    sim.set_job_condition(job, "Complete", "CompletionsReached")
    sim.job_of(second)
    assert len(sim.jobs(first["metadata"]["uid"])) == 1
