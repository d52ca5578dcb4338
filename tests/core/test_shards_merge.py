"""ifw.core.shards without models: how many shards, where they cut, and the merge's speaker relabelling.

The merge is checked on hand-built partial results whose speaker centroids are real-shaped
(192-d, like CAM++'s) and placed at known angles, so which local speakers are one person is
known; the storage round trip runs against the real apiserver of the test control plane.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from ifw.core import shards
from ifw.core.shards import PartialResult
from ifw.core.transcript import ProcessedBy, Segment, SpeakerTurn, Transcript, Word

DIM = 192


def test_importing_shards_needs_neither_torch_nor_numpy():
    # The operator merges; its image has neither.
    code = "import sys, ifw.core.shards; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_merge_threshold_is_the_single_runner_one():
    diarize = pytest.importorskip("ifw.runner.diarize")
    assert shards.CLUSTER_THRESHOLD == diarize.PACKAGED_PARAMS["clustering"]["threshold"]


# ----------------------------------------------------------------- effective_count, ranges, cuts


@pytest.mark.parametrize(
    ("requested", "duration", "minimum", "expected"),
    [
        (4, 3600.0, 300.0, 4),
        (4, 900.0, 300.0, 3),  # three shards of 300 s, not four of 225 s
        (4, 599.0, 300.0, 1),  # short audio never pays
        (1, 36000.0, 300.0, 1),
        (8, 0.0, 300.0, 1),  # unknown length: one shard does it all
        (3, 1290.0, 120.0, 3),
    ],
)
def test_effective_count(requested, duration, minimum, expected):
    assert shards.effective_count(requested, duration, minimum) == expected


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_effective_count_refuses_a_bad_parallelism_by_name(bad):
    with pytest.raises(ValueError, match="parallelism"):
        shards.effective_count(bad, 3600.0, 300.0)


def test_effective_count_refuses_shards_shorter_than_the_cut_window():
    with pytest.raises(ValueError, match="minShardSeconds"):
        shards.effective_count(4, 3600.0, shards.CUT_WINDOW_SECONDS)


def test_nominal_ranges_tile_the_file_on_the_vad_grid():
    duration, count = 1290.0003, 3
    ranges = [shards.nominal_range(i, count, duration) for i in range(count)]
    assert ranges[0][0] == 0.0 and ranges[-1][1] == duration
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end == start
        assert abs(start * 16000 / 512 - round(start * 16000 / 512)) < 1e-9  # a VAD frame edge
    assert ranges[1][0] == pytest.approx(430.0, abs=0.033)
    with pytest.raises(ValueError, match="shard index 3"):
        shards.nominal_range(3, 3, duration)


def test_cut_point_takes_the_longest_pause_in_the_window():
    regions = [(100.0, 104.0), (104.5, 110.0), (112.0, 120.0), (120.3, 129.0)]
    # pauses: 0.5 s, 2.0 s (the longest), 0.3 s, and 1.0 s up to the window's end
    assert shards.cut_point(regions, 100.0, 130.0) == pytest.approx(111.0, abs=0.032)


def test_cut_point_edge_cases():
    assert shards.cut_point([], 50.0, 80.0) == shards.on_grid(50.0) == 49.984  # silence: at the boundary
    assert shards.cut_point([(40.0, 90.0)], 50.0, 80.0) == 80.0  # speech throughout: the window's end
    # silence from the boundary on is a pause like any other
    assert shards.cut_point([(53.0, 80.0)], 50.0, 80.0) == pytest.approx(51.5, abs=0.032)
    # the same regions give the same cut, whatever their order
    regions = [(61.0, 62.0), (50.0, 60.0), (63.5, 70.0)]
    assert shards.cut_point(regions, 50.0, 80.0) == shards.cut_point(sorted(regions), 50.0, 80.0)


# ----------------------------------------------------------------- merge


def _direction(angle_deg: float, noise_axis: int | None = None) -> list[float]:
    """A unit vector in the plane of axes 0 and 1, with some of axis ``noise_axis`` mixed in."""
    v = [0.0] * DIM
    v[0], v[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    if noise_axis is not None:
        v[noise_axis] = 0.2
    return [x * 3.7 for x in v]  # unnormalised, as pyannote hands them over


def _partial(index: int, count: int, start: float, end: float, said: list[tuple[float, str, str]],
             centroids: dict[str, list[float]], pod: str | None = None) -> PartialResult:  # fmt: skip
    """said: (start, local speaker, word) one second each."""
    segments = [
        Segment(start=t, end=t + 1.0, text=f" {w}", speaker=spk,
                words=[Word(start=t, end=t + 1.0, text=f" {w}", speaker=spk)])
        for t, spk, w in said
    ]  # fmt: skip
    turns: list[SpeakerTurn] = []
    for t, spk, w in said:
        if turns and turns[-1].speaker == spk:
            turns[-1].end, turns[-1].text = t + 1.0, f"{turns[-1].text} {w}"
        else:
            turns.append(SpeakerTurn(speaker=spk, start=t, end=t + 1.0, text=w))
    transcript = Transcript(text="".join(s.text for s in segments), segments=segments, timestamp="word",
                            language="en", language_probability=1.0, duration=end - start, model="tiny.en",
                            speakers=turns, speech_seconds=float(len(said)), text_seconds=float(len(said)),
                            processed_by=ProcessedBy(pod=pod, node="n1", runtime="Job", device="cpu"))  # fmt: skip
    seconds = {spk: float(sum(1 for _, s, _ in said if s == spk)) for _, spk, _ in said}
    return PartialResult(index=index, count=count, start=start, end=end, duration=300.0, transcript=transcript,
                         centroids=centroids, speaker_seconds=seconds)  # fmt: skip


def _three_shards() -> list[PartialResult]:
    """Alice (0°) and Bob (90°) in every shard, Carol (180°) only in the last; local labels differ."""
    alice, bob, carol = _direction(0, 5), _direction(90, 6), _direction(180, 7)
    return [
        _partial(0, 3, 0.0, 100.0, [(1, "SPEAKER_00", "hello"), (3, "SPEAKER_01", "hi"), (5, "SPEAKER_00", "so")],
                 {"SPEAKER_00": alice, "SPEAKER_01": bob}, pod="p0"),
        _partial(1, 3, 100.0, 200.0, [(101, "SPEAKER_00", "well"), (103, "SPEAKER_01", "yes")],
                 {"SPEAKER_00": bob, "SPEAKER_01": _direction(3, 9)}, pod="p1"),
        _partial(2, 3, 200.0, 300.0, [(201, "SPEAKER_00", "I'm"), (203, "SPEAKER_01", "Carol"),
                                      (205, "SPEAKER_02", "bye")],
                 {"SPEAKER_00": carol, "SPEAKER_01": _direction(88, 8), "SPEAKER_02": alice}, pod="p2"),
    ]  # fmt: skip


def _who(transcript: Transcript) -> list[tuple[str, str]]:
    return [(w.text.strip(), w.speaker) for s in transcript.segments for w in s.words or []]


def test_merge_relabels_the_same_people_alike_across_shards():
    merged = shards.merge(list(reversed(_three_shards())))  # any order
    assert merged.text == " hello hi so well yes I'm Carol bye"
    assert _who(merged) == [
        ("hello", "SPEAKER_00"), ("hi", "SPEAKER_01"), ("so", "SPEAKER_00"),  # Alice, Bob
        ("well", "SPEAKER_01"), ("yes", "SPEAKER_00"),  # Bob, Alice: labels swapped in shard 1
        ("I'm", "SPEAKER_02"), ("Carol", "SPEAKER_01"), ("bye", "SPEAKER_00"),  # Carol is new
    ]  # fmt: skip
    assert [s.speaker for s in merged.segments] == [spk for _, spk in _who(merged)]
    assert [(t.speaker, t.text) for t in merged.speakers] == [
        ("SPEAKER_00", "hello"), ("SPEAKER_01", "hi"), ("SPEAKER_00", "so"), ("SPEAKER_01", "well"),
        ("SPEAKER_00", "yes"), ("SPEAKER_02", "I'm"), ("SPEAKER_01", "Carol"), ("SPEAKER_00", "bye"),
    ]  # fmt: skip
    assert merged.speech_seconds == 8.0 and merged.text_seconds == 8.0
    assert merged.duration == 300.0 and merged.language == "en"
    runners = merged.processed_by.runners
    assert [(r.index, r.pod, r.start, r.end) for r in runners] == [(0, "p0", 0.0, 100.0), (1, "p1", 100.0, 200.0),
                                                                  (2, "p2", 200.0, 300.0)]  # fmt: skip
    assert merged.processed_by.pod is None  # several pods: each is in runners


def test_merge_joins_one_persons_turns_that_meet_at_a_cut():
    a = _partial(0, 2, 0.0, 10.0, [(8, "SPEAKER_00", "and")], {"SPEAKER_00": _direction(0)})
    b = _partial(1, 2, 10.0, 20.0, [(10, "SPEAKER_00", "then")], {"SPEAKER_00": _direction(2)})
    merged = shards.merge([a, b])
    assert [(t.speaker, t.start, t.end, t.text) for t in merged.speakers] == [("SPEAKER_00", 8.0, 11.0, "and then")]


def test_merge_honours_num_min_and_max_speakers():
    # Four local speakers over two shards: Alice (0°), Bob (90°) in shard 0; Alice again (10°) and
    # Dave (150°: 60° from Bob, beyond the threshold's ~50°) in shard 1. At the threshold: Alice, Bob, Dave.
    parts = [
        _partial(0, 2, 0.0, 10.0, [(1, "A", "a"), (2, "B", "b")], {"A": _direction(0), "B": _direction(90)}),
        _partial(1, 2, 10.0, 20.0, [(11, "C", "c"), (12, "D", "d")], {"C": _direction(10), "D": _direction(150)}),
    ]  # fmt: skip

    def people(**hints) -> int:
        return len({spk for _, spk in _who(shards.merge(parts, **hints))})

    assert people() == 3
    assert people(num_speakers=2) == 2
    assert people(max_speakers=2) == 2
    assert people(min_speakers=4) == 4
    assert people(num_speakers=1) == 1  # forced below what one shard told apart: allowed when asked
    assert people(min_speakers=1, max_speakers=5) == 3
    with pytest.raises(ValueError, match="minSpeakers"):
        shards.merge(parts, min_speakers=3, max_speakers=2)
    with pytest.raises(ValueError, match="numSpeakers"):
        shards.merge(parts, num_speakers=0)


def test_speakers_one_shard_told_apart_stay_apart():
    # Two near-identical voices in one shard (cos 0.99) stay two people; the next shard's match joins one.
    parts = [
        _partial(0, 2, 0.0, 10.0, [(1, "A", "a"), (2, "B", "b")], {"A": _direction(0), "B": _direction(8)}),
        _partial(1, 2, 10.0, 20.0, [(11, "C", "c")], {"C": _direction(1)}),
    ]  # fmt: skip
    assert [spk for _, spk in _who(shards.merge(parts))] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_00"]


def test_merge_skips_unused_shards_and_checks_what_it_gets():
    a = _partial(0, 3, 0.0, 10.0, [(1, "A", "a")], {"A": _direction(0)})
    b = _partial(1, 3, 10.0, 20.0, [(11, "A", "b")], {"A": _direction(0)})
    unused = PartialResult(index=2, count=3, start=0.0, end=0.0, unused=True,
                           transcript=Transcript(text="", segments=[]))  # fmt: skip
    assert shards.merge([a, b, unused]).text == " a b"
    with pytest.raises(ValueError, match="exactly one partial result for each shard 0..2"):
        shards.merge([a, b])
    with pytest.raises(ValueError, match="exactly one"):
        shards.merge([a, a, unused])
    gap = b.model_copy(update={"start": 12.0})
    with pytest.raises(ValueError, match="do not meet"):
        shards.merge([a, gap, unused])
    with pytest.raises(ValueError, match="no partial results"):
        shards.merge([])


def test_merge_without_diarization_has_no_speakers():
    plain = [p.model_copy(update={"transcript": p.transcript.model_copy(update={"speakers": None}),
                                  "centroids": {}}) for p in _three_shards()]  # fmt: skip
    assert shards.merge(plain).speakers is None


def test_partial_encoding_is_deterministic():
    p = _three_shards()[0]
    assert shards.encode_partial(p) == shards.encode_partial(p)
    assert shards.decode_partial(shards.encode_partial(p)) == p.model_copy(
        update={"transcript": Transcript.model_validate_json(p.transcript.model_dump_json(exclude_none=True))}
    )


def test_secret_names_stay_valid():
    assert shards.partial_secret_name("meeting-42", 3) == "meeting-42-part-3"
    long = shards.partial_secret_name("x" * 300, 12)
    assert len(long) <= 253 and long.endswith("-part-12")


# ----------------------------------------------------------------- storage (real apiserver)


@pytest.fixture
def core_v1(kube):
    from kubernetes import client

    with kube.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.mark.cluster
def test_partials_round_trip_through_secrets_owned_by_the_job(kube, tj_crd, namespace, core_v1):
    from kubernetes import client

    from ifw.core import contract
    from ifw.core.results import ResultNotFound
    from ifw.crds.transcriptionjob import GROUP, KIND, PLURAL, VERSION

    with kube.api_client() as api:
        job = client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "long-meeting"},
             "spec": {"audio": {"url": "https://example.com/a.mp3"}}},
        )  # fmt: skip
    parts = _three_shards()
    with pytest.raises(ResultNotFound, match="shard 0"):
        shards.load_partials(core_v1, job, 3)
    for p in parts:
        shards.store_partial(core_v1, job, p)
    shards.store_partial(core_v1, job, parts[1])  # a retried shard overwrites its own
    secret = core_v1.read_namespaced_secret("long-meeting-part-1", namespace)
    assert secret.type == shards.PARTIAL_SECRET_TYPE
    assert [(o.kind, o.uid) for o in secret.metadata.owner_references] == [(KIND, job["metadata"]["uid"])]
    assert secret.metadata.labels[contract.LABEL_JOB_UID] == job["metadata"]["uid"]
    loaded = shards.load_partials(core_v1, job, 3)
    assert [p.index for p in loaded] == [0, 1, 2]
    assert shards.merge(loaded) == shards.merge(parts)
    shards.delete_partials(core_v1, job, 3)
    shards.delete_partials(core_v1, job, 3)  # already gone: fine
    with pytest.raises(ResultNotFound):
        shards.load_partials(core_v1, job, 3)
