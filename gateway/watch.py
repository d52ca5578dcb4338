"""One shared watch on TranscriptionJobs: an informer-style cache plus waiters.

One ifw.core Watcher per served namespace (list, watch from the list's version, resume,
relist on 410 Gone, one back-off rule) feeds the event loop, which updates the cache and
wakes the requests waiting on that TranscriptionJob. A thousand sync requests therefore cost
a thousand futures, not a thousand watches or polls. A streaming request subscribes instead
and gets every change of its TranscriptionJob (status.progress.text grows as the runner works).

What finished while a watch was reconnecting arrives by the resumed watch or the relist;
`problem()` tells /readyz while a namespace's watch is not connected.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from ifw.core.contract import is_terminal
from ifw.core.watch import Watcher
from ifw.gateway import metrics
from ifw.gateway.kube import Kube
from ifw.gateway.taskids import task_id_of

log = logging.getLogger("ifw.gateway.watch")

Key = tuple[str, str]  # (namespace, name)
# Called on the event loop with ("ADDED"|"MODIFIED"|"DELETED", object).
Listener = Callable[[str, dict[str, Any]], None]

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
        self.watchers: dict[str, Watcher] = {}
        # (namespace, name, uid) -> monotonic time the terminal event was read; popped by the waiter.
        self.finished_at: dict[tuple[str, str, str | None], float] = {}
        # Namespace -> monotonic time its watch lost the apiserver; absent while it is connected.
        # Written by the watchers' threads, read by /readyz (single dict operations: no lock needed).
        self.disconnected: dict[str, float] = {ns: time.monotonic() for ns in namespaces}
        # uid -> (object, monotonic time): what this gateway created and the watch has not shown
        # yet, so that a client's GET /tasks right after its POST lists the task (read your writes).
        self._created: dict[str, tuple[dict[str, Any], float]] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for namespace in self.namespaces:
            self.watchers[namespace] = self.kube.tjs.watcher(
                namespace,
                on_list=functools.partial(self._listed, namespace),
                on_event=self._received,
                on_connected=functools.partial(self._connected, namespace),
                on_disconnected=functools.partial(self._disconnected, namespace),
                name=f"tj-watch-{namespace}",
                server_timeout=self.server_timeout,
            ).start()

    def stop(self) -> None:
        for watcher in self.watchers.values():
            watcher.stop(wait=False)
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
        obj = _slim(obj)
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

    # ------------------------------------------------------- watch threads

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _listed(self, namespace: str, items: list[dict[str, Any]]) -> None:
        self._post(self._replace, namespace, [_slim(obj) for obj in items])
        metrics.WATCH_LISTS.inc()

    def _received(self, kind: str, obj: dict[str, Any]) -> None:
        obj = _slim(obj)
        self._post(self._apply, kind, obj, time.monotonic())
        metrics.WATCH_EVENTS.labels(kind).inc()

    def _connected(self, namespace: str) -> None:
        if self.disconnected.pop(namespace, None) is not None:
            log.info("watch on %s connected", namespace)

    def _disconnected(self, namespace: str, error: BaseException | None) -> None:
        self.disconnected.setdefault(namespace, time.monotonic())
        if error is not None:
            metrics.WATCH_ERRORS.inc()


def _slim(obj: dict[str, Any]) -> dict[str, Any]:
    """The TranscriptionJob as the gateway keeps it, once per job: without managedFields (never
    read; 4 of a small object's 11 KB) and with its keys shared by every cached object (json
    makes each object's own copies: 2 KB more). With 10,000 sync requests held, each costs ~50 KB."""
    obj.get("metadata", {}).pop("managedFields", None)
    return _shared_keys(obj)


def _shared_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {sys.intern(k): _shared_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared_keys(v) for v in value]
    return value
