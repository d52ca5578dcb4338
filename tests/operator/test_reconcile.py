"""The reconciler's decisions against an in-memory fake of the API (fakeapi.py): no apiserver, milliseconds.

Each test drives a real Controller the way kopf would (watch events, indexes) and plays the
user, the Job controller and the kubelet by writing to the fake. The real-apiserver tests in
the other modules cover the same life against Kubernetes itself.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import REGISTRY

from ifw.core.contract import ANNOTATION_RESUMED_AT, LABEL_JOB_UID
from ifw.operator import controller as controller_module
from ifw.operator.objectmeta import ANNOTATION_QUEUE_ORDER, FINALIZER
from ifw.operator.webhooks import event_of
from tests.operator.fakeapi import Harness

CHILDREN = {"ServiceAccount", "Role", "RoleBinding", "Secret"}


def scenario(test):
    """Run an async test on a fresh event loop, bounded in time (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 10))

    return run


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(controller_module, "RETRY_DELAYS", (0.01, 0.2, 1.0))


def uid(tj) -> str:
    return tj["metadata"]["uid"]


def errors() -> float:
    return REGISTRY.get_sample_value("ifw_operator_reconcile_errors_total") or 0.0


# ------------------------------------------------------------------ admission


@scenario
async def test_admission_under_a_cap_goes_in_creation_order_whatever_order_events_arrive():
    h = Harness(max_active_jobs=2, admission_settle_seconds=0.05)
    tjs = [h.add_tj(f"q{i}") for i in range(4)]
    h.kube.watch.reverse()  # the newest job's event first: the settling window must put it back in line
    await h.settle()
    assert [h.job_of(tj) is not None for tj in tjs] == [True, True, False, False]
    for name in ("q2", "q3"):
        status = h.status(name)
        assert (status["phase"], status["reason"]) == ("Queued", "ConcurrencyLimit")
        assert "2/2 runner jobs active cluster-wide" in status["message"]
    assert set(h.controller.active()) == {uid(tjs[0]), uid(tjs[1])}

    h.finish_job(h.job_of(tjs[0]), "Complete", "CompletionsReached")
    await h.settle()
    assert h.status("q0")["phase"] == "Succeeded"
    assert [h.job_of(tj) is not None for tj in tjs] == [True, True, True, False]  # exactly one more, the oldest
    assert set(h.controller.active()) == {uid(tjs[1]), uid(tjs[2])}
    assert h.status("q3")["reason"] == "ConcurrencyLimit"


# ---------------------------------------------------------------------- start


@scenario
async def test_start_creates_the_runners_account_role_binding_and_secret_before_its_job():
    h = Harness()
    tj = h.add_tj("hello")
    await h.settle()
    creates = [(kind, name) for verb, kind, name in h.kube.calls if verb == "create" and kind != "Event"]
    assert {kind for kind, _ in creates[:4]} == CHILDREN and creates[4][0] == "Job" and len(creates) == 5
    job = h.job_of(tj)
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid(tj)
    assert {obj["kind"] for obj in h.kube.owned_by(uid(tj))} == CHILDREN | {"Job"}
    status = h.status("hello")
    assert (status["phase"], status["reason"], status["jobName"]) == ("Pending", "JobCreated", job["metadata"]["name"])
    assert [e["reason"] for e in h.kube.events] == ["JobCreated"]


@scenario
async def test_an_invalid_pod_template_fails_the_job_without_retrying():
    h = Harness()
    h.kube.fail("create", kind="Job", status=422)
    tj = h.add_tj("bad")
    await h.settle()
    status = h.status("bad")
    assert (status["phase"], status["reason"]) == ("Failed", "JobCreateFailed")
    assert "injected HTTP 422" in status["message"]
    assert h.job_of(tj) is None and h.state(tj).failures == 0
    assert [call for call in h.kube.calls if call[:2] == ("create", "Job")] == [("create", "Job", "bad-" + uid(tj)[:8])]


