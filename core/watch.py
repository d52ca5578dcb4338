"""The one resumable Kubernetes watch: list, then watch from the list's version, in a thread, forever.

Every component that follows TranscriptionJobs uses it (the gateway's cache, the pool worker's
assignments; kopf has its own). The apiserver ends every watch after a while: the watch resumes
from the last version seen (bookmarks included); a 410 Gone (the version is too old) starts over
from a fresh list, handed over whole so the caller can drop what vanished meanwhile. A failed
request backs off from MIN_BACKOFF, doubling up to MAX_BACKOFF, and starts again from the bottom
once the apiserver answers a watch. Callbacks run on the watch thread.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ListFn = Callable[..., Any]  # TranscriptionJobs.list bound to a namespace, or any list call alike
# Seconds between reconnection attempts. Capped low: a gateway whose watch waits is a gateway
# whose sync requests wait, and a pool worker that waits is a job not started.
MIN_BACKOFF = 0.5
MAX_BACKOFF = 3.0
LIST_TIMEOUT = (5, 60)  # (connect, read) seconds of the list that starts or restarts a watch


class Watcher:
    def __init__(
        self,
        list_fn: ListFn,
        *,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        on_connected: Callable[[], None] | None = None,
        on_disconnected: Callable[[BaseException | None], None] | None = None,
        name: str = "watch",
        server_timeout: int = 240,
    ):
        self.list_fn = list_fn
        self.on_list = on_list
        self.on_event = on_event
        self.on_connected = on_connected or (lambda: None)
        # Called with the error at every failure, and with None when a 410 forces a relist.
        self.on_disconnected = on_disconnected or (lambda error: None)
        self.name = name
        self.server_timeout = server_timeout
        self.version: str | None = None  # where the watch resumes; None: list first
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    @property
    def connected(self) -> bool:
        """A watch request is open now (its events are arriving)."""
        return self._response is not None

    def interrupt(self) -> None:
        """Drop the open connection: the watch resumes from its version (a relist after a 410)."""
        sock = getattr(getattr(self._response, "connection", None), "sock", None)
        if sock is not None:
            try:  # unblocks the thread's read at once (close() would wait for the SSL lock)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self.interrupt()
        if wait:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        backoff = MIN_BACKOFF
        while not self._stop.is_set():
            try:
                if self.version is None:
                    listed = self.list_fn(_request_timeout=LIST_TIMEOUT)
                    self.version = listed["metadata"]["resourceVersion"]
                    self.on_list(listed["items"])
                    self.synced.set()
                response = self.list_fn(
                    watch=True, resource_version=self.version, allow_watch_bookmarks=True,
                    timeout_seconds=self.server_timeout, _preload_content=False,
                    _request_timeout=(10, self.server_timeout + 30),
                )  # fmt: skip
                self._response = response
                self.on_connected()
                backoff = MIN_BACKOFF
                try:
                    for line in iter_resp_lines(response):
                        if line.strip():
                            self._handle(json.loads(line))
                finally:
                    self._response = None
                    response.close()  # never hand a half-read connection back to the pool
                    response.release_conn()
            except ApiException as error:
                if error.status == 410:
                    log.info("%s: version too old (410), relisting", self.name)
                    self.version = None
                    self.on_disconnected(None)
                    continue
                log.warning("%s failed: %s %s", self.name, error.status, error.reason)
                backoff = self._pause(backoff, error)
            except Exception as error:  # noqa: BLE001 - network errors: back off and resume
                if self._stop.is_set():
                    break
                log.warning("%s interrupted: %s", self.name, error)
                backoff = self._pause(backoff, error)

    def _handle(self, event: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        obj = event["object"]
        if event["type"] == "ERROR":  # a metav1.Status; 410 means relist
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        if event["type"] != "BOOKMARK":
            try:
                self.on_event(event["type"], obj)
            except Exception:  # a broken callback must not stop the watch
                log.exception("%s: event handler failed", self.name)
        self.version = obj["metadata"].get("resourceVersion") or self.version

    def _pause(self, backoff: float, error: BaseException) -> float:
        self.on_disconnected(error)
        self._stop.wait(backoff)
        return min(backoff * 2, MAX_BACKOFF)
