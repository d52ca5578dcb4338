"""Prometheus metrics of the operator (prometheus-client).

Counters and histograms are observed when the operator itself records a transition, so a
restart never counts a job twice. Gauges (jobs by phase, queue length, active runners) are
read from the operator's state at scrape time by a collector.

The audio transcribed and the real-time factor are counted here, for both runtimes, from the
finished job's status (audio.durationSeconds, startTime, completionTime): a runner Job's pod is
short-lived and never scraped, the operator sees every job end.
"""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from threading import Lock
from time import monotonic
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ifw.core.contract import PHASES, parse_time

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_LONG = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)

JOB_CREATE_SECONDS = Histogram(
    "ifw_operator_job_create_seconds",
    "From the TranscriptionJob first seen by the operator to its runner Job created.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TIME_TO_START_SECONDS = Histogram(
    "ifw_operator_time_to_start_seconds",
    "From TranscriptionJob creation to its runner pod running (queueing, scheduling, image pull).",
    buckets=_SECONDS,
)
RUN_DURATION_SECONDS = Histogram(
    "ifw_operator_run_duration_seconds", "From the runner starting to the job finishing.", ["phase"], buckets=_LONG
)
FINISHED_TOTAL = Counter("ifw_operator_jobs_finished_total", "Jobs that finished, by phase.", ["phase"])
FAILURES_TOTAL = Counter("ifw_operator_job_failures_total", "Failed jobs by reason.", ["reason"])
RECONCILE_ERRORS_TOTAL = Counter("ifw_operator_reconcile_errors_total", "Reconciles that raised (retried).")
WEBHOOK_DELIVERIES_TOTAL = Counter(
    "ifw_operator_webhook_deliveries_total", "Webhook delivery attempts by outcome.", ["outcome"]
)

