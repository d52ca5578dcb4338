"""A sharded job, as the operator sees it: the shards' sum, and the one merge.

Each shard (one index of the job's Indexed Job, ``runner/job.py``) reports in its own key of
``status.shards.items`` and stores a partial result in its own Secret (``ifw.core.shards``).
The operator owns ``status.shards.count`` and ``.succeeded`` and, for a sharded job,
``status.progress`` (the sum over the shards; for a streaming job its text too, ``streamed_text``).
When the Indexed Job is Complete it merges the
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
from ifw.crds.transcriptionjob import MAX_PROGRESS_TEXT

DONE_STATES = ("Succeeded", "Unused")


def job_slots(job: dict[str, Any] | None) -> int:
    """How many runner pods a runner Job may run at once, i.e. what it counts against the admission caps
    (operator/queue.py): any Job but an Indexed Job of shards one; that one its ``parallelism``, less the
    shards that succeeded (their GPUs are free before the whole Job ends; a failed index retried runs in
    place of its own earlier pod)."""
    spec = (job or {}).get("spec") or {}
    if spec.get("completionMode") != "Indexed":
        return 1
    parallelism = max(1, int(spec.get("parallelism") or 1))
    remaining = int(spec.get("completions") or parallelism) - int(((job or {}).get("status") or {}).get("succeeded")
                                                                   or 0)  # fmt: skip
    return max(1, min(parallelism, remaining))


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


def streams(tj: dict[str, Any]) -> bool:
    """The job's client streams its text (the gateway's stream=true sets the annotation)."""
    return ((tj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_STREAM) == "true"


def streamed_text(tj: dict[str, Any], count: int) -> str:
    """A streaming job's text so far: the shards' texts in shard order, each only once every shard
    before it finished, so that it only ever grows at its end, and the merged text starts with it.

    Shard ``i``'s text (its item's ``text``, written by its runner) follows only a finished shard
    ``i-1`` whose whole text is there: a running shard's text may still grow, and a text cut to the
    shard's share of the size cap (``textCut``) is not the start of what follows it. An Unused shard
    adds nothing. Capped at the CRD's MAX_PROGRESS_TEXT, as a runner caps its own."""
    reported = items(tj)
    parts: list[str] = []
    for index in range(count):
        item = reported.get(str(index))
        if item is None:
            break
        if item.get("state") == "Unused":
            continue
        parts.append(item.get("text") or "")
        if item.get("state") != "Succeeded" or item.get("textCut") or "text" not in item:
            break  # what follows may not come after this text yet (or ever, before the merge)
    return "".join(parts)[:MAX_PROGRESS_TEXT]


def progress_patch(tj: dict[str, Any], count: int) -> dict[str, Any] | None:
    """status.progress as the sum over the shards (None: unchanged, so no write wakes every watcher).

    The total is the file's length (status.audio.durationSeconds, which every shard writes alike),
    or the shards' own totals once all of them have reported. A streaming job's text
    (``streamed_text``) is written only where it extends the text shown: a delta is never taken back
    (a retried shard starting over is not news until it passed what was shown)."""
    status = tj.get("status") or {}
    reported = items(tj)
    if not reported:
        return None
    current = status.get("progress") or {}
    text = None
    if streams(tj):
        grown, shown = streamed_text(tj, count), current.get("text") or ""
        if len(grown) > len(shown) and grown.startswith(shown):
            text = grown
    processed = sum(float(item.get("processedSeconds") or 0.0) for item in reported.values())
    total = (status.get("audio") or {}).get("durationSeconds")
    if not total and len(reported) >= count:
        total = sum(float(item.get("totalSeconds") or 0.0) for item in reported.values())
    if not total:
        return {"text": text, "lastUpdateTime": now_string()} if text else None
    processed = min(processed, total)
    body = {"percent": round(100.0 * processed / total, 1), "processedSeconds": round(processed, 2),
            "totalSeconds": round(total, 2)}  # fmt: skip
    if text:
        body["text"] = text
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
    final = final_status(transcript, ref, stream=streams(tj))
    final["shards"] = {"count": count, "succeeded": count}
    return final


def partial_selector(uid: str) -> str:
    """The partial-result Secrets of one job: by its uid and their component label."""
    return f"{LABEL_JOB_UID}={uid},{LABEL_COMPONENT}=partial"
