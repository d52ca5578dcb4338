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

from ifw.core.contract import ANNOTATION_STREAM, Failure
from ifw.core.progress import final_status, progress_body
from ifw.crds.transcriptionjob import MAX_PROGRESS_TEXT

__all__ = ["ProgressReporter", "TerminalBar", "final_status", "keep_trying", "progress_body", "streams"]

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


def streams(tj: dict[str, Any]) -> bool:
    """The job asked for its text as it grows (the gateway's stream=true sets the annotation)."""
    return ((tj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_STREAM) == "true"


class ProgressReporter:
    """Callable as an asr.ProgressCallback; sends at most one report per `interval` seconds.

    The first report, the first with text (a streaming client's first words should not wait for
    the interval) and the final one (processed == total) always go out. A
    failing sink is logged, never raised: progress is not worth failing a job.
    """

    def __init__(self, sink: Sink, interval: float, clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.interval = interval
        self.clock = clock
        self._last_sent: float | None = None
        self._pending: tuple[float, float] | None = None
        self._text: str | None = None
        self._text_sent = False
        self.sent: list[dict[str, Any]] = []  # what went out, for logs and tests

    def text(self, so_far: str) -> None:
        """Streaming jobs: the text so far goes out with the next report (the CRD's size cap kept)."""
        self._text = so_far[:MAX_PROGRESS_TEXT]

    def __call__(self, processed: float, total: float) -> None:
        now = self.clock()
        final = total > 0 and processed >= total
        first_text = self._text is not None and not self._text_sent
        if self._last_sent is None or final or first_text or now - self._last_sent >= self.interval:
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
            self._text_sent = True
        try:
            self.sink(body)
            self.sent.append(body)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            log.warning("progress report failed: %s", e)


class TerminalBar:
    """The command line's progress bar, for a terminal: audio seconds done of the total and the
    speed (audio seconds per wall-clock second, × real time), redrawn in place at most `every`
    seconds apart (and at the end). `close()` ends its line."""

    WIDTH = 24

    def __init__(self, stream: Any, every: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.every = every
        self.clock = clock
        self.started = clock()
        self._drawn: float | None = None
        self._shown = False

    def __call__(self, processed: float, total: float) -> None:
        now = self.clock()
        if total <= 0 or (self._drawn is not None and now - self._drawn < self.every and processed < total):
            return
        self._drawn = now
        done = min(max(processed, 0.0), total)
        filled = int(self.WIDTH * done / total)
        elapsed = now - self.started
        speed = f"{done / elapsed:5.1f}× real time" if elapsed > 0 and done > 0 else " " * 16
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {done:7.1f} / {total:.1f} s of audio  {speed}")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
