"""A sharded job, as the operator sees it: the shards' sum, and the one merge.

Each shard (one index of the job's Indexed Job, ``runner/job.py``) reports in its own key of
``status.shards.items`` and stores a partial result in its own Secret (``ifw.core.shards``).
The operator owns ``status.shards.count`` and ``.succeeded`` and, for a sharded job,
``status.progress`` (the sum over the shards). When the Indexed Job is Complete it merges the
partials once (``merge_and_store``: blocking, run in the API thread pool), stores the one result
as a runner would, and writes the same final status a runner writes (ifw.core.progress), in the
same patch as Succeeded; the partial Secrets are deleted after that.

Pure functions except ``merge_and_store``.
"""

from __future__ import annotations

from typing import Any

from ifw.core import results, shards
from ifw.core.contract import ANNOTATION_STREAM, LABEL_COMPONENT, LABEL_JOB_UID, Failure, Reason, now_string
from ifw.core.progress import final_status
from ifw.core.transcript import ProcessedBy

DONE_STATES = ("Succeeded", "Unused")


def _shards(tj: dict[str, Any]) -> dict[str, Any]:
    return (tj.get("status") or {}).get("shards") or {}


def items(tj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return _shards(tj).get("items") or {}


def shards_patch(tj: dict[str, Any], count: int) -> dict[str, Any] | None:
    """status.shards.count/.succeeded as they should be (None: already so). Only the operator's two
    keys: a merge patch leaves the shards' own items alone."""
    current = _shards(tj)
    succeeded = sum(1 for item in items(tj).values() if item.get("state") in DONE_STATES)
    want = {"count": count, "succeeded": succeeded}
    patch = {key: value for key, value in want.items() if current.get(key) != value}
    return patch or None


def progress_patch(tj: dict[str, Any], count: int) -> dict[str, Any] | None:
    """status.progress as the sum over the shards (None: unchanged, so no write wakes every watcher).

    The total is the file's length (status.audio.durationSeconds, which every shard writes alike),
    or the shards' own totals once all of them have reported."""
    status = tj.get("status") or {}
    reported = items(tj)
    if not reported:
        return None
    processed = sum(float(item.get("processedSeconds") or 0.0) for item in reported.values())
    total = (status.get("audio") or {}).get("durationSeconds")
    if not total and len(reported) >= count:
        total = sum(float(item.get("totalSeconds") or 0.0) for item in reported.values())
    if not total:
        return None
    processed = min(processed, total)
    body = {"percent": round(100.0 * processed / total, 1), "processedSeconds": round(processed, 2),
            "totalSeconds": round(total, 2)}  # fmt: skip
    current = status.get("progress") or {}
    if all(current.get(key) == value for key, value in body.items()):
        return None
    return {**body, "lastUpdateTime": now_string()}


def running_message(tj: dict[str, Any], count: int, pods: list[dict[str, Any]]) -> str:
    """'2 of 3 shards running, 1 done', for the Running condition."""
    running = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running"
                  and not p["metadata"].get("deletionTimestamp"))  # fmt: skip
    done = sum(1 for item in items(tj).values() if item.get("state") in DONE_STATES)
    return f"{running} of {count} shards running, {done} done"


class MergeFailed(Failure):
    """The shards' partial results do not make one transcript (they disagree): no retry fixes it."""

    reason = Reason.ShardMergeFailed


def merge_and_store(tj: dict[str, Any], count: int, core_v1: Any, store: results.ResultSettings) -> dict[str, Any]:
    """Load the partials, merge them, store the one result: the runner fields of the final status.

    Raises ResultStoreFailed (transient: the reconcile retries) or MergeFailed / ResultNotFound
    (the job fails)."""
    partials = shards.load_partials(core_v1, tj, count)
    hints = (tj.get("spec") or {}).get("diarization") or {}
    try:
        transcript = shards.merge(
            partials,
            num_speakers=hints.get("numSpeakers"),
            min_speakers=hints.get("minSpeakers"),
            max_speakers=hints.get("maxSpeakers"),
        )
    except ValueError as error:
        raise MergeFailed(f"the shards' partial results cannot be merged: {error}") from error
    if transcript.processed_by is None:
        transcript.processed_by = ProcessedBy(runtime="Job")
    ref = results.store_result(transcript, tj, store, core_v1=core_v1)
    streamed = ((tj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_STREAM) == "true"
    final = final_status(transcript, ref, stream=streamed)
    final["shards"] = {"count": count, "succeeded": count}
    return final


def partial_selector(uid: str) -> str:
    """The partial-result Secrets of one job: by its uid and their component label."""
    return f"{LABEL_JOB_UID}={uid},{LABEL_COMPONENT}=partial"
