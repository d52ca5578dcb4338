"""Admission: at most ``max_active_jobs`` runner Jobs at once, cluster-wide and per namespace.

GPU memory is finite (the original server OOMed by running every request at once), so
TranscriptionJobs beyond the caps wait in ``Queued`` and start in creation order as capacity
frees. A namespace at its own cap does not block the others (no head-of-line blocking across
namespaces); within the cluster, the oldest waiting job that fits always goes first.

The queue is in memory. That is safe across restarts because what counts as *active* is not
remembered here but recomputed from the Jobs that exist (kopf lists them before any handler
runs); only the order of the waiting jobs is rebuilt, from their creation timestamps.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Candidate:
    created: str  # RFC 3339 creationTimestamp (sorts lexically), one-second resolution
    seq: int  # first-seen order, breaks ties within one second
    uid: str = field(compare=False)
    namespace: str = field(compare=False)


def admissible(
    waiting: Iterable[Candidate],
    active: Iterable[str],
    *,
    max_total: int | None,
    max_per_namespace: int | None,
) -> list[Candidate]:
    """Which waiting candidates fit now, oldest first. ``active`` lists the namespace of each active job."""
    per_ns = Counter(active)
    total = sum(per_ns.values())
    chosen = []
    for cand in sorted(waiting):
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

    def __init__(self, max_total: int | None, max_per_namespace: int | None):
        self.max_total = max_total
        self.max_per_namespace = max_per_namespace
        self._waiting: dict[str, Candidate] = {}
        self._reserved: dict[str, str] = {}  # uid -> namespace
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def is_reserved(self, uid: str) -> bool:
        return uid in self._reserved

    def is_waiting(self, uid: str) -> bool:
        return uid in self._waiting

    def enqueue(self, uid: str, namespace: str, created: str) -> None:
        if uid not in self._waiting and uid not in self._reserved:
            self._waiting[uid] = Candidate(created, next(self._seq), uid, namespace)

    def forget(self, uid: str) -> None:
        """The job finished, was deleted or suspended: it neither waits nor holds capacity."""
        self._waiting.pop(uid, None)
        self._reserved.pop(uid, None)

    def settle(self, uid: str) -> None:
        """The job's Job exists now; it is counted from the Jobs, not from the reservation."""
        self._reserved.pop(uid, None)

    def position(self, uid: str) -> int | None:
        """1-based place in the line, for messages."""
        cand = self._waiting.get(uid)
        if cand is None:
            return None
        return 1 + sum(1 for other in self._waiting.values() if other < cand)

    def admit(self, active: dict[str, str]) -> list[str]:
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
