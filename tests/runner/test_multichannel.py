"""Multichannel (spec.multichannel): each channel transcribed on its own, the channel as the speaker.

Real speech: the Harvard sentences of speaker 1 on the left channel and speaker 2 on the right,
talking over each other (each right-hand sentence starts 1 s into a left-hand one). Each channel's
text is scored against its own speaker's sentences, and the merged transcript and the mono mix of
the same file against all ten sentences in the order they start.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from ifw.core import formats
from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
from ifw.runner import errors, pipeline
from ifw.runner.config import RunnerSettings
from tests.runner.conftest import SAMPLE_RATE, read_wav

pytestmark = pytest.mark.model

MODEL = "tiny.en"
# Measured (tiny.en, CPU): channel 0 0.00, channel 1 0.05 (one word of 37 wrong: 'Terra'); the mono mix
# of the same file loses most of one speaker where they overlap.
CHANNEL_WER = 0.15


def _settings() -> RunnerSettings:
    return RunnerSettings(default_model=MODEL, device="cpu", cpu_threads=2)


def _spec(**fields) -> TranscriptionJobSpec:
    return TranscriptionJobSpec.model_validate(
        {
            "audio": AudioSource.model_construct(url="https://example.com/a.wav"),
            "model": MODEL,
            "batchSize": 8,
            **fields,
        }  # fmt: skip
    )


def write_stereo(path: Path, left: np.ndarray, right: np.ndarray) -> None:
    n = max(len(left), len(right))
    frames = np.zeros((n, 2), np.float32)
    frames[: len(left), 0] = left
    frames[: len(right), 1] = right
    pcm = (np.clip(frames, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def two_speakers_on_two_channels(harvard, dest: Path):
    """(stereo wav, [(start, speaker, text)] in start order): speaker 1 left, speaker 2 right, overlapping."""
    left, right, spoken = [], [], []
    cursor_l = cursor_r = 0
    gap = np.zeros(int(0.7 * SAMPLE_RATE), np.float32)
    offset = int(1.0 * SAMPLE_RATE)
    right.append(np.zeros(offset, np.float32))
    cursor_r = offset
    for s in harvard:
        audio = read_wav(s.path)
        if s.speaker == "spk1":
            spoken.append((cursor_l / SAMPLE_RATE, s.speaker, s.text))
            left += [audio, gap]
            cursor_l += len(audio) + len(gap)
        else:
            spoken.append((cursor_r / SAMPLE_RATE, s.speaker, s.text))
            right += [audio, gap]
            cursor_r += len(audio) + len(gap)
    write_stereo(dest, np.concatenate(left), np.concatenate(right))
    return dest, sorted(spoken)


@pytest.fixture(scope="module")
def stereo(harvard, tmp_path_factory):
    return two_speakers_on_two_channels(harvard, tmp_path_factory.mktemp("multichannel") / "stereo.wav")


@pytest.fixture(scope="module")
def runs(stereo):
    path, _ = stereo
    settings = _settings()
    progress: list[tuple[float, float]] = []
    multi = pipeline.run(_spec(multichannel=True, timestamp="word"), str(path), settings,
                         on_progress=lambda d, t: progress.append((d, t)))  # fmt: skip
    mono = pipeline.run(_spec(timestamp="word"), str(path), settings)
    return multi, mono, progress


def test_each_channel_is_its_speaker_and_beats_the_mono_mix(stereo, runs, wer):
    _, spoken = stereo
    multi, mono, _ = runs
    refs = {c: " ".join(t for _, spk, t in spoken if spk == f"spk{c + 1}") for c in (0, 1)}
    hyps = {c: "".join(s.text for s in multi.segments if s.channel == c) for c in (0, 1)}
    wers = {c: wer(refs[c], hyps[c]) for c in (0, 1)}
    # Over all ten sentences: the channels' texts one after the other against the speakers' sentences
    # one after the other; the mono mix (one track, no speakers) against the better of that order and
    # the order the sentences start in.
    both = wer(refs[0] + " " + refs[1], hyps[0] + " " + hyps[1])
    in_order = " ".join(t for _, _, t in spoken)
    mono_wer = min(wer(refs[0] + " " + refs[1], mono.text), wer(in_order, mono.text))
    print(
        f"\nWER channel 0 {wers[0]:.3f}, channel 1 {wers[1]:.3f}, both channels {both:.3f}; mono mix {mono_wer:.3f}"
        f"\nmono: {mono.text}"
    )
    assert wers[0] <= CHANNEL_WER and wers[1] <= CHANNEL_WER, hyps
    assert mono_wer > both + 0.1, (mono.text, hyps)


def test_channel_and_speaker_on_every_segment_word_and_turn_in_time_order(runs):
    multi, _, progress = runs
    assert multi.segments and all(s.channel in (0, 1) and s.speaker == f"CHANNEL_{s.channel}" for s in multi.segments)
    words = [w for s in multi.segments for w in s.words or []]
    assert words and all(w.channel == s.channel and w.speaker == s.speaker for s in multi.segments for w in s.words)
    starts = [s.start for s in multi.segments]
    assert starts == sorted(starts)
    assert {s.channel for s in multi.segments} == {0, 1}
    assert multi.speakers and {t.speaker for t in multi.speakers} == {"CHANNEL_0", "CHANNEL_1"}
    assert all(t.speaker == f"CHANNEL_{t.channel}" for t in multi.speakers)
    # the formats carry them: the original's speakers, srt cues, diarized_json
    original = formats.to_original_json(multi)
    assert {c["speaker"] for c in original["speakers"]} == {"CHANNEL_0", "CHANNEL_1"}
    assert "[CHANNEL_1]" in formats.to_srt(multi)
    assert {s["speaker"] for s in formats.to_diarized_json(multi)["segments"]} == {"CHANNEL_0", "CHANNEL_1"}
    verbose = formats.to_verbose_json(multi)
    assert {s["channel"] for s in verbose["segments"]} == {0, 1}
    # progress in seconds of the file, never backwards, ending at its duration
    assert all(t == pytest.approx(multi.duration) for _, t in progress)
    done = [d for d, _ in progress]
    assert done == sorted(done) and done[-1] == pytest.approx(multi.duration, abs=0.05)


def test_mono_file_with_multichannel_is_refused(harvard):
    with pytest.raises(errors.NotMultichannel, match="one channel"):
        pipeline.run(_spec(multichannel=True), str(harvard[0].path), _settings())


def test_multichannel_excludes_diarization():
    with pytest.raises(ValueError, match="multichannel"):
        _spec(multichannel=True, diarization={"enabled": True})


def test_eight_channels_at_most(tmp_path):
    path = tmp_path / "nine.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(9)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.zeros((SAMPLE_RATE, 9), "<i2").tobytes())
    with pytest.raises(errors.InvalidAudio, match="9 channels"):
        pipeline.run(_spec(multichannel=True), str(path), _settings())


def test_cli_multichannel_names_channels_in_srt(stereo):
    from tests.runner.test_cli import cli

    path, _ = stereo
    done = cli("transcribe", str(path), "--model", MODEL, "--multichannel", "--format", "srt")
    assert done.returncode == 0, done.stderr
    assert "[CHANNEL_0] The child almost hurt the small dog." in done.stdout and "[CHANNEL_1]" in done.stdout
    refused = cli("transcribe", str(path), "--model", MODEL, "--multichannel", "--diarize")
    assert refused.returncode == 2 and "multichannel" in refused.stderr
    bad = cli("transcribe", str(path), "--model", MODEL, "--known-speaker", "SPEAKER_00=x.wav")
    assert bad.returncode == 2 and "--known-speaker" in bad.stderr
