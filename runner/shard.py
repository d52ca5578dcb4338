"""One shard of a long file: find its cuts, decode only its range, transcribe it, hand back a partial.

Shard ``i`` of ``N`` owns ``[i·L/N, (i+1)·L/N)`` of the file (ifw.core.shards.nominal_range).
Each inner boundary ``b`` moves to the longest pause in the 30 s after it: that window is decoded
on its own (ffmpeg input seeking) and the VAD runs on it with fixed settings. The shard
before ``b`` and the shard after it run that very same command and the same VAD on the same
samples, so both cut at the same instant without talking to each other, and no word is heard
twice or lost. Then the shard decodes exactly ``[cut_i, cut_{i+1})`` (the last one to the end of
the file), runs the normal pipeline on it, and moves every time onto the file's clock.

Where the file states no exact length (a stream without one, a bitrate estimate) shards cannot
agree on ``L`` without decoding it all: shard 0 then does the whole file and the others are unused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from ifw.core import shards
from ifw.core.shards import PartialResult
from ifw.core.transcript import Transcript
from ifw.runner import audio, errors, vad
from ifw.runner.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from ifw.crds.transcriptionjob import TranscriptionJobSpec
    from ifw.runner import asr
    from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)


def run_shard(
    spec: TranscriptionJobSpec,
    source: str | Path,
    index: int,
    count: int,
    settings: RunnerSettings,
    on_progress: asr.ProgressCallback | None = None,
    on_text: asr.TextCallback | None = None,
    *,
    min_shard_seconds: float | None = None,
) -> PartialResult:
    """Transcribe shard ``index`` of ``count`` of ``source`` (an http(s) URL or a local file).

    ``count`` is how many shards were started; fewer may get work (``effective_count``: each at
    least ``min_shard_seconds``, default ``settings.shard_min_seconds``), the others return an
    ``unused`` partial at once. Progress and text are the shard's own (its range's seconds).
    """
    if not 0 <= index < count:
        raise errors.InvalidSpec(f"shard index {index} is outside 0..{count - 1} (parallelism {count})")
    minimum = min_shard_seconds if min_shard_seconds is not None else settings.shard_min_seconds
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    from ifw.runner import models

    model_name = spec.model or settings.default_model
    models.check_model_allowed(model_name, settings)
    with clock("load"):  # before the download: a bad model fails fast
        models.load_model(model_name, settings)

    settings.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as work:
        with clock("fetch"):
            path = _local(source, settings, Path(work))
        with clock("probe"):
            length = file_length(path, settings)
        n = shards.effective_count(count, length or 0.0, minimum)
        if index >= n:
            log.info("shard %d of %d: the file needs only %d shards; nothing to do", index, count, n)
            return _unused(spec, index, count, length, timings)
        lo, hi = shards.nominal_range(index, n, length or 0.0)
        with clock("cut"):
            start = 0.0 if index == 0 else find_cut(path, settings, lo)
            end = None if index == n - 1 else find_cut(path, settings, hi)
        with clock("decode"):
            report = audio.DecodeReport()  # the last shard's says whether the file was cut short
            samples = audio.decode_audio(path, settings, report, start=start,
                                         length=None if end is None else end - start)  # fmt: skip
    log.info("shard %d of %d: %.2f-%.2f s (nominal %.2f-%.2f s)", index, n, start, end or -1, lo, hi)
    partial = transcribe_range(spec, samples, start, settings, on_progress, on_text, timings)
    noted = partial.transcript.model_copy(update=report.transcript_fields())  # a file cut short says so
    return partial.model_copy(update={"index": index, "count": count, "duration": round(length or partial.end, 3),
                                      "transcript": noted})  # fmt: skip


def text_fields(text: str, count: int) -> dict[str, object]:
    """A streaming job's shard text for its item of status.shards.items: at most MAX_PROGRESS_TEXT / count
    characters, so the shards' texts together stay within one progress text; ``textCut`` says there is more
    (the operator then shows none of the shards after it before the merge: its text would not be the start
    of theirs). False, not absent, when whole: a merge patch would keep a retried attempt's old True."""
    from ifw.crds.transcriptionjob import MAX_PROGRESS_TEXT

    budget = max(1, MAX_PROGRESS_TEXT // max(1, count))
    return {"text": text[:budget], "textCut": len(text) > budget}


def partial_text(partial: PartialResult) -> str:
    """The shard's text as the merge puts it into the job's text: its segments' texts, in order."""
    return "".join(s.text for s in sorted(partial.transcript.segments, key=lambda s: (s.start, s.end)))


def file_length(path: Path, settings: RunnerSettings) -> float | None:
    """The length the container states, when it is exact; None otherwise. Too long is AudioTooLarge."""
    report = audio.DecodeReport()
    if audio._probe(path, settings.max_audio_seconds, report):
        raise audio._too_long(settings.max_audio_seconds, report)
    if report.stated_seconds is None or report.stated_is_estimate:
        return None
    return report.stated_seconds


def find_cut(path: Path, settings: RunnerSettings, boundary: float) -> float:
    """Where the boundary at ``boundary`` seconds really cuts: the longest pause in the window after it.

    The same inputs give the same answer in any process: the window is decoded by the same ffmpeg
    command, and the VAD runs on one thread with fixed settings (not the job's spec.vad).
    """
    from ifw.runner import vad

    try:
        window = audio.decode_audio(path, settings, start=boundary, length=shards.CUT_WINDOW_SECONDS)
    except errors.InvalidAudio as error:
        if "no audio samples" in str(error):  # the boundary lies past the last sample
            return boundary
        raise
    regions = vad.speech_regions(window, workers=1)
    return shards.cut_point([(boundary + a, boundary + b) for a, b in regions], boundary,
                            boundary + len(window) / SAMPLE_RATE)  # fmt: skip


def transcribe_range(
    spec: TranscriptionJobSpec,
    samples,
    start: float,
    settings: RunnerSettings,
    on_progress: asr.ProgressCallback | None = None,
    on_text: asr.TextCallback | None = None,
    timings: dict[str, float] | None = None,
) -> PartialResult:
    """The normal pipeline on one range's samples (starting at ``start`` on the file's clock)."""
    from ifw.runner import pipeline

    timings = timings if timings is not None else {}
    clock = _Clock(timings)
    found = None
    if spec.diarization.enabled:
        from ifw.runner import diarize

        d = spec.diarization
        with clock("diarize"):
            # A shard may hold fewer people than the file: only the upper bound holds per shard;
            # the merge honours numSpeakers and minSpeakers over the whole file.
            found = diarize.diarization(samples, settings, max_speakers=d.num_speakers or d.max_speakers)
    # With diarization, word times are decoded whatever the output (as pipeline.run does), so that
    # assign_speakers can cut a chunk where the speaker changes and then drop the words again.
    asr_only = spec.model_copy(update={"diarization": spec.diarization.model_copy(update={"enabled": False}),
                                       "timestamp": "word" if found is not None else spec.timestamp})  # fmt: skip
    # The VAD's stretches and forced piece ends lie on the file's clock, as in the unsharded run.
    with clock("transcribe"), vad.file_clock(start):
        transcript = pipeline.run(asr_only, samples, settings, on_progress=on_progress, on_text=on_text)
    speaker_seconds: dict[str, float] = defaultdict(float)
    if found is not None:
        from ifw.runner.speakers import assign_speakers

        transcript = assign_speakers(transcript, found.exclusive, timestamp=spec.timestamp)
        for a, b, speaker in found.exclusive:
            speaker_seconds[speaker] += b - a
    return PartialResult(
        index=0,
        count=1,
        start=round(start, 3),
        end=round(start + len(samples) / SAMPLE_RATE, 3),
        duration=round(start + len(samples) / SAMPLE_RATE, 3),
        transcript=shift(transcript, start),
        centroids=(found.centroids or {}) if found is not None else {},
        speaker_seconds={k: round(v, 3) for k, v in speaker_seconds.items()},
        timings=timings,
    )


def shift(transcript: Transcript, offset: float) -> Transcript:
    """The transcript with every time moved ``offset`` seconds later (onto the file's clock)."""

    def moved(item):
        update = {"start": round(item.start + offset, 3), "end": round(item.end + offset, 3)}
        if getattr(item, "words", None):
            update["words"] = [moved(w) for w in item.words]
        return item.model_copy(update=update)

    return transcript.model_copy(
        update={
            "segments": [moved(s) for s in transcript.segments],
            "speakers": None if transcript.speakers is None else [moved(t) for t in transcript.speakers],
        }
    )


def _local(source: str | Path, settings: RunnerSettings, work: Path) -> Path:
    """A local path to the audio: a URL is fetched through the guard (ffmpeg never fetches)."""
    text = str(source)
    if audio.is_url(text):
        if not text.lower().startswith(("http://", "https://")):
            raise errors.AudioFetchFailed(f"unsupported URL scheme in {text.split('://')[0]!r}: use http or https")
        return audio.fetch_audio(text, settings, work)
    path = Path(text).expanduser()
    if not path.is_file():
        raise errors.InvalidAudio(f"the audio file {path.name!r} does not exist")
    return path


def _unused(spec, index: int, count: int, length: float | None, timings: dict[str, float]) -> PartialResult:
    empty = Transcript(text="", segments=[], task=spec.task, timestamp=spec.timestamp, model=spec.model)
    return PartialResult(index=index, count=count, start=0.0, end=0.0, duration=round(length or 0.0, 3),
                         transcript=empty, unused=True, timings=timings)  # fmt: skip


class _Clock:
    """Adds each named step's seconds to ``timings`` (bench/fanout.py reports the serial part)."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def __call__(self, name: str):
        clock = self

        class _Step:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.timings[name] = round(clock.timings.get(name, 0.0) + time.perf_counter() - self.t, 3)

        return _Step()


# ----------------------------------------------------------------- several shards on one machine


def _child(spec_json: str, source: str, index: int, count: int, settings_json: str, threads: int,
           min_shard_seconds: float | None) -> str:  # fmt: skip
    """One shard in a child process (run_local): settings and results cross as JSON."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
    from ifw.runner.config import RunnerSettings

    # As the CLI builds it: the audio may be a local path, which AudioSource alone would refuse.
    spec = TranscriptionJobSpec.model_validate(
        {**json.loads(spec_json), "audio": AudioSource.model_construct(url=source)}
    )
    # Through __init__, so HF_TOKEN and the like still come from the environment.
    settings = RunnerSettings(**{**json.loads(settings_json), "cpu_threads": threads})
    started = time.time()
    partial = run_shard(spec, source, index, count, settings, min_shard_seconds=min_shard_seconds)
    partial.timings["started_at"] = started
    partial.timings["finished_at"] = time.time()
    return partial.model_dump_json()


def run_local(
    spec: TranscriptionJobSpec,
    source: str | Path,
    count: int,
    settings: RunnerSettings,
    *,
    threads: int = 1,
    min_shard_seconds: float | None = None,
) -> list[PartialResult]:
    """``count`` shards as ``count`` child processes on this machine (``threads`` CPU threads each).

    A shard's failure is raised as the RunnerError it met (the first in index order).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter per shard (fork after torch has threads is unsafe)
    context = multiprocessing.get_context("spawn")
    spec_json = spec.model_dump_json(by_alias=True, exclude_none=True, exclude={"audio"})
    settings_json = settings.model_dump_json(exclude={"hf_token", "shard_index", "shard_count"})
    from ifw.core.processes import die_with_parent

    # PR_SET_PDEATHSIG in each worker: a shard still decoding ends with a killed CLI, not running on
    with ProcessPoolExecutor(max_workers=count, mp_context=context, initializer=die_with_parent) as pool:
        futures = [pool.submit(_child, spec_json, str(source), i, count, settings_json, threads, min_shard_seconds)
                   for i in range(count)]  # fmt: skip
        return [PartialResult.model_validate_json(f.result()) for f in futures]