@scenario
async def test_kueue_jobs_are_created_suspended_beside_the_cap():
    h = Harness(max_active_jobs=1)
    h.add_tj("busy")
    await h.settle()
    tj = h.add_tj("kq", queueName="gpu")
    await h.settle()
    job = h.job_of(tj)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert h.status("kq")["reason"] == "QueuedInKueue"
    assert uid(tj) not in h.controller.active()  # Kueue's quota counts it, not the operator's cap


# ----------------------------------------------------- phases from Job and Pods


@scenario
async def test_running_then_succeeded_from_the_pod_and_the_job():
    h = Harness()
    tj = h.add_tj("ok", ttlSecondsAfterFinished=3600)
    await h.settle()
    job = h.job_of(tj)
    h.run_pod(job)
    await h.settle()
    status = h.status("ok")
    assert (status["phase"], status["reason"]) == ("Running", "Running") and status["startTime"]
    assert uid(tj) in h.controller.active()

    h.finish_job(job, "Complete", "CompletionsReached")
    await h.settle()
    status = h.status("ok")
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed") and status["completionTime"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Queued": "False", "Running": "False", "Succeeded": "True", "Failed": "False",
                          "Ready": "True"}
    assert h.controller.active() == {}
    assert h.tj("ok") is not None and h.state(tj).timer is not None  # the TTL is an hour away


@scenario
async def test_failed_with_the_runners_own_reason():
    h = Harness()
    tj = h.add_tj("bad-audio")
    await h.settle()
    job = h.job_of(tj)
    h.run_pod(job, phase="Failed", containerStatuses=[{"name": "runner", "state": {"terminated": {
        "exitCode": 2, "reason": "Error", "message": '{"reason": "InvalidAudio", "message": "no audio stream"}'}}}])
    h.finish_job(job, "Failed", "PodFailurePolicy")
    await h.settle()
    status = h.status("bad-audio")
    assert (status["phase"], status["reason"], status["message"]) == ("Failed", "InvalidAudio", "no audio stream")
    assert ("Warning", "InvalidAudio") in [(e["type"], e["reason"]) for e in h.kube.events]


