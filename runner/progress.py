"""Progress reports, throttled: at most one status write per interval.

Every watcher of TranscriptionJobs (the operator, the gateway's shared watch,
kubectl -w) receives every status write, so the runner reports often enough
for a progress bar and no more often than `settings.progress_interval_seconds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ifw.core.contract import ANNOTATION_STREAM, Failure, now_string
from ifw.crds.transcriptionjob import MAX_PROGRESS_TEXT

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any]], None]


def keep_trying(write: Callable[[], Any], *, seconds: float, what: str) -> Any:
    """Run ``write`` until it succeeds, for up to ``seconds``, while it fails transiently.

    Once the audio is transcribed, losing the work to a short outage of the apiserver or the
    result store would cost a whole new transcription (a new pod, the model load, the decode):
    the result and the last status write are retried instead. Bad input is never retried.
    """
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

    def transient(error: BaseException) -> bool:
        return isinstance(error, Failure) and not error.bad_input

    def tell(state: Any) -> None:
        log.warning("%s failed (%s); retrying for up to %.0f s", what, state.outcome.exception(), seconds)

    retrying = Retrying(stop=stop_after_delay(seconds), wait=wait_exponential_jitter(initial=1, max=15),
                        retry=retry_if_exception(transient), before_sleep=tell, reraise=True)  # fmt: skip
    return retrying(write)


def final_status(transcript: Any, result: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """The runner's last status write, the same from a Job's pod and from a pool worker
    (a streaming job's progress.text ends as the whole text, within the size cap)."""
    progress = progress_body(transcript.duration, transcript.duration)
    if stream:
        progress["text"] = transcript.text[:MAX_PROGRESS_TEXT]
    final: dict[str, Any] = {
        "progress": progress,
        "audio": {
            "durationSeconds": transcript.duration,
            "language": transcript.language,
            "languageProbability": transcript.language_probability,
            # nothing dropped silently: speech found, speech with text, stretches given up
            "speechSeconds": transcript.speech_seconds,
            "textSeconds": transcript.text_seconds,
            "droppedPieces": transcript.dropped_pieces,
        },
        "result": result,
    }
    if transcript.speakers is not None:
        final["speakers"] = len({turn.speaker for turn in transcript.speakers})
    return final


def streams(tj: dict[str, Any]) -> bool:
    """The job asked for its text as it grows (the gateway's stream=true sets the annotation)."""
    return ((tj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_STREAM) == "true"


def progress_body(processed: float, total: float) -> dict[str, Any]:
    """status.progress as the CRD spells it."""
    processed = min(max(processed, 0.0), total) if total > 0 else 0.0
    return {
        "percent": round(100.0 * processed / total, 1) if total > 0 else 0.0,
        "processedSeconds": round(processed, 2),
        "totalSeconds": round(total, 2),
        "lastUpdateTime": now_string(),
    }


class ProgressReporter:
    """Callable as an asr.ProgressCallback; sends at most one report per `interval` seconds.

    The first report and the final one (processed == total) always go out. A
    failing sink is logged, never raised: progress is not worth failing a job.
    """

    def __init__(self, sink: Sink, interval: float, clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.interval = interval
        self.clock = clock
        self._last_sent: float | None = None
        self._pending: tuple[float, float] | None = None
        self._text: str | None = None
        self.sent: list[dict[str, Any]] = []  # what went out, for logs and tests

    def text(self, so_far: str) -> None:
        """Streaming jobs: the text so far goes out with the next report (the CRD's size cap kept)."""
        self._text = so_far[:MAX_PROGRESS_TEXT]

    def __call__(self, processed: float, total: float) -> None:
        now = self.clock()
        final = total > 0 and processed >= total
        if self._last_sent is None or final or now - self._last_sent >= self.interval:
            self._send(processed, total, now)
        else:
            self._pending = (processed, total)

    def flush(self) -> None:
        """Send the latest report held back by the throttle, if any."""
        if self._pending is not None:
            self._send(*self._pending, self.clock())

    def _send(self, processed: float, total: float, now: float) -> None:
        self._pending = None
        self._last_sent = now
        body = progress_body(processed, total)
        if self._text is not None:
            body["text"] = self._text
        try:
            self.sink(body)
            self.sent.append(body)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            log.warning("progress report failed: %s", e)
