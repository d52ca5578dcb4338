"""The pool's rules as the operator applies them (operator/pool.py): pure functions, every case."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone

from ifw.core import contract
from ifw.operator import pool

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


def lease(name: str, *, models=("base",), capacity=4, draining=False, renewed=NOW, duration=15, running=0) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ifw", "annotations": {
            contract.ANNOTATION_WORKER_MODELS: json.dumps(list(models)),
            contract.ANNOTATION_WORKER_CAPACITY: str(capacity),
            contract.ANNOTATION_WORKER_DRAINING: "true" if draining else "false",
            contract.ANNOTATION_WORKER_RUNNING: str(running)}},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": duration,
                 "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
    }  # fmt: skip


def tj(spec=None, **status) -> dict:
    return {"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "spec": {"audio": {"url": "https://x/a.mp3"},
            **(spec or {})}, "status": {"runtime": "Pool", **status}}  # fmt: skip


def test_leases_become_workers_and_stale_or_draining_ones_take_nothing():
    workers = pool.workers([lease("w1"), lease("w2", draining=True), lease("w3", renewed=NOW - timedelta(seconds=20)),
                            {"metadata": {"name": "junk", "annotations": {contract.ANNOTATION_WORKER_CAPACITY: "x"}},
                             "spec": {"renewTime": "2026-12-01T12:00:00Z"}}])  # fmt: skip
    assert set(workers) == {"w1", "w2", "w3"}  # the malformed one is not a worker
    assert [w.name for w in workers.values() if w.ready(NOW)] == ["w1"]
    assert workers["w2"].alive(NOW) and not workers["w3"].alive(NOW)


def test_runtime_follows_the_spec_then_the_pool():
    ready = pool.workers([lease("w1", models=("base",))])
    assert pool.runtime({}, ready, "base", NOW) == "Pool"
    assert pool.runtime({}, ready, "large-v3", NOW) == "Job"  # nobody holds that model
    assert pool.runtime({}, {}, "base", NOW) == "Job"
    assert pool.runtime({"runtime": "Job"}, ready, "base", NOW) == "Job"
    assert pool.runtime({"queueName": "gpu"}, ready, "base", NOW) == "Job"  # Kueue admits Jobs only
    assert pool.runtime({"runtime": "Pool"}, {}, "base", NOW) == "Pool"  # forced: waits for a worker


def test_choose_takes_the_least_loaded_ready_worker_with_a_free_slot():
    workers = pool.workers([lease("w1", capacity=2), lease("w2", capacity=4), lease("w3", draining=True)])
    assert pool.choose(workers, Counter(), "base", NOW).name == "w2"
    assert pool.choose(workers, Counter({"w2": 3}), "base", NOW).name == "w1"
    assert pool.choose(workers, Counter({"w1": 2, "w2": 4}), "base", NOW) is None
    assert pool.choose(workers, Counter(), "base", NOW, avoid="w2").name == "w1"  # retry elsewhere if possible


def test_a_job_without_a_worker_is_assigned_and_its_report_is_followed():
    workers = pool.workers([lease("w1")])
    assert pool.derive(tj(), workers, now=NOW).action == "assign"
    assigned = {"worker": "w1", "attempt": 1}
    waiting = pool.derive(tj(assignment=assigned), workers, now=NOW)
    assert (waiting.outcome.phase, waiting.outcome.reason, waiting.action) == ("Pending", "Assigned", "none")
    running = pool.derive(tj(assignment=assigned, execution={"worker": "w1", "attempt": 1, "state": "Running",
                                                             "startTime": "2026-12-01T11:59:00Z"}), workers, now=NOW)
    assert running.outcome.phase == "Running" and running.outcome.start_time == NOW - timedelta(minutes=1)
    done = pool.derive(tj(assignment=assigned, result={"store": "secret", "ref": "a-result"},
                          execution={"worker": "w1", "attempt": 1, "state": "Succeeded",
                                     "finishTime": "2026-12-01T12:00:00Z"}), workers, now=NOW)  # fmt: skip
    assert done.outcome.phase == "Succeeded" and done.outcome.completion_time == NOW


def test_a_report_of_an_earlier_attempt_or_another_worker_is_not_this_attempts():
    workers = pool.workers([lease("w1"), lease("w2")])
    stale = pool.derive(tj(assignment={"worker": "w2", "attempt": 2},
                           execution={"worker": "w1", "attempt": 1, "state": "Failed", "reason": "OutOfMemory"}),
                        workers, now=NOW)  # fmt: skip
    assert (stale.outcome.reason, stale.action) == ("Assigned", "none")


def test_failures_retry_up_to_the_backoff_limit_and_bad_input_never():
    workers = pool.workers([lease("w1"), lease("w2")])
    failed = {"worker": "w1", "attempt": 1, "state": "Failed", "reason": "OutOfMemory", "message": "GPU full"}
    retry = pool.derive(tj(assignment={"worker": "w1", "attempt": 1}, execution=failed), workers, now=NOW)
    assert (retry.action, retry.retry, retry.avoid) == ("assign", True, "w1")
    given_up = pool.derive(tj({"backoffLimit": 1}, assignment={"worker": "w1", "attempt": 2, "retries": 1},
                              execution={**failed, "attempt": 2}), workers, now=NOW)  # fmt: skip
    assert given_up.outcome.phase == "Failed" and "gave up after 2 attempts" in given_up.outcome.message
    bad = pool.derive(tj(assignment={"worker": "w1", "attempt": 1},
                         execution={**failed, "reason": "InvalidAudio", "badInput": True}), workers, now=NOW)
    assert (bad.outcome.phase, bad.outcome.reason, bad.action) == ("Failed", "InvalidAudio", "unassign")


def test_a_lost_worker_costs_a_retry_a_hand_back_does_not():
    alive = pool.workers([lease("w2")])
    lost = pool.derive(tj(assignment={"worker": "w1", "attempt": 1}), alive, now=NOW)
    assert (lost.action, lost.retry) == ("assign", True) and "stopped renewing its Lease" in lost.outcome.message
    stale = pool.workers([lease("w1", renewed=NOW - timedelta(seconds=16))])
    assert pool.derive(tj(assignment={"worker": "w1", "attempt": 1}), stale, now=NOW).retry
    drained = pool.derive(tj(assignment={"worker": "w1", "attempt": 1},
                             execution={"worker": "w1", "attempt": 1, "state": "HandedBack", "reason": "WorkerDraining",
                                        "message": "shut down"}), alive, now=NOW)  # fmt: skip
    assert (drained.action, drained.retry) == ("assign", False)


def test_audio_too_long_for_the_pool_goes_to_a_job_unless_the_pool_was_asked_for():
    back = {"worker": "w1", "attempt": 1, "state": "HandedBack", "reason": contract.Reason.AudioTooLongForPool,
            "message": "7200 s of audio is over the pool's 3600 s"}
    workers = pool.workers([lease("w1")])
    assert pool.derive(tj(assignment={"worker": "w1", "attempt": 1}, execution=back), workers, now=NOW).action == "to_job"
    forced = pool.derive(tj({"runtime": "Pool"}, assignment={"worker": "w1", "attempt": 1}, execution=back), workers,
                         now=NOW)  # fmt: skip
    assert forced.action == "assign"


def test_deadline_and_suspend_take_the_job_from_its_worker():
    workers = pool.workers([lease("w1")])
    running = {"worker": "w1", "attempt": 1, "state": "Running", "startTime": "2026-12-01T11:50:00Z"}
    late = pool.derive(tj({"activeDeadlineSeconds": 300}, assignment={"worker": "w1", "attempt": 1},
                          execution=running), workers, now=NOW)  # fmt: skip
    assert (late.outcome.reason, late.action) == ("DeadlineExceeded", "unassign")
    held = pool.derive(tj({"suspend": True}, assignment={"worker": "w1", "attempt": 1}, execution=running), workers,
                       now=NOW)  # fmt: skip
    assert (held.outcome.phase, held.outcome.reason, held.action) == ("Queued", "Suspended", "unassign")


def test_a_worker_that_says_it_is_full_gets_nothing_more():
    # The operator's count drops when a job is cancelled; the worker still holds it until its run
    # stops. Assigning by the operator's count alone made workers hand jobs back as WorkerFull.
    workers = pool.workers([lease("w1", capacity=2, running=2), lease("w2", capacity=2, running=1)])
    assert pool.choose(workers, Counter(), "base", NOW).name == "w2"
    assert pool.choose(workers, Counter({"w2": 1}), "base", NOW).name == "w2"  # the one it holds is that job
    assert pool.choose(workers, Counter({"w2": 2}), "base", NOW) is None
    assert pool.workers([lease("w1", capacity=2)])["w1"].free_slots(1) == 1  # an old worker's Lease: its count


def test_an_assignment_the_worker_never_starts_is_taken_back_without_costing_a_retry():
    workers = pool.workers([lease("w1"), lease("w2")])
    assigned = {"worker": "w1", "attempt": 3, "retries": 1, "time": contract.format_time(NOW)}
    waiting = pool.derive(tj(assignment=assigned), workers, now=NOW + timedelta(seconds=10), ack_seconds=30)
    assert waiting.action == "none" and waiting.outcome.reason == "Assigned"
    assert waiting.outcome.recheck_at == NOW + timedelta(seconds=15)  # the Lease's expiry comes first here
    renewed = pool.workers([lease("w1", renewed=NOW + timedelta(seconds=30)), lease("w2")])  # w1 is alive
    late = pool.derive(tj(assignment=assigned), renewed, now=NOW + timedelta(seconds=31), ack_seconds=30)
    assert (late.action, late.retry, late.avoid) == ("assign", False, "w1")
    assert late.outcome.reason == "NotAcknowledged" and "did not start attempt 3" in late.outcome.message
    # Started (the worker's Running report): the deadline no longer applies.
    running = {"worker": "w1", "attempt": 3, "state": "Running", "startTime": contract.format_time(NOW)}
    started = pool.derive(tj(assignment=assigned, execution=running), renewed, now=NOW + timedelta(seconds=31))
    assert started.outcome.phase == "Running" and started.action == "none"
    assert pool.derive(tj(assignment=assigned), renewed, now=NOW + timedelta(seconds=31), ack_seconds=0).action == "none"
