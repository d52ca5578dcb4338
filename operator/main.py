"""Entry point: ``python -m ifw.operator`` (or ``kopf run -m ifw.operator.main``).

Settings come from ifw.operator.config (YAML file + IFW_OPERATOR_* env). Health:
``GET :<liveness_port>/healthz`` (kopf's probe); metrics: ``GET :<metrics_port>/metrics``.

kopf ends on a watch error it deems fatal. The one that happens in practice is an apiserver
restart: for a moment after it listens again it answers 404 for a custom resource whose
CRD it has not loaded yet, and kopf gives up. ``main`` then runs kopf again in the same
process, after a short backoff: the restart lists every object again, so nothing is lost
(and the pod is not sent into CrashLoopBackOff). A stop by signal ends it.
"""

from __future__ import annotations

import logging
import time

import kopf

from ifw.operator import handlers  # noqa: F401  (registers the handlers)
from ifw.operator.config import get_settings

LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}
RESTART_DELAYS = (1, 2, 5, 10, 30)
STABLE_SECONDS = 60  # a run this long resets the backoff

log = logging.getLogger("ifw.operator")


def main() -> None:
    config = get_settings()
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
