"""Entry point: ``python -m ifw.operator`` (or ``kopf run -m ifw.operator.main``).

Settings come from ifw.operator.config (YAML file + IFW_OPERATOR_* env). Health:
``GET :<liveness_port>/healthz`` (kopf's probe); metrics: ``GET :<metrics_port>/metrics``.

An apiserver that restarts answers 404 for a custom resource for a moment after it listens
again (its CRDs are not loaded yet). kopf ends a watch on a 404 as fatal, and then its shutdown
can hang on the other watches' re-authentication until its ultimate exit timeout (10 min):
measured on the test control plane, the operator sat dead and its jobs waited. So a 404 on a
watch is retried here like kopf retries a 429 (``watch_through_missing_resources``). Anything
else that ends kopf makes ``main`` run it again in the same process, after a short backoff: the
restart lists every object again, so nothing is lost (and the pod is not sent into
CrashLoopBackOff). A stop by signal ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import kopf

from ifw.operator import handlers  # noqa: F401  (registers the handlers)
from ifw.operator.config import get_settings

LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}
RESTART_DELAYS = (1, 2, 5, 10, 30)
STABLE_SECONDS = 60  # a run this long resets the backoff

log = logging.getLogger("ifw.operator")


MISSING_RESOURCE_RETRY_SECONDS = 2.0


def watch_through_missing_resources() -> None:
    """Make a watch that gets 404 (a resource not served yet) wait and watch again (kopf==1.45.2 internals)."""
    from kopf._cogs.clients import errors, watching

    if getattr(watching.continuous_watch, "ifw_tolerates_404", False):
        return
    original = watching.continuous_watch

    async def continuous_watch(**kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for event in original(**kwargs):
                yield event
        except errors.APINotFoundError as error:
            # kopf's infinite_watch opens a new stream (list + watch) when this one ends
            log.warning("watch of %s got 404 (%s): the apiserver does not serve it yet; watching again in %.0f s",
                        kwargs.get("resource"), error, MISSING_RESOURCE_RETRY_SECONDS)  # fmt: skip
            await asyncio.sleep(MISSING_RESOURCE_RETRY_SECONDS)

    continuous_watch.ifw_tolerates_404 = True  # type: ignore[attr-defined]
    continuous_watch.__wrapped__ = original  # type: ignore[attr-defined]
    watching.continuous_watch = continuous_watch


def main() -> None:
    config = get_settings()
    watch_through_missing_resources()
    kopf.configure(log_format=LOG_FORMATS[config.log_format], verbose=False)
    failures = 0
    while True:
        started = time.monotonic()
        try:
            kopf.run(
                standalone=True,  # one replica, Deployment strategy Recreate
                clusterwide=not config.namespaces,
                namespaces=config.namespaces,
                liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
            )
            return  # stopped by a signal
        except Exception as error:
            failures = 1 if time.monotonic() - started > STABLE_SECONDS else failures + 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS)) - 1]
            log.error("kopf stopped (%s: %s); starting it again in %ss", type(error).__name__, error, delay)
            time.sleep(delay)


if __name__ == "__main__":
    main()
