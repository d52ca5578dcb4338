"""A long file of real speech for sharding tests and bench/fanout.py, built from ../shared/speech.

Blocks of real recordings (the Harvard conversation: two people reading, and AMI meeting
excerpts: three or four people talking over each other) joined with pauses of faint room
noise, repeated, so the same real people recur far apart in one file. Where each recording
lies is kept, with its reference speaker turns (the AMI RTTM inside its scored 30 s, the
Harvard speakers on their measured sentences), so a sharded result can be scored over the
whole file with one speaker mapping.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.runner.conftest import SAMPLE_RATE, SPEECH_DIR, harvard_conversation, write_wav

Turn = tuple[float, float, str]
NOISE = 0.0005  # the pauses' room noise, as harvard_conversation's


@dataclass
class LongSpeech:
    path: Path
    duration: float
    # (name, start, end) of each recording placed in the file
    placed: list[tuple[str, float, float]] = field(default_factory=list)
    reference: list[Turn] = field(default_factory=list)  # reference speaker turns, file clock
    scored: list[tuple[float, float]] = field(default_factory=list)  # where the reference is complete


def _ami(name: str) -> tuple[np.ndarray, list[Turn], tuple[float, float]]:
    from ifw.runner.audio import decode_audio
    from ifw.runner.config import RunnerSettings

    split = "dev" if name.startswith("dev") else "trn"
    turns = []
    for line in (SPEECH_DIR / "ami" / f"{split}.rttm").read_text().splitlines():
        f = line.split()
        if f[1] == name:
            turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    uem = next(
        (float(f[2]), float(f[3]))
        for f in map(str.split, (SPEECH_DIR / "ami" / f"{split}.uem").read_text().splitlines())
        if f[0] == name
    )
    return decode_audio(SPEECH_DIR / "ami" / f"{name}.wav", RunnerSettings()), turns, uem


def build(dest: Path, layout: list[tuple[str, float]], *, lead_s: float = 1.0) -> LongSpeech:
    """``layout``: [(recording, seconds of pause after it)], recordings being "harvard" or an AMI
    excerpt's name (dev00, trn03, ...). Cached in ``dest`` by its layout."""
    from tests.runner.conftest import read_wav

    key = hashlib.sha256(json.dumps([layout, lead_s, NOISE]).encode()).hexdigest()[:12]
    path = dest / f"long-speech-{key}.wav"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        m = json.loads(meta.read_text())
        return LongSpeech(path, m["duration"], [tuple(p) for p in m["placed"]],
                          [tuple(t) for t in m["reference"]], [tuple(s) for s in m["scored"]])  # fmt: skip
    conversation = harvard_conversation(dest)
    sources = {"harvard": (conversation.audio(), [(u.start, u.end, u.voice) for u in conversation.utterances],
                           (0.0, conversation.duration))}  # fmt: skip
    for name, _ in layout:
        if name not in sources:
            sources[name] = _ami(name)
    rng = np.random.default_rng(0)
    parts = [rng.normal(0.0, NOISE, int(lead_s * SAMPLE_RATE)).astype(np.float32)]
    cursor = len(parts[0])
    out = LongSpeech(path, 0.0)
    for name, pause in layout:
        samples, turns, (a, b) = sources[name]
        at = cursor / SAMPLE_RATE
        out.placed.append((name, round(at, 3), round(at + len(samples) / SAMPLE_RATE, 3)))
        out.reference += [(at + s, at + e, spk) for s, e, spk in turns if s < b]
        out.scored.append((at + a, at + b))
        parts += [samples, rng.normal(0.0, NOISE, int(pause * SAMPLE_RATE)).astype(np.float32)]
        cursor += len(samples) + len(parts[-1])
    audio = np.concatenate(parts)
    write_wav(path, audio)
    out.duration = len(audio) / SAMPLE_RATE
    assert len(read_wav(path)) == len(audio)
    meta.write_text(json.dumps(out.__dict__, default=str))
    return out


# 21.5 minutes (1290 s): the Harvard conversation three times, two AMI excerpts twice, long pauses.
# The nominal cuts of 3 shards (L/3 = 430 s, 2L/3 = 860 s) fall 10 s into AMI meeting speech,
# where a pause must be found; the two Harvard readers speak in every shard.
TEST_LAYOUT = [("harvard", 150.0), ("trn03", 205.76), ("dev00", 150.0), ("harvard", 150.0), ("trn03", 36.76),
               ("dev00", 170.0), ("harvard", 206.76)]  # fmt: skip


def bench_layout(minutes: float) -> list[tuple[str, float]]:
    """At least ``minutes`` of dense real speech: every recording in turn with short pauses, repeated."""
    block = [("harvard", 2.0), ("dev00", 1.5), ("dev01", 2.5), ("trn01", 1.0), ("trn02", 2.0), ("trn03", 3.0)]
    length = {"harvard": 33.24}  # the AMI excerpts are 30 s each
    layout: list[tuple[str, float]] = []
    total = 1.0
    while total < minutes * 60:
        name, pause = block[len(layout) % len(block)]
        layout.append((name, pause))
        total += length.get(name, 30.0) + pause
    return layout
