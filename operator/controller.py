"""The reconciler: one level-based pass per TranscriptionJob, serialised per job.

Every event (the TranscriptionJob changed, its Job changed, one of its Pods changed, a deadline
or TTL came due, the periodic resync) only *pokes* the job's uid. A poke runs ``reconcile`` for
that uid, or marks it dirty if one is already running so that it runs once more afterwards
(the work-queue pattern of controller-runtime). ``reconcile`` looks at the whole current state
(the last TranscriptionJob seen, its Job and Pods from kopf's indexes) and does what is missing;
it never depends on which event woke it, so bursts, lost events and restarts are harmless.

The operator writes nothing to the TranscriptionJob except its own status fields: no kopf
annotations or finalizers (kopf's on.event/index handlers need none), so a spec stays small
and a deletion is never blocked by the operator being down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from ifw.core import results
from ifw.core.contract import (
    ANNOTATION_RESUMED_AT,
    LABEL_JOB_UID,
    LABEL_KUEUE_QUEUE,
    TERMINAL_PHASES,
    format_time,
    parse_time,
)
from ifw.core.kube import api_message, status_code
from ifw.operator import jobs as manifests
from ifw.operator import metrics
from ifw.operator.config import OperatorSettings
from ifw.operator.kube import Kube
from ifw.operator.queue import AdmissionQueue
from ifw.operator.status import Outcome, derive, job_finished, job_suspended, status_patch

log = logging.getLogger("ifw.operator")

RETRY_DELAYS = (0.5, 1, 2, 5, 10, 30, 60)


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


class Controller:
    def __init__(self, settings: OperatorSettings, kube: Kube):
        self.settings = settings
        self.kube = kube
        self.queue = AdmissionQueue(
            settings.max_active_jobs, settings.max_active_jobs_per_namespace, settings.admission_settle_seconds
        )
        self.tjs: dict[str, dict[str, Any]] = {}  # uid -> latest TranscriptionJob seen
        self.tombstones: dict[str, dict[str, Any]] = {}  # uid -> last body of a deleted one
        self.first_seen: dict[str, float] = {}  # uid -> monotonic time the operator first saw it
        # Jobs this operator created whose watch event has not arrived yet (the index lags).
        self.created_jobs: dict[str, dict[str, Any]] = {}
        self.jobs_index: Any = {}  # kopf.Index: tj uid -> Store of Job bodies
        self.pods_index: Any = {}  # kopf.Index: tj uid -> Store of Pod bodies
        self.ready = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._dirty: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}
        self._webhooks: dict[str, asyncio.Task] = {}  # uid -> webhook delivery in flight
        self._background: set[asyncio.Task] = set()  # Event posts
        self._expired: set[str] = set()  # TTL passed, delete requested
        self._active: dict[str, str] = {}  # tj uid -> namespace of each Job holding capacity
        # Starts in flight at once. Without a bound, a burst of N jobs queues all N*4 child
        # creations ahead of the first Job (FIFO thread pool) and every job waits for the last.
        self._starting = asyncio.Semaphore(settings.concurrent_starts)

    # ------------------------------------------------------------- observation

    def bind_indexes(self, jobs_index: Any, pods_index: Any) -> None:
        """Called from the first handler: kopf has listed every runner Job by then."""
        self.jobs_index, self.pods_index = jobs_index, pods_index
        for uid in list(jobs_index):
            for job in jobs_index.get(uid) or []:
                self.note_job(None, job)
        self.ready.set()

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body["metadata"]["uid"]
        if event_type == "DELETED":
            self.tjs.pop(uid, None)
            self.tombstones[uid] = body
        elif _newer(body, self.tjs.get(uid)):
            self.tjs[uid] = body
            self.first_seen.setdefault(uid, time.monotonic())
        self.poke(uid)

    def job_for(self, uid: str) -> dict[str, Any] | None:
        """The newest known version of the job's Job: the index's, or the one we just wrote."""
        store = self.jobs_index.get(uid) if self.jobs_index else None
        indexed = max(store, key=lambda job: _rv(job) or 0) if store else None
        mine = self.created_jobs.get(uid)
        if mine is not None and (indexed is None or (_rv(indexed) or 0) < (_rv(mine) or 0)):
            return mine
        self.created_jobs.pop(uid, None)  # the index has caught up
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
        """Keep the map of capacity-holding Jobs current (one dict update, not a scan per decision)."""
        uid = (job["metadata"].get("labels") or {}).get(LABEL_JOB_UID)
        if not uid:
            return
        if event_type != "DELETED" and self._counted(job):
            self._active[uid] = job["metadata"]["namespace"]
        else:
            self._active.pop(uid, None)

    def observe_job(self, event_type: str | None, job: dict[str, Any]) -> None:
        self.note_job(event_type, job)
        self.poke(job["metadata"]["labels"][LABEL_JOB_UID])

    def active(self) -> dict[str, str]:
        """uid -> namespace of every runner Job holding capacity."""
        return self._active

    def phases(self) -> list[str]:
        return [(tj.get("status") or {}).get("phase") or "Pending" for tj in self.tjs.values()]

    # ----------------------------------------------------------------- pokes

    def poke(self, uid: str) -> None:
        if uid in self._tasks:
            self._dirty.add(uid)
            return
        self._tasks[uid] = asyncio.get_running_loop().create_task(self._work(uid), name=f"reconcile-{uid}")

    def poke_at(self, uid: str, when: datetime) -> None:
        delay = max(0.0, (when - _now()).total_seconds()) + 0.05
        old = self._timers.pop(uid, None)
        if old:
            old.cancel()
        self._timers[uid] = asyncio.get_running_loop().call_later(delay, self._timer_fired, uid)

    def _timer_fired(self, uid: str) -> None:
        self._timers.pop(uid, None)
        self.poke(uid)

    async def _work(self, uid: str) -> None:
        try:
            while True:
                self._dirty.discard(uid)
                try:
                    await self.reconcile(uid)
                    self._failures.pop(uid, None)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # retried with backoff; level-based, so nothing is lost
                    metrics.RECONCILE_ERRORS_TOTAL.inc()
                    attempt = self._failures.get(uid, 0)
                    self._failures[uid] = attempt + 1
                    delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                    log.warning("reconcile of %s failed (%s); retrying in %ss", self._describe(uid),
                                api_message(error), delay, exc_info=status_code(error) is None)
                    self.poke_at(uid, _now() + timedelta(seconds=delay))
                if uid not in self._dirty:
                    break
        finally:
            self._tasks.pop(uid, None)

    def _describe(self, uid: str) -> str:
        tj = self.tjs.get(uid) or self.tombstones.get(uid)
        return f"{tj['metadata']['namespace']}/{tj['metadata']['name']}" if tj else uid

    async def resync_forever(self) -> None:
        """The safety net under the events: every job is looked at again every interval."""
        await self.ready.wait()
        while True:
            await asyncio.sleep(self.settings.resync_interval_seconds)
            for uid in list(self.tjs):
                self.poke(uid)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        tasks = [*self._tasks.values(), *self._webhooks.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -------------------------------------------------------------- admission

    def _admit_waiting(self, current: str | None = None) -> None:
        if not len(self.queue):
            return
        # Counting the active Jobs walks them all: skip it when nothing is capped.
        uncapped = self.queue.max_total is None and self.queue.max_per_namespace is None
        for uid in self.queue.admit({} if uncapped else self.active(), time.monotonic()):
            if uid != current:
                self.poke(uid)

    def _enqueue(self, tj: dict[str, Any]) -> None:
        meta = tj["metadata"]
        revision = int(meta.get("resourceVersion") or 0)
        self.queue.enqueue(meta["uid"], meta["namespace"], meta.get("creationTimestamp") or "", revision,
                           time.monotonic())

    def _settling(self, uid: str) -> bool:
        """A job not admitted only because it (or an older one) is settling: come back then, write nothing."""
        now = time.monotonic()
        held = self.queue.held_until(uid, now)
        if held is None:
            return False
        self.poke_at(uid, _now() + timedelta(seconds=held - now))
        return True

    # -------------------------------------------------------------- reconcile

    async def reconcile(self, uid: str) -> None:
        tj = self.tjs.get(uid)
        if tj is None:
            body = self.tombstones.pop(uid, None)
            self.queue.forget(uid)
            if body is not None:
                await self.cleanup(body)
            self._admit_waiting()
            return

        status = tj.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            self.queue.forget(uid)
            self._admit_waiting()
            await self.after_finish(tj)
            return

        spec = tj.get("spec") or {}
        meta = tj["metadata"]
        namespace = meta["namespace"]
        kueue = bool(spec.get("queueName"))
        job = self.job_for(uid)
        if job is not None:
            self.queue.settle(uid)
        waiting: tuple[str, str] | None = None
        suspended_msg = ("Suspended", "spec.suspend is true; set it to false to run the job")

        if job is None and not status.get("jobName"):
            if spec.get("suspend"):
                self.queue.forget(uid)
                waiting = suspended_msg
            else:
                if not kueue:
                    self._enqueue(tj)
                    self._admit_waiting(current=uid)
                if kueue or self.queue.is_reserved(uid):
                    job = await self.start(tj)
                    if job is None:
                        return  # failed permanently; status already written
                elif self._settling(uid):
                    return
                else:
                    waiting = ("ConcurrencyLimit", self.queue.describe(self.active(), namespace))
        elif job is not None and not kueue and not job_finished(job):
            if spec.get("suspend"):
                self.queue.forget(uid)
                waiting = suspended_msg
                if not job_suspended(job):
                    # The Job controller deletes the pod; a resume starts it again.
                    job = await self.kube.patch_job(namespace, job["metadata"]["name"], {"spec": {"suspend": True}})
                    self.created_jobs[uid] = job
                    self.note_job(None, job)
                    self._admit_waiting()
            elif job_suspended(job):
                self._enqueue(tj)
                self._admit_waiting(current=uid)
                if self._settling(uid):
                    return
                if self.queue.is_reserved(uid):
                    job = await self.kube.patch_job(
                        namespace, job["metadata"]["name"],
                        {"metadata": {"annotations": {ANNOTATION_RESUMED_AT: format_time(_now())}},
                         "spec": {"suspend": False}},
                    )
                    self.created_jobs[uid] = job  # until the index catches up
                    self.note_job(None, job)
                else:
                    waiting = ("ConcurrencyLimit", self.queue.describe(self.active(), namespace))

        now = _now()
        outcome = derive(
            tj, job, self.pods_for(uid), now=now,
            startup_deadline_seconds=self.settings.startup_deadline_seconds,
            image_pull_grace_seconds=self.settings.image_pull_grace_seconds,
            waiting=waiting,
        )
        if outcome.stop_job and job is not None:
            await self.stop_job(uid, job)
        job_name = job["metadata"]["name"] if job else status.get("jobName")
        tj = await self.write_status(tj, outcome, job_name=job_name, now=now)
        if outcome.terminal:
            self.queue.forget(uid)
            self._admit_waiting()
            await self.after_finish(tj)
        elif outcome.recheck_at:
            self.poke_at(uid, outcome.recheck_at)

    async def start(self, tj: dict[str, Any]) -> dict[str, Any] | None:
        """Create the runner's account, role, binding and result Secret, then its Job."""
        uid = tj["metadata"]["uid"]
        kueue = bool((tj.get("spec") or {}).get("queueName"))
        manifest = manifests.runner_job(tj, self.settings, suspend=kueue)
        try:
            async with self._starting:
                # The pod needs its ServiceAccount and the runner its Secret: all before the Job.
                children = manifests.children(tj)
                created = await asyncio.gather(*(self.kube.create(obj) for obj in children))
                for obj, result in zip(children, created):
                    if result is None:  # it existed: ours from before a restart, or a namesake's
                        await self._check_ours(obj, uid)
                job = await self.kube.create(manifest)
        except Exception as error:
            if status_code(error) in (400, 422):
                # The operator's pod template is invalid: retrying cannot help; say so on the job.
                outcome = Outcome("Failed", "JobCreateFailed", f"cannot create the runner Job: {api_message(error)}",
                                  completion_time=_now())
                self.queue.forget(uid)
                await self.write_status(tj, outcome, job_name=None, now=_now())
                self._admit_waiting()
                return None
            raise
        if job is None:  # created before (a restart, or the index lagging): it is ours by name
            job = await self.kube.read("Job", tj["metadata"]["namespace"], manifest["metadata"]["name"])
            if job is None:
                raise RuntimeError(f"Job {manifest['metadata']['name']} exists and vanished; retrying")
        else:
            seen = self.first_seen.get(uid)
            if seen is not None:
                metrics.JOB_CREATE_SECONDS.observe(time.monotonic() - seen)
        self.created_jobs[uid] = job
        self.note_job(None, job)
        self.queue.settle(uid)
        return job

    async def _check_ours(self, obj: dict[str, Any], uid: str) -> None:
        meta = obj["metadata"]
        existing = await self.kube.read(obj["kind"], meta["namespace"], meta["name"])
        owner = ((existing or {}).get("metadata", {}).get("labels") or {}).get(LABEL_JOB_UID)
        if existing is None or owner != uid:
            # A deleted TranscriptionJob of the same name is still being cleaned up: try again soon.
            raise RuntimeError(f"{obj['kind']} {meta['name']} still belongs to a previous TranscriptionJob "
                               f"({owner or 'gone'}); retrying")

    async def stop_job(self, uid: str, job: dict[str, Any]) -> None:
        """The operator failed the job itself: remove its Job and Pods so nothing keeps running."""
        namespace = job["metadata"]["namespace"]
        await self.kube.delete("Job", namespace, job["metadata"]["name"], uid=job["metadata"].get("uid"))
        for pod in self.pods_for(uid):
            await self.kube.delete("Pod", namespace, pod["metadata"]["name"], uid=pod["metadata"].get("uid"))
        self.created_jobs.pop(uid, None)
        self._active.pop(uid, None)

    async def write_status(
        self, tj: dict[str, Any], outcome: Outcome, *, job_name: str | None, now: datetime
    ) -> dict[str, Any]:
        meta = tj["metadata"]
        model = (tj.get("spec") or {}).get("model") or self.settings.default_model
        patch = status_patch(tj, outcome, job_name=job_name, model=model, now=now)
        if patch is None:
            return tj
        before = tj.get("status") or {}
        updated = await self.kube.patch_tj_status(meta["namespace"], meta["name"], patch)
        if _newer(updated, self.tjs.get(meta["uid"])):
            self.tjs[meta["uid"]] = updated
        if (before.get("phase"), before.get("reason")) != (outcome.phase, outcome.reason):
            self._transition(tj, before, outcome, updated)
        return updated

    def _transition(self, tj: dict[str, Any], before: dict[str, Any], outcome: Outcome, updated: dict) -> None:
        """A phase or reason changed: an Event, a log line, metrics."""
        meta = tj["metadata"]
        log.info("%s/%s: %s (%s): %s", meta["namespace"], meta["name"], outcome.phase, outcome.reason,
                 outcome.message)
        type_ = "Warning" if outcome.phase == "Failed" else "Normal"
        # Events are for people: posting one must never hold up or break a reconcile.
        task = asyncio.get_running_loop().create_task(self._post_event(tj, type_, outcome))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        status = updated.get("status") or {}
        if outcome.phase == "Running" and before.get("phase") != "Running" and not before.get("startTime"):
            created = parse_time(meta.get("creationTimestamp"))
            started = parse_time(status.get("startTime"))
            if created and started:
                metrics.TIME_TO_START_SECONDS.observe(max(0.0, (started - created).total_seconds()))
        if outcome.terminal and before.get("phase") not in TERMINAL_PHASES:
            metrics.FINISHED_TOTAL.labels(outcome.phase).inc()
            if outcome.phase == "Failed":
                metrics.FAILURES_TOTAL.labels(outcome.reason).inc()
            started, done = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
            if started and done:
                metrics.RUN_DURATION_SECONDS.labels(outcome.phase).observe(max(0.0, (done - started).total_seconds()))

    async def _post_event(self, tj: dict[str, Any], type_: str, outcome: Outcome) -> None:
        try:
            await self.kube.event(tj, type_=type_, reason=outcome.reason, message=outcome.message,
                                  component=self.settings.event_component)
        except Exception as error:
            log.warning("could not post an Event on %s: %s", tj["metadata"]["name"], api_message(error))

    # -------------------------------------------------------- after the end

    async def after_finish(self, tj: dict[str, Any]) -> None:
        """Webhook delivery, then the TTL: delete the TranscriptionJob when it expires."""
        uid = tj["metadata"]["uid"]
        await self.deliver_webhook(tj)
        ttl = (tj.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            ttl = self.settings.default_ttl_seconds_after_finished
        done = parse_time((tj.get("status") or {}).get("completionTime"))
        if ttl is None or done is None:
            return
        expiry = done + timedelta(seconds=ttl)
        if _now() >= expiry:
            if uid in self._expired:
                return  # already deleted; waiting for the DELETED event
            self._expired.add(uid)
            meta = tj["metadata"]
            log.info("%s/%s: TTL of %ss after finishing expired; deleting", meta["namespace"], meta["name"], ttl)
            # The DELETED event then removes the children (cleanup).
            await self.kube.delete_tj(meta["namespace"], meta["name"], uid)
        else:
            self.poke_at(uid, expiry)

    async def deliver_webhook(self, tj: dict[str, Any]) -> None:
        """Overridden by the webhook support (ifw.operator.webhooks); no-op without a webhook."""

    async def cleanup(self, tj: dict[str, Any]) -> None:
        """The TranscriptionJob is gone (cancel or TTL): stop its runner, remove its children now.

        A real cluster's garbage collector would do this through the ownerReferences, but the
        Pod must stop at once and the operator must not depend on a collector being present.
        """
        meta = tj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        timer = self._timers.pop(uid, None)
        if timer:
            timer.cancel()
        # By the uid label: a new TranscriptionJob reusing the name keeps its own children.
        selector = f"{LABEL_JOB_UID}={uid}"
        await self.kube.delete_labelled("Job", namespace, selector)  # first, so no new pod is made
        await asyncio.gather(
            *(self.kube.delete_labelled(kind, namespace, selector)
              for kind in ("Pod", "Secret", "RoleBinding", "Role", "ServiceAccount"))
        )
        ref = (tj.get("status") or {}).get("result") or {}
        if ref.get("store") == "s3":  # a Secret result went with the Secrets above
            await self._delete_s3_result(ref, namespace, name)
        self.created_jobs.pop(uid, None)
        self._active.pop(uid, None)
        self.first_seen.pop(uid, None)
        self._failures.pop(uid, None)
        self._expired.discard(uid)
        log.info("%s/%s deleted: removed its Job, pods, result and runner RBAC", namespace, name)

    async def _delete_s3_result(self, ref: dict[str, Any], namespace: str, name: str) -> None:
        """S3 objects have no owner references: the operator deletes them (same IFW_S3_* env as the runner)."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: results.delete_result(ref, namespace, settings=results.ResultSettings())
            )
        except Exception as error:  # never block the cleanup of the Kubernetes objects on it
            log.warning("%s/%s: could not delete result %s: %s", namespace, name, ref.get("ref"), error)
