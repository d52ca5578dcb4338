"""The reconciler: one level-based pass per TranscriptionJob, serialised per job.

Every event (the TranscriptionJob changed, its Job changed, one of its Pods changed, a deadline
or TTL came due, the periodic resync) only *pokes* the job's uid. A poke runs ``reconcile`` for
that uid, or marks it dirty if one is already running so that it runs once more afterwards
(the work-queue pattern of controller-runtime). ``reconcile`` looks at the whole current state
(the last TranscriptionJob seen, its Job and Pods from kopf's indexes) and does what is missing;
it never depends on which event woke it, so bursts, lost events and restarts are harmless.

A pass is a few named steps, one per situation: being deleted -> stop the runner, send the
cancel webhook, clean up, let go; gone -> clean up; finished -> webhook and TTL; not started ->
admission, then children and Job; started -> suspend or resume; then derive the status, write
what changed, and set a timer for when it may change without an event.

What the controller knows about a job lives in one ``JobState`` record per uid (jobstate.py).
Webhook delivery is a collaborator it is handed (``WebhookSender``), not a subclass.

Besides its own status fields the operator writes only two things into a TranscriptionJob:
its finalizer, on the jobs whose deletion still needs it (an S3 result, a webhook), and, under
a cap, the queue-order annotation (objectmeta.py). kopf writes nothing (its on.event/index
handlers need no annotations or finalizers), so a job without S3 or a webhook is never held
up by the operator being down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from ifw.core import results
from ifw.core.contract import (
    ANNOTATION_RESUMED_AT,
    LABEL_JOB_UID,
    LABEL_KUEUE_QUEUE,
    TERMINAL_PHASES,
    ConditionType,
    Phase,
    Reason,
    Runtime,
    format_time,
    is_terminal,
    parse_time,
    phase_of,
)
from ifw.core.kube import api_message, status_code
from ifw.crds.transcriptionjob import PARALLELISM_AUTO
from ifw.operator import jobs as manifests
from ifw.operator import metrics, objectmeta, pool, sharding
from ifw.operator.config import OperatorSettings
from ifw.operator.jobstate import JobState
from ifw.operator.kube import Kube
from ifw.operator.queue import AdmissionQueue
from ifw.operator.status import Outcome, derive, job_finished, job_suspended, status_patch
from ifw.operator.webhooks import WebhookSender

log = logging.getLogger("ifw.operator")

RETRY_DELAYS = (0.5, 1, 2, 5, 10, 30, 60)
SUSPENDED = ("Suspended", "spec.suspend is true; set it to false to run the job")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _rv(obj: dict[str, Any]) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _newer(candidate: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Resource versions are opaque, but etcd's are integers: use them to drop stale bodies."""
    if current is None:
        return True
    a, b = _rv(candidate), _rv(current)
    return a is None or b is None or a >= b


def _spec(tj: dict[str, Any]) -> dict[str, Any]:
    return tj.get("spec") or {}


def _assignment(tj: dict[str, Any]) -> dict[str, Any]:
    return (tj.get("status") or {}).get("assignment") or {}


def _waiting_for_worker_since(tj: dict[str, Any], now: datetime) -> datetime:
    """When the job began waiting for a pool worker (its Queued condition's flip), else now."""
    status = tj.get("status") or {}
    if status.get("reason") == "WaitingForWorker":
        for cond in status.get("conditions") or []:
            if cond.get("type") == ConditionType.Queued and cond.get("status") == "True":
                return parse_time(cond.get("lastTransitionTime")) or now
    return now


def _kueue(tj: dict[str, Any]) -> bool:
    """Kueue admits the job (spec.queueName), not the operator's cap."""
    return bool(_spec(tj).get("queueName"))


class Observed(NamedTuple):
    """What a pass found before the status is derived: the Job, and why the operator holds the job back."""

    job: dict[str, Any] | None
    waiting: tuple[str, str] | None = None  # (reason, message)


