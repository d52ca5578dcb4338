"""Batching across jobs (runner/batching.py) on real Whisper weights and real speech.

Several jobs' transcribe() calls hand their pieces to one SharedDecoder from their own threads,
as a pool worker's jobs do: their pieces share generate() calls, each job still gets its own
transcript and its own progress, a cancelled job leaves the queue, and a job whose pieces make
the decode fail gets the error alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY

from ifw.runner import asr, decoding, errors, models, vad
from ifw.runner.audio import SAMPLE_RATE
from ifw.runner.batching import SharedDecoder
from ifw.runner.config import RunnerSettings
from tests.runner.conftest import read_wav

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def whisper() -> models.WhisperModel:
    return models.load_model("tiny.en", RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2))


def _calls() -> float:
    return REGISTRY.get_sample_value("ifw_worker_generate_calls_total") or 0.0


def _concurrently(targets):
    """Run the callables in threads started together; their results (or exceptions) in order."""
    out: list = [None] * len(targets)
    start = threading.Barrier(len(targets))

    def run(i, fn):
        start.wait()
        try:
            out[i] = fn()
        except BaseException as error:  # noqa: BLE001 - returned to the test
            out[i] = error

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_concurrent_jobs_share_generate_calls_and_each_gets_its_own_transcript(whisper, harvard, wer):
    clips = [read_wav(s.path) for s in harvard[:6]]
    alone = [asr.transcribe(c, whisper).text for c in clips]
    decoder = SharedDecoder(whisper, batch_size=8, max_wait_seconds=2.0)
    progress: list[list[float]] = [[] for _ in clips]

    def job(i):
        return asr.transcribe(clips[i], whisper, decode=decoder.session(lambda: None),
                              on_progress=lambda done, total: progress[i].append(done / total))  # fmt: skip

    before = _calls()
    transcripts = _concurrently([lambda i=i: job(i) for i in range(len(clips))])
    calls = _calls() - before
    decoder.stop()
    for i, t in enumerate(transcripts):
        assert not isinstance(t, BaseException), t
        assert wer(alone[i], t.text) <= 0.1, (alone[i], t.text)
        assert wer(harvard[i].text, t.text) <= 0.5, t.text
        assert progress[i][-1] == pytest.approx(1.0)  # each job's own progress reached 100 %
    # six one-piece jobs, alone: six generate() calls (and more for any fallback); together: one or two
    assert calls <= 3, calls


def test_without_cross_job_batching_each_call_holds_one_jobs_pieces(whisper, harvard):
    clips = [read_wav(s.path) for s in harvard[:3]]
    decoder = SharedDecoder(whisper, batch_size=8, max_wait_seconds=2.0, cross_job=False)
    before = _calls()
    out = _concurrently([lambda c=c: asr.transcribe(c, whisper, decode=decoder.session(lambda: None)) for c in clips])
    decoder.stop()
    assert all(not isinstance(t, BaseException) and t.text.strip() for t in out), out
    assert _calls() - before >= 3


class _Stop(Exception):
    pass


def test_a_cancelled_job_leaves_the_queue_and_the_others_finish(whisper, harvard):
    clips = [read_wav(s.path) for s in harvard[:4]]
    # the job to cancel: eight sentences, one piece each
    gap = np.zeros(SAMPLE_RATE, np.float32)
    long = np.concatenate([part for s in harvard[:8] for part in (read_wav(s.path), gap)])
    bounds = np.cumsum([0] + [len(read_wav(s.path)) + len(gap) for s in harvard[:8]]) / SAMPLE_RATE
    pieces = [vad.Piece(a, b - 1.0, ((a, b - 1.0),)) for a, b in zip(bounds, bounds[1:])]
    decoder = SharedDecoder(whisper, batch_size=1, max_wait_seconds=0.0)  # one piece per call: a queue forms
    cancel = threading.Event()

    def check():
        if cancel.is_set():
            raise _Stop()

    def cancelled_job():
        # many pieces: the job is still queued when it is cancelled after its first piece
        return asr.transcribe(long, whisper, decode=decoder.session(check), pieces=pieces,
                              on_progress=lambda done, total: done > bounds[1] and cancel.set())  # fmt: skip

    before = _calls()
    out = _concurrently([cancelled_job] + [lambda c=c: asr.transcribe(c, whisper, decode=decoder.session(lambda: None))
                                           for c in clips[1:]])  # fmt: skip
    decoder.stop()
    assert isinstance(out[0], _Stop), out[0]
    assert all(not isinstance(t, BaseException) and t.text.strip() for t in out[1:]), out
    # 3 pieces of the others, and of the cancelled job's 8 only those decoded before it was cancelled
    # (the decode of one more may be under way then); uncancelled this would be 11 calls
    assert _calls() - before <= 6


def test_a_job_whose_pieces_fail_the_decode_gets_the_error_alone(whisper, harvard):
    clips = [read_wav(s.path) for s in harvard[:3]]
    decoder = SharedDecoder(whisper, batch_size=8, max_wait_seconds=2.0)

    def poison():
        # an English-only model asked for German: decode_pieces refuses the request
        request = decoding.PieceRequest(clips[0], language="de")
        return decoder.decode([request], None, lambda: None)

    out = _concurrently([poison] + [lambda c=c: asr.transcribe(c, whisper, decode=decoder.session(lambda: None))
                                    for c in clips[1:]])  # fmt: skip
    assert isinstance(out[0], errors.InvalidSpec), out[0]
    assert all(not isinstance(t, BaseException) and t.text.strip() for t in out[1:]), out
    # the decoder thread goes on serving
    assert asr.transcribe(clips[0], whisper, decode=decoder.session(lambda: None)).text.strip()
    decoder.stop()
