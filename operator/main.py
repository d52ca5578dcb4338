"""Entry point: ``python -m ifw.operator`` (or ``kopf run -m ifw.operator.main``).

Settings come from ifw.operator.config (YAML file + IFW_OPERATOR_* env). Health:
``GET :<liveness_port>/healthz`` (kopf's probe); metrics: ``GET :<metrics_port>/metrics``.
"""

from __future__ import annotations

import kopf

from ifw.operator import handlers  # noqa: F401  (registers the handlers)
from ifw.operator.config import get_settings

LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def main() -> None:
    config = get_settings()
    kopf.configure(log_format=LOG_FORMATS[config.log_format], verbose=False)
    kopf.run(
        standalone=True,  # one replica, Deployment strategy Recreate
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
    )


if __name__ == "__main__":
    main()
