"""GitOps against the real apiserver: a kstatus Ready condition, and a job from Git transcribed once."""

from __future__ import annotations

import subprocess

import pytest

from ifw.core import results
from ifw.core.results import ResultSettings
from ifw.core.transcript import Segment, Transcript
from ifw.local.control_plane import _kubectl
from tests.operator.conftest import wait_for, wait_reconciled

pytestmark = pytest.mark.cluster


def _finish(sim, tj) -> None:
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached")


def test_ready_follows_kstatus_and_kubectl_wait_returns_when_the_transcript_is_ready(run_operator, sim, kube):
    run_operator()
    tj = sim.create_tj("waited")
    job = sim.job_of(tj)
    status = sim.wait_phase("waited", "Pending", "JobCreated")
    ready = sim.conditions("waited")["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "JobCreated")
    assert ready["observedGeneration"] == status["observedGeneration"] == tj["metadata"]["generation"]

    waiter = subprocess.Popen([_kubectl(), "--kubeconfig", kube.kubeconfig, "-n", sim.ns, "wait",
                               "--for=condition=Ready", "tj/waited", "--timeout=60s"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pod = sim.create_pod(job)
        sim.pod_running(pod)
        sim.wait_phase("waited", "Running")
        assert sim.conditions("waited")["Ready"]["reason"] == "Running"
        assert waiter.poll() is None, waiter.stdout.read()  # Running is not Ready
        sim.pod_terminated(pod, 0, reason="Completed")
        sim.set_job_condition(job, "Complete", "CompletionsReached")
        assert waiter.wait(30) == 0, waiter.stdout.read()
    finally:
        if waiter.poll() is None:
            waiter.kill()
    conds = sim.conditions("waited")
    assert set(conds) == {"Queued", "Running", "Succeeded", "Failed", "Ready"}
    assert (conds["Ready"]["status"], conds["Succeeded"]["status"]) == ("True", "True")

    # A failure is not Ready, and says why.
    bad = sim.create_tj("bad")
    job = sim.job_of(bad)
    pod = sim.create_pod(job)
    sim.pod_terminated(pod, 2, message='{"reason": "InvalidAudio", "message": "no audio stream"}')
    sim.set_job_condition(job, "Failed", "PodFailurePolicy", failed=1)
    sim.wait_phase("bad", "Failed", "InvalidAudio")
    ready = sim.conditions("bad")["Ready"]
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "InvalidAudio", "no audio stream")


MANIFEST = """\
apiVersion: ifw.dev/v1alpha1
kind: TranscriptionJob
metadata:
  name: {name}
  namespace: {namespace}
  {marker}
spec:
  audio: {{url: "https://media.example.com/meeting.mp3"}}
  ttlSecondsAfterFinished: 1
"""
MARKERS = {
    "argo-cd": "annotations: {{argocd.argoproj.io/tracking-id: 'apps:ifw.dev/TranscriptionJob:{namespace}/{name}'}}",
    "flux": "labels: {{kustomize.toolkit.fluxcd.io/name: apps, kustomize.toolkit.fluxcd.io/namespace: flux-system}}",
}


@pytest.mark.parametrize("tool", sorted(MARKERS))
def test_a_git_managed_job_outlives_its_ttl_and_a_reapply_does_not_run_it_again(run_operator, sim, kube, tool):
    op = run_operator()
    fields = {"name": "from-git", "namespace": sim.ns}
    manifest = MANIFEST.format(marker=MARKERS[tool].format(**fields), **fields)

    def apply() -> None:  # what the GitOps tool does on every sync (Argo CD, Flux: server-side apply)
        kube.kubectl("apply", "--server-side", "--field-manager=gitops", "-f", "-", input=manifest)

    apply()
    tj = sim.tj("from-git")
    uid = tj["metadata"]["uid"]
    plain = sim.create_tj("plain", ttlSecondsAfterFinished=1)
    sim.job_of(tj)
    # What the runner does at the end: the transcript into its Secret, status.result pointing at it.
    transcript = Transcript(text=" Hello.", segments=[Segment(start=0.0, end=1.0, text=" Hello.")])
    sim.patch_tj_status("from-git", {"result": results.store_result(transcript, tj, ResultSettings(),
                                                                     core_v1=sim.core)})
    _finish(sim, tj)
    _finish(sim, plain)

    wait_for(lambda: sim.tj("plain") is None, 10, what="the unmanaged job deleted by its TTL")
    # The Git-managed one: at its TTL only the heavy part goes.
    wait_for(lambda: not sim.jobs(uid) and not sim.pods(uid), 10, what="its runner Job and pods removed at the TTL")
    wait_reconciled(op, uid)
    kept = sim.tj("from-git")
    assert kept["metadata"]["uid"] == uid and kept["status"]["phase"] == "Succeeded"
    assert results.load_result(kept["status"]["result"], sim.ns, job_uid=uid, core_v1=sim.core).text == " Hello."
    sel = f"ifw.dev/job-uid={uid}"
    assert sim.core.list_namespaced_service_account(sim.ns, label_selector=sel).items == []  # runner account too
    generation = kept["metadata"]["generation"]

    apply()  # the next sync: the same manifest
    wait_reconciled(op, uid)
    again = sim.tj("from-git")
    assert again["metadata"]["generation"] == generation and again["metadata"]["uid"] == uid
    assert again["status"]["phase"] == "Succeeded" and sim.jobs(uid) == []  # not run again
