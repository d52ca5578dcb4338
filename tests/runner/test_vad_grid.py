"""The VAD's stretches on the file's clock (issue 17): regions that depend neither on the CPU count
nor, from a shard's first grid point on, on where the shard starts; and pieces that end after each
grid point at the same pause, so a shard decodes the unsharded run's windows from there on.

No model: the VAD alone, on real meeting speech (../shared/speech/ami) with a short grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from ifw.runner import vad
from tests.runner.conftest import SAMPLE_RATE, SPEECH_DIR

STEP = 40.0  # the grid here (the default is 120 s): four grid points in ~150 s of speech
WARM = 10.0


@pytest.fixture(scope="module")
def meeting() -> np.ndarray:
    """Three AMI excerpts (30 s each), the two densest twice: 150 s of overlapping talk."""
    from ifw.runner.audio import decode_audio
    from ifw.runner.config import RunnerSettings

    names = ("dev00", "trn03", "dev01", "trn03", "dev00")
    parts = [decode_audio(SPEECH_DIR / "ami" / f"{name}.wav", RunnerSettings()) for name in names]
    return np.concatenate(parts)[: 150 * SAMPLE_RATE + 77]  # off the frame grid: the last frame is padded


@pytest.fixture(autouse=True)
def short_grid(monkeypatch):
    monkeypatch.setattr(vad, "MIN_STRETCH_SECONDS", STEP)
    monkeypatch.setattr(vad, "WARM_UP_SECONDS", WARM)


def test_stretches_lie_on_the_files_grid_whatever_the_audio_starts_at():
    assert vad.stretch_bounds(150 * SAMPLE_RATE + 77) == [0, 640000, 1280000, 1920000, 150 * SAMPLE_RATE + 77]
    start = 1469 * 512 / SAMPLE_RATE  # 47.008 s: a shard's cut, on the frame grid
    bounds = vad.stretch_bounds(80 * SAMPLE_RATE, start)
    assert [b + round(start * SAMPLE_RATE) for b in bounds[1:-1]] == [1280000, 1920000]
    assert all(b % vad.FRAME == 0 for b in bounds[:-1])
    assert vad.stretch_bounds(1000) == [0, 1000]


def test_regions_do_not_depend_on_the_worker_count(meeting):
    regions = vad.speech_regions(meeting, workers=1)
    assert len(regions) > 20
    for workers in (2, 3, 4, 8):
        assert vad.speech_regions(meeting, workers=workers) == regions, workers


def test_a_shard_on_the_files_clock_finds_the_files_regions_and_pieces_from_its_first_grid_point(meeting):
    full = vad.speech_regions(meeting)
    pieces = vad.split_audio(meeting)
    for frame in (782, 1469, 1953):  # 25.0 s, 47.0 s, 62.5 s
        start = frame * vad.FRAME / SAMPLE_RATE
        shard = meeting[frame * vad.FRAME :]
        # the first grid point with all its warm-up inside the shard
        settled = next(k * STEP for k in range(1, 10) if k * STEP - WARM >= start)
        mine = _on_file_clock(vad.speech_regions(shard, start=start), start)
        assert [r for r in mine if r[0] >= settled] == [r for r in _on_file_clock(full) if r[0] >= settled], start
        with vad.file_clock(start):  # a shard's transcription sets its start once for the VAD
            assert vad.speech_regions(shard) == vad.speech_regions(shard, start=start)
            theirs = _on_file_clock([(p.start, p.end) for p in vad.split_audio(shard)], start)
        after = settled + vad.FORCED_CUT_WINDOW_SECONDS
        expected = [p for p in _on_file_clock([(p.start, p.end) for p in pieces]) if p[0] >= after]
        assert expected and [p for p in theirs if p[0] >= after] == expected, start


def _on_file_clock(spans, start: float = 0.0) -> list[tuple[float, float]]:
    return [(round(start + a, 6), round(start + b, 6)) for a, b in spans]


def test_a_piece_ends_at_the_longest_pause_after_each_grid_point():
    regions = [(0.0, 39.0), (40.0, 45.0), (47.0, 50.0), (50.5, 75.0), (76.0, 79.0), (80.5, 100.0)]
    # after 40 s: pauses 1 s (from 39, reaching past 40), 2 s, 0.5 s (the window ends at 70 s)
    assert vad._split_at_points(regions, [40.0], 100.0) == [regions[:2], regions[2:]]
    # after 75 s: the pause before 76 s (1 s) and 79-80.5 s (1.5 s)
    assert vad._split_at_points(regions, [75.0], 100.0) == [regions[:5], regions[5:]]
    # the silence up to the audio's end is the longest: nothing to split in this audio
    assert vad._split_at_points(regions[:5], [75.0], 85.0) == [regions[:5]]
    # the silence from the audio's start is the longest (a shard that starts in that pause)
    assert vad._split_at_points([(5.0, 20.0), (20.5, 30.0)], [-10.0], 30.0) == [[(5.0, 20.0), (20.5, 30.0)]]
    # speech throughout the window: no split
    assert vad._split_at_points([(0.0, 29.0), (29.2, 80.0)], [40.0], 80.0) == [[(0.0, 29.0), (29.2, 80.0)]]
    every = vad.split_audio(np.zeros(0, np.float32))
    assert every == []


def test_the_grid_and_its_window_agree_with_the_shards():
    from ifw.core import shards

    assert vad.FORCED_CUT_WINDOW_SECONDS == shards.CUT_WINDOW_SECONDS
    step = 120.0 * SAMPLE_RATE / vad.FRAME
    assert step == int(step)  # the default grid lies on the frame grid: 3750 frames
