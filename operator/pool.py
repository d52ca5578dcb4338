"""The warm pool, as the operator sees it (pure functions, no API calls, no clock reads).

Pool workers (``ifw-runner serve``, runner/worker.py) hold a Lease each; ``workers`` turns the
Leases into ``PoolWorker`` records. ``runtime`` decides where a job runs (spec.runtime, the
Kueue rule, whether a ready worker serves its model), ``choose`` picks the least loaded
ready worker with a free slot, and ``derive`` says what a pool job's status is from its
assignment, the worker's report (status.execution) and the worker's Lease — and what the
operator must do about it (assign, give up the attempt, hand the job to a Job).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from ifw.core.contract import (
    ANNOTATION_WORKER_CAPACITY,
    ANNOTATION_WORKER_DRAINING,
    ANNOTATION_WORKER_MODELS,
    ANNOTATION_WORKER_NODE,
    ANNOTATION_WORKER_RUNNING,
    ExecutionState,
    Phase,
    Reason,
    Runtime,
    parse_time,
)
from ifw.operator.status import Outcome


@dataclass(frozen=True)
class PoolWorker:
    name: str
    namespace: str
    models: tuple[str, ...]
    capacity: int
    draining: bool
    expires: datetime
    node: str = ""
    running: int = 0  # jobs the worker says it holds (stopping ones too) at its last renewal

    def free_slots(self, assigned: int) -> int:
        """Room for more: by the operator's count of its assignments or the worker's own, the larger."""
        return self.capacity - max(assigned, self.running)

    def ready(self, now: datetime) -> bool:
        return not self.draining and now < self.expires

    def alive(self, now: datetime) -> bool:
        """Still holds its Lease (a draining worker finishes what it has)."""
        return now < self.expires


def worker_of(lease: Mapping[str, Any]) -> PoolWorker | None:
    """A Lease as a PoolWorker; None for a Lease that is not a well-formed worker's."""
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    annotations = meta.get("annotations") or {}
    renewed = parse_time(spec.get("renewTime") or spec.get("acquireTime"))
    if renewed is None or not meta.get("name"):
        return None
    try:
        models = tuple(json.loads(annotations.get(ANNOTATION_WORKER_MODELS) or "[]"))
        capacity = max(1, int(annotations.get(ANNOTATION_WORKER_CAPACITY) or 1))
        running = max(0, int(annotations.get(ANNOTATION_WORKER_RUNNING) or 0))
    except (ValueError, TypeError):
        return None
    duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 15))
    return PoolWorker(
        name=meta["name"],
        namespace=meta.get("namespace", ""),
        models=models,
        capacity=capacity,
        draining=annotations.get(ANNOTATION_WORKER_DRAINING) == "true",
        expires=renewed + duration,
        node=annotations.get(ANNOTATION_WORKER_NODE) or "",
        running=running,
    )


def workers(leases: Iterable[Mapping[str, Any]]) -> dict[str, PoolWorker]:
    found = (worker_of(lease) for lease in leases)
    return {w.name: w for w in found if w is not None}


def serves(pool: Mapping[str, PoolWorker], model: str, now: datetime) -> bool:
    return any(w.ready(now) and model in w.models for w in pool.values())


def choose(pool: Mapping[str, PoolWorker], load: Counter[str], model: str, now: datetime,
           avoid: str | None = None) -> PoolWorker | None:  # fmt: skip
    """The ready worker serving ``model`` with the most free slots (``avoid``: the one just lost)."""
    fits = [w for w in pool.values() if w.ready(now) and model in w.models and w.free_slots(load[w.name]) > 0]
    if avoid is not None and len(fits) > 1:
        fits = [w for w in fits if w.name != avoid]
    return max(fits, key=lambda w: (w.free_slots(load[w.name]), w.name), default=None)


def runtime(spec: Mapping[str, Any], pool: Mapping[str, PoolWorker], model: str, now: datetime) -> Runtime:
    """Where a new job runs (Pool or Job): as its spec says; a Kueue queue or shards (spec.parallelism > 1)
    need a Job; Auto: the pool if it serves the model."""
    wanted = spec.get("runtime") or Runtime.Auto
    parallelism = spec.get("parallelism")
    # Shards run as one Indexed Job (a pool worker runs a job whole; an Auto count is decided on the audio).
    sharded = isinstance(parallelism, int) and not isinstance(parallelism, bool) and parallelism > 1
    if spec.get("queueName") or wanted == Runtime.Job or sharded:
        return Runtime.Job
    if wanted == Runtime.Pool or serves(pool, model, now):
        return Runtime.Pool
    return Runtime.Job


# ------------------------------------------------------------------ a pool job's state

Action = Literal["assign", "unassign", "to_job", "none"]


@dataclass(frozen=True)
class Decision:
    """A pool job's status, and what the operator does about it in this pass."""

    outcome: Outcome
    action: Action = "none"
    retry: bool = False  # with "assign": the last attempt counts against spec.backoffLimit
    avoid: str | None = None  # with "assign": prefer another worker than this one


