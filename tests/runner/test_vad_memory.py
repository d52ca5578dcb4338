"""The VAD without torch (issue 19, item 5): the same regions as silero_vad's own loop, and little
memory beyond the decoded samples.

runner/vad.py runs Silero's ONNX model with onnxruntime and numpy and turns the frame
probabilities into regions itself; silero_vad (which imports torch) is used here only as the
reference the results must equal exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ifw.runner import vad
from tests.runner.conftest import SAMPLE_RATE, SPEECH_DIR, read_wav

REPO = Path(__file__).resolve().parents[2]

# (threshold, min_silence_s, pad_s, max_region_s): the defaults, the CRD's extremes, and short
# maximums that force Silero's cuts of a long speech run (at its longest pause, or where it is)
OPTIONS = [(0.5, 0.5, 0.2, 30.0), (0.05, 0.1, 0.0, 30.0), (0.9, 1.3, 0.5, 30.0), (0.5, 0.1, 0.03, 5.0),
           (0.3, 0.5, 0.2, 2.0), (0.5, 0.5, 0.2, 1.2), (0.16, 0.1, 0.0, 10.0)]  # fmt: skip


def _silero_kwargs(threshold, min_silence_s, pad_s, max_region_s) -> dict:
    return {"threshold": threshold, "min_silence_duration_ms": int(min_silence_s * 1000),
            "speech_pad_ms": int(pad_s * 1000), "max_speech_duration_s": max_region_s - 2 * pad_s}  # fmt: skip


@pytest.fixture(scope="module")
def real_speech(conversation) -> np.ndarray:
    """An AMI meeting excerpt (dense, overlapping talk: long speech runs) then the Harvard conversation,
    one odd sample past the frame grid so the last frame is padded."""
    from ifw.runner.audio import decode_audio
    from ifw.runner.config import RunnerSettings

    ami = decode_audio(SPEECH_DIR / "ami" / "dev00.wav", RunnerSettings())  # float WAV: ffmpeg reads it
    return np.concatenate([ami, read_wav(conversation.path), np.full(77, 0.01, np.float32)])


def test_frame_probabilities_and_regions_equal_silero_vads_own(real_speech):
    import torch
    from silero_vad import get_speech_timestamps, get_speech_timestamps_from_probs, load_silero_vad

    reference = load_silero_vad(onnx=True)
    theirs = reference.audio_forward(torch.from_numpy(real_speech), SAMPLE_RATE)[0].numpy()
    ours = vad._frame_probs(vad._silero(), real_speech, 0, len(real_speech))
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    for options in OPTIONS:
        kwargs = _silero_kwargs(*options)
        expected = [(s["start"], s["end"]) for s in get_speech_timestamps_from_probs(
            theirs.tolist(), sampling_rate=SAMPLE_RATE, audio_length_samples=len(real_speech), **kwargs)]  # fmt: skip
        assert vad._speech_stamps(ours, len(real_speech), **kwargs) == expected, options
    # end to end, through the public function, float64 input included (read a frame at a time)
    kwargs = _silero_kwargs(*OPTIONS[0])
    expected = [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE)
                for s in get_speech_timestamps(torch.from_numpy(real_speech), reference, sampling_rate=SAMPLE_RATE,
                                               **kwargs)]  # fmt: skip
    assert len(expected) > 5
    assert vad.speech_regions(real_speech, workers=1) == expected
    assert vad.speech_regions(real_speech.astype(np.float64), workers=1) == expected


def _synthetic_probs(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Speech and silence runs of random lengths, with values on and around the thresholds."""
    out = np.empty(frames, np.float32)
    at, speaking = 0, False
    edges = np.array([0.5, 0.35, 0.05, 0.01, 0.9, 0.75, 0.3, 0.15, 0.16], np.float32)
    while at < frames:
        run = int(rng.choice([rng.integers(1, 8), rng.integers(8, 60), rng.integers(60, 1200)]))
        lo, hi = (0.3, 1.0) if speaking else (0.0, 0.6)
        values = rng.uniform(lo, hi, run).astype(np.float32)
        near = rng.random(run) < 0.2
        values[near] = rng.choice(edges, near.sum()) + rng.choice([0, 1e-7, -1e-7], near.sum()).astype(np.float32)
        out[at : at + run] = values[: frames - at]
        at += run
        speaking = not speaking
    return out


@pytest.mark.parametrize("seed", range(6))
def test_speech_stamps_follow_silero_on_any_probabilities(seed):
    from silero_vad import get_speech_timestamps_from_probs

    rng = np.random.default_rng(seed)
    frames = int(rng.integers(500, 6000))
    probs = _synthetic_probs(rng, frames)
    length = frames * vad.FRAME - int(rng.integers(0, vad.FRAME))
    for options in OPTIONS:
        kwargs = _silero_kwargs(*options)
        expected = [(s["start"], s["end"]) for s in get_speech_timestamps_from_probs(
            probs.tolist(), sampling_rate=SAMPLE_RATE, audio_length_samples=length, **kwargs)]  # fmt: skip
        assert vad._speech_stamps(probs, length, **kwargs) == expected, (seed, options)


def _python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=600)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def test_the_vad_runs_without_torch(conversation):
    # torch alone is ~190 MB of RSS, and silero_vad's import sets torch's threads to 1 for the whole process
    seen = _python(f"""
        import json, sys
        from tests.runner.conftest import read_wav
        from ifw.runner import vad
        regions = vad.speech_regions(read_wav({str(conversation.path)!r}))
        print(json.dumps({{"regions": len(regions), "imported": sorted({{"torch", "silero_vad"}} & set(sys.modules))}}))
    """)
    assert seen["regions"] >= 5 and seen["imported"] == []


def test_decode_and_vad_peak_at_about_twice_the_samples(tmp_path):
    # 6 min of real speech (22 MiB of samples, in two VAD threads where two cores are usable):
    # before, the VAD alone added ~250 MB (torch, silero_vad, a model per thread)
    from bench.audio_memory import make_speech

    path = make_speech(tmp_path / "speech.mp3", 360)
    cmd = [sys.executable, "-m", "bench.audio_memory", "--child", str(path), "--limit", "3600", "--vad"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=600)
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["outcome"] == "decoded 360 s" and figures["pieces"] > 0
    fixed = 64  # MiB: onnxruntime and its session (~45 MB), whatever the audio's length
    assert figures["peak_mib"] <= 2 * figures["samples_mib"] + fixed, figures
    assert figures["vad_mib"] <= 0.25 * figures["samples_mib"] + fixed, figures
