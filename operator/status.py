"""What a TranscriptionJob's status should say, from its Job and Pods (pure functions).

``derive`` turns the observed world (the TranscriptionJob, its batch/v1 Job, the Job's Pods,
the time) into an ``Outcome``: the phase, a CamelCase reason and a message. ``conditions``
makes the five conditions of it: ``Queued``, ``Running``, ``Succeeded``, ``Failed`` (True for
the phase that holds) and ``Ready`` (kstatus: True once Succeeded, else False with the phase's
reason), so ``kubectl wait --for=condition=Ready`` and GitOps health checks work. ``status_patch``
turns an Outcome into a merge patch of only the fields the operator owns (conditions, phase,
reason, message, startTime, completionTime, jobName, model, observedGeneration), or None when
the status already says it. The runner's fields (progress, audio, speakers, result) are never
in it, so the two writers never touch the same field.

No API calls and no clock reads here: everything is an argument, so every case is a unit test.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ifw.core.contract import (
    ANNOTATION_RESUMED_AT,
    LABEL_KUEUE_QUEUE,
    RUNNER_CONTAINER,
    TERMINAL_PHASES,
    ConditionType,
    Phase,
    Reason,
    clip,
    format_time,
    parse_termination_message,
    parse_time,
)

OUT_OF_MEMORY = ("the runner was killed for using more memory than its limit (OOMKilled); "
                 "lower batchSize or give the runner more memory")

# Waiting reasons of a container that mean its image cannot be pulled; the first two are
# never fixed by retrying, the others may be a registry hiccup (grace period).
IMAGE_PULL_FATAL = frozenset({"InvalidImageName", "ErrImageNeverPull"})
IMAGE_PULL_RETRYABLE = frozenset({"ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", "SignatureValidationFailed"})


@dataclass(frozen=True)
class Outcome:
    phase: str
    reason: str
    message: str
    start_time: datetime | None = None
    completion_time: datetime | None = None
    # The operator decided the failure itself (startup deadline, image pull): it must stop the Job.
    stop_job: bool = False
    # When the answer may change without any event (a deadline): reconcile again then.
    recheck_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


# ------------------------------------------------------------------ helpers


def _condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def job_finished(job: dict[str, Any]) -> bool:
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


def job_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def _runner_state(pod: dict[str, Any], container: str = RUNNER_CONTAINER) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            return cs
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    cs = _runner_state(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}


def _created(obj: dict[str, Any]) -> datetime | None:
    return parse_time((obj.get("metadata") or {}).get("creationTimestamp"))


def _pod_sort_key(pod: dict[str, Any]) -> tuple[datetime, str]:
    return (_created(pod) or datetime.min.replace(tzinfo=timezone.utc), pod["metadata"].get("name", ""))


def _ended_key(pod: dict[str, Any]) -> tuple[datetime, int, datetime]:
    """Orders ended pods by when they ended. Times have one-second resolution and a retry often
    starts and ends within the second of the attempt before it, so ties go to the resourceVersion:
    the pod whose end was written last has the larger one."""
    meta = pod["metadata"]
    never = datetime.min.replace(tzinfo=timezone.utc)
    end = parse_time(_terminated(pod).get("finishedAt")) or parse_time(meta.get("deletionTimestamp"))
    try:
        revision = int(meta.get("resourceVersion") or 0)
    except ValueError:
        revision = 0
    return (end or _created(pod) or never, revision, _created(pod) or never)


def _disruption(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The DisruptionTarget condition: evicted, preempted, its node drained or lost. Costs no retry."""
    return _condition(pod, "DisruptionTarget")


def _killed_by(term: dict[str, Any]) -> str | None:
    """The signal that ended the container: the kubelet reports 128 + n as the exit code."""
    number = term.get("signal")
    code = term.get("exitCode")
    if not number and isinstance(code, int) and 128 < code < 160:
        number = code - 128
    if not number:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit(term: dict[str, Any]) -> str:
    """'exit code 137, killed by SIGKILL', 'exit code 1', or '' when the pod never reported one."""
    code = term.get("exitCode")
    if code is None:
        return ""
    killed = _killed_by(term)
    return f"exit code {code}, killed by {killed}" if killed else f"exit code {code}"