AUDIO_SECONDS_TOTAL = Counter(
    "ifw_operator_audio_seconds_total",
    "Seconds of audio transcribed by succeeded jobs, by model and runtime (Pool or Job).",
    ["model", "runtime"],
)
REAL_TIME_FACTOR = Histogram(
    "ifw_operator_real_time_factor",
    "Per succeeded job: seconds of audio over wall seconds from the runner starting to the job finishing "
    "(x real time: higher is faster; a Job's includes loading the model).",
    ["model", "runtime"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
ASSIGNMENT_WAIT_SECONDS = Histogram(
    "ifw_operator_pool_assignment_wait_seconds",
    "From a pool job's assignment to a worker (status.assignment.time) to the worker reporting it Running.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


def observe_finished(phase: str, status: Mapping[str, Any]) -> None:
    """A job the operator just wrote Succeeded: its audio and how fast it went (from its status)."""
    if phase != "Succeeded":
        return
    seconds = ((status.get("audio") or {}).get("durationSeconds")) or 0
    if not seconds or seconds <= 0:
        return
    labels = (status.get("model") or "unknown", status.get("runtime") or "Job")
    AUDIO_SECONDS_TOTAL.labels(*labels).inc(seconds)
    started, done = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    if started and done:
        # Both are whole seconds (metav1.Time): a job under a second counts as one.
        REAL_TIME_FACTOR.labels(*labels).observe(seconds / max(1.0, (done - started).total_seconds()))


class _Unstarted:
    """Pool jobs assigned to a worker that has not reported them Running yet, with when each was
    first seen so (kept across re-assignments: a job handed from worker to worker is still stuck).

    Filled by ``pool_pass``, called on every pass of the operator over a pool job (at least every
    resync); an entry not refreshed for ``stale_seconds`` (its job deleted meanwhile) is dropped."""

    def __init__(self, stale_seconds: float = 120.0):
        self.stale_seconds = stale_seconds
        self._since: dict[str, tuple[datetime, float]] = {}
        self._lock = Lock()

    def track(self, uid: str, now: datetime) -> None:
        with self._lock:
            first = self._since.get(uid, (now, 0.0))[0]
            self._since[uid] = (first, monotonic())

    def forget(self, uid: str) -> None:
        with self._lock:
            self._since.pop(uid, None)

    def oldest_seconds(self, now: datetime) -> float:
        with self._lock:
            fresh = monotonic() - self.stale_seconds
            for uid in [uid for uid, (_, seen) in self._since.items() if seen < fresh]:
                del self._since[uid]
            return max(((now - first).total_seconds() for first, _ in self._since.values()), default=0.0)

    def count(self) -> int:
        with self._lock:
            return len(self._since)


UNSTARTED = _Unstarted()


def pool_pass(tj: Mapping[str, Any], outcome: Any, extra: Mapping[str, Any], now: datetime) -> None:
    """The operator's pass over a pool job, before it writes ``outcome`` and ``extra``: observe how
    long the assignment waited when the worker's Running report is first seen, and keep the
    assigned-but-not-running jobs for ``ifw_operator_pool_unstarted_*``."""
    status = tj.get("status") or {}
    uid = (tj.get("metadata") or {}).get("uid") or ""
    assignment = (extra["assignment"] if "assignment" in extra else status.get("assignment")) or {}
    if outcome.phase == "Running" and status.get("phase") != "Running":
        assigned = parse_time((status.get("assignment") or {}).get("time"))
        reported = parse_time((status.get("execution") or {}).get("startTime")) or now
        if assigned is not None:
            ASSIGNMENT_WAIT_SECONDS.observe(max(0.0, (reported - assigned).total_seconds()))
    if outcome.phase == "Pending" and assignment.get("worker") and extra.get("runtime", "Pool") == "Pool":
        UNSTARTED.track(uid, now)
    else:
        UNSTARTED.forget(uid)


class _UnstartedCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        oldest = UNSTARTED.oldest_seconds(datetime.now(timezone.utc))  # first: drops stale entries
        yield GaugeMetricFamily("ifw_operator_pool_unstarted_jobs",
                                "Pool jobs assigned to a worker that has not reported them Running yet.",
                                value=UNSTARTED.count())  # fmt: skip
        yield GaugeMetricFamily(
            "ifw_operator_pool_unstarted_oldest_seconds",
            "How long the oldest assigned-but-not-running pool job has waited since it was first assigned "
            "(re-assignments included); 0 when none waits.",
            value=oldest,
        )


REGISTRY.register(_UnstartedCollector())


class StateCollector(Collector):
    """Jobs by phase, waiting jobs, active runners and the pool, read from the controller on scrape."""

    def __init__(self, phases: Callable[[], list[str]], queued: Callable[[], int], active: Callable[[], int],
                 pool: Callable[[], dict[str, int]] | None = None):  # fmt: skip
        self._phases, self._queued, self._active, self._pool = phases, queued, active, pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = _Counter(self._phases())
        by_phase = GaugeMetricFamily("ifw_operator_jobs", "TranscriptionJobs by phase.", labels=["phase"])
        for phase in PHASES:
            by_phase.add_metric([phase], counts.get(phase, 0))
        yield by_phase
        yield GaugeMetricFamily(
            "ifw_operator_queue_length", "TranscriptionJobs waiting for capacity.", value=self._queued()
        )
        yield GaugeMetricFamily("ifw_operator_active_jobs", "Runner Jobs holding capacity.", value=self._active())
        if self._pool is None:
            return
        stats = self._pool()
        # The autoscaler's input: pool jobs waiting for a slot plus those being worked on, against
        # the slots the ready workers offer (desired workers = demand / slots per worker).
        demand = GaugeMetricFamily("ifw_operator_pool_jobs", "Unfinished pool jobs, by state.", labels=["state"])
        for state in ("waiting", "assigned"):
            demand.add_metric([state], stats[state])
        yield demand
        workers = GaugeMetricFamily("ifw_operator_pool_workers", "Pool workers holding a Lease.", labels=["state"])
        workers.add_metric(["ready"], stats["workers_ready"])
        workers.add_metric(["draining"], stats["workers_draining"])
        yield workers
        yield GaugeMetricFamily("ifw_operator_pool_capacity", "Job slots of the ready pool workers.",
                                value=stats["capacity"])  # fmt: skip


def serve(port: int, registry: CollectorRegistry = REGISTRY):
    """Start /metrics on ``port``; returns the server (call ``.shutdown()`` to stop it)."""
    server, _thread = start_http_server(port, registry=registry)
    return server
