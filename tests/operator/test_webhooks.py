"""Webhooks on success and failure: the original API's payloads, signed, retried, guarded."""

from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook

from ifw.core import results
from ifw.core.results import ResultSettings
from ifw.core.transcript import ProcessedBy, Segment, Transcript
from tests.operator.conftest import FAST, SECRET, wait_for, wait_reconciled

pytestmark = pytest.mark.cluster
def _finish(sim, tj, ok: bool):
    job = sim.job_of(tj)
    pod = sim.create_pod(job)
    sim.pod_running(pod)
    if ok:
        sim.pod_terminated(pod, 0, reason="Completed")
        sim.set_job_condition(job, "Complete", "CompletionsReached")
    else:
        sim.pod_terminated(pod, 2, message='{"reason": "InvalidAudio", "message": "no audio stream in the file"}')
        sim.set_job_condition(job, "Failed", "PodFailurePolicy", failed=1)


def test_success_webhook_carries_the_transcript_signed_with_user_headers(run_operator, sim, receiver):
    hook = receiver()
    sim.core.create_namespaced_secret(sim.ns, {"metadata": {"name": "hook-headers"},
                                               "stringData": {"Authorization": "Bearer t0ken", "webhook-id": "spoof"}})
    run_operator(**FAST)
    tj = sim.create_tj("done", webhook={"url": hook.url, "headersSecretRef": {"name": "hook-headers"}})
    sim.job_of(tj)
    # What the runner does at the end: store the transcript in its Secret, point status.result at it.
    transcript = Transcript(text=" Hello world.", segments=[Segment(start=0.0, end=1.5, text=" Hello world.")],
                            language="en", duration=1.5,
                            processed_by=ProcessedBy(pod="done-runner-x7k2p", node="gpu-node-3", runtime="Job"))
    ref = results.store_result(transcript, tj, ResultSettings(), core_v1=sim.core)
    sim.patch_tj_status("done", {"result": ref})
    _finish(sim, tj, ok=True)

    wait_for(lambda: hook.requests, 10, what="the webhook")
    (request,) = hook.requests
    payload = Webhook(SECRET).verify(request["body"], request["headers"])  # raises unless signed right
    assert payload == {"output": {"text": " Hello world.", "chunks": [{"timestamp": [0.0, 1.5],
                                                                     "text": " Hello world."}]},
                       "status": "completed", "task_id": "done",
                       # the original's fly_machine_id: who did the work, as the runner reported it
                       "processed_by": {"pod": "done-runner-x7k2p", "node": "gpu-node-3", "runtime": "Job"}}
    assert request["headers"]["authorization"] == "Bearer t0ken"
    assert request["headers"]["webhook-id"] == f"{tj['metadata']['uid']}-succeeded"  # not the spoofed one
    state = wait_for(lambda: (sim.status("done").get("webhook") or {}).get("delivered") and sim.status("done"), 15)
    assert state["webhook"]["attempts"] == 1 and not state["webhook"].get("lastError")


def _no_delivery_in_flight(op, *tjs) -> bool:
    return all(op.controller.states[tj["metadata"]["uid"]].webhook is None for tj in tjs)


def test_failure_webhook_is_retried_with_the_same_id(run_operator, sim, receiver):
    hook = receiver(answers=[503, 500])
    op = run_operator(**FAST)
    tj = sim.create_tj("broken", webhook={"url": hook.url})
    _finish(sim, tj, ok=False)
    wait_for(lambda: len(hook.requests) == 3, 10, what="three attempts")
    bodies = {r["body"] for r in hook.requests}
    assert len(bodies) == 1
    assert json.loads(bodies.pop()) == {"error": "no audio stream in the file", "status": "error",
                                        "task_id": "broken", "processed_by": {"runtime": "Job"}}
    assert len({r["headers"]["webhook-id"] for r in hook.requests}) == 1
    for r in hook.requests:
        Webhook(SECRET).verify(r["body"], r["headers"])
    state = wait_for(lambda: (sim.status("broken").get("webhook") or {}).get("delivered") and sim.status("broken"), 15)
    assert state["webhook"]["attempts"] == 3
    # Reconciles after the delivery must not send it again (nor have a second delivery running).
    wait_reconciled(op, tj["metadata"]["uid"])
    assert _no_delivery_in_flight(op, tj)
    assert len(hook.requests) == 3


def test_client_errors_are_not_retried_and_attempts_are_bounded(run_operator, sim, receiver):
    gone = receiver(answers=[404])
    down = receiver(answers=[503] * 10)
    op = run_operator(**FAST)
    a = sim.create_tj("gone", webhook={"url": gone.url})
    b = sim.create_tj("down", webhook={"url": down.url})
    _finish(sim, a, ok=False)
    _finish(sim, b, ok=False)
    wait_for(lambda: (sim.status("gone").get("webhook") or {}).get("attempts") == 1, 10)
    wait_for(lambda: (sim.status("down").get("webhook") or {}).get("attempts") == 4, 10)
    wait_reconciled(op, a["metadata"]["uid"], b["metadata"]["uid"])
    assert _no_delivery_in_flight(op, a, b)
    assert len(gone.requests) == 1 and len(down.requests) == 4  # max_attempts
    assert "HTTP 404" in sim.status("gone")["webhook"]["lastError"]
    assert sim.status("down")["webhook"]["delivered"] is False


def test_webhook_to_a_private_address_is_refused_by_the_ssrf_guard(run_operator, sim, receiver):
    hook = receiver()
    run_operator(webhook={"signing_secret": SECRET})  # no allowlist: loopback is private
    tj = sim.create_tj("ssrf", webhook={"url": hook.url})
    _finish(sim, tj, ok=False)
    state = wait_for(lambda: sim.status("ssrf").get("webhook"), 10, what="webhook state")
    assert state["delivered"] is False and state["attempts"] == 1
    assert "SSRF" in state["lastError"] and hook.requests == []
    # It says which setting lets it through: the operator's webhook allowlist, not the runner's fetch one.
    assert "operator.webhook.allowlist" in state["lastError"] and "config webhook.allowlist" in state["lastError"]
    assert "fetch" not in state["lastError"] and "127.0.0.1" in state["lastError"]


def test_ttl_waits_for_the_webhook(run_operator, sim, receiver):
    hook = receiver(answers=[503, 503])
    run_operator(**FAST)
    tj = sim.create_tj("brief", ttlSecondsAfterFinished=0, webhook={"url": hook.url})
    _finish(sim, tj, ok=False)
    wait_for(lambda: sim.tj("brief") is None, 10, what="TTL deletion")
    assert len(hook.requests) == 3  # delivered (third attempt) before the job was deleted
