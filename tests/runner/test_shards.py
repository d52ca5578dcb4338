"""One long file of real speech as 1 and as 3 shards (ifw.runner.shard + ifw.core.shards.merge).

The file (tests/runner/shard_speech.py) is 21.5 minutes: the Harvard conversation (two real
readers) three times and two AMI meeting excerpts twice, joined with pauses of room noise. The
nominal cuts of 3 shards fall inside meeting speech, so each shard must find a pause for them.
One unsharded run and one 3-shard run (in this process, one after the other: one model load),
both with word timestamps and diarization, feed every test here.

SLOW: the two diarized runs take about 8-10 minutes on 2 busy cores (diarization is most of it:
about real time per second of speech on one core); every other test in the module reuses them.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ifw.core import formats, shards
from ifw.core.transcript import Transcript
from tests.runner.conftest import normalize_text, word_error_rate
from tests.runner.shard_speech import TEST_LAYOUT, LongSpeech, build

pytestmark = pytest.mark.model

COUNT = 3
MIN_SHARD_SECONDS = 120.0


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory) -> LongSpeech:
    return build(tmp_path_factory.mktemp("long-speech"), TEST_LAYOUT)


@pytest.fixture(scope="module")
def setup():
    from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
    from ifw.runner.config import RunnerSettings

    settings = RunnerSettings(diarization_pipeline="packaged", default_model="tiny.en", allowed_models=["tiny.en"],
                              device="cpu", cpu_threads=2)  # fmt: skip

    def spec(url: str, **extra) -> TranscriptionJobSpec:
        return TranscriptionJobSpec.model_validate({"audio": AudioSource.model_construct(url=url), "model": "tiny.en",
                                                    "language": "en", "timestamp": "word", "batchSize": 8, **extra})  # fmt: skip

    return spec, settings


@pytest.fixture(scope="module")
def unsharded(long_speech, setup) -> Transcript:
    from ifw.runner import pipeline

    spec, settings = setup
    return pipeline.run(spec(str(long_speech.path), diarization={"enabled": True}), long_speech.path, settings)


@pytest.fixture(scope="module")
def parts(long_speech, setup) -> list[shards.PartialResult]:
    from ifw.runner.shard import run_shard

    spec, settings = setup
    job = spec(str(long_speech.path), diarization={"enabled": True})
    return [run_shard(job, long_speech.path, i, COUNT, settings, min_shard_seconds=MIN_SHARD_SECONDS)
            for i in range(COUNT)]  # fmt: skip


@pytest.fixture(scope="module")
def sharded(parts) -> Transcript:
    return shards.merge(parts)


def _words(transcript: Transcript, lo: float = 0.0, hi: float = float("inf")) -> list[str]:
    return [normalize_text(w.text) for s in transcript.segments for w in s.words or [] if lo <= w.start < hi]


def _cuts(parts) -> list[float]:
    return [p.start for p in parts[1:]]


# ----------------------------------------------------------------- where the shards cut


def test_each_nominal_cut_lies_in_meeting_speech_and_moves_to_a_pause(long_speech, parts, unsharded):
    assert [p.unused for p in parts] == [False] * COUNT
    assert parts[0].start == 0.0 and parts[-1].end == pytest.approx(long_speech.duration, abs=0.001)
    for a, b in zip(parts, parts[1:], strict=False):
        assert a.end == b.start  # neighbours agree on the cut without talking
    for i, cut in enumerate(_cuts(parts), start=1):
        nominal = shards.nominal_range(i, COUNT, long_speech.duration)[0]
        # The test is only worth something if the nominal cut would split speech.
        assert any(name != "harvard" and a < nominal < b for name, a, b in long_speech.placed), nominal
        assert nominal <= cut <= nominal + shards.CUT_WINDOW_SECONDS
        # No word of the unsharded run straddles the cut: it lies in a pause.
        straddling = [(w.start, w.end, w.text) for s in unsharded.segments for w in s.words or []
                      if w.start < cut < w.end]  # fmt: skip
        assert not straddling, (cut, straddling)


def test_a_shard_finds_the_same_speech_as_the_unsharded_run_in_its_range(long_speech, setup):
    # What makes the words match: the VAD sees the same frames (cuts on its 512-sample grid), its
    # stretches lie on the file's clock (the shard says where its audio starts), and so it finds
    # the same speech, whatever the audio's length and however many threads run it.
    from ifw.runner import audio, vad
    from ifw.runner.shard import find_cut

    _, settings = setup
    full = vad.speech_regions(audio.decode_audio(long_speech.path, settings), workers=2)
    lo, hi = (shards.nominal_range(1, COUNT, long_speech.duration)[k] for k in (0, 1))
    start, end = find_cut(long_speech.path, settings, lo), find_cut(long_speech.path, settings, hi)
    samples = audio.decode_audio(long_speech.path, settings, start=start, length=end - start)
    for workers in (1, 2):
        regions = vad.speech_regions(samples, workers=workers, start=start)
        mine = [(round(start + a, 3), round(start + b, 3)) for a, b in regions]
        assert mine == [(round(a, 3), round(b, 3)) for a, b in full if start <= a < end], workers


# ----------------------------------------------------------------- the words


def test_sharded_words_match_the_unsharded_run(unsharded, sharded):
    assert len(_words(unsharded)) > 300
    assert word_error_rate(unsharded.text, sharded.text) <= 0.01


def test_no_word_is_duplicated_or_dropped_at_a_cut(parts, unsharded, sharded):
    for cut in _cuts(parts):
        # the words around each cut, in order, exactly as the unsharded run heard them
        assert _words(sharded, cut - 20, cut + 20) == _words(unsharded, cut - 20, cut + 20), cut
        assert _words(sharded, cut - 20, cut + 20) == _words(sharded, cut - 20, cut) + _words(sharded, cut, cut + 20)


def test_times_are_on_the_files_clock_and_in_order(long_speech, unsharded, sharded):
    starts = [s.start for s in sharded.segments]
    assert starts == sorted(starts)
    assert 0.0 <= starts[0] and sharded.segments[-1].end <= long_speech.duration
    for s in sharded.segments:
        assert s.start <= s.end
        for w in s.words or []:
            assert s.start - 0.01 <= w.start <= w.end <= s.end + 0.01
    # The same words at the same times as the unsharded run (the last Harvard reading is in shard 3).
    pairs = list(zip([s for s in unsharded.segments if s.start > 1040], [s for s in sharded.segments if s.start > 1040],
                     strict=True))  # fmt: skip
    assert len(pairs) >= 10
    for a, b in pairs:
        assert (a.text, round(a.start, 1), round(a.end, 1)) == (b.text, round(b.start, 1), round(b.end, 1))


def test_nothing_is_dropped_and_the_coverage_adds_up(parts, unsharded, sharded):
    assert sharded.duration == pytest.approx(unsharded.duration, abs=0.002)
    assert sharded.speech_seconds == pytest.approx(sum(p.transcript.speech_seconds for p in parts), abs=0.01)
    assert sharded.speech_seconds == pytest.approx(unsharded.speech_seconds, rel=0.01)
    assert sharded.text_seconds == pytest.approx(unsharded.text_seconds, rel=0.02)
    assert sharded.text_seconds <= sharded.speech_seconds + 0.01
    assert sharded.dropped_pieces == unsharded.dropped_pieces


def test_the_sharded_transcript_renders_like_the_unsharded_one(unsharded, sharded):
    for fmt in ("json", "verbose_json"):
        a, b = json.loads(formats.render(unsharded, fmt)), json.loads(formats.render(sharded, fmt))
        assert sorted(a) == sorted(b), fmt


def test_processed_by_lists_each_shards_runner(parts, sharded):
    runners = sharded.processed_by.runners
    assert [(r.index, r.start, r.end) for r in runners] == [(p.index, p.start, p.end) for p in parts]
    assert sharded.processed_by.device == "cpu"


# ----------------------------------------------------------------- speakers


def _label_of(transcript: Transcript, a: float, b: float) -> str | None:
    """The speaker most of the words in [a, b) were given."""
    said = Counter(w.speaker for s in transcript.segments for w in s.words or [] if a <= w.start < b)
    return said.most_common(1)[0][0] if said else None


def test_the_same_real_speakers_recur_across_shards(long_speech, parts, sharded):
    # Each Harvard reader's sentences, in each of the three readings (one per shard).
    readings = [(a, b) for name, a, b in long_speech.placed if name == "harvard"]
    shard_of = [next(p.index for p in parts if p.start <= a < p.end) for a, _ in readings]
    assert shard_of == [0, 1, 2]
    labels = {}
    for voice in ("spk1", "spk2"):
        turns = [(s, e) for s, e, v in long_speech.reference if v == voice]
        labels[voice] = [
            Counter(_label_of(sharded, s, e) for s, e in turns if a <= s < b).most_common(1)[0][0] for a, b in readings
        ]
    assert len(set(labels["spk1"])) == 1 and len(set(labels["spk2"])) == 1, labels
    assert labels["spk1"][0] != labels["spk2"][0], labels
    # The main speaker of the AMI trn03 excerpt, once in shard 1 and once in shard 2.
    trn03 = [(a, b) for name, a, b in long_speech.placed if name == "trn03"]
    assert len({_label_of(sharded, a + 2, b) for a, b in trn03}) == 1
    # The merge joined local speakers: fewer people than the shards' own speakers together.
    people = {w.speaker for s in sharded.segments for w in s.words or []}
    assert len(people) < sum(len(p.centroids) for p in parts)


def _der(transcript: Transcript, speech: LongSpeech) -> float:
    """Speaker error over the whole file's scored regions, with one mapping of speakers."""
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns):
        out = Annotation()
        for i, (s, e, spk) in enumerate(turns):
            if e > s:
                out[Segment(s, e), i] = spk
        return out

    hypothesis = [(s.start, s.end, s.speaker) for s in transcript.segments if s.speaker is not None]
    metric = DiarizationErrorRate(collar=0.0, skip_overlap=False)
    return metric(annotation(speech.reference), annotation(hypothesis),
                  uem=Timeline([Segment(a, b) for a, b in speech.scored]))  # fmt: skip


