"""The status a transcript ends with, as the CRD spells it: one shape for every writer.

A runner writes it when it stored its result (ifw.runner.progress re-exports these), and the
operator writes the same when it merged a sharded job's partial results into one; so a client
cannot tell from the status whether a job ran as one runner or as shards (status.shards aside).
"""

from __future__ import annotations

from typing import Any

from ifw.core.contract import now_string
from ifw.crds.transcriptionjob import MAX_PROGRESS_TEXT


def progress_body(processed: float, total: float) -> dict[str, Any]:
    """status.progress as the CRD spells it."""
    processed = min(max(processed, 0.0), total) if total > 0 else 0.0
    return {
        "percent": round(100.0 * processed / total, 1) if total > 0 else 0.0,
        "processedSeconds": round(processed, 2),
        "totalSeconds": round(total, 2),
        "lastUpdateTime": now_string(),
    }


def final_status(transcript: Any, result: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """The last status write of a transcribed job, the same from a Job's pod, a pool worker and the
    operator's merge of shards (a streaming job's progress.text ends as the whole text, within the size cap)."""
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
            # a file cut short: transcribed as far as it goes (durationSeconds), and said so; None clears
            # what an earlier attempt wrote
            "cutShort": True if transcript.cut_short else None,
            "statedSeconds": transcript.stated_duration,
            "note": transcript.audio_note,
        },
        "result": result,
    }
    if transcript.speakers is not None:
        final["speakers"] = len({turn.speaker for turn in transcript.speakers})
    return final
