"""One shared watch on TranscriptionJobs: an informer-style cache plus waiters.

A thread per served namespace lists the TranscriptionJobs, then watches from the list's
resourceVersion, resuming from the last seen version (bookmarks included)
whenever the apiserver ends the watch, and relisting on 410 Gone. Every event
is handed to the event loop, which updates the cache and wakes the requests
waiting on that TranscriptionJob. A thousand sync requests therefore cost a thousand
futures, not a thousand watches or polls. A streaming request subscribes instead and gets
every change of its TranscriptionJob (status.progress.text grows as the runner works).

A failed watch retries after a short back-off (at most MAX_BACKOFF, back to the start once
connected), so it is back within seconds of the apiserver, and what finished meanwhile
arrives by the resumed watch or the relist; `problem()` tells /readyz while a namespace's
watch is not connected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from ifw.core.contract import is_terminal
from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from ifw.gateway import metrics
from ifw.gateway.kube import Kube
from ifw.gateway.taskids import task_id_of

log = logging.getLogger("ifw.gateway.watch")

Key = tuple[str, str]  # (namespace, name)
# Called on the event loop with ("ADDED"|"MODIFIED"|"DELETED", object).
Listener = Callable[[str, dict[str, Any]], None]

# Seconds between reconnection attempts: doubling from MIN_BACKOFF, capped low, since a
# gateway whose watch waits is a gateway whose sync requests wait.
MIN_BACKOFF = 0.5
MAX_BACKOFF = 3.0
LIST_TIMEOUT = (5, 60)  # (connect, read) seconds of the list that starts or restarts a watch
# How long a TranscriptionJob this gateway created stands in for its watch event, which comes
# within milliseconds unless the watch is reconnecting (the relist then brings it).
CREATED_GRACE = 30.0


def _key(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return meta["namespace"], meta["name"]


class TjGone(Exception):
    """The TranscriptionJob was deleted (cancelled) while a request waited for it."""


class TjWatch:
    def __init__(self, kube: Kube, namespaces: list[str], server_timeout: int = 240):
        self.kube = kube
        self.namespaces = namespaces
        self.server_timeout = server_timeout
        self.objects: dict[Key, dict[str, Any]] = {}
        self.listeners: list[Listener] = []
        self._waiters: dict[Key, list[tuple[str, asyncio.Future[dict[str, Any]]]]] = {}
        # Streaming requests: every (kind, object) of their TranscriptionJob, in order.
        self._subscribers: dict[Key, list[tuple[str, asyncio.Queue[tuple[str, dict[str, Any]]]]]] = {}
        self._synced: set[str] = set()
        self._synced_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: list[Any] = []
        # Where each namespace's watch resumes; None (absent) means list first.
        self.versions: dict[str, str] = {}
        # (namespace, name, uid) -> monotonic time the terminal event was read; popped by the waiter.
        self.finished_at: dict[tuple[str, str, str | None], float] = {}
        # Namespace -> monotonic time its watch lost the apiserver; absent while it is connected.
        # Written by the watch threads, read by /readyz (single dict operations: no lock needed).
        self.disconnected: dict[str, float] = {ns: time.monotonic() for ns in namespaces}
        # uid -> (object, monotonic time): what this gateway created and the watch has not shown
        # yet, so that a client's GET /tasks right after its POST lists the task (read your writes).
        self._created: dict[str, tuple[dict[str, Any], float]] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for namespace in self.namespaces:
            thread = threading.Thread(target=self._run, args=(namespace,), name=f"tj-watch-{namespace}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for resp in list(self._responses):
            # Shut the raw socket down: that unblocks the thread's read at once, whereas
            # close() would wait for the SSL lock the blocked read holds.
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for fut in (f for waiters in self._waiters.values() for _, f in waiters):
            if not fut.done():
                fut.cancel()

    @property
    def synced(self) -> bool:
        return self._synced_event.is_set()

    def problem(self) -> str | None:
        """Why the watch cannot be trusted now (for /readyz), or None: every namespace listed once
        and watching. While one is reconnecting, events of its TranscriptionJobs are not seen yet."""
        if not self.synced:
            return "not synced yet"
        lost = dict(self.disconnected)  # a copy: the watch threads write it
        if lost:
            ns, since = min(lost.items(), key=lambda item: item[1])
            return f"reconnecting to the Kubernetes API (namespace {ns}, for {time.monotonic() - since:.0f} s)"
        return None

    async def wait_synced(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._synced_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------- reads

    def has_waiters(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._waiters

    def created(self, obj: dict[str, Any]) -> None:
        """A TranscriptionJob this gateway just created (the API's answer to the create)."""
        if _key(obj) not in self.objects:
            self._created[obj["metadata"]["uid"]] = (obj, time.monotonic())

    def active(self, namespace: str) -> list[str]:
        """Task ids of the namespace's TranscriptionJobs that have not finished, oldest first."""
        now = time.monotonic()
        self._created = {uid: entry for uid, entry in self._created.items() if now - entry[1] <= CREATED_GRACE}
        tjs = [o for (ns, _), o in self.objects.items() if ns == namespace and not is_terminal(o)]
        # What is still in _created the watch has not shown (_apply takes it out on any event of it).
        tjs += [o for o, _ in self._created.values() if o["metadata"]["namespace"] == namespace]
        tjs.sort(key=lambda o: (o["metadata"].get("creationTimestamp") or "", o["metadata"]["name"]))
        return [task_id_of(o) for o in tjs]

    def subscribe(self, namespace: str, name: str, uid: str) -> asyncio.Queue[tuple[str, dict[str, Any]]]:
        """A queue of every event of this TranscriptionJob from now on, starting with its cached state."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        current = self.objects.get((namespace, name))
        if current is not None and current["metadata"].get("uid") == uid:
            queue.put_nowait(("MODIFIED", current))
        self._subscribers.setdefault((namespace, name), []).append((uid, queue))
        return queue

    def unsubscribe(self, namespace: str, name: str, queue: asyncio.Queue[Any]) -> None:
        entries = self._subscribers.get((namespace, name), [])
        entries[:] = [e for e in entries if e[1] is not queue]
        if not entries:
            self._subscribers.pop((namespace, name), None)

    async def wait_terminal(self, namespace: str, name: str, uid: str, timeout: float) -> dict[str, Any]:
        """The TranscriptionJob once Succeeded or Failed. Raises TimeoutError, or TjGone if it was deleted."""
        key = (namespace, name)
        current = self.objects.get(key)
        if current is not None and current["metadata"].get("uid") == uid and is_terminal(current):
            return current
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (uid, fut)
        self._waiters.setdefault(key, []).append(entry)
        metrics.WAITERS.inc()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            metrics.WAITERS.dec()
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.remove(entry)
                if not waiters:
                    del self._waiters[key]

    # --------------------------------------------------- event loop side

    def _apply(self, kind: str, obj: dict[str, Any], received: float | None = None) -> None:
        key = _key(obj)
        self._created.pop(obj["metadata"].get("uid"), None)  # the watch has it now
        if received is not None and key in self._waiters and kind != "DELETED" and is_terminal(obj):
            # When the watch read the TranscriptionJob's last change: the start of completion -> response.
            self.finished_at[(key[0], key[1], obj["metadata"].get("uid"))] = received
        if kind == "DELETED":
            self.objects.pop(key, None)
            self.finished_at.pop((key[0], key[1], obj["metadata"].get("uid")), None)
        else:
            self.objects[key] = obj
        self._notify(key, kind, obj)

    def _replace(self, namespace: str, items: list[dict[str, Any]]) -> None:
        """A fresh list: TranscriptionJobs missing from it were deleted while we were not watching."""
        fresh = {_key(o): o for o in items}
        for key in [k for k in self.objects if k[0] == namespace and k not in fresh]:
            self._apply("DELETED", self.objects[key])
        for obj in items:
            self._apply("MODIFIED", obj)
        self._synced.add(namespace)
        if self._synced.issuperset(self.namespaces):
            self._synced_event.set()

    def _notify(self, key: Key, kind: str, obj: dict[str, Any]) -> None:
        uid = obj["metadata"].get("uid")
        deleted = kind == "DELETED"
        for waiter_uid, fut in self._waiters.get(key, ()):
            if fut.done() or waiter_uid != uid:
                continue
            if deleted:
                fut.set_exception(TjGone(key[1]))
            elif is_terminal(obj):
                fut.set_result(obj)
        for subscriber_uid, queue in self._subscribers.get(key, ()):
            if subscriber_uid == uid:
                queue.put_nowait((kind, obj))
        for listener in self.listeners:
            try:
                listener(kind, obj)
            except Exception:  # a broken listener must not stop the watch
                log.exception("watch listener failed")

    # ------------------------------------------------------- watch thread

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self, namespace: str) -> None:
        api = self.kube.custom
        backoff = MIN_BACKOFF
        while not self._stop.is_set():
            try:
                version = self.versions.get(namespace)
                if version is None:
                    listed = api.list_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, _request_timeout=LIST_TIMEOUT
                    )
                    version = self.versions[namespace] = listed["metadata"]["resourceVersion"]
                    self._post(self._replace, namespace, listed["items"])
                    metrics.WATCH_LISTS.inc()
                resp = api.list_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    watch=True,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self.server_timeout,
                    _preload_content=False,
                    _request_timeout=(10, self.server_timeout + 30),
                )
                self._responses.append(resp)
                # The apiserver answered the watch: connected, and the next failure starts the back-off afresh.
                if self.disconnected.pop(namespace, None) is not None:
                    log.info("watch on %s connected", namespace)
                backoff = MIN_BACKOFF
                try:
                    self._consume(resp, namespace)
                finally:
                    self._responses.remove(resp)
                    resp.close()  # never hand a half-read connection back to the pool
                    resp.release_conn()
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: start over from a list
                    log.info("watch on %s expired (410), relisting", namespace)
                    self.versions.pop(namespace, None)
                    self.disconnected.setdefault(namespace, time.monotonic())
                    continue
                log.warning("watch on %s failed: %s %s", namespace, exc.status, exc.reason)
                backoff = self._pause(namespace, backoff)
            except Exception as exc:  # noqa: BLE001 - network errors: retry with backoff
                if self._stop.is_set():
                    break
                log.warning("watch on %s interrupted: %s", namespace, exc)
                backoff = self._pause(namespace, backoff)

    def _consume(self, resp: Any, namespace: str) -> None:
        """Hand each event of one watch response to the loop; remember the last resourceVersion."""
        for line in iter_resp_lines(resp):
            if not line.strip():
                continue
            event = json.loads(line)
            obj = event["object"]
            if event["type"] == "ERROR":  # a metav1.Status; 410 means relist
                raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
            if event["type"] != "BOOKMARK":
                self._post(self._apply, event["type"], obj, time.monotonic())
                metrics.WATCH_EVENTS.labels(event["type"]).inc()
            self.versions[namespace] = obj["metadata"].get("resourceVersion") or self.versions[namespace]

    def _pause(self, namespace: str, backoff: float) -> float:
        self.disconnected.setdefault(namespace, time.monotonic())
        metrics.WATCH_ERRORS.inc()
        self._stop.wait(backoff)
        return min(backoff * 2, MAX_BACKOFF)