def test_speaker_error_of_the_sharded_result_is_within_005_of_the_unsharded(long_speech, parts, unsharded, sharded):
    one, many = _der(unsharded, long_speech), _der(sharded, long_speech)
    # Control: the shards' speakers left apart (no cross-shard joining) must score clearly worse.
    apart = _der(shards.merge(parts, threshold=0.0), long_speech)
    print(f"speaker error over the whole file: unsharded {one:.3f}, {COUNT} shards {many:.3f}, not joined {apart:.3f}")
    assert many <= one + 0.05
    assert apart > one + 0.05


# ----------------------------------------------------------------- short audio, bad input


def test_short_audio_is_not_sharded(setup, conversation):
    from ifw.runner import pipeline
    from ifw.runner.shard import run_shard

    spec, settings = setup
    job = spec(str(conversation.path))
    got = [run_shard(job, conversation.path, i, COUNT, settings) for i in range(COUNT)]  # 300 s per shard at least
    assert [p.unused for p in got] == [False, True, True]
    assert got[0].start == 0.0 and got[0].end == pytest.approx(conversation.duration, abs=0.001)
    assert shards.merge(got).text == pipeline.run(job, conversation.path, settings).text


def test_an_unreadable_range_fails_that_shard_with_invalid_audio(long_speech, setup, tmp_path):
    import subprocess

    from ifw.runner import errors
    from ifw.runner.shard import run_shard

    # The first 400 s as MP3 (constant bitrate), frames 3/4 of the way in overwritten with garbage.
    mp3 = tmp_path / "damaged.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(long_speech.path), "-t", "400",
                    str(mp3)], check=True)  # fmt: skip
    data = bytearray(mp3.read_bytes())
    at = int(len(data) * 0.75)
    for i in range(at, at + 2000):
        data[i] = (i * 37) % 256
    mp3.write_bytes(bytes(data))
    spec, settings = setup
    # Shard 2 of 2 owns 200-400 s: it fails, naming where on the file's clock.
    with pytest.raises(errors.InvalidAudio, match=r"damaged at (29\d|30\d)\.\d s and more audio follows") as info:
        run_shard(spec(str(mp3)), mp3, 1, 2, settings, min_shard_seconds=MIN_SHARD_SECONDS)
    assert info.value.exit_code == errors.EXIT_BAD_INPUT


def test_a_bad_shard_index_or_count_is_a_clear_error(setup, long_speech):
    from ifw.runner import errors
    from ifw.runner.shard import run_shard

    spec, settings = setup
    with pytest.raises(errors.InvalidSpec, match="shard index 3 is outside 0..2"):
        run_shard(spec(str(long_speech.path)), long_speech.path, 3, 3, settings)


def test_the_cli_refuses_a_bad_shard_count(long_speech):
    from tests.runner.test_cli import cli

    done = cli("transcribe", str(long_speech.path), "--model", "tiny.en", "--shards", "0", timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--shards and --threads-per-shard must be at least 1, got 0" in done.stderr
