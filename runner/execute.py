"""One attempt at a TranscriptionJob, the same wherever it runs.

    validate the spec -> [the runtime may refuse it] -> progress -> pipeline -> processed_by
      -> store the result -> final status        (any failure -> one Failure, reported once)

A runtime (a Job's pod, a pool worker, later a shard) implements ``Attempt``: how its status
writes reach the job, how it learns it was cancelled, what it reports on failure. The steps
themselves are written here once, so a fix or a new field reaches every runtime at once.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ifw.core import results
from ifw.core.contract import Failure, Reason, Runtime, now_string
from ifw.core.transcript import ProcessedBy
from ifw.crds.transcriptionjob import PARALLELISM_AUTO, TranscriptionJobSpec
from ifw.runner import errors, metrics
from ifw.runner.progress import ProgressReporter, final_status, keep_trying, streams

if TYPE_CHECKING:
    import numpy as np

    from ifw.runner.audio import DecodeReport
    from ifw.runner.config import RunnerSettings
    from ifw.runner.decoding import Decode

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was deleted or given to another runner while this one ran it: stop, report nothing."""


class HandBack(Exception):
    """The runner gives the job back to the operator unrun (a Job or another worker takes it; with
    ``shards``, the Indexed Job of that many shards)."""

    def __init__(self, reason: Reason, message: str, shards: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.shards = shards


def auto_shards(spec: TranscriptionJobSpec, settings: RunnerSettings, duration: float) -> int:
    """How many shards an Auto job's audio asks for (1: run it here). Only audio longer than the operator's
    threshold is sharded, into pieces of at least its shortest shard, at most its most shards."""
    from ifw.core.shards import effective_count

    if spec.parallelism != PARALLELISM_AUTO or settings.shard_count is not None or not spec.shardable:
        return 1
    if duration <= settings.shard_auto_above_seconds:
        return 1
    return effective_count(settings.shard_max_count, duration, settings.shard_min_seconds)


class Attempt(ABC):
    """How one runtime runs an attempt: where its writes go and what it says when it ends."""

    runtime: Runtime

    @abstractmethod
    def write(self, status: dict[str, Any]) -> None:
        """Write the runner's part of the status (progress, audio, speakers, result); a failed
        write raises a Failure (transient), a lost claim on the job raises Cancelled."""

    @abstractmethod
    def fail(self, failure: Failure) -> None:
        """Report the attempt's failure (the operator retries it or not by its reason)."""

    def hand_back(self, back: HandBack) -> None:
        raise NotImplementedError(f"{self.runtime} runs every job it is given")

    def finish(self, final: dict[str, Any]) -> None:
        """The last write: the result is stored."""
        self.write(final)

    def check(self) -> None:
        """Raise Cancelled when the job is no longer this attempt's (between pieces)."""

    def audio(self, spec: TranscriptionJobSpec, settings: RunnerSettings) -> str | np.ndarray:
        """What the pipeline decodes: the URL (it loads the model first, so a bad model fails before
        the download), or audio this runtime already loaded to decide whether to take the job (loaded
        with ``report=self.decode_report``, so that a file cut short still says so)."""
        return spec.audio.url

    @functools.cached_property
    def decode_report(self) -> DecodeReport:
        """What decoding this attempt's audio found (a file cut short): the transcript and status say it."""
        from ifw.runner.audio import DecodeReport

        return DecodeReport()

    def decoder(self, spec: TranscriptionJobSpec) -> Decode | None:
        """A shared decoder to hand the pieces to (a pool worker's batching across jobs); None: own."""
        return None

    @property
    @abstractmethod
    def processed_by(self) -> ProcessedBy: ...


def parse_spec(tj: dict[str, Any]) -> TranscriptionJobSpec:
    try:
        return TranscriptionJobSpec.model_validate(tj.get("spec") or {})
    except ValidationError as error:
        raise errors.InvalidSpec(f"invalid spec: {error}") from error


def as_failure(error: BaseException) -> Failure:
    """Any exception as the Failure a runner reports: its own, out of memory, or unforeseen (retried)."""
    if isinstance(error, Failure):
        return error
    if isinstance(error, MemoryError):
        return errors.OutOfMemory(f"out of host memory: {error}")
    log.error("unexpected failure", exc_info=error)
    return errors.RunnerError(f"unexpected {type(error).__name__}: {error}")


def transcribe(tj: dict[str, Any], attempt: Attempt, settings: RunnerSettings, store: results.ResultSettings,
               core_v1: Any) -> dict[str, Any]:  # fmt: skip
    """The attempt's work, start to end; returns the final status written. Raises on failure."""
    from ifw.runner import pipeline

    spec = parse_spec(tj)
    stream = streams(tj)

    def report(body: dict[str, Any]) -> None:
        attempt.check()
        # The duration is known once the audio is decoded: show it (kubectl's Duration column) from then on.
        attempt.write({"progress": body, "audio": {"durationSeconds": body["totalSeconds"]}})

    reporter = ProgressReporter(report, settings.progress_interval_seconds)
    source = attempt.audio(spec, settings)
    transcript = pipeline.run(spec, source, settings, on_progress=reporter, decode=attempt.decoder(spec),
                              on_text=reporter.text if stream else None, report=attempt.decode_report)  # fmt: skip
    metrics.observe_attempt()  # the GPU memory peak (runner/metrics.py)
    reporter.flush()
    attempt.check()
    # Where it ran (the attempt: pod, node, runtime) beside how (the pipeline: device, dtype, attention).
    made = transcript.processed_by or ProcessedBy()
    transcript.processed_by = made.model_copy(update=attempt.processed_by.model_dump(exclude_none=True))
    # From here on the work is done: outages of the API or the store are waited out, not redone.
    ref = keep_trying(lambda: results.store_result(transcript, tj, store, core_v1=core_v1),
                      seconds=settings.result_write_retry_seconds, what="storing the result")  # fmt: skip
    final = final_status(transcript, ref, stream=stream)
    keep_trying(lambda: attempt.finish(final), seconds=settings.result_write_retry_seconds,
                what="writing the final status")  # fmt: skip
    return final


def run(tj: dict[str, Any], attempt: Attempt, settings: RunnerSettings, store: results.ResultSettings,
        core_v1: Any) -> dict[str, Any] | None:  # fmt: skip
    """``transcribe``, with every way it can end reported through ``attempt``; the final status, or
    None when the attempt ended otherwise (failed, handed back, cancelled)."""
    meta = tj.get("metadata") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    # One shard of a sharded job does its stretch and stores a partial result; the operator merges.
    work = transcribe_shard if settings.shard_count is not None else transcribe
    try:
        final = work(tj, attempt, settings, store, core_v1)
    except Cancelled:
        log.info("%s: cancelled", where)
        return None
    except HandBack as back:
        log.info("%s: handed back (%s: %s)", where, back.reason, back.message)
        attempt.hand_back(back)
        return None
    except Exception as error:  # noqa: BLE001 - every failure is reported, never raised past the attempt
        failure = as_failure(error)
        log.warning("%s: %s: %s", where, failure.reason, failure.message)
        attempt.fail(failure)
        return None
    log.info("%s: done (%s)", where, (final.get("result") or {}).get("ref") or "partial result stored")
    return final


def shard_item(status: dict[str, Any], attempt: Attempt, settings: RunnerSettings) -> dict[str, Any]:
    """This shard's entry of status.shards.items, merged into its own key only: the shards write at once."""
    where = attempt.processed_by
    item = {**status, "pod": where.pod, "node": where.node, "lastUpdateTime": now_string()}
    return {"shards": {"items": {str(settings.shard_index): {k: v for k, v in item.items() if v is not None}}}}


def transcribe_shard(tj: dict[str, Any], attempt: Attempt, settings: RunnerSettings, store: results.ResultSettings,
                     core_v1: Any) -> dict[str, Any]:  # fmt: skip
    """One shard's work: its stretch of the audio, the partial result stored, its item of status.shards."""
    from ifw.core import shards
    from ifw.runner.shard import partial_text, run_shard, text_fields

    spec = parse_spec(tj)
    index, count = settings.shard_index, settings.shard_count
    if index is None or not 0 <= index < count:
        raise errors.InvalidSpec(f"shard index {index} is not one of 0..{count - 1} (JOB_COMPLETION_INDEX, set by "
                                 "the Indexed Job)")  # fmt: skip

    stream = streams(tj)
    written: dict[str, str] = {}  # the text last written: unchanged, it is not sent again

    def report(body: dict[str, Any]) -> None:
        attempt.check()
        item = {"state": "Running", "processedSeconds": body["processedSeconds"], "totalSeconds": body["totalSeconds"]}
        if "text" in body and body["text"] != written.get("text"):
            item.update(text_fields(body["text"], count))  # a streaming job: the operator shows it in order
            written["text"] = body["text"]
        attempt.write(shard_item(item, attempt, settings))

    reporter = ProgressReporter(report, settings.progress_interval_seconds)
    partial = run_shard(spec, spec.audio.url, index, count, settings, on_progress=reporter,
                        on_text=reporter.text if stream else None)  # fmt: skip
    metrics.observe_attempt()
    reporter.flush()
    attempt.check()
    made = partial.transcript.processed_by or ProcessedBy()
    partial.transcript.processed_by = made.model_copy(update=attempt.processed_by.model_dump(exclude_none=True))
    keep_trying(lambda: shards.store_partial(core_v1, tj, partial), seconds=settings.result_write_retry_seconds,
                what="storing the partial result")  # fmt: skip
    length = round(max(partial.end - partial.start, 0.0), 2)
    item = {"state": "Unused" if partial.unused else "Succeeded", "processedSeconds": length, "totalSeconds": length,
            "start": round(partial.start, 3), "end": round(partial.end, 3)}  # fmt: skip
    if stream:
        item.update(text_fields(partial_text(partial), count))
    final = shard_item(item, attempt, settings)
    if partial.duration:
        final["audio"] = {"durationSeconds": round(partial.duration, 3)}  # the same from every shard
    keep_trying(lambda: attempt.finish(final), seconds=settings.result_write_retry_seconds,
                what="writing the shard's status")  # fmt: skip
    return final

