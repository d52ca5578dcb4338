"""Admission counts a sharded job as its shards: the runner pods (GPUs) it runs at once (pure)."""

from __future__ import annotations

from ifw.operator.queue import AdmissionQueue, Candidate, admissible
from ifw.operator.sharding import job_slots


def _cand(uid: str, second: int, namespace: str = "ns", slots: int = 1, ready_at: float = 0.0) -> Candidate:
    return Candidate(f"2026-01-01T00:00:{second:02d}Z", 0, uid, namespace, ready_at, slots)


def _uids(chosen: list[Candidate]) -> list[str]:
    return [c.uid for c in chosen]


def test_a_running_sharded_job_takes_as_many_slots_as_its_shards():
    # Cap 4: three shards and one single runner fill it. Counted once, the shard job left two free.
    waiting = [_cand("single", 1)]
    assert _uids(admissible(waiting, [("ns", 3), ("ns", 1)], max_total=4, max_per_namespace=None)) == []
    assert _uids(admissible(waiting, [("ns", 3)], max_total=4, max_per_namespace=None)) == ["single"]
    assert _uids(admissible(waiting, [("a", 3)], max_total=None, max_per_namespace=3)) == ["single"]
    assert _uids(admissible([_cand("x", 1, "a")], [("a", 3)], max_total=None, max_per_namespace=3)) == []


def test_a_waiting_sharded_job_needs_room_for_every_shard():
    assert _uids(admissible([_cand("wide", 1, slots=3)], [("ns", 2)], max_total=4, max_per_namespace=None)) == []
    assert _uids(admissible([_cand("wide", 1, slots=3)], [("ns", 1)], max_total=4, max_per_namespace=None)) == [
        "wide"
    ]
    # Two wide jobs on an empty cluster of 4: the first goes, the second waits for the first.
    both = [_cand("w1", 1, slots=3), _cand("w2", 2, slots=3)]
    assert _uids(admissible(both, [], max_total=4, max_per_namespace=None)) == ["w1"]


def test_a_job_wider_than_the_cap_goes_alone_and_never_waits_for_ever():
    wide = _cand("wide", 1, slots=8)
    assert _uids(admissible([wide], [("ns", 1)], max_total=4, max_per_namespace=None)) == []
    assert _uids(admissible([wide], [], max_total=4, max_per_namespace=None)) == ["wide"]
    # Once it runs it counts as all of its pods: nothing else fits beside it.
    assert _uids(admissible([_cand("next", 2)], [("ns", 8)], max_total=4, max_per_namespace=None)) == []
    # The same per namespace: alone in its namespace, the other namespaces unaffected.
    ns_wide = _cand("wide", 1, "a", slots=5)
    assert _uids(admissible([ns_wide], [("a", 1)], max_total=None, max_per_namespace=2)) == []
    assert _uids(admissible([ns_wide, _cand("b1", 2, "b")], [("b", 1)], max_total=None, max_per_namespace=2)) == [
        "wide",
        "b1",
    ]


def test_oldest_first_a_wide_job_is_not_overtaken_by_younger_narrow_ones():
    # Cap 4, two slots taken: the oldest waiting job needs 3. The younger single ones would fit,
    # but going first they would hold it back for ever: they wait behind it.
    waiting = [_cand("wide", 1, slots=3), _cand("s1", 2), _cand("s2", 3)]
    assert _uids(admissible(waiting, [("ns", 2)], max_total=4, max_per_namespace=None)) == []
    assert _uids(admissible(waiting, [("ns", 1)], max_total=4, max_per_namespace=None)) == ["wide"]
    assert _uids(admissible(waiting, [], max_total=4, max_per_namespace=None)) == ["wide", "s1"]


def test_a_wide_job_waiting_on_its_namespace_holds_back_its_namespace_only():
    # Namespace a is at 1 of 2: its wide job (2 shards) waits, and so does a's younger single job
    # (it would overtake); namespace b's job goes (no head-of-line blocking across namespaces).
    waiting = [_cand("a-wide", 1, "a", slots=2), _cand("a-single", 2, "a"), _cand("b-single", 3, "b")]
    assert _uids(admissible(waiting, [("a", 1)], max_total=10, max_per_namespace=2)) == ["b-single"]
    assert _uids(admissible(waiting, [], max_total=10, max_per_namespace=2)) == ["a-wide", "b-single"]


def test_settling_counts_the_slots_wanted():
    # 10 free slots, one waiting job of 4 shards: with the margin it is near the cap (settles);
    # far from it (1000 free) it does not.
    settling = [_cand("wide", 1, slots=4, ready_at=10.0)]
    assert admissible(settling, [], max_total=10, max_per_namespace=None, now=5.0) == []
    assert _uids(admissible(settling, [], max_total=1000, max_per_namespace=None, now=5.0)) == ["wide"]


def test_the_queue_reserves_and_describes_slots():
    q = AdmissionQueue(max_total=4, max_per_namespace=None)
    q.enqueue("wide", "ns", "2026-01-01T00:00:00Z", slots=3)
    q.enqueue("single", "ns", "2026-01-01T00:00:01Z")
    q.enqueue("late", "ns", "2026-01-01T00:00:02Z")
    assert q.admit({}) == ["wide", "single"]
    # The wide job's reservation holds 3 slots until its Job exists; then its Job's pods count.
    assert q.admit({}) == []
    q.settle("wide")
    q.settle("single")
    assert q.admit({"wide": "ns", "single": "ns"}, slots={"wide": 3}) == []
    assert q.describe({"wide": "ns", "single": "ns"}, "ns", {"wide": 3}, "late") == (
        "waiting for capacity: 4/4 runner jobs active cluster-wide, each shard counts as one"
    )
    q.enqueue("wide2", "ns", "2026-01-01T00:00:03Z", slots=2)
    assert "this job needs 2 (one per shard)" in q.describe({"wide": "ns"}, "ns", {"wide": 3}, "wide2")
    assert q.admit({"wide": "ns"}, slots={"wide": 3}) == ["late"]
    q.settle("late")
    assert q.admit({"late": "ns"}) == ["wide2"]


def test_job_slots_of_runner_jobs():
    assert job_slots(None) == 1
    assert job_slots({"spec": {"parallelism": 1, "completions": 1}}) == 1
    indexed = {"spec": {"completionMode": "Indexed", "parallelism": 3, "completions": 3}}
    assert job_slots(indexed) == 3
    # Two shards succeeded: one pod left to run (a retried index replaces its own pod).
    assert job_slots({**indexed, "status": {"succeeded": 2, "failed": 4}}) == 1
    assert job_slots({**indexed, "status": {"succeeded": 3}}) == 1  # finished: not counted at all (controller)