def derive(tj: Mapping[str, Any], pool: Mapping[str, PoolWorker], *, now: datetime,
           ack_seconds: float = 0.0) -> Decision:  # fmt: skip
    """The state of a non-terminal pool job, from its assignment, the worker's report and its Lease.

    ``ack_seconds``: how long a worker may take to report that it started an attempt before the
    job is taken back and assigned again (a worker that missed the assignment never reports); 0, the
    default, never takes it back. The operator passes its setting (PoolSettings.ack_seconds), the one
    place its default is written."""
    spec, status = tj.get("spec") or {}, tj.get("status") or {}
    assignment = status.get("assignment") or {}
    worker_name, attempt = assignment.get("worker"), assignment.get("attempt") or 0
    retries, limit = assignment.get("retries") or 0, spec.get("backoffLimit", 2)
    execution = status.get("execution") or {}
    mine = worker_name is not None and execution.get("worker") == worker_name and execution.get("attempt") == attempt
    report = execution if mine else {}
    start = parse_time(status.get("startTime")) or parse_time(report.get("startTime"))

    if spec.get("suspend"):
        if worker_name:
            return Decision(Outcome(Phase.Queued, "Suspended", "spec.suspend is true; the worker stops the job"), "unassign")
        return Decision(Outcome(Phase.Queued, "Suspended", "spec.suspend is true; set it to false to run the job"))
    if not worker_name:
        return Decision(_waiting(attempt), "assign")

    state = report.get("state")
    if state == ExecutionState.Succeeded and status.get("result"):
        done = parse_time(report.get("finishTime")) or now
        return Decision(Outcome(Phase.Succeeded, "Completed", "the transcript is ready", start_time=start or done,
                                completion_time=done))  # fmt: skip
    if state == ExecutionState.Failed:
        reason, message = report.get("reason") or Reason.RunnerFailed, report.get("message") or "the runner failed"
        if report.get("badInput") or retries >= limit:
            if not report.get("badInput"):
                message = f"{message} (gave up after {retries + 1} attempts)"
            return Decision(Outcome(Phase.Failed, reason, message, start_time=start, completion_time=now), "unassign")
        return Decision(Outcome(Phase.Pending, "Retrying", f"attempt {attempt} failed ({reason}: {message}); retrying",
                                start_time=start), "assign", retry=True, avoid=worker_name)  # fmt: skip
    if state == ExecutionState.HandedBack:
        reason = Reason.of(report.get("reason")) or Reason.HandedBack
        if reason.needs_own_job and spec.get("runtime") != Runtime.Pool:
            return Decision(Outcome(Phase.Pending, reason, f"{report.get('message')}; running it in its own Job"), "to_job")
        return Decision(Outcome(Phase.Pending, reason, f"{report.get('message')}; assigning it again"), "assign",
                        avoid=worker_name)  # fmt: skip

    worker = pool.get(worker_name)
    if worker is None or not worker.alive(now):
        lost = f"pool worker {worker_name} stopped renewing its Lease during attempt {attempt}"
        if retries >= limit:
            return Decision(Outcome(Phase.Failed, Reason.WorkerLost, f"{lost} (gave up after {retries + 1} attempts)",
                                    start_time=start, completion_time=now), "unassign")  # fmt: skip
        return Decision(Outcome(Phase.Pending, "Retrying", f"{lost}; assigning it again", start_time=start),
                        "assign", retry=True, avoid=worker_name)  # fmt: skip

    deadline = spec.get("activeDeadlineSeconds")
    if state == ExecutionState.Running:
        if deadline and start and now >= start + timedelta(seconds=deadline):
            return Decision(Outcome(Phase.Failed, Reason.DeadlineExceeded,
                                    f"the job ran longer than activeDeadlineSeconds={deadline} and was stopped",
                                    start_time=start, completion_time=now), "unassign")  # fmt: skip
        recheck = min(worker.expires, start + timedelta(seconds=deadline)) if deadline and start else worker.expires
        return Decision(Outcome(Phase.Running, "Running", f"pool worker {worker_name} is working on it",
                                start_time=start or now, recheck_at=recheck))  # fmt: skip
    assigned = parse_time(assignment.get("time"))
    if assigned is not None and ack_seconds > 0:
        ack_by = assigned + timedelta(seconds=ack_seconds)
        if now >= ack_by:  # not started, never reported: costs no retry, prefers another worker
            return Decision(Outcome(Phase.Pending, "NotAcknowledged",
                                    f"pool worker {worker_name} did not start attempt {attempt} within {ack_seconds:g} s; "
                                    "assigning it again"), "assign", avoid=worker_name)  # fmt: skip
        recheck = min(worker.expires, ack_by)
    else:
        recheck = worker.expires
    return Decision(Outcome(Phase.Pending, "Assigned", f"assigned to pool worker {worker_name}, attempt {attempt}",
                            recheck_at=recheck))  # fmt: skip


def _waiting(attempt: int) -> Outcome:
    after = f" (after attempt {attempt})" if attempt else ""
    return Outcome(Phase.Queued, "WaitingForWorker", f"waiting for a pool worker with a free slot{after}")


def load(assigned: Iterable[str]) -> Counter[str]:
    """Jobs per worker: the names of the workers the unfinished pool jobs are assigned to."""
    return Counter(assigned)
