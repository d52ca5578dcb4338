"""Damaged or truncated audio: one rule whatever the container (ifw.runner.audio, runner/README.md).

A file cut short is decoded as far as it goes and says so (DecodeReport.cut_short: the transcript's
cut_short/stated_duration/audio_note, the status's audio.cutShort/statedSeconds/note); damage with
audio after it is InvalidAudio naming where, because skipping it would move every later word.
On real speech: the ten Harvard sentences as one 33 s conversation, in each container.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ifw.core.progress import final_status
from ifw.core.transcript import Transcript
from ifw.crds.transcriptionjob import AudioInfo
from ifw.runner import errors
from ifw.runner.audio import SAMPLE_RATE, DecodeReport, decode_audio
from ifw.runner.config import RunnerSettings

# (suffix, ffmpeg output options, whether the container states its whole length in a header)
CONTAINERS = [
    ("wav", (), True),  # the RIFF data chunk's size
    ("flac", (), True),  # STREAMINFO
    ("mp3", ("-b:a", "64k"), True),  # LAME's Info frame
    ("ogg", ("-c:a", "libvorbis"), False),  # Ogg states no length: its missing last page tells the cut
    ("opus", ("-c:a", "libopus"), False),
    ("webm", ("-c:a", "libopus"), True),  # Matroska's Duration
    ("m4a", ("-c:a", "aac", "-movflags", "+faststart"), True),  # the MP4 index, at the front
]
IDS = [c[0] for c in CONTAINERS]


@pytest.fixture(scope="module")
def encoded(conversation, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("containers")
    out = {}
    for suffix, args, _ in CONTAINERS:
        out[suffix] = work / f"conversation.{suffix}"
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(conversation.path), *args,
                        str(out[suffix])], check=True)  # fmt: skip
    return out


@pytest.fixture
def settings(tmp_path) -> RunnerSettings:
    return RunnerSettings(work_dir=tmp_path)


@pytest.mark.parametrize("suffix, args, states", CONTAINERS, ids=IDS)
def test_a_truncated_file_is_decoded_as_far_as_it_goes_and_flagged(encoded, conversation, settings, tmp_path,
                                                                   suffix, args, states):  # fmt: skip
    whole_report, report = DecodeReport(), DecodeReport()
    whole = decode_audio(encoded[suffix], settings, whole_report)
    assert not whole_report.cut_short and whole_report.transcript_fields() == {}
    data = encoded[suffix].read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    part = decode_audio(cut, settings, report)
    assert 0.4 * conversation.duration < len(part) / SAMPLE_RATE < 0.6 * conversation.duration
    n = len(part) - SAMPLE_RATE // 10  # the last packet may be cut through
    np.testing.assert_allclose(part[:n], whole[:n], atol=1e-6)  # nothing before the cut moved
    assert report.cut_short and report.decoded_seconds == len(part) / SAMPLE_RATE
    fields = report.transcript_fields()
    assert fields["cut_short"] is True
    assert f"ends at {report.decoded_seconds:.1f} s" in fields["audio_note"]
    if states:
        assert report.stated_seconds == pytest.approx(conversation.duration, abs=0.11)
        assert fields["stated_duration"] == pytest.approx(conversation.duration, abs=0.11)
        assert f"before the {report.stated_seconds:.1f} s its container states" in fields["audio_note"]
    else:
        assert fields["stated_duration"] is None and "last page" in fields["audio_note"]


def _damage(data: bytes, at: int, size: int = 2000) -> bytes:
    out = bytearray(data)
    for i in range(at, at + size):
        out[i] = (i * 37) % 256
    return bytes(out)


@pytest.mark.parametrize("suffix, args, states", [c for c in CONTAINERS if c[0] != "wav"], ids=IDS[1:])
def test_damage_in_the_middle_is_refused_naming_where(encoded, conversation, settings, tmp_path, suffix, args,
                                                      states):  # fmt: skip
    # FLAC, Ogg and Matroska decoders drop the damaged frames with no error (0.4 to 3 s of this speech):
    # every later word would come early. MP3 and AAC decoders report the damage.
    data = encoded[suffix].read_bytes()
    bad = tmp_path / f"damaged.{suffix}"
    bad.write_bytes(_damage(data, len(data) // 2))
    with pytest.raises(errors.InvalidAudio, match="more audio follows") as info:
        decode_audio(bad, settings)
    assert info.value.exit_code == 2 and str(tmp_path) not in info.value.message
    where = float(re.search(r"damaged (?:at|before) ([0-9.]+) s", info.value.message).group(1))
    assert abs(where - conversation.duration / 2) < 2.5, info.value.message


def test_damage_in_a_pcm_wav_keeps_the_clock(encoded, settings, tmp_path):
    # PCM has nothing to check: overwritten samples decode as noise in their place, and nothing after moves.
    data = encoded["wav"].read_bytes()
    bad = tmp_path / "damaged.wav"
    bad.write_bytes(_damage(data, len(data) // 2))
    report = DecodeReport()
    damaged, whole = decode_audio(bad, settings, report), decode_audio(encoded["wav"], settings)
    assert len(damaged) == len(whole) and not report.cut_short
    after = (len(data) // 2 + 2000) // 2  # samples: 16-bit mono after a short header
    assert np.array_equal(damaged[after:], whole[after:])


def _piped_wav(path: Path, tool: str) -> bytes:
    if tool == "ffmpeg":
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "wav", "pipe:1"]
        return subprocess.run(cmd, capture_output=True, check=True).stdout
    cmd = ["sox", "-V1", "-t", "raw", "-r", "16000", "-e", "signed", "-b", "16", "-c", "1", "-", "-t", "wav", "-"]
    return subprocess.run(cmd, input=path.read_bytes()[44:], capture_output=True, check=True).stdout


@pytest.mark.parametrize("tool", ["ffmpeg", "sox"])
def test_a_wav_of_unknown_length_decodes_whole_unflagged(conversation, settings, tmp_path, tool):
    piped = tmp_path / "piped.wav"
    piped.write_bytes(_piped_wav(conversation.path, tool))
    report = DecodeReport()
    audio = decode_audio(piped, settings, report)
    assert len(audio) == round(conversation.duration * SAMPLE_RATE)
    assert not report.cut_short and report.transcript_fields() == {}
    # Such a file states no length: a cut one cannot be told from a shorter recording.
    cut = tmp_path / "piped-cut.wav"
    cut.write_bytes(piped.read_bytes()[:300_000])
    report = DecodeReport()
    decode_audio(cut, settings, report)
    assert not report.cut_short


def test_the_flag_reaches_the_status_as_the_crd_spells_it():
    transcript = Transcript(text=" Hello.", segments=[], duration=16.2, cut_short=True, stated_duration=33.24,
                            audio_note="the audio ends at 16.2 s, before the 33.2 s its container states")  # fmt: skip
    audio = final_status(transcript, {"store": "secret", "ref": "x"})["audio"]
    assert audio["cutShort"] is True and audio["statedSeconds"] == 33.24 and audio["note"].startswith("the audio")
    AudioInfo.model_validate(audio)  # every key is the CRD's
    whole = final_status(Transcript(text="", segments=[], duration=3.0), {})["audio"]
    # None: a merge patch removes what an earlier attempt may have written
    assert whole["cutShort"] is None and whole["statedSeconds"] is None and whole["note"] is None


def test_a_sharded_jobs_merge_carries_the_last_shards_flag():
    from ifw.core.shards import PartialResult, merge

    def partial(index: int, start: float, end: float, **fields) -> PartialResult:
        return PartialResult(index=index, count=2, start=start, end=end, duration=33.24,
                             transcript=Transcript(text="", segments=[], duration=end - start, **fields))  # fmt: skip

    merged = merge([partial(0, 0.0, 10.0), partial(1, 10.0, 16.2, cut_short=True, stated_duration=33.24,
                                                   audio_note="cut")])  # fmt: skip
    assert merged.cut_short and merged.stated_duration == 33.24 and merged.audio_note == "cut"
    assert not merge([partial(0, 0.0, 10.0), partial(1, 10.0, 33.24)]).cut_short