@dataclass(frozen=True)
class PodFailure:
    """Why one runner pod failed, and whether the Job counts it against backoffLimit."""

    reason: str | None  # the runner's own reason, OutOfMemory or Disrupted; None: only an exit
    message: str
    counted: bool = True


def _reason_and_message(reason: str | None, message: str | None) -> str:
    """'Reason: message', or whichever of them there is."""
    return ": ".join(part for part in (reason, message) if part)


def pod_failure(pod: dict[str, Any]) -> PodFailure:
    name = pod["metadata"].get("name", "")
    disruption = _disruption(pod)
    if disruption:
        why = _reason_and_message(disruption.get("reason") or "DisruptionTarget", disruption.get("message"))
        return PodFailure("Disrupted", f"pod {name} was disrupted ({why}); that costs no retry", counted=False)
    term = _terminated(pod)
    if term.get("reason") == "OOMKilled":
        return PodFailure(Reason.OutOfMemory, OUT_OF_MEMORY)
    runner_reason, runner_message = parse_termination_message(term.get("message"))
    if runner_reason:
        return PodFailure(runner_reason, runner_message or runner_reason)
    status = pod.get("status") or {}
    message = f"the runner failed with {_exit(term)}" if _exit(term) else "the runner failed"
    if status.get("reason"):  # e.g. Evicted on a cluster without DisruptionTarget conditions
        message += f" (pod {_reason_and_message(status['reason'], status.get('message'))})"
    if runner_message:
        message += f": {runner_message}"
    return PodFailure(None, message)


def failure_cause(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str]:
    """The real reason a failed Job failed, most specific first."""
    cond = _condition(job, "Failed") or {}
    job_reason = cond.get("reason") or ""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    last = max(failed, key=_ended_key) if failed else None
    term = _terminated(last) if last else {}
    cause = pod_failure(last) if last else None
    runner_reason, runner_message = parse_termination_message(term.get("message"))
    attempts = ((job.get("status") or {}).get("failed")) or sum(1 for p in failed if pod_failure(p).counted)

    if job_reason == Reason.DeadlineExceeded:
        limit = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return Reason.DeadlineExceeded, f"the job ran longer than activeDeadlineSeconds={limit} and was stopped"
    if cause and cause.reason == Reason.OutOfMemory:
        return Reason.OutOfMemory, OUT_OF_MEMORY
    # A sharded job's Indexed Job: one index ran out of its backoffLimitPerIndex (maxFailedIndexes 0).
    out_of_retries = job_reason in (Reason.BackoffLimitExceeded, "MaxFailedIndexesExceeded", "FailedIndexes")
    if runner_reason:
        message = runner_message or runner_reason
        if out_of_retries:
            message = f"{message} (gave up after {attempts} attempts)"
        return runner_reason, message
    detail = f"; last {_exit(term)}" if _exit(term) else ""
    if runner_message:
        detail += f": {runner_message}"
    if out_of_retries:
        return Reason.BackoffLimitExceeded, f"the runner failed {attempts} times, more than backoffLimit allows{detail}"
    if job_reason == "PodFailurePolicy":
        return Reason.RunnerFailed, f"the runner reported bad input{detail}"
    return job_reason or Reason.JobFailed, clip(cond.get("message") or f"the runner Job failed{detail}")


def _started_at(pod: dict[str, Any]) -> datetime | None:
    running = (_runner_state(pod).get("state") or {}).get("running") or {}
    return (parse_time(running.get("startedAt")) or parse_time(_terminated(pod).get("startedAt"))
            or parse_time((pod.get("status") or {}).get("startTime")))


