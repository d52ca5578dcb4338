"""kopf registrations: thin, they only feed the Controller (ifw.operator.controller).

- indexes of the runner Jobs and their Pods, keyed by the TranscriptionJob uid label: kopf
  lists both before calling any handler, so after a restart the operator knows every Job that
  already exists before it decides anything (no second Job, no over-admission);
- event handlers on TranscriptionJobs, Jobs and Pods that poke the job's reconcile (a Pod
  deleted before it ended is remembered: the index forgets it);
- startup/cleanup: settings, the API client, the Controller with its WebhookSender, the resync
  loop, the metrics server;
- a liveness probe.

No on.create/on.update handlers on purpose: those make kopf write its progress and last-handled
spec into annotations on every object; these handlers need nothing stored on the object.

Per watch event kopf itself costs CPU too (a burst of 500 jobs is some 2,000 events): the
settings below take out what these handlers do not use (the essence of each body kept for
change handlers, a log line per handled event), and the handlers are coroutines, so none waits
for a thread of kopf's executor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from ifw.core import kube
from ifw.core.contract import LABEL_JOB_UID, LABEL_POOL_WORKER
from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from ifw.operator.config import OperatorSettings, get_settings
from ifw.operator.controller import Controller
from ifw.operator.kube import Kube
from ifw.operator.webhooks import WebhookSender

log = logging.getLogger("ifw.operator")


def configure_kopf(settings: kopf.OperatorSettings, config: OperatorSettings) -> None:
    # Stale watches are kopf's most reported failure: bound them on both sides.
    # An int: kopf passes it verbatim as timeoutSeconds, which the apiserver parses as an integer.
    settings.watching.server_timeout = int(config.watch_server_timeout_seconds)
    settings.watching.client_timeout = config.watch_client_timeout_seconds
    settings.watching.connect_timeout = 30
    # Watches are label-filtered client-side by default; filter Jobs and Pods on the server.
    settings.watching.label_selectors["batch", "jobs"] = LABEL_JOB_UID
    settings.watching.label_selectors["v1", "pods"] = LABEL_JOB_UID
    settings.watching.label_selectors["coordination.k8s.io", "leases"] = f"{LABEL_POOL_WORKER}=true"
    settings.posting.reporting_component = config.event_component
    # One replica (Deployment strategy Recreate): no peering objects needed.
    settings.peering.standalone = True
    # kopf builds a diff base of every event's body (a deep copy) for on.create/on.update/on.field
    # handlers; there are none, so that copy of every Job, Pod and TranscriptionJob body is waste.
    settings.persistence.diffbase_storage = NoDiffBase()
    # "Handler 'transcriptionjob_event' succeeded." for every event of every object: noise, and
    # CPU for each line formatted. Warnings and errors (a handler that failed) still show.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


class NoDiffBase(kopf.DiffBaseStorage):
    """No essence, nothing stored: only change handlers use it, and the operator has none."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def make_controller(config: OperatorSettings) -> Controller:
    # A connection for each thread that calls: the API threads and Kube's two for Events. A smaller
    # pool discards (closes) connections in a burst, and each new one costs a TLS handshake.
    api = kube.api_client(pool_size=config.api_threads + 2, component="operator")
    writes = Kube(api, config.api_threads)
    return Controller(config, writes, WebhookSender(config, writes))


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Tests and embedders hand a config in through the memo; a deployment reads file + env.
    config: OperatorSettings = getattr(memo, "config", None) or get_settings()
    configure_kopf(settings, config)
    controller = make_controller(config)
    memo.controller = controller
    memo.resync = asyncio.get_running_loop().create_task(controller.resync_forever())
    memo.metrics_server = None
    if config.metrics_port:
        from prometheus_client import REGISTRY

        from ifw.operator import metrics

        memo.collector = metrics.StateCollector(
            controller.phases, lambda: len(controller.queue), lambda: len(controller.active()), controller.pool_stats
        )
        REGISTRY.register(memo.collector)
        memo.metrics_server = metrics.serve(config.metrics_port)
    log.info(
        "ifw operator starting: maxActiveJobs=%s perNamespace=%s image=%s",
        config.max_active_jobs, config.max_active_jobs_per_namespace, config.runner.image,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = getattr(memo, "controller", None)
    resync = getattr(memo, "resync", None)
    if resync:
        resync.cancel()
    if controller:
        await controller.stop()
        controller.kube.close()
    if getattr(memo, "metrics_server", None):
        from prometheus_client import REGISTRY

        memo.metrics_server.shutdown()
        memo.metrics_server.server_close()  # free the port: kopf may be started again in this process
        REGISTRY.unregister(memo.collector)


@kopf.index("batch", "v1", "jobs", labels={LABEL_JOB_UID: kopf.PRESENT})
async def runner_jobs(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    return {labels[LABEL_JOB_UID]: dict(body)}


@kopf.index("v1", "pods", labels={LABEL_JOB_UID: kopf.PRESENT})
async def runner_pods(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    return {labels[LABEL_JOB_UID]: dict(body)}


@kopf.index("coordination.k8s.io", "v1", "leases", labels={LABEL_POOL_WORKER: "true"})
async def pool_workers(body: kopf.Body, name: str, **_: Any) -> dict[str, dict[str, Any]]:
    return {name: dict(body)}


def _controller(memo: kopf.Memo, runner_jobs: kopf.Index, runner_pods: kopf.Index,
                pool_workers: kopf.Index) -> Controller:  # fmt: skip
    controller: Controller = memo.controller
    if not controller.ready.is_set():
        controller.bind_indexes(runner_jobs, runner_pods, pool_workers)
    return controller


@kopf.on.event(GROUP, VERSION, PLURAL)
async def transcriptionjob_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, runner_jobs: kopf.Index, runner_pods: kopf.Index,
    pool_workers: kopf.Index, **_: Any,
) -> None:
    _controller(memo, runner_jobs, runner_pods, pool_workers).observe(type, dict(body))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB_UID: kopf.PRESENT})
async def job_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, runner_jobs: kopf.Index, runner_pods: kopf.Index,
    pool_workers: kopf.Index, **_: Any,
) -> None:
    _controller(memo, runner_jobs, runner_pods, pool_workers).observe_job(type, dict(body))


@kopf.on.event("v1", "pods", labels={LABEL_JOB_UID: kopf.PRESENT})
async def pod_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, runner_jobs: kopf.Index, runner_pods: kopf.Index,
    pool_workers: kopf.Index, **_: Any,
) -> None:
    _controller(memo, runner_jobs, runner_pods, pool_workers).observe_pod(type, dict(body))


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={LABEL_POOL_WORKER: "true"})
async def lease_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, runner_jobs: kopf.Index, runner_pods: kopf.Index,
    pool_workers: kopf.Index, **_: Any,
) -> None:
    _controller(memo, runner_jobs, runner_pods, pool_workers).observe_lease(type, dict(body))


@kopf.on.probe(id="jobs")
def probe_jobs(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    controller: Controller | None = getattr(memo, "controller", None)
    if controller is None:
        return {}
    return {"known": controller.known(), "waiting": len(controller.queue), "active": len(controller.active())}
