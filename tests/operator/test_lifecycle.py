"""The operator against the real test kube-apiserver: the life of a TranscriptionJob."""

from __future__ import annotations

import pytest

from tests.operator.conftest import wait_for

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
