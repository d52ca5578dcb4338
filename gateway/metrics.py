"""Prometheus metrics of the gateway (served at /metrics, unauthenticated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "ifw_gateway_requests_total",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "ifw_gateway_request_duration_seconds",
    "HTTP request duration by route template.",
    ["route", "method"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
TJS_CREATED = Counter(
    "ifw_gateway_jobs_created_total", "TranscriptionJobs created, by mode (name kept for dashboards).", ["mode"], registry=REGISTRY
)
SYNC_WAIT_SECONDS = Histogram(
    "ifw_gateway_sync_wait_seconds",
    "How long sync requests waited for their TranscriptionJob, by outcome.",
    ["outcome"],
    registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
WAITERS = Gauge("ifw_gateway_sync_waiters", "Sync requests waiting on a TranscriptionJob right now.", registry=REGISTRY)
WATCH_EVENTS = Counter(
    "ifw_gateway_watch_events_total", "TranscriptionJob watch events by type.", ["type"], registry=REGISTRY
)
WATCH_LISTS = Counter(
    "ifw_gateway_watch_lists_total", "Full lists (start-up and after 410 Gone).", registry=REGISTRY
)
WATCH_ERRORS = Counter(
    "ifw_gateway_watch_errors_total", "Watch interruptions retried with backoff.", registry=REGISTRY
)
UPLOAD_BYTES = Counter("ifw_gateway_upload_bytes_total", "Bytes of audio uploaded.", registry=REGISTRY)
COMPLETION_TO_RESPONSE = Histogram(
    "ifw_gateway_completion_to_response_seconds",
    "From the watch reading a waited-on TranscriptionJob's completion to its rendered result (read from the store).",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5),
)