class Controller:
    def __init__(self, settings: OperatorSettings, kube: Kube, webhooks: WebhookSender):
        self.settings = settings
        self.kube = kube
        self.webhooks = webhooks
        self.queue = AdmissionQueue(
            settings.max_active_jobs, settings.max_active_jobs_per_namespace, settings.admission_settle_seconds
        )
        self.states: dict[str, JobState] = {}  # TranscriptionJob uid -> everything known about it
        # The result store, from the same IFW_* env the runner gets: S3 results need the finalizer.
        self.result_settings = results.ResultSettings()
        self.jobs_index: Any = {}  # kopf.Index: tj uid -> Store of Job bodies
        self.pods_index: Any = {}  # kopf.Index: tj uid -> Store of Pod bodies
        self.leases_index: Any = {}  # kopf.Index: pool worker name -> Store of its Lease
        self.ready = asyncio.Event()
        self._background: set[asyncio.Task] = set()  # Event posts
        # Starts in flight at once. Without a bound, a burst of N jobs queues all N*4 child
        # creations ahead of the first Job (FIFO thread pool) and every job waits for the last.
        self._starting = asyncio.Semaphore(settings.concurrent_starts)

    # ------------------------------------------------------------- observation

    def _state(self, uid: str) -> JobState:
        """The job's record, made on first sight of anything about it."""
        state = self.states.get(uid)
        if state is None:
            state = self.states[uid] = JobState(uid)
        return state

    def _forget_if_done(self, state: JobState) -> None:
        if state.forgettable and self.states.get(state.uid) is state:
            del self.states[state.uid]

    def bind_indexes(self, jobs_index: Any, pods_index: Any, leases_index: Any = None) -> None:
        """Called from the first handler: kopf has listed every runner Job (and worker Lease) by then."""
        self.jobs_index, self.pods_index = jobs_index, pods_index
        self.leases_index = leases_index if leases_index is not None else {}
        for uid in list(jobs_index):
            for job in jobs_index.get(uid) or []:
                self.note_job(None, job)
        self.ready.set()

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        state = self._state(body["metadata"]["uid"])
        if event_type == "DELETED":
            state.tj, state.tombstone = None, body
        elif state.tj is not None and _rv(body) is not None and _rv(body) == _rv(state.tj):
            # The echo of the operator's own write: the pass that wrote it holds this very version
            # (or the delivery that wrote it pokes when it ends). Another pass would find nothing to do.
            return
        elif _newer(body, state.tj):
            state.tj = body
            if state.first_seen is None:
                state.first_seen = time.monotonic()
                state.order = objectmeta.queue_order(body)
        self.poke(state.uid)

    def _keep_newest(self, state: JobState, body: dict[str, Any]) -> None:
        """The API's answer to one of our writes: keep it if it is the newest body of a live job."""
        if state.tj is not None and _newer(body, state.tj):
            state.tj = body

    def job_for(self, state: JobState) -> dict[str, Any] | None:
        """The newest known version of the job's Job: the index's, or the one we just wrote."""
        store = self.jobs_index.get(state.uid) if self.jobs_index else None
        indexed = max(store, key=lambda job: _rv(job) or 0) if store else None
        mine = state.written_job
        if mine is not None and (indexed is None or (_rv(indexed) or 0) < (_rv(mine) or 0)):
            return mine
        state.written_job = None  # the index has caught up
        return indexed

    def pods_for(self, uid: str) -> list[dict[str, Any]]:
        store = self.pods_index.get(uid) if self.pods_index else None
        return list(store or [])

    @staticmethod
    def _counted(job: dict[str, Any]) -> bool:
        """Whether a runner Job holds capacity: unfinished, running (not suspended), not Kueue's."""
        labels = job["metadata"].get("labels") or {}
        if LABEL_KUEUE_QUEUE in labels:
            return False  # Kueue's quota governs those
        return not (job_finished(job) or job_suspended(job))

    def note_job(self, event_type: str | None, job: dict[str, Any]) -> None:
        """Keep the record's capacity current as its Job changes: admission never re-reads the Jobs."""
        uid = (job["metadata"].get("labels") or {}).get(LABEL_JOB_UID)
        if not uid:
            return
        if event_type != "DELETED" and self._counted(job):
            self._state(uid).capacity = job["metadata"]["namespace"]
        elif uid in self.states:
            self.states[uid].capacity = None

    def observe_job(self, event_type: str | None, job: dict[str, Any]) -> None:
        self.note_job(event_type, job)
        if manifests.is_sharded(job):
            self._admit_waiting()  # a shard that succeeded frees its slot before the whole Job ends
        self.poke(job["metadata"]["labels"][LABEL_JOB_UID])

    def observe_pod(self, event_type: str | None, pod: dict[str, Any]) -> None:
        """Remember a pod deleted before it ended (its node lost, or by hand): once gone from the index,
        only this says what happened to the attempt, until the next pod shows up."""
        state = self._state(pod["metadata"]["labels"][LABEL_JOB_UID])
        name = pod["metadata"]["name"]
        if event_type == "DELETED":
            if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                state.pod_lost = pod
        elif name not in state.pods_seen:
            state.pods_seen.add(name)
            state.pod_lost = None
        self.poke(state.uid)

    # ------------------------------------------------------------------ the pool

    def pool(self) -> dict[str, pool.PoolWorker]:
        """The pool workers, from their Leases (kopf's index: current without a read)."""
        leases = [lease for name in list(self.leases_index) for lease in (self.leases_index.get(name) or [])]
        return pool.workers(leases)

    def _pool_jobs(self) -> list[tuple[JobState, dict[str, Any]]]:
        """Unfinished jobs that run (or wait to run) in the pool."""
        return [(state, state.tj) for state in list(self.states.values())
                if state.tj is not None and not is_terminal(state.tj)
                and (state.tj.get("status") or {}).get("runtime") == Runtime.Pool]  # fmt: skip

    def pool_load(self) -> Counter[str]:
        return pool.load(w for _, tj in self._pool_jobs() if (w := _assignment(tj).get("worker")))

    def pool_stats(self) -> dict[str, int]:
        """For the metrics (and the autoscaler that reads them): demand and supply of the pool."""
        jobs = self._pool_jobs()
        now, workers = _now(), self.pool().values()
        # Auto jobs still deciding (runtime unset) while they wait for a cold pool are demand too:
        # without them a pool scaled to zero would never be woken by its autoscaler.
        cold = sum(1 for state in list(self.states.values()) if state.tj is not None
                   and not (state.tj.get("status") or {}).get("runtime") and not is_terminal(state.tj)
                   and (state.tj.get("status") or {}).get("reason") == "WaitingForWorker")  # fmt: skip
        return {
            "waiting": cold + sum(1 for _, tj in jobs if not _assignment(tj).get("worker")),
            "assigned": sum(1 for _, tj in jobs if _assignment(tj).get("worker")),
            "workers_ready": sum(1 for w in workers if w.ready(now)),
            "workers_draining": sum(1 for w in workers if w.alive(now) and w.draining),
            "capacity": sum(w.capacity for w in workers if w.ready(now)),
        }

    def observe_lease(self, event_type: str | None, lease: dict[str, Any]) -> None:
        """A worker appeared, renewed, drained or vanished: look again at its jobs and at who waits."""
        name = lease["metadata"]["name"]
        for state, tj in self._pool_jobs():
            worker = _assignment(tj).get("worker")
            if worker == name or worker is None:
                self.poke(state.uid)
        if event_type != "DELETED":
            # Jobs waiting to learn whether the pool serves them (runtime not decided yet).
            for state in list(self.states.values()):
                if state.tj is not None and not (state.tj.get("status") or {}).get("runtime") \
                        and not is_terminal(state.tj):
                    self.poke(state.uid)

    # These three are also read by the liveness probe and the metrics scrape, from other threads:
    # each iterates a snapshot (list() of a dict runs under the GIL in one go).

    def active(self) -> dict[str, str]:
        """uid -> namespace of every runner Job holding capacity."""
        return {uid: state.capacity for uid, state in list(self.states.items()) if state.capacity}

    def known(self) -> int:
        """TranscriptionJobs that exist (deleted ones still being cleaned up excluded)."""
        return sum(1 for state in list(self.states.values()) if state.tj is not None)

    def phases(self) -> list[str]:
        tjs = [state.tj for state in list(self.states.values())]
        return [phase_of(tj) or "Pending" for tj in tjs if tj is not None]

    # ----------------------------------------------------------------- pokes

    def poke(self, uid: str) -> None:
        state = self._state(uid)
        if state.task is not None:
            state.dirty = True
            return
        state.task = asyncio.get_running_loop().create_task(self._work(state), name=f"reconcile-{uid}")

    def poke_at(self, uid: str, when: datetime) -> None:
        state = self._state(uid)
        delay = max(0.0, (when - _now()).total_seconds()) + 0.05
        if state.timer:
            state.timer.cancel()
        state.timer = asyncio.get_running_loop().call_later(delay, self._timer_fired, state)

    def _timer_fired(self, state: JobState) -> None:
        state.timer = None
        self.poke(state.uid)

    async def _work(self, state: JobState) -> None:
        """Reconcile, and again while pokes came in meanwhile (the work-queue pattern)."""
        try:
            while True:
                state.dirty = False
                await self._pass(state)
                if not state.dirty:
                    break
        finally:
            state.task = None
            self._forget_if_done(state)

    async def _pass(self, state: JobState) -> None:
        """One reconcile; an error comes back after a growing delay."""
        try:
            await self.reconcile(state.uid)
            state.failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as error:  # retried with backoff; level-based, so nothing is lost
            metrics.RECONCILE_ERRORS_TOTAL.inc()
            delay = RETRY_DELAYS[min(state.failures, len(RETRY_DELAYS) - 1)]
            state.failures += 1
            log.warning("reconcile of %s failed (%s); retrying in %ss", self._describe(state),
                        api_message(error), delay, exc_info=status_code(error) is None)
            self.poke_at(state.uid, _now() + timedelta(seconds=delay))
        state.reconciles += 1

    @staticmethod
    def _describe(state: JobState) -> str:
        tj = state.tj or state.tombstone
        return f"{tj['metadata']['namespace']}/{tj['metadata']['name']}" if tj else state.uid

    async def resync_forever(self) -> None:
        """The safety net under the events: every job is looked at again every interval."""
        await self.ready.wait()
        while True:
            await asyncio.sleep(self.settings.resync_interval_seconds)
            for uid in [uid for uid, state in self.states.items() if state.tj is not None]:
                self.poke(uid)

    async def stop(self) -> None:
        states = list(self.states.values())
        for state in states:
            if state.timer:
                state.timer.cancel()
        tasks = [task for state in states for task in (state.task, state.webhook) if task]
        tasks += self._background
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -------------------------------------------------------------- admission

    def _admit_waiting(self, current: str | None = None) -> None:
        if not len(self.queue):
            return
        # Counting the active Jobs walks them all: skip it when nothing is capped.
        uncapped = self.queue.max_total is None and self.queue.max_per_namespace is None
        active = {} if uncapped else self.active()
        for uid in self.queue.admit(active, time.monotonic(), self._slots(active)):
            if uid != current:
                self.poke(uid)

    def _slots(self, active: dict[str, str]) -> dict[str, int]:
        """uid -> the runner pods each active job runs at once: a sharded job counts as its shards."""
        return {uid: sharding.job_slots(self.job_for(self.states[uid])) for uid in active if uid in self.states}

    def _enqueue(self, state: JobState, tj: dict[str, Any]) -> None:
        meta = tj["metadata"]
        # The revision first seen, not the current one: the operator's own writes move that.
        revision = state.order if state.order is not None else objectmeta.queue_order(tj)
        # A sharded job waits for room for all of its shards (an Auto job: once its runner asked for them).
        self.queue.enqueue(meta["uid"], meta["namespace"], meta.get("creationTimestamp") or "", revision,
                           time.monotonic(), slots=manifests.shard_count(tj))  # fmt: skip

    def _settling(self, uid: str) -> bool:
        """A job not admitted only because it (or an older one) is settling: come back then, write nothing."""
        now = time.monotonic()
        held = self.queue.held_until(uid, now)
        if held is None:
            return False
        self.poke_at(uid, _now() + timedelta(seconds=held - now))
        return True

    def _over_cap(self, tj: dict[str, Any]) -> tuple[str, str]:
        active = self.active()
        return "ConcurrencyLimit", self.queue.describe(active, tj["metadata"]["namespace"], self._slots(active),
                                                       tj["metadata"]["uid"])  # fmt: skip

    # -------------------------------------------------------------- reconcile

    async def reconcile(self, uid: str) -> None:
        """One level-based pass: look at everything known about the job and do what is missing."""
        state = self._state(uid)
        tj = state.tj
        if tj is None:
            await self._deleted(state)
        elif tj["metadata"].get("deletionTimestamp"):
            await self._deleting(state, tj)
        else:
            tj = await self._sync_metadata(state, tj)
            if tj is None:
                return  # deleted meanwhile: its events follow
            if is_terminal(tj):
                await self._finished(state, tj)
            else:
                observed = await self._drive(state, tj)
                if observed is not None:
                    await self._report(state, tj, observed)

    def _needs_finalizer(self, tj: dict[str, Any]) -> bool:
        """Whether deleting the job still needs the operator: an S3 result, or a cancel webhook owed."""
        ref = (tj.get("status") or {}).get("result") or {}
        s3 = self.result_settings.result_store == "s3" or ref.get("store") == "s3"
        return s3 or (bool(_spec(tj).get("webhook")) and not is_terminal(tj))

    async def _sync_metadata(self, state: JobState, tj: dict[str, Any],
                             annotations: dict[str, str] | None = None) -> dict[str, Any] | None:  # fmt: skip
        """Put the finalizer on (or take it off) as the job needs, and set ``annotations``."""
        annotations = annotations or {}
        needed = self._needs_finalizer(tj)
        if objectmeta.metadata_patch(tj, finalizer=needed, annotations=annotations) is None:
            return tj
        updated = await self.kube.patch_tj_metadata(
            tj, lambda body: objectmeta.metadata_patch(body, finalizer=needed, annotations=annotations))
        if updated is not None:
            self._keep_newest(state, updated)
        return updated

    async def _deleted(self, state: JobState) -> None:
        """Gone (or never seen: only its Job or Pods were): clean up after it, let the next one in."""
        self.queue.forget(state.uid)
        if state.tombstone is not None:
            if not state.cleaned:  # (a job that had our finalizer was cleaned up before it went)
                await self.cleanup(state, state.tombstone)
            state.tombstone = None  # only now: a failed cleanup is retried
        self._admit_waiting()

    async def _deleting(self, state: JobState, tj: dict[str, Any]) -> None:
        """Being deleted (cancel, TTL, a GitOps prune; held by our finalizer or another tool's).

        At once: stop the runner (the GPU is free) and let the next job in. Then, with our
        finalizer: the cancel webhook if the job had not finished (or a completion webhook still
        owed), bounded by its attempts; then the children and the result; then our finalizer goes.
        """
        self.queue.forget(state.uid)
        if state.timer:
            state.timer.cancel()
            state.timer = None
        if not state.stopped:
            await self._unassign(state, tj)
            await self.stop_runner(state, tj)
            self._admit_waiting()
        if not objectmeta.has_finalizer(tj):
            if not state.cleaned:
                await self.remove_children(state, tj)
            return  # another tool's finalizer holds it; ours was never put on
        if self._webhook_in_flight(state, tj):
            return  # the delivery pokes the job when it is over
        if not state.cleaned:
            await self.remove_children(state, tj)
        await self.kube.patch_tj_metadata(tj, lambda body: objectmeta.metadata_patch(body, finalizer=False))
        meta = tj["metadata"]
        log.info("%s/%s: cleaned up; finalizer %s removed", meta["namespace"], meta["name"], objectmeta.FINALIZER)

    async def _finished(self, state: JobState, tj: dict[str, Any]) -> None:
        """Succeeded or Failed: its place goes to the next one; then the webhook and the TTL."""
        self.queue.forget(state.uid)
        self._admit_waiting()
        tj = await self._observe_generation(state, tj)
        await self.after_finish(state, tj)

    async def _observe_generation(self, state: JobState, tj: dict[str, Any]) -> dict[str, Any]:
        """A finished job whose mutable spec changed (its TTL, say, edited in Git) has seen it: kstatus
        reads an old observedGeneration as a change still in progress."""
        generation, status = tj["metadata"].get("generation"), tj.get("status") or {}
        if generation is None or status.get("observedGeneration") == generation:
            return tj
        conditions = [{**cond, "observedGeneration": generation} for cond in status.get("conditions") or []]
        meta = tj["metadata"]
        updated = await self.kube.patch_tj_status(meta["namespace"], meta["name"],
                                                  {"observedGeneration": generation, "conditions": conditions})
        self._keep_newest(state, updated)
        return updated

    async def _drive(self, state: JobState, tj: dict[str, Any]) -> Observed | None:
        """Bring the runner (a pool worker or a Job) in line with the spec. None: nothing more to do."""
        runtime = await self._runtime(state, tj)
        if runtime is None:
            return None  # waiting to see whether a pool worker comes up; status written
        if runtime == Runtime.Pool:
            await self._drive_pool(state, tj)
            return None
        job = self.job_for(state)
        if job is not None:
            self.queue.settle(state.uid)
            if not manifests.is_sharded(job) and _spec(tj).get("parallelism") == PARALLELISM_AUTO:
                tj = await self._handed_back(state, tj, job)
                if manifests.shard_count(tj) > 1:
                    return await self._reshard(state, tj, job)
        if job is None and not (tj.get("status") or {}).get("jobName"):
            return await self._not_started(state, tj)
        if job is not None and not _kueue(tj) and not job_finished(job):
            return await self._started(state, tj, job)
        return Observed(job)  # finished, Kueue's to suspend and resume, or deleted under us (derive says)

    async def _handed_back(self, state: JobState, tj: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        """An Auto job's single runner finished: did it transcribe, or hand the job back to be sharded?

        It writes status.shards.count before it exits, but the Job's event can come before the job's:
        a finished Job without a result or a shard count is worth one fresh read before it is called done."""
        status = tj.get("status") or {}
        if not job_finished(job) or status.get("result") or status.get("shards"):
            return tj
        fresh = await self.kube.get_tj(tj["metadata"]["namespace"], tj["metadata"]["name"])
        if fresh is None or fresh["metadata"]["uid"] != state.uid:
            return tj
        self._keep_newest(state, fresh)
        return fresh

    async def _reshard(self, state: JobState, tj: dict[str, Any], job: dict[str, Any]) -> Observed | None:
        """The single runner handed the Auto job back (its audio is long): replace its Job with the
        Indexed Job of the shards. Under a cap the shards need room for all of them: the job is queued
        again in its old place (creation order) and, when there is no room yet, its Indexed Job is
        created suspended and resumed once admitted, like any suspended Job. Kueue admits its own."""
        count = manifests.shard_count(tj)
        meta = tj["metadata"]
        log.info("%s/%s: its runner asked for %d shards; replacing Job %s with an Indexed Job", meta["namespace"],
                 meta["name"], count, job["metadata"]["name"])
        await self.stop_job(state, job)
        wait = False
        if not _kueue(tj) and (self.queue.max_total is not None or self.queue.max_per_namespace is not None):
            self._enqueue(state, tj)
            self._admit_waiting(current=state.uid)
            wait = not self.queue.is_reserved(state.uid)  # it stays in line; _started resumes it
        new = await self.start(state, tj, suspend=wait)
        if new is None:
            return None
        return Observed(new, self._over_cap(tj)) if wait else Observed(new)

    async def _not_started(self, state: JobState, tj: dict[str, Any]) -> Observed | None:
        """No Job yet: hold it while suspended, else queue it and start it once admitted."""
        uid = state.uid
        if _spec(tj).get("suspend"):
            self.queue.forget(uid)
            return Observed(None, SUSPENDED)
        if not _kueue(tj):
            self._enqueue(state, tj)
            self._admit_waiting(current=uid)
        if _kueue(tj) or self.queue.is_reserved(uid):
            job = await self.start(state, tj)
            return Observed(job) if job is not None else None  # None: failed for good, status written
        if self._settling(uid):
            return None
        return Observed(None, self._over_cap(tj))

    async def _started(self, state: JobState, tj: dict[str, Any], job: dict[str, Any]) -> Observed | None:
        """The Job exists and is unfinished: suspend it as the spec asks, or resume it once admitted."""
        if _spec(tj).get("suspend"):
            self.queue.forget(state.uid)
            if not job_suspended(job):
                # The Job controller deletes the pod; a resume starts it again.
                job = await self._patch_job(state, job, {"spec": {"suspend": True}})
                self._admit_waiting()
            return Observed(job, SUSPENDED)
        if not job_suspended(job):
            return Observed(job)
        # Resuming takes capacity again: it waits its turn like a new job.
        self._enqueue(state, tj)
        self._admit_waiting(current=state.uid)
        if self._settling(state.uid):
            return None
        if not self.queue.is_reserved(state.uid):
            return Observed(job, self._over_cap(tj))
        resume = {"metadata": {"annotations": {ANNOTATION_RESUMED_AT: format_time(_now())}}, "spec": {"suspend": False}}
        return Observed(await self._patch_job(state, job, resume))

    # ------------------------------------------------------------------ pool jobs

    async def _runtime(self, state: JobState, tj: dict[str, Any]) -> str | None:
        """Pool or Job, decided once and kept in status.runtime. None: wait (a cold pool may start)."""
        status = tj.get("status") or {}
        if status.get("runtime"):
            return status["runtime"]
        if status.get("jobName") or self.job_for(state) is not None:
            return Runtime.Job  # started before runtimes existed, or by an operator that restarted since
        now = _now()
        chosen = pool.runtime(_spec(tj), self.pool(), self._model(tj), now)
        wait = self.settings.pool.wait_seconds
        created = parse_time(tj["metadata"].get("creationTimestamp")) or now
        if chosen == Runtime.Job and (_spec(tj).get("runtime") or Runtime.Auto) == Runtime.Auto and not _kueue(tj) \
                and wait > 0 and now < created + timedelta(seconds=wait):
            # The pool may be scaled to zero: give the autoscaler the time to start a worker.
            outcome = Outcome(Phase.Queued, "WaitingForWorker",
                              f"no pool worker serves {self._model(tj)} yet; a Job takes it after {wait:g} s")
            await self.write_status(state, tj, outcome, job_name=None, now=now)
            self.poke_at(state.uid, created + timedelta(seconds=wait))
            return None
        return chosen

    async def _drive_pool(self, state: JobState, tj: dict[str, Any]) -> None:
        """A pool job: assign it to a worker, follow the worker's report, give it up or to a Job."""
        now = _now()
        workers = self.pool()
        decision = pool.derive(tj, workers, now=now, ack_seconds=self.settings.pool.ack_seconds)
        outcome = decision.outcome
        assignment = dict(_assignment(tj))
        extra: dict[str, Any] = {"runtime": Runtime.Pool}
        action = decision.action
        if action == "to_job":
            extra = {"runtime": Runtime.Job, "assignment": None}
        elif decision.action == "unassign":
            assignment.pop("worker", None)
            extra["assignment"] = {**assignment, "worker": None}
        elif decision.action == "assign":
            if decision.retry:
                assignment["retries"] = assignment.get("retries", 0) + 1
            load = self.pool_load()
            if _assignment(tj).get("worker"):
                load[_assignment(tj)["worker"]] -= 1  # this job's own slot is free for its next attempt
            chosen = pool.choose(workers, load, self._model(tj), now, avoid=decision.avoid)
            wait = self.settings.pool.wait_seconds
            since = _waiting_for_worker_since(tj, now)
            auto = (_spec(tj).get("runtime") or Runtime.Auto) == Runtime.Auto
            if chosen is None and auto and not pool.serves(workers, self._model(tj), now) and now >= since + timedelta(
                    seconds=wait):  # fmt: skip
                # No worker for its model at all (they died, or never came back), not merely busy ones:
                # an Auto job does not wait for ever, it runs in its own Job, as a new one would.
                action, extra = "to_job", {"runtime": Runtime.Job, "assignment": None}
                outcome = Outcome(Phase.Pending, "NoPoolWorker", f"no ready pool worker serves {self._model(tj)} "
                                  f"(waited {wait:g} s); running it in its own Job", start_time=outcome.start_time)
            elif chosen is None:
                # Nobody free: wait (the attempt count and retries stay on the assignment).
                assignment.pop("worker", None)
                extra["assignment"] = {**assignment, "worker": None} if assignment else None
                why = f"{outcome.message}; " if decision.retry or outcome.phase == "Pending" else ""
                outcome = Outcome(Phase.Queued, "WaitingForWorker",
                                  f"{why}waiting for a pool worker serving {self._model(tj)} with a free slot",
                                  start_time=outcome.start_time,
                                  recheck_at=since + timedelta(seconds=wait) if auto else None)  # fmt: skip
            else:
                await self._create_pool_children(state, tj)
                extra["assignment"] = {"worker": chosen.name, "attempt": assignment.get("attempt", 0) + 1,
                                       "retries": assignment.get("retries", 0), "time": format_time(now)}  # fmt: skip
                if outcome.phase == "Queued":
                    outcome = Outcome(Phase.Pending, "Assigned", f"assigned to pool worker {chosen.name}",
                                      recheck_at=chosen.expires)  # fmt: skip
                else:  # a retry or a hand-back: say where it went
                    outcome = Outcome(outcome.phase, outcome.reason,
                                      f"{outcome.message}: now pool worker {chosen.name}",
                                      start_time=outcome.start_time, recheck_at=chosen.expires)  # fmt: skip
        metrics.pool_pass(tj, outcome, extra, now)  # assignment wait; assigned-not-running jobs
        tj = await self.write_status(state, tj, outcome, job_name=None, now=now, extra=extra)
        if outcome.terminal:
            await self._finished(state, tj)
            self._poke_pool_waiters()
        elif action == "to_job":
            self.poke(state.uid)  # the next pass takes the Job path
        elif outcome.recheck_at:
            self.poke_at(state.uid, outcome.recheck_at)

    async def _create_pool_children(self, state: JobState, tj: dict[str, Any]) -> None:
        """A pool worker needs only the result Secret: it runs with its own identity, not a per-job one."""
        for obj in manifests.pool_children(tj):
            if await self.kube.create(obj) is None:
                await self._check_ours(obj, state.uid)

    def _poke_pool_waiters(self) -> None:
        """A slot freed up: the jobs waiting for a worker may go now."""
        for state, tj in self._pool_jobs():
            if not _assignment(tj).get("worker"):
                self.poke(state.uid)

    def _model(self, tj: dict[str, Any]) -> str:
        return _spec(tj).get("model") or self.settings.default_model

    async def _report(self, state: JobState, tj: dict[str, Any], observed: Observed) -> None:
        """Derive the status from what was seen, write what changed, come back when it may change."""
        now = _now()
        outcome = derive(
            tj, observed.job, self.pods_for(state.uid), now=now,
            startup_deadline_seconds=self.settings.startup_deadline_seconds,
            image_pull_grace_seconds=self.settings.image_pull_grace_seconds,
            waiting=observed.waiting, lost_pod=state.pod_lost,
        )
        if outcome.stop_job and observed.job is not None:
            await self.stop_job(state, observed.job)
        job_name = observed.job["metadata"]["name"] if observed.job else (tj.get("status") or {}).get("jobName")
        extra: dict[str, Any] = {"runtime": Runtime.Job}
        sharded = observed.job is not None and manifests.is_sharded(observed.job)
        if sharded:
            outcome, extra = await self._shards(state, tj, observed.job, outcome, extra)
        tj = await self.write_status(state, tj, outcome, job_name=job_name, now=now, extra=extra)
        if outcome.terminal:
            if sharded and outcome.phase == Phase.Succeeded:
                # Merged and recorded: the partials have served (a failed job's go with its other Secrets).
                await self.kube.delete_labelled("Secret", tj["metadata"]["namespace"],
                                                sharding.partial_selector(state.uid))
            await self._finished(state, tj)
        elif outcome.recheck_at:
            self.poke_at(state.uid, outcome.recheck_at)

    async def _shards(self, state: JobState, tj: dict[str, Any], job: dict[str, Any], outcome: Outcome,
                      extra: dict[str, Any]) -> tuple[Outcome, dict[str, Any]]:  # fmt: skip
        """A sharded job's own status: the shard count and how many finished, the progress summed over the
        shards; once every index succeeded, the one merge and the runner's final fields."""
        count = int((job.get("spec") or {}).get("completions") or manifests.shard_count(tj))
        status = tj.get("status") or {}
        if outcome.phase == Phase.Succeeded:
            if status.get("result"):
                return outcome, extra  # merged before (this status write failed after it): once is enough
            try:
                final = await self.kube._run(lambda: sharding.merge_and_store(tj, count, self.kube.core,
                                                                              self.result_settings))
            except (sharding.MergeFailed, results.ResultNotFound, results.ResultTooLarge) as failure:
                failed = Outcome(Phase.Failed, failure.reason, failure.message, start_time=outcome.start_time,
                                 completion_time=outcome.completion_time)
                return failed, {**extra, "shards": {"count": count}}
            return outcome, {**extra, **final}
        shards_patch = sharding.shards_patch(tj, count)
        if shards_patch:
            extra["shards"] = shards_patch
        progress = sharding.progress_patch(tj, count)
        if progress:
            extra["progress"] = progress
        if outcome.phase == Phase.Running and outcome.reason == "Running":
            outcome = replace(outcome, message=sharding.running_message(tj, count, self.pods_for(state.uid)))
        return outcome, extra

    # ------------------------------------------------------------- Job writes

    async def start(self, state: JobState, tj: dict[str, Any], suspend: bool = False) -> dict[str, Any] | None:
        """Create the runner's account, role, binding and result Secret, then its Job. None: failed for good.
        ``suspend``: create it suspended (not admitted yet: it waits its turn in ``_started``)."""
        manifest = manifests.runner_job(tj, self.settings, suspend=_kueue(tj) or suspend)
        try:
            async with self._starting:
                await self._create_children(state, tj)
                job = await self.kube.create(manifest)
        except Exception as error:
            if status_code(error) not in (400, 422):
                raise
            await self._start_failed(state, tj, error)
            return None
        if job is None:  # created before (a restart, or the index lagging): it is ours by name
            job = await self.kube.read("Job", tj["metadata"]["namespace"], manifest["metadata"]["name"])
            if job is None:
                raise RuntimeError(f"Job {manifest['metadata']['name']} exists and vanished; retrying")
        elif state.first_seen is not None:
            metrics.JOB_CREATE_SECONDS.observe(time.monotonic() - state.first_seen)
        self._wrote_job(state, job)
        if not suspend:
            self.queue.settle(state.uid)
        return job

    async def _create_children(self, state: JobState, tj: dict[str, Any]) -> None:
        """The pod needs its ServiceAccount and the runner its Secret: all before the Job."""
        children = manifests.children(tj, self.settings)
        created = await asyncio.gather(*(self.kube.create(obj) for obj in children))
        for obj, result in zip(children, created):
            if result is None:  # it existed: ours from before a restart, or a namesake's
                await self._check_ours(obj, state.uid)

    async def _check_ours(self, obj: dict[str, Any], uid: str) -> None:
        meta = obj["metadata"]
        existing = await self.kube.read(obj["kind"], meta["namespace"], meta["name"])
        owner = ((existing or {}).get("metadata", {}).get("labels") or {}).get(LABEL_JOB_UID)
        if existing is None or owner != uid:
            # A deleted TranscriptionJob of the same name is still being cleaned up: try again soon.
            raise RuntimeError(f"{obj['kind']} {meta['name']} still belongs to a previous TranscriptionJob "
                               f"({owner or 'gone'}); retrying")

    async def _start_failed(self, state: JobState, tj: dict[str, Any], error: Exception) -> None:
        """The operator's pod template is invalid: retrying cannot help; say so on the job."""
        outcome = Outcome(Phase.Failed, Reason.JobCreateFailed, f"cannot create the runner Job: {api_message(error)}",
                          completion_time=_now())
        self.queue.forget(state.uid)
        await self.write_status(state, tj, outcome, job_name=None, now=_now())
        self._admit_waiting()

    async def _patch_job(self, state: JobState, job: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        job = await self.kube.patch_job(meta["namespace"], meta["name"], patch)
        self._wrote_job(state, job)
        return job

    def _wrote_job(self, state: JobState, job: dict[str, Any]) -> None:
        state.written_job = job  # until the index catches up
        self.note_job(None, job)

    async def stop_job(self, state: JobState, job: dict[str, Any]) -> None:
        """The operator failed the job itself: remove its Job and Pods so nothing keeps running."""
        namespace = job["metadata"]["namespace"]
        await self.kube.delete("Job", namespace, job["metadata"]["name"], uid=job["metadata"].get("uid"))
        for pod in self.pods_for(state.uid):
            await self.kube.delete("Pod", namespace, pod["metadata"]["name"], uid=pod["metadata"].get("uid"))
        state.written_job = None
        state.capacity = None

    # ----------------------------------------------------------------- status

    def _order_to_keep(self, state: JobState, tj: dict[str, Any], outcome: Outcome,
                       job_name: str | None) -> dict[str, str]:  # fmt: skip
        """The queue-order annotation, when this status write would move the resourceVersion of a job
        that may still have to wait its turn under a cap (objectmeta.py). A job started at once never
        waits: its first status write names its Job, and it is spared the metadata write."""
        capped = self.queue.max_total is not None or self.queue.max_per_namespace is not None
        if not capped or state.order is None or outcome.terminal or is_terminal(tj) or _kueue(tj) \
                or job_name or (tj.get("status") or {}).get("jobName") or self.job_for(state) is not None:
            return {}
        return {objectmeta.ANNOTATION_QUEUE_ORDER: str(state.order)}

    async def write_status(
        self, state: JobState, tj: dict[str, Any], outcome: Outcome, *, job_name: str | None, now: datetime,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The outcome (and ``extra`` operator-owned fields: runtime, assignment) as one merge patch."""
        meta = tj["metadata"]
        status = tj.get("status") or {}
        patch = status_patch(tj, outcome, job_name=job_name, model=self._model(tj), now=now) or {}
        patch.update({key: value for key, value in (extra or {}).items() if status.get(key) != value})
        if not patch:
            return tj
        order = self._order_to_keep(state, tj, outcome, job_name)
        if order:
            updated = await self._sync_metadata(state, tj, order)
            if updated is None:
                return tj  # deleted meanwhile: its events follow
            tj = updated
        before = tj.get("status") or {}
        updated = await self.kube.patch_tj_status(meta["namespace"], meta["name"], patch)
        self._keep_newest(state, updated)
        if (before.get("phase"), before.get("reason")) != (outcome.phase, outcome.reason):
            self._transition(tj, before, outcome, updated)
        return updated

    def _transition(self, tj: dict[str, Any], before: dict[str, Any], outcome: Outcome, updated: dict) -> None:
        """A phase or reason changed: a log line, an Event, metrics."""
        meta = tj["metadata"]
        log.info("%s/%s: %s (%s): %s", meta["namespace"], meta["name"], outcome.phase, outcome.reason,
                 outcome.message)
        type_ = "Warning" if outcome.phase == "Failed" else "Normal"
        self._background_task(self._post_event(tj, type_, outcome))
        _count_transition(tj, before, outcome, updated.get("status") or {})

    def _background_task(self, work: Any) -> None:
        """Events are for people: posting one must never hold up or break a reconcile."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_event(self, tj: dict[str, Any], type_: str, outcome: Outcome) -> None:
        try:
            await self.kube.event(tj, type_=type_, reason=outcome.reason, message=outcome.message,
                                  component=self.settings.event_component)
        except Exception as error:
            log.warning("could not post an Event on %s: %s", tj["metadata"]["name"], api_message(error))

    # -------------------------------------------------------- after the end

    async def after_finish(self, state: JobState, tj: dict[str, Any]) -> None:
        """Webhook delivery, then the TTL: delete the TranscriptionJob when it expires (a GitOps-managed
        one is kept: only its runner goes)."""
        if self._webhook_in_flight(state, tj):
            return  # the TTL waits: the delivery pokes the job when it ends
        ttl = _spec(tj).get("ttlSecondsAfterFinished")
        if ttl is None:
            ttl = self.settings.default_ttl_seconds_after_finished
        done = parse_time((tj.get("status") or {}).get("completionTime"))
        if ttl is None or done is None or state.expired:
            return  # kept forever, or expired already (deletion accepted, or the runner removed)
        expiry = done + timedelta(seconds=ttl)
        if _now() < expiry:
            self.poke_at(state.uid, expiry)
            return
        meta = tj["metadata"]
        marker = objectmeta.gitops_marker(tj, self.settings.gitops)
        if marker:
            await self._expire_in_place(state, tj, marker, ttl)
            state.expired = True
            return
        log.info("%s/%s: TTL of %ss after finishing expired; deleting", meta["namespace"], meta["name"], ttl)
        # The deletion (or the DELETED event) then removes the children.
        await self.kube.delete_tj(meta["namespace"], meta["name"], meta["uid"])
        state.expired = True

    async def _expire_in_place(self, state: JobState, tj: dict[str, Any], marker: str, ttl: int) -> None:
        """A GitOps tool keeps this job in the cluster: deleting it would only have it re-created and
        run again. Remove the heavy part (runner Job, pods, runner account); keep the job and its result."""
        if self.job_for(state) is None and not self.pods_for(state.uid):
            return  # done before (this process, or one before a restart)
        meta = tj["metadata"]
        namespace, selector = meta["namespace"], f"{LABEL_JOB_UID}={meta['uid']}"
        # The account first: a retry after a failure still finds the Job and does it all again.
        await asyncio.gather(*(self.kube.delete_labelled(kind, namespace, selector)
                               for kind in ("RoleBinding", "Role", "ServiceAccount")))
        await self.stop_runner(state, tj)
        message = (f"TTL of {ttl}s expired; kept because {marker} says a GitOps tool manages it (deleting it would "
                   "re-create and re-run it): its runner Job and pods were removed, its result is kept")
        log.info("%s/%s: %s", namespace, meta["name"], message)
        self._background_task(self._post_event(tj, "Normal", Outcome(Phase.Succeeded, "TTLExpired", message)))

    def _webhook_in_flight(self, state: JobState, tj: dict[str, Any]) -> bool:
        """Start the job's webhook delivery if one is owed; True while one runs."""
        if state.webhook is None and not state.webhook_settled and self.webhooks.owed(tj):
            delivery = self.webhooks.deliver(tj, lambda body: self._keep_newest(state, body))
            state.webhook = asyncio.get_running_loop().create_task(delivery, name=f"webhook-{state.uid}")
            state.webhook.add_done_callback(lambda task: self._webhook_ended(state, task))
        return state.webhook is not None

    def _webhook_ended(self, state: JobState, task: asyncio.Task) -> None:
        state.webhook = None
        if task.cancelled():
            return  # the operator is stopping: a restart delivers what is still owed
        if task.exception() is not None:
            log.error("webhook delivery of %s crashed", self._describe(state), exc_info=task.exception())
        state.webhook_settled = True
        self.poke(state.uid)  # the TTL may proceed now

    async def cleanup(self, state: JobState, tj: dict[str, Any]) -> None:
        """The TranscriptionJob is gone (cancel or TTL): stop its runner, remove its children now.

        A real cluster's garbage collector would do this through the ownerReferences, but the
        Pod must stop at once and the operator must not depend on a collector being present.
        """
        await self.stop_runner(state, tj)
        await self.remove_children(state, tj)

    async def _unassign(self, state: JobState, tj: dict[str, Any]) -> None:
        """A pool worker stops an attempt that is no longer assigned to it (the job lingers while its
        finalizer is held, so the worker would not see it vanish yet)."""
        assignment = _assignment(tj)
        if not assignment.get("worker"):
            return
        meta = tj["metadata"]
        try:
            self._keep_newest(state, await self.kube.patch_tj_status(meta["namespace"], meta["name"],
                                                             {"assignment": {**assignment, "worker": None}}))
        except Exception as error:
            if status_code(error) != 404:
                raise

    async def stop_runner(self, state: JobState, tj: dict[str, Any]) -> None:
        """Delete the job's runner Job, then its Pods: by the uid label, so a namesake keeps its own."""
        meta = tj["metadata"]
        selector = f"{LABEL_JOB_UID}={meta['uid']}"
        await self.kube.delete_labelled("Job", meta["namespace"], selector)  # first, so no new pod is made
        await self.kube.delete_labelled("Pod", meta["namespace"], selector)
        state.written_job = None
        state.capacity = None
        state.stopped = True

    async def remove_children(self, state: JobState, tj: dict[str, Any]) -> None:
        """The result Secret, the runner's account, role and binding, and an S3 result."""
        meta = tj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if state.timer:
            state.timer.cancel()
            state.timer = None
        selector = f"{LABEL_JOB_UID}={uid}"
        await asyncio.gather(*(self.kube.delete_labelled(kind, namespace, selector)
                               for kind in ("Secret", "RoleBinding", "Role", "ServiceAccount")))
        ref = self._s3_ref(tj)
        if ref:  # a Secret result went with the Secrets above
            await self._delete_s3_result(tj, ref)
        state.cleaned = True
        log.info("%s/%s deleted: removed its Job, pods, result and runner RBAC", namespace, name)

    def _s3_ref(self, tj: dict[str, Any]) -> dict[str, Any] | None:
        """Where an S3 result is, or would be: the runner may have stored it without saying so yet."""
        ref = (tj.get("status") or {}).get("result") or {}
        if ref.get("store") == "s3":
            return ref
        settings = self.result_settings
        if settings.result_store == "s3" and settings.s3_bucket:
            key = results.s3_key(settings, results.JobRef.of(tj))
            return {"store": "s3", "ref": f"s3://{settings.s3_bucket}/{key}"}
        return None

    async def _delete_s3_result(self, tj: dict[str, Any], ref: dict[str, Any]) -> None:
        """S3 objects have no owner references: the operator deletes them (same IFW_S3_* env as the runner).

        boto3 retries on its own; a store that still fails is reported, and the deletion goes on.
        """
        meta = tj["metadata"]
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: results.delete_result(ref, meta["namespace"], settings=self.result_settings)
            )
        except Exception as error:  # never block the cleanup of the Kubernetes objects on it
            message = f"could not delete the result {ref.get('ref')}: {error}"
            log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
            self._background_task(self._post_event(tj, "Warning", Outcome(Phase.Failed, "ResultNotDeleted", message)))


def _count_transition(tj: dict[str, Any], before: dict[str, Any], outcome: Outcome, status: dict[str, Any]) -> None:
    """Metrics of a transition the operator wrote itself (so a restart never counts one twice)."""
    if outcome.phase == "Running" and before.get("phase") != "Running" and not before.get("startTime"):
        created = parse_time(tj["metadata"].get("creationTimestamp"))
        started = parse_time(status.get("startTime"))
        if created and started:
            metrics.TIME_TO_START_SECONDS.observe(max(0.0, (started - created).total_seconds()))
    if outcome.terminal and before.get("phase") not in TERMINAL_PHASES:
        metrics.FINISHED_TOTAL.labels(outcome.phase).inc()
        if outcome.phase == "Failed":
            metrics.FAILURES_TOTAL.labels(outcome.reason).inc()
        metrics.observe_finished(outcome.phase, status)  # audio seconds, real-time factor
        started, done = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
        if started and done:
            metrics.RUN_DURATION_SECONDS.labels(outcome.phase).observe(max(0.0, (done - started).total_seconds()))
