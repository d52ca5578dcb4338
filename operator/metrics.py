"""Prometheus metrics of the operator (prometheus-client).

Counters and histograms are observed when the operator itself records a transition, so a
restart never counts a job twice. Gauges (jobs by phase, queue length, active runners) are
read from the operator's state at scrape time by a collector.
"""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ifw.core.contract import PHASES

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
