"""The one way every ifw process builds its Kubernetes client.

Precedence, the same everywhere (operator, gateway, runner, the chart's hook, the local stack):

1. an explicit kubeconfig path (a caller that knows which cluster it means);
2. ``$KUBECONFIG`` (tests, laptops, the local stack's processes);
3. the pod's service account, when running in a pod (``KUBERNETES_SERVICE_HOST`` is set);
4. ``~/.kube/config``.

The configuration is read when the client is built, never at import time.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from kubernetes import client, config

from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION

IFW_VERSION = "0.1.0"


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
    api.user_agent = f"ifw-{component or 'client'}/{IFW_VERSION}"
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


# ------------------------------------------------------------------ TranscriptionJobs

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# (connect, read) seconds of one request: a dead connection never hangs a job or a client.
REQUEST_TIMEOUT = (10, 60)


class TranscriptionJobs:
    """The one client of the TranscriptionJob API that every ifw process uses (kopf aside).

    Synchronous, like the ``kubernetes`` client under it: the operator and the gateway run its
    calls in their own bounded thread pools. Answers are raw JSON (``_preload_content=False``):
    deserialising through the client's models costs more CPU than the request. A missing job is
    ``None`` or ``False``, never an exception; every other refusal is the client's ApiException.
    """

    def __init__(self, api: client.ApiClient, request_timeout: Any = REQUEST_TIMEOUT):
        self.custom = client.CustomObjectsApi(api)
        self.request_timeout = request_timeout

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.request_timeout)
        response = fn(GROUP, VERSION, *args, _preload_content=False, **kwargs)
        return json.loads(response.data) if response.data else None

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(self.custom.get_namespaced_custom_object, namespace, PLURAL, name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(self, namespace: str | None = None, **kwargs: Any) -> Any:
        """One namespace's jobs, or every namespace's (``None``); with ``watch=True`` the raw stream."""
        fn, where = (self.custom.list_cluster_custom_object, ()) if namespace is None else \
            (self.custom.list_namespaced_custom_object, (namespace,))
        if kwargs.get("watch"):  # a stream: the caller reads it line by line
            return fn(GROUP, VERSION, *where, PLURAL, **kwargs)
        return self._call(fn, *where, PLURAL, **kwargs)

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.custom.create_namespaced_custom_object, namespace, PLURAL, body)

    def delete(self, namespace: str, name: str, *, propagation: str = "Background", uid: str | None = None,
               resource_version: str | None = None) -> bool:  # fmt: skip
        """False when there was no such job. A precondition (``uid``: never a namesake; ``resource_version``:
        only the version the caller saw) that does not hold raises ApiException 409."""
        body: dict[str, Any] = {"propagationPolicy": propagation}
        preconditions = {key: value for key, value in (("uid", uid), ("resourceVersion", resource_version)) if value}
        if preconditions:
            body["preconditions"] = preconditions
        try:
            self._call(self.custom.delete_namespaced_custom_object, namespace, PLURAL, name, body=body)
        except client.ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """A merge patch of /status: each writer sends only the fields it owns."""
        return self._call(self.custom.patch_namespaced_custom_object_status, namespace, PLURAL, name,
                          {"status": status}, _content_type=MERGE_PATCH)  # fmt: skip

    def json_patch(self, namespace: str, name: str, ops: list[dict[str, Any]], *,
                   status: bool = False) -> dict[str, Any] | None:  # fmt: skip
        """A JSON patch (of /status with ``status``), guarded by its ``test`` ops; None when the job
        is gone or a test failed (it changed: the caller reads it again or gives up its claim)."""
        fn = self.custom.patch_namespaced_custom_object_status if status else self.custom.patch_namespaced_custom_object
        try:
            return self._call(fn, namespace, PLURAL, name, ops, _content_type=JSON_PATCH)
        except client.ApiException as error:
            if error.status in (404, 409, 422):
                return None
            raise

    def watcher(self, namespace: str | None, *, on_list: Any, on_event: Any, **kwargs: Any) -> Any:
        """A resumable watch of one namespace's jobs (``None``: every namespace); see ifw.core.watch."""
        from ifw.core.watch import Watcher

        return Watcher(functools.partial(self.list, namespace), on_list=on_list, on_event=on_event, **kwargs)


def guarded(tests: dict[str, Any], ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A JSON patch that applies ``ops`` only while every path in ``tests`` still holds its value."""
    return [{"op": "test", "path": path, "value": value} for path, value in tests.items()] + ops
