"""Status derivation from Job and Pods: pure functions, every case."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from ifw.core.contract import format_time, parse_termination_message
from ifw.operator.status import Outcome, conditions, derive, failure_cause, status_patch

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def ts(seconds: float = 0) -> str:
    return format_time(T0 + timedelta(seconds=seconds))


def tj(**status):
    return {"metadata": {"name": "a", "namespace": "n", "uid": "u", "generation": 3},
            "spec": {"audio": {"url": "https://x/a.mp3"}}, "status": status}


def job(conds=(), suspend=False, created=0, **status):
    return {"metadata": {"name": "a-u", "namespace": "n", "creationTimestamp": ts(created), "labels": {}},
            "spec": {"suspend": suspend, "activeDeadlineSeconds": 60},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "lastTransitionTime": ts(50)}
                                      for t, r in conds], **status}}


def pod(phase="Pending", created=1, name="a-u-x", state=None, last_state=None, conditions_=None):
    cs = {"name": "runner", "state": state or {}}
    if last_state:
        cs["lastState"] = last_state
    return {"metadata": {"name": name, "creationTimestamp": ts(created)},
            "spec": {"containers": [{"name": "runner", "image": "img:1"}]},
            "status": {"phase": phase, "containerStatuses": [cs], "conditions": conditions_ or []}}


def run(t, j, pods, now=10, waiting=None, startup=300, pull=60):
    return derive(t, j, pods, now=T0 + timedelta(seconds=now), startup_deadline_seconds=startup,
                  image_pull_grace_seconds=pull, waiting=waiting)


def terminated(code, reason="Error", message=None, finished=5):
    out = {"terminated": {"exitCode": code, "reason": reason, "finishedAt": ts(finished)}}
    if message:
        out["terminated"]["message"] = message
    return out


def test_no_job_yet():
    assert run(tj(), None, []).phase == "Pending"
    out = run(tj(), None, [], waiting=("ConcurrencyLimit", "waiting for capacity"))
    assert (out.phase, out.reason) == ("Queued", "ConcurrencyLimit")


def test_job_deleted_under_a_running_job_is_a_failure_not_a_rerun():
    out = run(tj(phase="Running", jobName="a-u"), None, [])
    assert (out.phase, out.reason) == ("Failed", "JobDeleted") and "a-u" in out.message


def test_pod_running_is_running_with_start_time():
    p = pod("Running", state={"running": {"startedAt": ts(7)}})
    out = run(tj(), job(), [p])
    assert (out.phase, out.start_time) == ("Running", T0 + timedelta(seconds=7))
    # an existing startTime is kept
    assert run(tj(startTime=ts(3)), job(), [p]).start_time == T0 + timedelta(seconds=3)


def test_complete_job_succeeds():
    out = run(tj(startTime=ts(2)), job([("Complete", "CompletionsReached")], completionTime=ts(40)), [])
    assert (out.phase, out.reason, out.completion_time) == ("Succeeded", "Completed", T0 + timedelta(seconds=40))


@pytest.mark.parametrize("job_reason,pod_state,expected,fragment", [
    ("PodFailurePolicy", terminated(2, message='{"reason":"InvalidAudio","message":"no audio stream"}'),
     "InvalidAudio", "no audio stream"),
    ("BackoffLimitExceeded", terminated(1, message='{"reason":"AudioFetchFailed","message":"503"}'),
     "AudioFetchFailed", "gave up after 3 attempts"),
    ("BackoffLimitExceeded", terminated(137, reason="OOMKilled"), "OutOfMemory", "OOMKilled"),
    ("BackoffLimitExceeded", terminated(1, message="Traceback: boom"), "BackoffLimitExceeded", "Traceback: boom"),
    ("DeadlineExceeded", terminated(137, reason="Error"), "DeadlineExceeded", "activeDeadlineSeconds=60"),
    ("PodFailurePolicy", terminated(2), "RunnerFailed", "last exit code 2"),
])
def test_failure_causes(job_reason, pod_state, expected, fragment):
    j = job([("Failed", job_reason)], failed=3)
    out = run(tj(), j, [pod("Failed", state=pod_state)])
    assert (out.phase, out.reason) == ("Failed", expected)
    assert fragment in out.message
    assert out.completion_time == T0 + timedelta(seconds=50)


def test_failure_cause_uses_the_latest_failed_pod():
    old = pod("Failed", created=1, name="p1", state=terminated(1, message='{"reason":"AudioFetchFailed","message":"x"}'))
    new = pod("Failed", created=9, name="p2", state=terminated(137, reason="OOMKilled"))
    assert failure_cause(job([("Failed", "BackoffLimitExceeded")]), [new, old])[0] == "OutOfMemory"


def test_termination_message_is_sanitised():
    assert parse_termination_message('{"reason": "Bad Reason!", "message": "m"}') == (None, "m")
    assert parse_termination_message('{"reason": "InvalidAudio"}') == ("InvalidAudio", None)
    assert parse_termination_message("plain log tail") == (None, "plain log tail")
    assert parse_termination_message("") == (None, None)
    assert len(parse_termination_message("x" * 100000)[1]) <= 4096


def test_suspended_job_is_queued():
    assert run(tj(), job(suspend=True), []).reason == "Suspended"
    kueue = job(suspend=True)
    kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "gpu"
    out = run(tj(), kueue, [])
    assert (out.phase, out.reason) == ("Queued", "QueuedInKueue") and "gpu" in out.message
    assert run(tj(), job(suspend=True), [], waiting=("ConcurrencyLimit", "m")).reason == "ConcurrencyLimit"


def test_unschedulable_then_startup_deadline():
    unsched = pod(conditions_=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": "0/4 nodes: Insufficient nvidia.com/gpu"}])
    out = run(tj(), job(), [unsched], now=100, startup=300)
    assert (out.phase, out.reason) == ("Queued", "Unschedulable") and out.recheck_at == T0 + timedelta(seconds=300)
    out = run(tj(), job(), [unsched], now=300, startup=300)
    assert (out.phase, out.reason, out.stop_job) == ("Failed", "StartupDeadlineExceeded", True)
    assert "Insufficient nvidia.com/gpu" in out.message


def test_no_pod_at_all_also_hits_the_startup_deadline():
    assert run(tj(), job(), [], now=299, startup=300).reason == "JobCreated"
    assert run(tj(), job(), [], now=301, startup=300).reason == "StartupDeadlineExceeded"


def test_startup_deadline_counts_from_a_resume():
    j = job(suspend=False)
    j["metadata"]["annotations"] = {"ifw.dev/resumed-at": ts(1000)}
    assert run(tj(), j, [], now=1200, startup=300).reason == "JobCreated"


def test_image_pull():
    backoff = pod(state={"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}})
    out = run(tj(), job(), [backoff], now=30, pull=60)
    assert (out.phase, out.reason) == ("Pending", "ImagePullBackOff") and "img:1" in out.message
    out = run(tj(), job(), [backoff], now=62, pull=60)
    assert (out.phase, out.reason, out.stop_job) == ("Failed", "ImagePullFailed", True)
    invalid = pod(state={"waiting": {"reason": "InvalidImageName", "message": "bad"}})
    assert run(tj(), job(), [invalid], now=2).reason == "ImagePullFailed"


def test_retrying_after_a_transient_failure():
    failed = pod("Failed", state=terminated(1, message='{"reason":"AudioFetchFailed","message":"503"}'))
    out = run(tj(), job(failed=1), [failed])
    assert (out.phase, out.reason) == ("Pending", "Retrying") and "AudioFetchFailed: 503" in out.message


def test_conditions_keep_transition_times_until_status_flips():
    running = Outcome("Running", "Running", "m")
    first = conditions(running, [], 3, T0)
    assert {c["type"]: c["status"] for c in first} == {"Queued": "False", "Running": "True",
                                                        "Succeeded": "False", "Failed": "False", "Ready": "False"}
    assert all(c["observedGeneration"] == 3 for c in first)
    later = conditions(Outcome("Running", "Running", "other"), first, 3, T0 + timedelta(seconds=30))
    assert [c["lastTransitionTime"] for c in later] == [c["lastTransitionTime"] for c in first]
    done = conditions(Outcome("Succeeded", "Completed", "ok"), later, 3, T0 + timedelta(seconds=60))
    by_type = {c["type"]: c for c in done}
    assert by_type["Succeeded"]["lastTransitionTime"] == ts(60) and by_type["Running"]["lastTransitionTime"] == ts(60)
    assert by_type["Queued"]["lastTransitionTime"] == ts(0)
    assert by_type["Running"]["reason"] == "Completed"


def test_status_patch_has_only_operator_fields_and_only_changes():
    t = tj(progress={"percent": 50.0}, result={"store": "secret", "ref": "a-result"}, speakers=2,
           audio={"language": "en"})
    out = Outcome("Running", "Running", "m", start_time=T0)
    patch = status_patch(t, out, job_name="a-u", model="m1", now=T0)
    assert set(patch) <= {"phase", "reason", "message", "conditions", "observedGeneration", "startTime",
                          "completionTime", "jobName", "model"}
    assert not {"progress", "result", "speakers", "audio"} & set(patch)
    applied = {**t["status"], **patch}
    assert status_patch({**t, "status": applied}, out, job_name="a-u", model="m1", now=T0 + timedelta(seconds=5)) is None


# ------------------------------------------------ what the fault injection found


def test_a_pod_that_succeeded_before_its_job_completes_is_still_running():
    done = pod("Succeeded", state=terminated(0, reason="Completed", finished=8))
    out = run(tj(phase="Running", startTime=ts(2)), job(), [done], now=9)
    assert (out.phase, out.reason) == ("Running", "RunnerFinished") and "waiting for the Job" in out.message
    assert out.start_time == T0 + timedelta(seconds=2)


@pytest.mark.parametrize("code,signal_name", [(137, "SIGKILL"), (143, "SIGTERM")])
def test_a_killed_runner_names_the_signal(code, signal_name):
    killed = pod("Failed", state=terminated(code))
    retrying = run(tj(), job(), [killed])
    assert retrying.reason == "Retrying"
    assert f"exit code {code}, killed by {signal_name}" in retrying.message and "attempt 1 failed" in retrying.message
    final = run(tj(), job([("Failed", "BackoffLimitExceeded")], failed=3), [killed])
    assert final.reason == "BackoffLimitExceeded" and f"last exit code {code}, killed by {signal_name}" in final.message
    assert "killed by" not in run(tj(), job(), [pod("Failed", state=terminated(1))]).message


def test_an_oom_killed_attempt_is_retried_and_says_so():
    out = run(tj(), {**job(), "spec": {"backoffLimit": 2}}, [pod("Failed", state=terminated(137, reason="OOMKilled"))])
    assert (out.phase, out.reason) == ("Pending", "Retrying")
    assert "OOMKilled" in out.message and "retry 1 of 2" in out.message


DISRUPTED = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
             "message": "Eviction API: evicting"}


def test_an_evicted_pod_costs_no_retry():
    evicted = pod("Failed", name="p1", state=terminated(143), conditions_=[DISRUPTED])
    out = run(tj(startTime=ts(1)), job(), [evicted])
    assert (out.phase, out.reason) == ("Pending", "Disrupted")
    assert "EvictionByEvictionAPI" in out.message and "costs no retry" in out.message
    # The next attempt that fails is the first one counted.
    oom = pod("Failed", created=5, name="p2", state=terminated(137, reason="OOMKilled"))
    assert "attempt 1 failed" in run(tj(startTime=ts(1)), job(), [evicted, oom]).message


def test_a_pod_lost_mid_run_waits_for_the_next_one_instead_of_failing_the_startup_deadline():
    # Running for 20 minutes, past the 5 minute startup deadline, when the node went away with the pod.
    running = tj(phase="Running", startTime=ts(0), conditions=[
        {"type": "Running", "status": "True", "lastTransitionTime": ts(0)}])
    out = run(running, job(), [], now=1200, startup=300)
    assert (out.phase, out.reason) == ("Pending", "PodLost") and out.recheck_at == T0 + timedelta(seconds=1500)
    # Once that is written the Running condition says when it stopped: a restarted operator knows it too.
    lost = tj(phase="Pending", startTime=ts(0), conditions=[
        {"type": "Running", "status": "False", "lastTransitionTime": ts(1200)}])
    assert run(lost, job(), [], now=1400, startup=300).reason == "PodLost"
    assert run(lost, job(), [], now=1500, startup=300).reason == "StartupDeadlineExceeded"  # no new pod came
    # A pod being deleted (its node lost) is said to be.
    going = pod("Running", state={"running": {"startedAt": ts(1)}})
    going["metadata"]["deletionTimestamp"] = ts(1199)
    assert run(running, job(), [going], now=1200, startup=300).reason == "PodLost"


def test_ready_is_true_only_when_succeeded_and_says_why_not():
    def ready(outcome):
        return next(c for c in conditions(outcome, [], 3, T0) if c["type"] == "Ready")

    assert ready(Outcome("Succeeded", "Completed", "the transcript is ready"))["status"] == "True"
    for phase, reason in [("Pending", "JobCreated"), ("Queued", "ConcurrencyLimit"), ("Running", "Running"),
                          ("Failed", "InvalidAudio")]:
        cond = ready(Outcome(phase, reason, f"because {reason}"))
        assert (cond["status"], cond["reason"], cond["message"]) == ("False", reason, f"because {reason}")
        assert cond["observedGeneration"] == 3


def test_the_attempt_that_ended_last_speaks_even_within_the_same_second():
    # An eviction and the OOM of the retry, both created and ended in one second: the resourceVersion decides.
    evicted = pod("Failed", created=1, name="p-zzz", state=terminated(143, finished=2), conditions_=[DISRUPTED])
    oom = pod("Failed", created=1, name="p-aaa", state=terminated(137, reason="OOMKilled", finished=2))
    evicted["metadata"]["resourceVersion"], oom["metadata"]["resourceVersion"] = "10", "11"
    assert run(tj(), job(), [evicted, oom]).reason == "Retrying"
    evicted["metadata"]["resourceVersion"] = "12"
    assert run(tj(), job(), [evicted, oom]).reason == "Disrupted"
