"""Streaming through the official `openai` SDK, nothing played: real human speech of about one and
six minutes uploaded to `ifw local`'s stack (a real apiserver, the operator, the gateway and a warm
pool worker with the packaged tiny.en weights, on CPU).

OpenAI's contract: the transcript.text.delta events add up exactly to the transcript.text.done
text. And the first delta comes once the first seconds are decoded, well before the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.runner.conftest import SPEECH_DIR, harvard_conversation, write_wav

pytestmark = [pytest.mark.cluster, pytest.mark.model]

AMI = [SPEECH_DIR / "ami" / f"{name}.wav" for name in ("dev00", "dev01", "trn01", "trn02", "trn03")]


def _samples(path: Path) -> np.ndarray:
    from ifw.runner.audio import decode_audio
    from ifw.runner.config import RunnerSettings

    return decode_audio(path, RunnerSettings(device="cpu"))


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory) -> dict[str, Path]:
    """Built once per session from ../shared/speech: ~1 min (two AMI meeting excerpts) and ~6 min
    (the five AMI excerpts and the Harvard two-speaker conversation, twice)."""
    work = tmp_path_factory.mktemp("long-speech")
    ami = [_samples(p) for p in AMI]
    conversation = harvard_conversation(work).audio()
    files = {"1min": np.concatenate(ami[:2]), "6min": np.concatenate([*ami, conversation] * 2)}
    paths = {}
    for name, audio in files.items():
        write_wav(paths.setdefault(name, work / f"{name}.wav"), audio)
    return paths


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from ifw.local.control_plane import ControlPlane
    from ifw.local.stack import LocalStack

    work = tmp_path_factory.mktemp("stream-stack")
    with ControlPlane() as cp:
        s = LocalStack(work, "tiny.en")
        s.start(cp)
        try:
            yield s
        finally:
            s.stop()


@pytest.mark.parametrize("length", ["1min", "6min"])
def test_deltas_add_up_to_the_done_text_and_the_first_comes_early(stack, long_speech, length):
    import openai

    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=900)
    deltas: list[tuple[float, str]] = []
    done = None
    started = time.monotonic()
    with long_speech[length].open("rb") as f:
        for event in client.audio.transcriptions.create(model="whisper-1", file=f, stream=True):
            if event.type == "transcript.text.delta":
                deltas.append((time.monotonic() - started, event.delta))
            elif event.type == "transcript.text.done":
                done = event
    total = time.monotonic() - started
    assert done is not None and len(done.text) > (400 if length == "1min" else 2000), done
    assert "".join(d for _, d in deltas) == done.text
    first = deltas[0][0]
    print(f"{length}: first delta at {first:.1f} s of {total:.1f} s; {len(deltas)} deltas, "
          f"{[len(d) for _, d in deltas]} characters; done text {len(done.text)}")  # fmt: skip
    assert first < total / 2, (first, total)
    assert len(deltas) >= 2  # the first words, then more
