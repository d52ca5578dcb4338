"""Admission: at most ``max_active_jobs`` runner Jobs at once, cluster-wide and per namespace.

GPU memory is finite (the original server OOMed by running every request at once), so
TranscriptionJobs beyond the caps wait in ``Queued`` and start in creation order as capacity
frees. A namespace at its own cap does not block the others (no head-of-line blocking across
namespaces); within the cluster, the oldest waiting job that fits always goes first.

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
from collections.abc import Iterable
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


def admissible(
    waiting: Iterable[Candidate],
    active: Iterable[str],
    *,
    max_total: int | None,
    max_per_namespace: int | None,
    now: float = float("inf"),
) -> list[Candidate]:
    """Which waiting candidates fit now, oldest first. ``active`` lists the namespace of each active job."""
    per_ns = Counter(active)
    total = sum(per_ns.values())
    ordered = sorted(waiting)
    waiting_in = Counter(cand.namespace for cand in ordered)

    def near_cap(namespace: str) -> bool:
        """Could the jobs seen now, plus a few not seen yet, outnumber the free slots?"""
        if max_total is not None and max_total - total <= len(ordered) + SETTLE_MARGIN:
            return True
        return max_per_namespace is not None and (
            max_per_namespace - per_ns[namespace] <= waiting_in[namespace] + SETTLE_MARGIN
        )

    chosen = []
    for cand in ordered:
        if cand.ready_at > now and near_cap(cand.namespace):
            break  # still settling where the order matters: nothing younger may go before it
        if max_total is not None and total >= max_total:
            break
        if max_per_namespace is not None and per_ns[cand.namespace] >= max_per_namespace:
            continue
        chosen.append(cand)
        total += 1
        per_ns[cand.namespace] += 1
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
        self._reserved: dict[str, str] = {}  # uid -> namespace

    def __len__(self) -> int:
        return len(self._waiting)

    def is_reserved(self, uid: str) -> bool:
        return uid in self._reserved

    def enqueue(self, uid: str, namespace: str, created: str, revision: int = 0, now: float = 0.0) -> None:
        if uid not in self._waiting and uid not in self._reserved:
            self._waiting[uid] = Candidate(created, revision, uid, namespace, now + self.settle_seconds)

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

    def admit(self, active: dict[str, str], now: float = float("inf")) -> list[str]:
        """Reserve capacity for the waiting jobs that fit. ``active``: uid -> namespace of running Jobs.

        Returns the uids admitted by this call, oldest first.
        """
        counted = dict(active)
        counted.update({uid: ns for uid, ns in self._reserved.items() if uid not in counted})
        chosen = admissible(
            self._waiting.values(),
            counted.values(),
            max_total=self.max_total,
            max_per_namespace=self.max_per_namespace,
            now=now,
        )
        for cand in chosen:
            del self._waiting[cand.uid]
            self._reserved[cand.uid] = cand.namespace
        return [cand.uid for cand in chosen]

    def describe(self, active: dict[str, str], namespace: str) -> str:
        total = len(set(active) | set(self._reserved))
        in_ns = sum(1 for ns in {**self._reserved, **active}.values() if ns == namespace)
        parts = []
        if self.max_total is not None:
            parts.append(f"{total}/{self.max_total} runner jobs active cluster-wide")
        if self.max_per_namespace is not None:
            parts.append(f"{in_ns}/{self.max_per_namespace} in namespace {namespace}")
        return "waiting for capacity: " + ", ".join(parts)
