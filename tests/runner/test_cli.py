"""`python -m ifw.runner transcribe` end to end, in a subprocess, on spoken samples."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IFW_")}
    env.update(OMP_NUM_THREADS="2", IFW_CPU_THREADS="2", IFW_DEVICE="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ifw.runner", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def sample(speech):
    return speech([
        ("en-us", "Good morning, everyone, and welcome to the meeting.", 1.0),
        ("en-gb", "Today we will talk about the new train timetable.", 1.0),
        ("en-us", "Please send your questions before Friday.", 0.5),
    ])  # fmt: skip


@pytest.mark.model
def test_transcribe_prints_the_original_json_shape(sample, wer):
    p = cli("transcribe", str(sample.path), "--model", "tiny.en")
    assert p.returncode == 0, p.stderr
    assert "real time" not in p.stderr and "\r" not in p.stderr, p.stderr  # stderr is a pipe: no progress bar
    out = json.loads(p.stdout)
    assert set(out) >= {"text", "chunks"}
    assert wer(sample.text, out["text"]) <= 0.2, out["text"]
    starts = [c["timestamp"][0] for c in out["chunks"]]
    for u in sample.utterances:
        assert min(abs(s - u.start) for s in starts) <= 1.0


@pytest.mark.model
def test_default_model_on_cpu_is_the_packaged_base_with_word_times_in_verbose_json(sample, wer):
    p = cli("transcribe", str(sample.path), "--timestamp", "word", "--format", "verbose_json")
    assert p.returncode == 0, p.stderr
    assert "using the packaged 'base' model" in p.stderr
    out = json.loads(p.stdout)
    assert out["language"] in ("en", "english") and out["duration"] == pytest.approx(sample.duration, abs=0.05)
    assert wer(sample.text, out["text"]) <= 0.15, out["text"]
    words = out["words"]
    assert len(words) >= 20
    assert all(0 <= w["start"] <= w["end"] <= sample.duration for w in words)
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(words, words[1:]))


@pytest.mark.model
def test_srt_to_a_file_parses_and_vtt_parses(sample, tmp_path):
    import srt
    import webvtt

    out = tmp_path / "out.srt"
    p = cli("transcribe", str(sample.path), "--model", "tiny.en", "--format", "srt", "--output", str(out))
    assert p.returncode == 0 and p.stdout == "", p.stderr
    cues = list(srt.parse(out.read_text()))
    assert len(cues) >= 3 and "meeting" in cues[0].content.lower()

    p = cli("transcribe", str(sample.path), "--model", "tiny.en", "--format", "vtt")
    assert p.returncode == 0, p.stderr
    captions = webvtt.from_buffer(io.StringIO(p.stdout))
    assert len(captions) >= 3 and "timetable" in " ".join(c.text for c in captions).lower()


@pytest.mark.model
def test_diarize_two_voices(speech, wer):
    clip = speech([
        ("en-us", "Hello, I am calling about the apartment you advertised last week.", 1.0),
        ("en+f3", "Yes, it is still available. Would you like to come and see it?", 1.0),
        ("en-us", "That would be great. Is Saturday morning a good time for you?", 1.0),
        ("en+f3", "Saturday at ten works well. I will send you the address.", 0.5),
    ])  # fmt: skip
    p = cli("transcribe", str(clip.path), "--model", "tiny.en", "--diarize", "--num-speakers", "2")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    # the original's speakers: one entry per chunk (the chunks a sentence was cut into share its voice)
    assert len(out["speakers"]) == len(out["chunks"]) and len({s["speaker"] for s in out["speakers"]}) == 2
    # the merged turns alternate with the voices, four of them
    labels = [t["speaker"] for t in out["speaker_turns"]]
    assert len(labels) == 4 and labels[0] != labels[1] and labels[0] == labels[2] and labels[1] == labels[3], labels


@pytest.mark.model
def test_prompt_spells_a_name_as_given(speech):
    clip = speech([("en-us", "Please send the invoice to Siobhan Kowalczyk before Thursday.", 0.5)])
    p = cli("transcribe", str(clip.path), "--model", "tiny.en", "--format", "text")
    assert p.returncode == 0 and "Kowalczyk" not in p.stdout, p.stdout  # tiny.en hears "Shimon Kalak"
    p = cli("transcribe", str(clip.path), "--model", "tiny.en", "--format", "text", "--prompt", "Siobhan Kowalczyk")
    assert p.returncode == 0, p.stderr
    assert "Siobhan Kowalczyk before Thursday" in p.stdout, p.stdout


@pytest.mark.model
def test_diarized_json_with_a_progress_bar_on_a_terminal(conversation, wer):
    """The real two-speaker Harvard conversation, stderr on a pseudo-terminal: OpenAI's diarized_json
    on stdout (diarization implied), and on stderr a bar redrawn in place up to the whole duration."""
    import pty
    import re
    import threading

    env = {k: v for k, v in os.environ.items() if not k.startswith("IFW_")}
    env.update(OMP_NUM_THREADS="2", IFW_CPU_THREADS="2", IFW_DEVICE="cpu", HF_HUB_OFFLINE="1")
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "ifw.runner", "transcribe", str(conversation.path), "--model",
                          "tiny.en", "--format", "diarized_json"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=slave, stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(slave)
    terminal = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end closed
                return
            if not chunk:
                return
            terminal.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    stdout, _ = p.communicate(timeout=600)
    reader.join(10)
    os.close(master)
    shown = terminal.decode(errors="replace")
    assert p.returncode == 0, shown
    out = json.loads(stdout)
    assert out["task"] == "transcribe" and out["duration"] == pytest.approx(conversation.duration, abs=0.05)
    assert wer(conversation.text, out["text"]) <= 0.15, out["text"]
    speakers = [s["speaker"] for s in out["segments"]]
    assert len(set(speakers)) == 2 and all(s["type"] == "transcript.text.segment" for s in out["segments"])
    assert sum(a != b for a, b in zip(speakers, speakers[1:])) >= 8, speakers  # ten sentences, taking turns
    draws = re.findall(r"\r\[([#.]+)\] +([\d.]+) / ([\d.]+) s of audio +(?:([\d.]+)× real time)?", shown)
    assert len(draws) >= 2, shown
    total = float(draws[-1][2])
    assert total == pytest.approx(conversation.duration, abs=0.1)
    assert float(draws[-1][1]) == total and set(draws[-1][0]) == {"#"} and float(draws[-1][3]) > 0, draws[-1]
    assert [float(d[1]) for d in draws] == sorted(float(d[1]) for d in draws)  # it only goes forward
    assert shown.rstrip("\r\n").endswith("real time"), shown[-200:]


def test_bad_input_exits_2_with_the_reason(tmp_path, sample):
    p = cli("transcribe", str(sample.path), "--model", "tiny.en", "--language", "xx")
    assert p.returncode == 2 and "language" in p.stderr and "'xx'" in p.stderr

    p = cli("transcribe", str(sample.path), "--model", "tiny.en", "--temperature", "1.5")
    assert p.returncode == 2 and "temperature" in p.stderr

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n" * 100)
    p = cli("transcribe", str(not_audio), "--model", "tiny.en")
    assert p.returncode == 2 and "InvalidAudio" in p.stderr

    p = cli("transcribe", str(sample.path), "--model", "no-such/model-anywhere")
    assert p.returncode == 2 and "ModelLoadFailed" in p.stderr

    p = cli("transcribe", "http://169.254.169.254/latest/meta-data", "--model", "tiny.en")
    assert p.returncode == 2 and "AudioFetchFailed" in p.stderr


def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ifw-runner"] == "ifw.runner.__main__:main"