def _unschedulable(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond
    return None


def _waiting(pod: dict[str, Any]) -> dict[str, Any]:
    return (_runner_state(pod).get("state") or {}).get("waiting") or {}


def _stopped_running(tj: dict[str, Any], now: datetime) -> datetime | None:
    """When the runner was last seen to stop running, from the job's own Running condition.

    Still True: the status says it runs, so it stopped just now. False after a start: the time
    of that flip. It lives in the API, so a restarted operator knows it too. (Without it a pod
    lost mid-run would be measured from the Job's start and fail the startup deadline at once.)
    """
    status = tj.get("status") or {}
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Running"), None)
    if cond is None:
        return None
    if cond.get("status") == "True":
        return now
    return parse_time(cond.get("lastTransitionTime")) if status.get("startTime") else None


def startup_reference(
    job: dict[str, Any], pods: list[dict[str, Any]], tj: dict[str, Any] | None = None, now: datetime | None = None
) -> datetime | None:
    """When the current attempt to start began: the Job's creation or resumption, the last failure,
    deletion or stop of a pod."""
    times = [
        _created(job),
        parse_time(((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_RESUMED_AT)),
        parse_time((job.get("status") or {}).get("startTime")),
    ]
    times += [parse_time(_terminated(p).get("finishedAt")) for p in pods]
    times += [parse_time(p["metadata"].get("deletionTimestamp")) for p in pods]
    if tj is not None and now is not None:
        times.append(_stopped_running(tj, now))
    return max((t for t in times if t), default=None)


# ------------------------------------------------------------------- derive


def derive(
    tj: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    *,
    now: datetime,
    startup_deadline_seconds: float,
    image_pull_grace_seconds: float,
    waiting: tuple[str, str] | None = None,
    lost_pod: dict[str, Any] | None = None,
) -> Outcome:
    """The state of a non-terminal TranscriptionJob.

    ``waiting`` is (reason, message) when the operator holds the job back itself (suspended, or
    over the concurrency cap); then ``job`` is None or a suspended Job. ``lost_pod``: the last
    pod deleted before it ended, if no pod was made since (the Pods themselves no longer show it).
    """
    status = tj.get("status") or {}
    start = parse_time(status.get("startTime"))
    if job is None:
        return _without_job(status, start, now, waiting)
    done = _job_done(job, pods, start, now)
    if done is not None:
        return done
    if job_suspended(job):
        return _job_held(job, waiting)

    live = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            and not p["metadata"].get("deletionTimestamp")]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        pod = max(running, key=_pod_sort_key)
        return Outcome(
            Phase.Running, "Running", f"the runner is working in pod {pod['metadata']['name']}",
            start_time=start or _started_at(pod) or now,
        )
    finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if finished and not live:
        # The Job controller marks the Job Complete a moment after its pod succeeded: still Running.
        pod = max(finished, key=_ended_key)
        return Outcome(
            Phase.Running, "RunnerFinished",
            f"the runner finished in pod {pod['metadata']['name']}; waiting for the Job to complete",
            start_time=start or _started_at(pod) or now,
        )

    ref = startup_reference(job, pods, tj, now) or now
    deadline = ref + timedelta(seconds=startup_deadline_seconds)
    if now >= deadline:
        return _startup_deadline_passed(live, start, now, startup_deadline_seconds)
    if live:
        starting = _Starting(max(live, key=_pod_sort_key), ref, deadline, start, now)
        return _pod_starting(starting, image_pull_grace_seconds)
    return _between_attempts(job, pods, start, deadline, lost_pod)


def _without_job(
    status: dict[str, Any], start: datetime | None, now: datetime, waiting: tuple[str, str] | None
) -> Outcome:
    if waiting:
        return Outcome(Phase.Queued, *waiting)
    if status.get("jobName"):
        return Outcome(
            Phase.Failed, Reason.JobDeleted, f"the runner Job {status['jobName']} was deleted before it finished",
            start_time=start, completion_time=now,
        )
    return Outcome(Phase.Pending, "Admitted", "creating the runner Job")


def _job_done(job: dict[str, Any], pods: list[dict[str, Any]], start: datetime | None, now: datetime) -> Outcome | None:
    """Succeeded or Failed as the Job's conditions say; None while it is not finished."""
    job_status = job.get("status") or {}
    complete = _condition(job, "Complete")
    if complete:
        done = parse_time(job_status.get("completionTime")) or parse_time(complete.get("lastTransitionTime")) or now
        start = start or parse_time(job_status.get("startTime")) or done
        return Outcome(Phase.Succeeded, "Completed", "the transcript is ready", start_time=start, completion_time=done)
    failed = _condition(job, "Failed")
    if failed:
        reason, message = failure_cause(job, pods)
        done = parse_time(failed.get("lastTransitionTime")) or now
        return Outcome(Phase.Failed, reason, message, start_time=start, completion_time=done)
    return None


def _job_held(job: dict[str, Any], waiting: tuple[str, str] | None) -> Outcome:
    """A suspended Job: by the operator (suspend, cap), by Kueue, or by someone else."""
    if waiting:
        return Outcome(Phase.Queued, *waiting)
    queue = (job["metadata"].get("labels") or {}).get(LABEL_KUEUE_QUEUE)
    if queue:
        return Outcome(Phase.Queued, "QueuedInKueue", f"waiting for Kueue to admit the Job in LocalQueue {queue}")
    return Outcome(Phase.Queued, "Suspended", "the runner Job is suspended")


def _startup_deadline_passed(
    live: list[dict[str, Any]], start: datetime | None, now: datetime, limit: float
) -> Outcome:
    detail = ""
    if live:
        pod = max(live, key=_pod_sort_key)
        unsched = _unschedulable(pod)
        wait = _waiting(pod)
        if unsched:
            detail = f": {unsched.get('message') or 'unschedulable'}"
        elif wait.get("reason"):
            detail = f": {wait['reason']}: {wait.get('message', '')}".rstrip(": ")
    return Outcome(
        Phase.Failed, Reason.StartupDeadlineExceeded, clip(f"the runner did not start within {limit:g}s{detail}"),
        start_time=start, completion_time=now, stop_job=True,
    )


@dataclass(frozen=True)
class _Starting:
    """The newest live pod of a Job that is not running yet, and the times that bound its start."""

    pod: dict[str, Any]
    ref: datetime  # when this attempt to start began (startup_reference)
    deadline: datetime  # the startup deadline
    start: datetime | None  # status.startTime
    now: datetime


def _pod_starting(s: _Starting, image_pull_grace_seconds: float) -> Outcome:
    """Pending, Queued (unschedulable) or an image pull that failed for good."""
    name = s.pod["metadata"]["name"]
    wait = _waiting(s.pod)
    wait_reason = wait.get("reason") or ""
    if wait_reason in IMAGE_PULL_FATAL or wait_reason in IMAGE_PULL_RETRYABLE:
        return _image_pull(s, wait, image_pull_grace_seconds)
    unsched = _unschedulable(s.pod)
    if unsched:
        return Outcome(
            Phase.Queued, "Unschedulable",
            clip(f"pod {name} cannot be scheduled yet: {unsched.get('message') or unsched.get('reason')}"),
            recheck_at=s.deadline,
        )
    if wait_reason:
        return Outcome(Phase.Pending, wait_reason, clip(f"pod {name}: {wait.get('message') or wait_reason}"),
                       recheck_at=s.deadline)
    return Outcome(Phase.Pending, "PodStarting", f"pod {name} is starting", recheck_at=s.deadline)


def _image_pull(s: _Starting, wait: dict[str, Any], grace_seconds: float) -> Outcome:
    """Fatal pull errors fail at once; the others after a grace period (a registry hiccup heals)."""
    since = max(s.ref, _created(s.pod) or s.ref)
    give_up = since + timedelta(seconds=grace_seconds)
    image = next((c.get("image") for c in (s.pod.get("spec") or {}).get("containers", [])), None)
    message = clip(f"cannot pull image {image}: {wait['reason']}: {wait.get('message', '')}".rstrip(": "))
    if wait["reason"] in IMAGE_PULL_FATAL or s.now >= give_up:
        return Outcome(Phase.Failed, Reason.ImagePullFailed, message, start_time=s.start, completion_time=s.now, stop_job=True)
    return Outcome(Phase.Pending, "ImagePullBackOff", message, recheck_at=min(give_up, s.deadline))


def _between_attempts(
    job: dict[str, Any], pods: list[dict[str, Any]], start: datetime | None, deadline: datetime,
    lost_pod: dict[str, Any] | None = None,
) -> Outcome:
    """No live pod: an attempt ended (failed, disrupted, deleted, lost) and the Job controller starts
    another, or the first pod is not made yet."""
    name = job["metadata"]["name"]
    if lost_pod is not None:
        disruption = _disruption(lost_pod)
        why = _reason_and_message(disruption.get("reason"), disruption.get("message")) if disruption \
            else "its node was lost, or it was deleted by hand"
        return Outcome(Phase.Pending, "PodLost", clip(f"pod {lost_pod['metadata']['name']} was deleted before it "
                       f"finished ({why}); waiting for Job {name} to start another"), start_time=start,
                       recheck_at=deadline)
    ended = [p for p in pods
             if (p.get("status") or {}).get("phase") == "Failed" or p["metadata"].get("deletionTimestamp")]
    if ended:
        last = max(ended, key=_ended_key)
        if (last.get("status") or {}).get("phase") != "Failed" and not _disruption(last):
            return Outcome(Phase.Pending, "PodLost", f"pod {last['metadata']['name']} is being deleted; waiting for "
                           f"Job {name} to start another", start_time=start, recheck_at=deadline)
        cause = pod_failure(last)
        if not cause.counted:
            return Outcome(Phase.Pending, "Disrupted", clip(f"{cause.message}; waiting for Job {name} to start another"),
                           start_time=start, recheck_at=deadline)
        counted = sum(1 for p in ended if pod_failure(p).counted)
        attempt = max(counted, (job.get("status") or {}).get("failed") or 0)
        limit = (job.get("spec") or {}).get("backoffLimit")
        text = f"{cause.reason}: {cause.message}" if cause.reason else cause.message
        if limit is None:
            retry = "retrying"
        elif attempt <= limit:
            retry = f"retry {attempt} of {limit}"
        else:
            retry = f"no retry left (backoffLimit {limit})"
        return Outcome(Phase.Pending, "Retrying", clip(f"attempt {attempt} failed ({text}); {retry}"),
                       start_time=start, recheck_at=deadline)
    if start is not None:
        # It ran before and every pod is gone: deleted with its node, or by hand.
        return Outcome(Phase.Pending, "PodLost", f"the runner pod is gone (deleted, or its node was lost); waiting "
                       f"for Job {name} to start another", start_time=start, recheck_at=deadline)
    return Outcome(Phase.Pending, "JobCreated", f"waiting for the runner pod of Job {name}", recheck_at=deadline)


# ------------------------------------------------------------------- status


_FALSE_REASONS = {
    ConditionType.Queued: "Admitted",
    ConditionType.Running: "NotRunning",
    ConditionType.Succeeded: "NotSucceeded",
    ConditionType.Failed: "NotFailed",
}


def conditions(
    outcome: Outcome, current: list[dict[str, Any]], generation: int | None, now: datetime
) -> list[dict[str, Any]]:
    """The five conditions; lastTransitionTime moves only when a condition's status flips."""
    previous = {c.get("type"): c for c in current or []}
    out = []
    for ctype in ConditionType:
        if ctype == ConditionType.Ready:
            # kstatus: the goal is a transcript. Not there yet (or never): False, saying why.
            is_true = outcome.phase == Phase.Succeeded
            reason, message = outcome.reason, outcome.message
        else:
            is_true = outcome.phase == ctype
            if is_true:
                reason, message = outcome.reason, outcome.message
            elif outcome.terminal and ctype in (ConditionType.Running, ConditionType.Succeeded, ConditionType.Failed):
                reason, message = outcome.reason, f"the job {outcome.phase.lower()}"
            else:
                reason, message = _FALSE_REASONS[ctype], ""
        status = "True" if is_true else "False"
        old = previous.get(ctype) or {}
        changed = old.get("status") != status
        cond = {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": clip(message) if message else message,
            "lastTransitionTime": format_time(now) if changed or not old.get("lastTransitionTime")
            else old["lastTransitionTime"],
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out


def desired_status(
    tj: dict[str, Any], outcome: Outcome, *, job_name: str | None, model: str, now: datetime
) -> dict[str, Any]:
    status = tj.get("status") or {}
    generation = (tj.get("metadata") or {}).get("generation")
    desired: dict[str, Any] = {
        "phase": outcome.phase,
        "reason": outcome.reason,
        "message": clip(outcome.message),
        "conditions": conditions(outcome, status.get("conditions") or [], generation, now),
        "model": model,
    }
    if generation is not None:
        desired["observedGeneration"] = generation
    if job_name:
        desired["jobName"] = job_name
    if outcome.start_time:
        desired["startTime"] = status.get("startTime") or format_time(outcome.start_time)
    if outcome.completion_time:
        desired["completionTime"] = status.get("completionTime") or format_time(outcome.completion_time)
    return desired


def status_patch(
    tj: dict[str, Any], outcome: Outcome, *, job_name: str | None, model: str, now: datetime
) -> dict[str, Any] | None:
    """A merge patch of the operator's own status fields that differ, or None."""
    status = tj.get("status") or {}
    desired = desired_status(tj, outcome, job_name=job_name, model=model, now=now)
    patch = {key: value for key, value in desired.items() if status.get(key) != value}
    return patch or None
