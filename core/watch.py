"""A resumable Kubernetes watch in a thread: list, then watch from the list's version, forever.

Used where a component follows objects for its whole life (the pool worker follows the
TranscriptionJobs assigned to it). The apiserver ends every watch after a while: the watch
resumes from the last version seen (bookmarks included); a 410 Gone (the version is too old)
starts over from a fresh list, which is handed over whole so the caller can drop what vanished.
Network errors back off exponentially up to 30 s. Callbacks run on the watch thread.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ListFn = Callable[..., Any]  # e.g. functools.partial(custom.list_namespaced_custom_object, group, ...)


class Watcher:
    def __init__(
        self,
        list_fn: ListFn,
        *,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        name: str = "watch",
        server_timeout: int = 240,
    ):
        self.list_fn = list_fn
        self.on_list = on_list
        self.on_event = on_event
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

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            try:  # unblocks the thread's read at once (close() would wait for the SSL lock)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self.version is None:
                    listed = self.list_fn()
                    self.version = listed["metadata"]["resourceVersion"]
                    self.on_list(listed["items"])
                    self.synced.set()
                self._response = self.list_fn(
                    watch=True, resource_version=self.version, allow_watch_bookmarks=True,
                    timeout_seconds=self.server_timeout, _preload_content=False,
                    _request_timeout=(10, self.server_timeout + 30),
                )  # fmt: skip
                try:
                    for line in iter_resp_lines(self._response):
                        if line.strip():
                            self._handle(json.loads(line))
                finally:
                    self._response.close()  # never hand a half-read connection back to the pool
                    self._response.release_conn()
                    self._response = None
                backoff = 0.5
            except ApiException as error:
                if error.status == 410:
                    log.info("%s: version too old (410), relisting", self.name)
                    self.version = None
                    continue
                log.warning("%s failed: %s %s", self.name, error.status, error.reason)
                backoff = self._pause(backoff)
            except Exception as error:  # noqa: BLE001 - network errors: back off and resume
                if self._stop.is_set():
                    break
                log.warning("%s interrupted: %s", self.name, error)
                backoff = self._pause(backoff)

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

    def _pause(self, backoff: float) -> float:
        self._stop.wait(backoff)
        return min(backoff * 2, 30.0)
