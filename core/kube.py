"""The one way every ifw process builds its Kubernetes client.

Precedence, the same everywhere (operator, gateway, runner, the chart's hook, the local stack):

1. an explicit kubeconfig path (a caller that knows which cluster it means);
2. ``$KUBECONFIG`` (tests, laptops, the local stack's processes);
3. the pod's service account, when running in a pod (``KUBERNETES_SERVICE_HOST`` is set);
4. ``~/.kube/config``.

The configuration is read when the client is built, never at import time.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes import client, config

VERSION = "0.1.0"


def load_configuration(kubeconfig: str | None = None) -> client.Configuration:
    configuration = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=path, client_configuration=configuration, persist_config=False)
    return configuration


def api_client(
    *, kubeconfig: str | None = None, pool_size: int | None = None, component: str | None = None
) -> client.ApiClient:
    """An ApiClient for this process. ``pool_size``: pooled connections (one per thread that calls)."""
    configuration = load_configuration(kubeconfig)
    if pool_size:
        configuration.connection_pool_maxsize = pool_size
    api = client.ApiClient(configuration)
    # ifw-operator/0.1.0, ifw-runner/0.1.0...: audit logs tell the components apart.
    api.user_agent = f"ifw-{component or 'client'}/{VERSION}"
    return api


def status_code(error: BaseException) -> int | None:
    from kubernetes.client.exceptions import ApiException

    return error.status if isinstance(error, ApiException) else None


def api_message(error: BaseException) -> str:
    """The apiserver's own explanation (its Status.message), else the exception's text."""
    body: Any = getattr(error, "body", None)
    if body:
        try:
            return json.loads(body).get("message") or str(error)
        except (ValueError, AttributeError):
            pass
    reason = getattr(error, "reason", None)
    return str(reason) if reason and status_code(error) else str(error)
