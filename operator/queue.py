"""Admission: at most ``max_active_jobs`` runner pods at once, cluster-wide and per namespace.

GPU memory is finite (the original server OOMed by running every request at once), so
TranscriptionJobs beyond the caps wait in ``Queued`` and start in creation order as capacity
frees. A namespace at its own cap does not block the others (no head-of-line blocking across
namespaces); within the cluster, the oldest waiting job that fits always goes first.

Slots: a job counts as the runner pods it can run at once. An ordinary Job is one slot; a sharded
job's Indexed Job runs its ``parallelism`` pods (one GPU each) at once, so it takes that many. A
job wider than a cap counts as the whole cap: it is admitted once nothing else holds that cap
(alone in the cluster, or alone in its namespace) -- refusing it would make it wait forever.
The order stays strict: a wide job waiting for room holds back the younger ones behind it (in the
cluster, and within its namespace) rather than being overtaken for ever by narrow ones, so a few
slots may stay free while it waits for the rest. Other namespaces are not held back by a wide job
that waits on its own namespace's cap.

The queue is in memory. That is safe across restarts because what counts as *active* is not
remembered here but recomputed from the Jobs that exist (kopf lists them before any handler
runs); only the order of the waiting jobs is rebuilt, from their creation timestamps.

Order within one second: creationTimestamp has one-second resolution, and kopf handles each
object in its own worker, so jobs created together are not seen in creation order. The tie is
broken by the resourceVersion first seen (the creation revision for an untouched job), and
while a cap is set a new job waits ``settle_seconds`` before it may be admitted: long enough
for the jobs created just before it to be seen too. A job still settling holds back the
younger ones, so the line is never jumped. Far from the caps (more free slots than waiting
jobs plus a margin) everyone fits anyway, and nothing settles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Far from the caps every waiting job fits and the order cannot matter: no settling there.
SETTLE_MARGIN = 16


@dataclass(frozen=True, order=True)
class Candidate:
    created: str  # RFC 3339 creationTimestamp (sorts lexically), one-second resolution
    revision: int  # resourceVersion when first seen: breaks ties within one second
    uid: str = field(compare=False)
    namespace: str = field(compare=False)
    ready_at: float = field(default=0.0, compare=False)  # monotonic time its settling ends
    slots: int = field(default=1, compare=False)  # runner pods it runs at once (its shards' parallelism)


def _within(used: int, slots: int, cap: int | None) -> bool:
    """Whether ``slots`` more fit under ``cap`` with ``used`` taken; a job wider than the cap fits alone."""
    return cap is None or used + min(slots, cap) <= cap


def admissible(
    waiting: Iterable[Candidate],
    active: Iterable[tuple[str, int]],
    *,
    max_total: int | None,
    max_per_namespace: int | None,
    now: float = float("inf"),
) -> list[Candidate]:
    """Which waiting candidates fit now, oldest first. ``active``: (namespace, slots) of each active job."""
    per_ns: Counter[str] = Counter()
    for namespace, slots in active:
        per_ns[namespace] += slots
    total = sum(per_ns.values())
    ordered = sorted(waiting)
    wanted = sum(cand.slots for cand in ordered)
    wanted_in: Counter[str] = Counter()
    for cand in ordered:
        wanted_in[cand.namespace] += cand.slots

    def near_cap(namespace: str) -> bool:
        """Could the jobs seen now, plus a few not seen yet, want more than the free slots?"""
        if max_total is not None and max_total - total <= wanted + SETTLE_MARGIN:
            return True
        return max_per_namespace is not None and (
            max_per_namespace - per_ns[namespace] <= wanted_in[namespace] + SETTLE_MARGIN
        )

    chosen = []
    held: set[str] = set()  # namespaces whose oldest waiting job waits for room there
    for cand in ordered:
        if cand.ready_at > now and near_cap(cand.namespace):
            break  # still settling where the order matters: nothing younger may go before it
        if cand.namespace in held:
            continue  # an older job of its namespace waits for room: no overtaking it there
        if not _within(per_ns[cand.namespace], cand.slots, max_per_namespace):
            held.add(cand.namespace)  # its namespace is full for it; the other namespaces go on
            continue
        if not _within(total, cand.slots, max_total):
            break  # the oldest that may go does not fit the cluster: nobody younger overtakes it
        chosen.append(cand)
        total += cand.slots
        per_ns[cand.namespace] += cand.slots
    return chosen


class AdmissionQueue:
    """Waiting candidates plus the ones admitted whose Job does not exist yet (reservations)."""

    def __init__(self, max_total: int | None, max_per_namespace: int | None, settle_seconds: float = 0.0):
        self.max_total = max_total
        self.max_per_namespace = max_per_namespace
        # Ordering only matters when something is capped.
        capped = max_total is not None or max_per_namespace is not None
        self.settle_seconds = settle_seconds if capped else 0.0
        self._waiting: dict[str, Candidate] = {}
        self._reserved: dict[str, Candidate] = {}  # admitted, its Job not seen yet

    def __len__(self) -> int:
        return len(self._waiting)

    def is_reserved(self, uid: str) -> bool:
        return uid in self._reserved

    def enqueue(self, uid: str, namespace: str, created: str, revision: int = 0, now: float = 0.0,
                slots: int = 1) -> None:  # fmt: skip
        """Wait for ``slots`` runner pods' worth of capacity (a sharded job: its parallelism)."""
        if uid not in self._waiting and uid not in self._reserved:
            self._waiting[uid] = Candidate(created, revision, uid, namespace, now + self.settle_seconds, max(1, slots))

    def held_until(self, uid: str, now: float) -> float | None:
        """When a waiting job stops being held back by settling (its own or an older job's); None if not."""
        cand = self._waiting.get(uid)
        if cand is None:
            return None
        holds = [other.ready_at for other in self._waiting.values() if other <= cand and other.ready_at > now]
        return max(holds) if holds else None

    def forget(self, uid: str) -> None:
        """The job finished, was deleted or suspended: it neither waits nor holds capacity."""
        self._waiting.pop(uid, None)
        self._reserved.pop(uid, None)

    def settle(self, uid: str) -> None:
        """The job's Job exists now; it is counted from the Jobs, not from the reservation."""
        self._reserved.pop(uid, None)

    def _counted(self, active: dict[str, str], slots: Mapping[str, int] | None) -> dict[str, tuple[str, int]]:
        """uid -> (namespace, slots) of the running Jobs (``slots``: uid -> its pods at once; 1 if absent)
        and of the reservations."""
        counted = {uid: (ns, (slots or {}).get(uid, 1)) for uid, ns in active.items()}
        counted.update({uid: (c.namespace, c.slots) for uid, c in self._reserved.items() if uid not in counted})
        return counted

    def admit(self, active: dict[str, str], now: float = float("inf"),
              slots: Mapping[str, int] | None = None) -> list[str]:  # fmt: skip
        """Reserve capacity for the waiting jobs that fit. ``active``: uid -> namespace of running Jobs;
        ``slots``: uid -> how many pods each of them runs at once (1 where absent).

        Returns the uids admitted by this call, oldest first.
        """
        chosen = admissible(
            self._waiting.values(),
            self._counted(active, slots).values(),
            max_total=self.max_total,
            max_per_namespace=self.max_per_namespace,
            now=now,
        )
        for cand in chosen:
            del self._waiting[cand.uid]
            self._reserved[cand.uid] = cand
        return [cand.uid for cand in chosen]

    def describe(self, active: dict[str, str], namespace: str, slots: Mapping[str, int] | None = None,
                 uid: str | None = None) -> str:  # fmt: skip
        """Why a job waits: the slots taken of each cap (and how many it needs, when more than one)."""
        counted = self._counted(active, slots)
        total = sum(n for _, n in counted.values())
        in_ns = sum(n for ns, n in counted.values() if ns == namespace)
        parts = []
        if self.max_total is not None:
            parts.append(f"{total}/{self.max_total} runner jobs active cluster-wide")
        if self.max_per_namespace is not None:
            parts.append(f"{in_ns}/{self.max_per_namespace} in namespace {namespace}")
        waiting = self._waiting.get(uid) if uid else None
        wide = any(n > 1 for _, n in counted.values())
        if waiting is not None and waiting.slots > 1:
            parts.append(f"this job needs {waiting.slots} (one per shard)")
        elif wide:
            parts.append("each shard counts as one")
        return "waiting for capacity: " + ", ".join(parts)