@scenario
async def test_a_pod_that_never_starts_fails_the_job_and_the_operator_removes_it():
    h = Harness(startup_deadline_seconds=60)
    tj = h.add_tj("stuck")
    await h.settle()
    job = h.job_of(tj)
    h.run_pod(job, phase="Pending")
    # As a restarted operator finds it: the Job has been there, its pod pending, for longer than the deadline.
    long_ago = (datetime.now(timezone.utc) - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    h.kube.update("Job", job["metadata"]["name"], {"metadata": {"creationTimestamp": long_ago}})
    await h.settle()
    assert h.status("stuck")["reason"] == "StartupDeadlineExceeded"
    assert h.kube.owned_by(uid(tj), "Job") == [] and h.kube.owned_by(uid(tj), "Pod") == []


# ------------------------------------------------------------ suspend, resume


@scenario
async def test_suspend_frees_the_slot_and_resume_waits_for_one():
    h = Harness(max_active_jobs=1)
    a = h.add_tj("a")
    await h.settle()
    h.run_pod(h.job_of(a))
    b = h.add_tj("b")
    await h.settle()
    assert h.status("a")["phase"] == "Running" and h.job_of(b) is None

    h.kube.update(a["kind"], "a", {"spec": {"suspend": True}})
    await h.settle()
    assert h.job_of(a)["spec"]["suspend"] is True
    (pod,) = h.kube.owned_by(uid(a), "Pod")
    h.kube.remove("Pod", pod["metadata"]["name"])  # what the Job controller does to a suspended Job's pod
    assert (h.status("a")["phase"], h.status("a")["reason"]) == ("Queued", "Suspended")
    assert h.job_of(b) is not None  # a's slot went to the waiting job

    h.kube.update(a["kind"], "a", {"spec": {"suspend": False}})
    await h.settle()
    assert h.job_of(a)["spec"]["suspend"] is True and h.status("a")["reason"] == "ConcurrencyLimit"

    h.finish_job(h.job_of(b), "Complete", "CompletionsReached")
    await h.settle()
    job = h.job_of(a)
    assert job["spec"]["suspend"] is False and ANNOTATION_RESUMED_AT in job["metadata"]["annotations"]
    assert h.status("a")["phase"] == "Pending" and len(h.kube.owned_by(uid(a), "Job")) == 1


# ------------------------------------------------------- TTL, webhook, delete


class GatedSender:
    """Stands in for WebhookSender: a delivery ends only when the test opens the gate."""

    def __init__(self, settings, kube) -> None:
        self.kube = kube
        self.gate = asyncio.Event()
        self.deliveries = 0
        self.events: list[str] = []  # what each delivery reported: succeeded, failed, cancelled

    def owed(self, tj) -> bool:
        return bool(tj["spec"].get("webhook")) and not ((tj.get("status") or {}).get("webhook") or {}).get("delivered")

    async def deliver(self, tj, on_written) -> None:
        self.deliveries += 1
        self.events.append(event_of(tj))
        await self.gate.wait()
        meta = tj["metadata"]
        on_written(await self.kube.patch_tj_status(meta["namespace"], meta["name"],
                                                   {"webhook": {"attempts": 1, "delivered": True}}))


@scenario
async def test_ttl_deletes_the_job_only_after_its_webhook_settled():
    h = Harness(webhooks=GatedSender)
    sender = h.controller.webhooks
    tj = h.add_tj("brief", ttlSecondsAfterFinished=0, webhook={"url": "https://hooks.example.com/x"})
    await h.settle()
    h.finish_job(h.job_of(tj), "Complete", "CompletionsReached")
    await h.settle()
    assert h.status("brief")["phase"] == "Succeeded" and sender.deliveries == 1
    h.controller.poke(uid(tj))  # more passes while it is in flight: no second delivery, no deletion
    await h.settle()
    assert sender.deliveries == 1 and h.tj("brief") is not None
    assert not [call for call in h.kube.calls if call[:2] == ("delete", "TranscriptionJob")]

    delivery = h.state(tj).webhook
    sender.gate.set()
    await delivery
    await h.settle()
    assert h.tj("brief") is None and sender.deliveries == 1
    assert h.kube.owned_by(uid(tj)) == [] and uid(tj) not in h.controller.states


@scenario
async def test_deletion_removes_every_child_and_the_job_is_forgotten():
    h = Harness(max_active_jobs=1)
    gone, other, waiting = h.add_tj("gone"), h.add_tj("other", queueName="q"), h.add_tj("waiting")
    await h.settle()
    h.run_pod(h.job_of(gone))
    await h.settle()
    assert h.job_of(waiting) is None

    h.kube.remove(gone["kind"], "gone")  # cancel
    await h.settle()
    assert h.kube.owned_by(uid(gone)) == []  # Job, Pod, Secret, ServiceAccount, Role, RoleBinding
    deletes = [kind for verb, kind, _ in h.kube.calls if verb == "deletecollection"]
    assert deletes[0] == "Job"  # first, so no new pod is made
    assert uid(gone) not in h.controller.states
    assert {obj["kind"] for obj in h.kube.owned_by(uid(other))} == CHILDREN | {"Job"}  # by uid label only
    assert h.job_of(waiting) is not None  # the freed slot went on


@scenario
async def test_a_namesakes_leftovers_hold_the_start_until_they_are_gone(quick_retries):
    h = Harness()
    # A deleted job of the same name whose cleanup has not reached its result Secret yet.
    h.kube.add({"kind": "Secret", "metadata": {"name": "again-result", "labels": {LABEL_JOB_UID: "previous"}}})
    tj = h.add_tj("again")
    await h.drain()
    assert h.job_of(tj) is None and h.state(tj).failures == 1 and h.state(tj).timer is not None

    h.kube.remove("Secret", "again-result")
    await h.settle()
    assert h.job_of(tj) is not None and h.state(tj).failures == 0
    assert [s["metadata"]["name"] for s in h.kube.owned_by(uid(tj), "Secret")] == ["again-result"]


@scenario
async def test_an_api_error_is_retried_with_growing_backoff(quick_retries):
    h = Harness()
    errors_before = errors()
    h.kube.fail("create", kind="Job", times=2)  # no watch event follows: only the timer brings it back
    tj = h.add_tj("flaky")
    loop = asyncio.get_running_loop()
    await h.drain()
    state = h.state(tj)
    assert state.failures == 1 and h.job_of(tj) is None and h.status("flaky") == {}
    first_delay = state.timer.when() - loop.time()
    await h.tick()  # the retry, which fails too
    assert state.failures == 2 and h.job_of(tj) is None
    second_delay = state.timer.when() - loop.time()
    assert first_delay <= 0.06 and 0.1 < second_delay <= 0.25  # RETRY_DELAYS[0], then [1]; each + poke_at's 0.05 s
    await h.tick()
    assert h.state(tj).failures == 0 and h.status("flaky")["reason"] == "JobCreated"
    assert len(h.kube.owned_by(uid(tj), "Job")) == 1
    assert {kind for verb, kind, _ in h.kube.calls if verb == "read"} == CHILDREN  # each 409 checked: ours
    assert errors() - errors_before == 2


# ------------------------------------------------------- finalizer, cancel, GitOps


HOOK = {"url": "https://hooks.example.com/x"}


@scenario
async def test_a_cancelled_job_stops_at_once_then_sends_its_cancelled_webhook_then_goes():
    h = Harness(webhooks=GatedSender)
    sender = h.controller.webhooks
    plain, hooked = h.add_tj("plain"), h.add_tj("hooked", webhook=HOOK)
    await h.settle()
    assert FINALIZER not in (h.tj("plain")["metadata"].get("finalizers") or [])  # nothing owed after its deletion
    assert h.tj("hooked")["metadata"]["finalizers"] == [FINALIZER]
    h.run_pod(h.job_of(hooked))
    await h.settle()

    h.kube.remove(hooked["kind"], "hooked")  # the cancel: the finalizer holds it
    await h.settle()
    assert h.tj("hooked")["metadata"]["deletionTimestamp"]
    assert h.kube.owned_by(uid(hooked), "Job") == [] and h.kube.owned_by(uid(hooked), "Pod") == []  # GPU freed
    assert sender.events == ["cancelled"]
    h.controller.poke(uid(hooked))  # more passes while it is in flight: no second delivery
    await h.settle()
    assert sender.deliveries == 1 and h.tj("hooked") is not None

    delivery = h.state(hooked).webhook
    sender.gate.set()
    await delivery
    await h.settle()
    assert h.tj("hooked") is None and h.kube.owned_by(uid(hooked)) == [] and sender.deliveries == 1
    assert uid(hooked) not in h.controller.states
    assert h.job_of(plain) is not None


@scenario
async def test_only_our_finalizer_is_removed():
    h = Harness(webhooks=GatedSender)
    h.controller.webhooks.gate.set()
    tj = h.add_tj("shared", webhook=HOOK)
    await h.settle()
    h.kube.update(tj["kind"], "shared", {"metadata": {"finalizers": ["example.com/first", FINALIZER,
                                                                     "example.com/last"]}})
    await h.settle()
    h.kube.remove(tj["kind"], "shared")
    await h.settle()
    for state in list(h.controller.states.values()):
        if state.webhook:
            await state.webhook
    await h.settle()
    assert h.tj("shared")["metadata"]["finalizers"] == ["example.com/first", "example.com/last"]
    assert h.controller.webhooks.events == ["cancelled"] and h.kube.owned_by(uid(tj), "Job") == []


@scenario
async def test_a_finished_job_with_only_a_webhook_gives_its_finalizer_back():
    h = Harness(webhooks=GatedSender)
    h.controller.webhooks.gate.set()
    tj = h.add_tj("done", webhook=HOOK, ttlSecondsAfterFinished=3600)
    await h.settle()
    assert h.tj("done")["metadata"]["finalizers"] == [FINALIZER]
    h.finish_job(h.job_of(tj), "Complete", "CompletionsReached")
    await h.settle()
    assert h.status("done")["phase"] == "Succeeded" and not h.tj("done")["metadata"]["finalizers"]
    assert h.controller.webhooks.events == ["succeeded"]


@scenario
async def test_a_gitops_job_is_kept_at_its_ttl_with_its_result_and_only_its_runner_goes():
    h = Harness()
    kept = h.kube.add({"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob",
                       "metadata": {"name": "kept", "labels": {"kustomize.toolkit.fluxcd.io/name": "apps"}},
                       "spec": {"audio": {"url": "https://media.example.com/a.mp3"}, "ttlSecondsAfterFinished": 0}})
    await h.settle()
    job = h.job_of(kept)
    h.run_pod(job, phase="Succeeded")
    h.finish_job(job, "Complete", "CompletionsReached")
    await h.settle()
    assert h.status("kept")["phase"] == "Succeeded"
    assert {obj["kind"] for obj in h.kube.owned_by(uid(kept))} == {"Secret"}  # the result
    assert not [call for call in h.kube.calls if call[:2] == ("delete", "TranscriptionJob")]
    assert ("Normal", "TTLExpired") in [(e["type"], e["reason"]) for e in h.kube.events]
    calls = len(h.kube.calls)
    h.controller.poke(uid(kept))
    await h.settle()
    assert [call for call in h.kube.calls[calls:] if call[0] != "read"] == []  # nothing more to do


@scenario
async def test_jobs_created_in_the_same_second_keep_their_order_across_a_restart():
    h = Harness(max_active_jobs=1)
    tjs = [h.add_tj(f"q{i}") for i in range(4)]  # one second apart at most: creationTimestamp ties
    await h.settle()
    # The waiting ones carry their order; q0 started at once and never needed it (one write fewer).
    assert ANNOTATION_QUEUE_ORDER not in (h.tj("q0")["metadata"].get("annotations") or {})
    assert [h.tj(tj["metadata"]["name"])["metadata"]["annotations"][ANNOTATION_QUEUE_ORDER] for tj in tjs[1:]] == [
        tj["metadata"]["resourceVersion"] for tj in tjs[1:]]
    # Writes after creation move the resourceVersions in another order (here: backwards).
    for tj in reversed(tjs[1:]):
        h.kube.update(tj["kind"], tj["metadata"]["name"], {"status": {"message": "touched"}})
    await h.controller.stop()
    h.restart()
    await h.settle()
    started = [tjs[0]]
    for _ in range(3):
        h.finish_job(h.job_of(started[-1]), "Complete", "CompletionsReached")
        await h.settle()
        (running,) = [tj for tj in tjs if tj not in started and h.job_of(tj) is not None]
        started.append(running)
    assert [tj["metadata"]["name"] for tj in started] == ["q0", "q1", "q2", "q3"]


@scenario
async def test_a_cancelled_pool_job_is_taken_from_its_worker_at_once():
    from tests.operator.test_pool_rules import lease

    h = Harness(webhooks=GatedSender)
    renewed = datetime.now(timezone.utc)
    h.controller.leases_index["w1"] = [lease("w1", models=("openai/whisper-large-v3",), renewed=renewed,
                                             duration=3600)]
    tj = h.add_tj("pooled", runtime="Pool", webhook=HOOK)
    await h.settle()
    assert h.status("pooled")["assignment"]["worker"] == "w1"
    h.kube.remove(tj["kind"], "pooled")
    await h.settle()
    # The worker stops an attempt that is no longer its own: it need not wait for the job to vanish.
    assert h.status("pooled")["assignment"].get("worker") is None and h.tj("pooled")["metadata"]["deletionTimestamp"]
    assert h.controller.webhooks.events == ["cancelled"]


@scenario
async def test_a_finished_job_whose_ttl_is_edited_reports_the_new_generation():
    h = Harness()
    tj = h.add_tj("edited", ttlSecondsAfterFinished=3600)
    await h.settle()
    h.finish_job(h.job_of(tj), "Complete", "CompletionsReached")
    await h.settle()
    h.kube.update(tj["kind"], "edited", {"spec": {"ttlSecondsAfterFinished": 7200}})  # as from a Git commit
    await h.settle()
    status = h.status("edited")
    assert status["phase"] == "Succeeded" and status["observedGeneration"] == 2
    assert {c["observedGeneration"] for c in status["conditions"]} == {2}
