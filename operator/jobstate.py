"""What the controller remembers about one TranscriptionJob, in one record per uid.

The record is made the first time anything about the job is seen (the TranscriptionJob, its
Job, a Pod, a timer) and dropped once nothing is left in it: the job is deleted and cleaned up,
no Job of it holds capacity, and no reconcile, timer or webhook delivery is pending. Forgetting
a job is one ``pop``.

Everything here is a cache of the cluster or bookkeeping of work in flight; a restarted
operator rebuilds it from the API (kopf lists every object first), so nothing is lost with it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class JobState:
    uid: str
    tj: dict[str, Any] | None = None  # the newest TranscriptionJob seen; None once deleted (or not seen yet)
    tombstone: dict[str, Any] | None = None  # its last body after deletion, until the cleanup succeeded
    first_seen: float | None = None  # monotonic time the operator first saw it (job create latency)
    order: int | None = None  # its place among jobs created in the same second (objectmeta.queue_order)
    # The Job as this operator last wrote it (create, suspend, resume), until kopf's index catches up.
    written_job: dict[str, Any] | None = None
    capacity: str | None = None  # the namespace, while its runner Job holds capacity (see Controller.active)
    pods_seen: set[str] = field(default_factory=set)  # names of its runner pods seen so far
    pod_lost: dict[str, Any] | None = None  # the last pod deleted before it ended, until a new pod shows up
    task: asyncio.Task | None = None  # the reconcile running now (one at a time per job)
    dirty: bool = False  # poked while reconciling: run once more afterwards
    timer: asyncio.TimerHandle | None = None  # the next timed reconcile (deadline, TTL, retry)
    failures: int = 0  # reconciles that raised in a row (retry backoff)
    reconciles: int = 0  # passes finished; tests wait on it to know the operator looked again
    webhook: asyncio.Task | None = None  # the webhook delivery in flight
    webhook_settled: bool = False  # delivered or given up in this process (the status may lag behind)
    expired: bool = False  # the TTL passed: deletion accepted, or (GitOps) its runner removed
    stopped: bool = False  # its runner Job and pods are deleted (being deleted, or expired in place)
    cleaned: bool = False  # being deleted: every child and the result are deleted too

    @property
    def forgettable(self) -> bool:
        """Nothing left to remember: deleted and cleaned up, nothing pending or holding capacity."""
        return (
            self.tj is None
            and self.tombstone is None
            and self.capacity is None
            and self.task is None
            and self.timer is None
            and self.webhook is None
        )
