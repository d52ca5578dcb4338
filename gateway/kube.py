"""Async access to the kube-apiserver through the official `kubernetes` client.

The client is synchronous; every call runs in a bounded thread pool whose size
matches the HTTP connection pool, so a burst of requests queues here instead
of opening unbounded connections to the apiserver. Each call has a deadline
(kube_timeout_seconds) for getting a thread and another for its answer: an apiserver
that hangs (etcd stalled) is a KubeUnavailable after that long, not after the
apiserver's own minute.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import anyio
from kubernetes import client
from kubernetes.client.rest import ApiException

from ifw.core.contract import owner_reference
from ifw.core.kube import TranscriptionJobs, api_message
from ifw.core.redact import redact


class KubeError(Exception):
    """An apiserver answer other than success, with its HTTP status and message."""

    def __init__(self, status: int, message: str):
        message = redact(message)  # an apiserver refusal may quote the spec: upload URLs carry tokens
        super().__init__(message)
        self.status = status
        self.message = message  # the apiserver's words: for logs; errors.py decides what a client sees

    @classmethod
    def from_api(cls, exc: ApiException) -> KubeError:
        return cls(exc.status or 503, api_message(exc) or "apiserver error")


class KubeUnavailable(KubeError):
    """No answer: the apiserver is unreachable, or did not answer within the deadline.
    The message (addresses, socket errors) is for the log only."""

    def __init__(self, message: str):
        super().__init__(503, message)


class Kube:
    def __init__(self, api_client: client.ApiClient, threads: int, timeout: float = 10.0):
        self.api_client = api_client
        # The HTTP request of each call is bounded by the same deadline as the answer.
        self.tjs = TranscriptionJobs(api_client, request_timeout=timeout)
        self.core = client.CoreV1Api(api_client)
        self.timeout = timeout
        # Admission (a burst queues here) and the threads that run the calls, apart: a call's
        # deadline starts when it is sent, not when it began to wait. A call that waited 9.9 s
        # for a thread and was then abandoned 0.1 s after sending could still create the object
        # while its client was told 503 (a burst of 10,000 sync requests did exactly that).
        self._admission = anyio.Semaphore(threads)
        self._threads = anyio.CapacityLimiter(threads)

    async def call(self, fn: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a worker thread: at most `timeout` seconds (default: the gateway's
        kube timeout) waiting for a free thread, during which nothing has been sent (safe to
        retry), then at most as long again for the answer."""
        limit = timeout or self.timeout
        try:
            with anyio.fail_after(limit):
                await self._admission.acquire()
        except TimeoutError:
            raise KubeUnavailable(f"no free connection to the kube-apiserver within {limit:g} s (overloaded)") from None
        try:
            with anyio.fail_after(limit):
                # abandon_on_cancel: the answer does not wait for a stuck thread; the thread's own
                # request timeout (api() below) ends it soon after, and holds its thread till then.
                return await anyio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs), limiter=self._threads, abandon_on_cancel=True
                )
        except TimeoutError:
            raise KubeUnavailable(f"no answer from the kube-apiserver within {limit:g} s") from None
        except ApiException as exc:
            raise KubeError.from_api(exc) from exc
        except OSError as exc:  # urllib3 connection errors derive from it
            raise KubeUnavailable(f"kube-apiserver unreachable: {exc}") from exc
        except Exception as exc:  # urllib3.exceptions.HTTPError and friends
            if type(exc).__module__.startswith("urllib3"):
                raise KubeUnavailable(f"kube-apiserver unreachable: {exc}") from exc
            raise
        finally:
            self._admission.release()

    async def api(self, fn: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """A kubernetes client API method through call(), its HTTP request bounded by the same deadline."""
        limit = timeout or self.timeout
        return await self.call(fn, *args, timeout=limit, _request_timeout=limit, **kwargs)

    # ------------------------------------------------------ TranscriptionJobs (ifw.core's client)

    async def create_tj(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.call(self.tjs.create, namespace, body)

    async def get_tj(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.call(self.tjs.get, namespace, name)

    async def list_tjs(self, namespace: str, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        limit = timeout or self.timeout
        return await self.call(self.tjs.list, namespace, timeout=limit, _request_timeout=limit, **kwargs)

    async def delete_tj(self, namespace: str, name: str, propagation: str, resource_version: str | None = None) -> bool:
        """False when there was no such TranscriptionJob. With `resource_version`, only that
        version is deleted: a changed one raises KubeError 409."""
        return await self.call(self.tjs.delete, namespace, name, propagation=propagation,
                               resource_version=resource_version)  # fmt: skip

    # ---------------------------------------------------------------- Secrets

    async def create_secret(
        self, namespace: str, name: str, string_data: dict[str, str], labels: dict[str, str]
    ) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": labels},
            "type": "Opaque",
            # data, not stringData: the same bytes on every apiserver (test servers do not convert).
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in string_data.items()},
        }
        await self.api(self.core.create_namespaced_secret, namespace, body)

    async def own_secret(self, namespace: str, name: str, tj: dict[str, Any]) -> None:
        """Make the TranscriptionJob the Secret's owner so Kubernetes deletes it with the TranscriptionJob."""
        patch = {"metadata": {"ownerReferences": [owner_reference(tj, controller=False)]}}
        await self.api(self.core.patch_namespaced_secret, name, namespace, patch)

    async def delete_secret(self, namespace: str, name: str) -> None:
        try:
            await self.api(self.core.delete_namespaced_secret, name, namespace)
        except KubeError as exc:
            if exc.status != 404:
                raise
