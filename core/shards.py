"""One long file across many runners: where shards cut, what each returns, and the one merge.

Shard ``i`` of ``N`` owns the nominal range ``[i·L/N, (i+1)·L/N)`` of a file ``L`` seconds long
(``nominal_range``). Every boundary ``b`` moves to the longest pause just after it (``cut_point``),
found by the VAD on the same decoded window ``[b, b + CUT_WINDOW_SECONDS)``: the two shards that
share a boundary decode that window with the same ffmpeg command and run the same VAD on it,
so they agree on the cut without talking to each other and without a planning pass over the
file. Each shard transcribes only ``[cut_i, cut_{i+1})`` (ifw.runner.shard) and returns a
``PartialResult`` with its times already on the file's clock and, when diarization ran, one
embedding centroid per local speaker.

``merge`` turns the partials into the job's one Transcript: in time order, speakers clustered
globally by their centroids (so ``SPEAKER_00`` is the same person in minute 3 and minute 170).
The operator imports this module to merge, so it needs neither torch nor numpy: the
clustering is a few dozen centroids at most, done in plain Python.

Partials travel in Secrets owned by the TranscriptionJob (``store_partial`` / ``load_partials``
/ ``delete_partials``), gzip JSON like the results in ifw.core.results.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from ifw.core import contract
from ifw.core.languages import join_texts
from ifw.core.results import JobRef, ResultSettings, ResultStoreFailed, ResultTooLarge, _api_error, _need
from ifw.core.transcript import ProcessedBy, Segment, ShardRunner, SpeakerTurn, Transcript

log = logging.getLogger(__name__)

# The single-runner diarization's clustering threshold (ifw.runner.diarize.PACKAGED_PARAMS; a test
# keeps them equal): Euclidean distance between unit-length speaker embeddings, centroid linkage.
CLUSTER_THRESHOLD = 0.85
# Each boundary's pause is looked for in this much audio after it. Long enough to hold a pause
# in any real conversation; a shard shorter than this would reach past its neighbour's boundary.
CUT_WINDOW_SECONDS = 30.0
# Pauses shorter than this (between the VAD's padded regions) are not cut at: the VAD itself
# splits regions only at longer silences, so a cut there would split one region of an unsharded run.
MIN_CUT_PAUSE_SECONDS = 0.1
# Cuts and boundaries sit on the VAD's frame grid (512 samples at 16 kHz): a shard's VAD then
# sees the same frames as an unsharded run's, and finds the same speech edges. The VAD's stretches
# (its model's state starts afresh at each) lie on the file's clock, every 120 s
# (ifw.runner.vad.MIN_STRETCH_SECONDS), so a shard tells the VAD where its range starts
# (vad.file_clock): from its first such point on, its speech regions and pieces are the unsharded
# run's. Before it the shard's VAD starts cold at the cut, where the unsharded run's carries the
# state of the minutes before, and may differ in a region or two.
GRID_SECONDS = 512 / 16000
# Below this much audio per shard the fixed costs (model load, fetch, the cut's VAD) outweigh
# the gain: short audio never pays for sharding.
DEFAULT_MIN_SHARD_SECONDS = 120.0

PARTIAL_KEY = "partial.json.gz"
PARTIAL_SECRET_TYPE = "ifw.dev/partial"
_PARTIAL_INFIX = "-part-"


class PartialResult(BaseModel):
    """What one shard hands to the merge."""

    index: int = Field(ge=0)
    count: int = Field(ge=1, description="The shards started (some may be unused), the same in every shard.")
    start: float = Field(ge=0, description="The shard's cut range on the file's clock, seconds.")
    end: float = Field(ge=0)
    duration: float = Field(0.0, ge=0, description="The whole file's length in seconds.")
    transcript: Transcript = Field(description="Times on the file's clock; speakers labelled locally.")
    centroids: dict[str, list[float]] = Field(default_factory=dict, description="Local speaker -> embedding.")
    speaker_seconds: dict[str, float] = Field(default_factory=dict, description="Local speaker -> seconds.")
    unused: bool = Field(False, description="An index beyond the effective count: it had nothing to do.")
    # Where the time went (fetch, cut, decode, transcribe, ...): the serial part bench/fanout.py reports.
    timings: dict[str, float] = Field(default_factory=dict)


# ------------------------------------------------------------------ where shards cut


def effective_count(requested: int, duration: float, min_shard_seconds: float = DEFAULT_MIN_SHARD_SECONDS) -> int:
    """How many shards get work for a file ``duration`` seconds long: at most ``requested``, each at
    least ``min_shard_seconds`` long (and always at least one). Every shard computes it alike."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"parallelism must be a whole number of shards of at least 1, got {requested!r}")
    if not min_shard_seconds > CUT_WINDOW_SECONDS:
        raise ValueError(
            f"minShardSeconds must be more than the {CUT_WINDOW_SECONDS:g} s searched for a pause at each cut, "
            f"got {min_shard_seconds!r}"
        )
    if not duration or duration <= 0 or not math.isfinite(duration):
        return 1
    return max(1, min(requested, int(duration // min_shard_seconds)))


def nominal_range(index: int, count: int, duration: float) -> tuple[float, float]:
    """Shard ``index``'s nominal range ``[i·L/N, (i+1)·L/N)``, inner boundaries on the VAD's frame
    grid; the cuts move each inner boundary on to a pause."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")

    def boundary(i: int) -> float:
        return duration if i == count else on_grid(i * duration / count)

    return boundary(index), boundary(index + 1)


def on_grid(seconds: float) -> float:
    """The nearest VAD frame edge at or before ``seconds`` (an exact float: a multiple of 0.032)."""
    return math.floor(seconds / GRID_SECONDS + 1e-9) * 512 / 16000


def cut_point(
    regions: Sequence[tuple[float, float]],
    window_start: float,
    window_end: float,
    min_pause: float = MIN_CUT_PAUSE_SECONDS,
) -> float:
    """Where to cut, given the VAD's speech regions (file clock) in the window after a boundary.

    The middle of the window's longest pause (the first of equals; silence from the boundary on
    counts), on the VAD's frame grid; speech throughout: the window's end; no speech: the boundary.
    The longest pause, not the first: an unsharded run ends each ≤30 s piece at its longest pause,
    so a cut there most often falls between the very pieces an unsharded run decodes, and the
    words on both sides come out the same. A pure function of its inputs: neighbours that see the
    same regions cut at the same instant.
    """
    regions = sorted((max(a, window_start), min(b, window_end)) for a, b in regions if b > window_start)
    regions = [(a, b) for a, b in regions if b > a and a < window_end]
    if not regions:
        return on_grid(window_start)
    gaps = []
    previous_end = window_start
    for a, b in regions:
        if a - previous_end >= min_pause:
            gaps.append((previous_end, a))
        previous_end = max(previous_end, b)
    if window_end - previous_end >= min_pause:
        gaps.append((previous_end, window_end))
    if not gaps:
        return on_grid(window_end)
    a, b = max(gaps, key=lambda g: g[1] - g[0])  # max() keeps the first of equals
    return on_grid((a + b) / 2)


# ------------------------------------------------------------------ merging


def merge(
    partials: Sequence[PartialResult],
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    threshold: float = CLUSTER_THRESHOLD,
) -> Transcript:
    """The job's one transcript from its shards' partial results (any order; unused ones skipped)."""
    used = _check(partials)
    _check_hints(num_speakers, min_speakers, max_speakers)
    first = used[0].transcript
    segments: list[Segment] = [s for p in used for s in p.transcript.segments]
    segments.sort(key=lambda s: (s.start, s.end))
    language, probability = _language(used)

    diarized = all(p.transcript.speakers is not None for p in used)
    speakers = None
    if diarized:
        names = _global_names(used, num_speakers, min_speakers, max_speakers, threshold)
        segments = [_renamed_segment(s, names[p.index]) for p in used for s in p.transcript.segments]
        segments.sort(key=lambda s: (s.start, s.end))
        speakers = _turns(used, names, language)

    transcript = Transcript(
        text="".join(s.text for s in segments),
        segments=segments,
        task=first.task,
        timestamp=first.timestamp,
        language=language,
        language_probability=probability,
        duration=round(used[-1].end, 3),  # the last shard decodes to the real end of the file
        model=first.model,
        speakers=speakers,
        speech_seconds=_sum(p.transcript.speech_seconds for p in used),
        text_seconds=_sum(p.transcript.text_seconds for p in used),
        dropped_pieces=sum(p.transcript.dropped_pieces for p in used),
        processed_by=_processed_by(used),
        # the last shard decodes to the end of the file: whether it was cut short is its to say
        **used[-1].transcript.model_dump(include={"cut_short", "stated_duration", "audio_note"}),
    )
    return transcript


def _check(partials: Sequence[PartialResult]) -> list[PartialResult]:
    if not partials:
        raise ValueError("no partial results to merge")
    counts = {p.count for p in partials}
    if len(counts) != 1:
        raise ValueError(f"partial results disagree on the shard count: {sorted(counts)}")
    count = counts.pop()
    seen = Counter(p.index for p in partials)
    if sorted(seen) != list(range(count)) or any(n > 1 for n in seen.values()):
        raise ValueError(
            f"expected exactly one partial result for each shard 0..{count - 1}, got {sorted(seen.elements())}"
        )
    used = sorted((p for p in partials if not p.unused), key=lambda p: p.index)
    if not used:
        raise ValueError("every partial result is marked unused: no shard did the work")
    for a, b in zip(used, used[1:], strict=False):
        if abs(a.end - b.start) > 1e-3:
            raise ValueError(
                f"shards {a.index} and {b.index} do not meet: one ends at {a.end}, the next starts at {b.start}"
            )
    return used


def _check_hints(num: int | None, lo: int | None, hi: int | None) -> None:
    for name, value in (("numSpeakers", num), ("minSpeakers", lo), ("maxSpeakers", hi)):
        if value is not None and value < 1:
            raise ValueError(f"diarization.{name} must be at least 1, got {value}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"diarization.minSpeakers ({lo}) is greater than maxSpeakers ({hi})")


def _sum(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else round(sum(values), 3)


def _language(used: list[PartialResult]) -> tuple[str | None, float | None]:
    """The language with the most speech over all shards, and its speech-weighted probability."""
    weight: Counter[str] = Counter()
    for p in used:
        if p.transcript.language:
            weight[p.transcript.language] += p.transcript.speech_seconds or 0.0
    if not weight:
        return used[0].transcript.language, used[0].transcript.language_probability
    language = max(weight, key=lambda lang: (weight[lang], -_first_index(used, lang)))
    rated = [(p.transcript.speech_seconds or 0.0, p.transcript.language_probability) for p in used
             if p.transcript.language == language and p.transcript.language_probability is not None]  # fmt: skip
    total = sum(w for w, _ in rated)
    probability = round(sum(w * q for w, q in rated) / total, 4) if total else None
    return language, probability


def _first_index(used: list[PartialResult], language: str) -> int:
    return next(p.index for p in used if p.transcript.language == language)


def _processed_by(used: list[PartialResult]) -> ProcessedBy | None:
    machines = [p.transcript.processed_by for p in used]
    if all(m is None for m in machines):
        return None
    known = next(m for m in machines if m is not None)
    runners = [
        ShardRunner(index=p.index, start=round(p.start, 3), end=round(p.end, 3),
                    pod=m.pod if m else None, node=m.node if m else None, runtime=m.runtime if m else None)
        for p, m in zip(used, machines, strict=True)
    ]  # fmt: skip
    pods = {m.pod for m in machines if m is not None}
    # One runner did everything: it is the job's pod; several: each is in runners.
    return ProcessedBy(
        pod=known.pod if len(pods) == 1 else None,
        node=known.node if len(pods) == 1 else None,
        runtime=known.runtime,
        device=known.device,
        dtype=known.dtype,
        attention=known.attention,
        runners=runners,
    )


# --- speakers ------------------------------------------------------------------------------


def _unit(vector: Sequence[float]) -> list[float] | None:
    norm = math.sqrt(sum(x * x for x in vector))
    if not norm or not math.isfinite(norm):
        return None  # pyannote pads speakers without an embedding with zeros
    return [x / norm for x in vector]


class _Cluster:
    __slots__ = ("members", "shards", "weight", "centroid")

    def __init__(self, member: tuple[int, str], vector: list[float] | None, weight: float):
        self.members = [member]
        self.shards = {member[0]}
        self.weight = weight
        self.centroid = vector


def _distance(a: _Cluster, b: _Cluster) -> float:
    # Two speakers one shard told apart stay apart unless the speaker count forces it.
    if a.centroid is None or b.centroid is None or a.shards & b.shards:
        return math.inf
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a.centroid, b.centroid, strict=True)))


def cluster_speakers(
    speakers: Sequence[tuple[int, str, Sequence[float] | None, float]],
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    threshold: float = CLUSTER_THRESHOLD,
) -> list[list[tuple[int, str]]]:
    """Group (shard, local label, centroid, seconds) into people: centroid-linkage agglomerative
    clustering of unit-length centroids (weighted by seconds of speech), stopped at ``threshold``,
    then moved along the same merge order to honour num/min/max speakers. Speakers of one shard
    are never joined unless the count asks for fewer people than a shard found."""
    clusters = [_Cluster((shard, label), _unit(v) if v else None, max(seconds, 1e-3))
                for shard, label, v, seconds in speakers]  # fmt: skip
    if not clusters:
        return []
    history = [[list(c.members) for c in clusters]]
    within = 0  # merges made at or below the threshold, in order, before the first above it
    stopped = False
    while len(clusters) > 1:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = _distance(clusters[i], clusters[j])
                if best is None or d < best[0]:
                    best = (d, i, j)
        d, i, j = best
        if d <= threshold and not stopped:
            within += 1
        else:
            stopped = True
        a, b = clusters[i], clusters[j]
        if a.centroid is not None and b.centroid is not None:
            w = a.weight + b.weight
            a.centroid = [(x * a.weight + y * b.weight) / w for x, y in zip(a.centroid, b.centroid, strict=True)]
        a.members += b.members
        a.shards |= b.shards
        a.weight += b.weight
        del clusters[j]
        history.append([list(c.members) for c in clusters])
    total = len(history[0])
    found = total - within
    if num_speakers is not None:
        target = num_speakers
    else:
        target = max(min_speakers or 1, min(found, max_speakers or found))
    target = max(1, min(total, target))
    return history[total - target]


def _global_names(used, num, lo, hi, threshold) -> dict[int, dict[str, str]]:
    """shard index -> local label -> SPEAKER_NN, numbered by first appearance in the merged file."""
    speakers = []
    for p in used:
        local = _local_labels(p)
        for label in local:
            speakers.append((p.index, label, p.centroids.get(label), p.speaker_seconds.get(label, 0.0)))
    groups = cluster_speakers(speakers, num_speakers=num, min_speakers=lo, max_speakers=hi, threshold=threshold)
    group_of = {member: g for g, members in enumerate(groups) for member in members}
    # First appearance: the earliest turn (or word) of any member, as the single-runner path numbers them.
    first: dict[int, float] = {}
    for p in used:
        for start, label in _appearances(p):
            g = group_of[(p.index, label)]
            first[g] = min(first.get(g, math.inf), start)
    order = sorted(range(len(groups)), key=lambda g: (first.get(g, math.inf), g))
    number = {g: f"SPEAKER_{n:02d}" for n, g in enumerate(order)}
    names: dict[int, dict[str, str]] = {p.index: {} for p in used}
    for (shard, label), g in group_of.items():
        names[shard][label] = number[g]
    return names


def _local_labels(p: PartialResult) -> list[str]:
    labels = list(p.centroids)
    for _, label in _appearances(p):
        if label not in labels:
            labels.append(label)
    for label in p.speaker_seconds:
        if label not in labels:
            labels.append(label)
    return labels


def _appearances(p: PartialResult):
    for turn in p.transcript.speakers or []:
        yield turn.start, turn.speaker
    for seg in p.transcript.segments:
        if seg.speaker:
            yield seg.start, seg.speaker
        for word in seg.words or []:
            if word.speaker:
                yield word.start, word.speaker


def _renamed_segment(seg: Segment, names: dict[str, str]) -> Segment:
    update: dict[str, Any] = {"speaker": names.get(seg.speaker, seg.speaker) if seg.speaker else None}
    if seg.words:
        update["words"] = [w.model_copy(update={"speaker": names.get(w.speaker, w.speaker) if w.speaker else None})
                           for w in seg.words]  # fmt: skip
    return seg.model_copy(update=update)


def _turns(used: list[PartialResult], names: dict[int, dict[str, str]], language: str | None) -> list[SpeakerTurn]:
    """Each shard's turns renamed; one person's turns that meet at a cut become one turn."""
    turns: list[SpeakerTurn] = []
    for p in used:
        for turn in p.transcript.speakers or []:
            speaker = names[p.index].get(turn.speaker, turn.speaker)
            if turns and turns[-1].speaker == speaker:
                last = turns[-1]
                last.end = max(last.end, turn.end)
                last.text = join_texts([last.text, turn.text], language).strip()
            else:
                turns.append(turn.model_copy(update={"speaker": speaker}))
    return turns


# ------------------------------------------------------------------ storage (Secrets)


def partial_secret_name(tj_name: str, index: int) -> str:
    """``<job>-part-<i>``, deterministic; a long job name keeps a hash of itself."""
    suffix = f"{_PARTIAL_INFIX}{index}"
    return contract.fit_name(tj_name, 253 - len(suffix)) + suffix


def encode_partial(partial: PartialResult) -> bytes:
    """gzip JSON with a fixed mtime: a retried shard writes the same bytes."""
    return gzip.compress(partial.model_dump_json(exclude_none=True).encode(), compresslevel=9, mtime=0)


def decode_partial(data: bytes) -> PartialResult:
    try:
        return PartialResult.model_validate_json(gzip.decompress(data))
    except (OSError, EOFError, ValueError) as error:
        raise ResultStoreFailed(f"a shard's partial result cannot be read: {error}") from error


def store_partial(core_v1: Any, tj: Mapping[str, Any], partial: PartialResult) -> None:
    """Write a shard's partial result into its Secret (created here, owned by the job; or patched
    when it exists, e.g. from an earlier try of the same shard)."""
    from kubernetes.client.exceptions import ApiException

    core_v1 = _need(core_v1)
    job = JobRef.of(tj)
    data = encode_partial(partial)
    cap = ResultSettings().result_secret_max_bytes
    if len(data) > cap:
        raise ResultTooLarge(
            f"shard {partial.index}'s compressed partial result is {len(data)} bytes, over the Secret limit of "
            f"{cap} bytes: use more shards"
        )
    name = partial_secret_name(job.name, partial.index)
    digest = hashlib.sha256(data).hexdigest()
    encoded = {PARTIAL_KEY: base64.b64encode(data).decode()}
    annotations = {contract.ANNOTATION_RESULT_SHA256: digest}
    try:
        try:
            current = core_v1.read_namespaced_secret(name, job.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            metadata = contract.child_metadata(tj, name, "partial")
            metadata["annotations"] = annotations
            body = {"apiVersion": "v1", "kind": "Secret", "type": PARTIAL_SECRET_TYPE, "metadata": metadata,
                    "data": encoded}  # fmt: skip
            core_v1.create_namespaced_secret(job.namespace, body)
        else:
            owner = (current.metadata.labels or {}).get(contract.LABEL_JOB_UID)
            if owner != job.uid:
                raise ResultStoreFailed(
                    f"Secret {job.namespace}/{name} belongs to another TranscriptionJob (uid {owner}), not {job.uid}"
                )
            patch = {"metadata": {"annotations": annotations, "resourceVersion": current.metadata.resource_version},
                     "data": encoded}  # fmt: skip
            core_v1.patch_namespaced_secret(name, job.namespace, patch)
    except ApiException as error:
        if error.status == 413:
            raise ResultTooLarge(f"the apiserver refused shard {partial.index}'s partial: {error.reason}") from error
        raise _api_error(f"cannot write Secret {job.namespace}/{name}", error) from error
    except ResultStoreFailed:
        raise
    except Exception as error:  # connection errors and the like: transient
        raise _api_error(f"cannot write Secret {job.namespace}/{name}", error) from error


def load_partials(core_v1: Any, tj: Mapping[str, Any], count: int) -> list[PartialResult]:
    """Every shard's partial result, in index order; a missing one is ResultNotFound (ResultStoreFailed)."""
    from kubernetes.client.exceptions import ApiException

    from ifw.core.results import ResultNotFound

    core_v1 = _need(core_v1)
    job = JobRef.of(tj)
    partials = []
    for index in range(count):
        name = partial_secret_name(job.name, index)
        try:
            secret = core_v1.read_namespaced_secret(name, job.namespace)
        except ApiException as error:
            if error.status == 404:
                raise ResultNotFound(
                    f"shard {index}'s partial result (Secret {job.namespace}/{name}) is missing"
                ) from error
            raise _api_error(f"cannot read Secret {job.namespace}/{name}", error) from error
        owner = (secret.metadata.labels or {}).get(contract.LABEL_JOB_UID)
        if owner != job.uid:
            raise ResultNotFound(f"Secret {job.namespace}/{name} belongs to another job (uid {owner})")
        encoded = (secret.data or {}).get(PARTIAL_KEY)
        if not encoded:
            raise ResultNotFound(f"Secret {job.namespace}/{name} has no {PARTIAL_KEY} yet")
        data = base64.b64decode(encoded)
        expected = (secret.metadata.annotations or {}).get(contract.ANNOTATION_RESULT_SHA256)
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise ResultStoreFailed(f"Secret {job.namespace}/{name} does not match its sha256: corrupt or replaced")
        partial = decode_partial(data)
        if partial.index != index:
            raise ResultStoreFailed(f"Secret {job.namespace}/{name} holds shard {partial.index}, not {index}")
        partials.append(partial)
    return partials


def delete_partials(core_v1: Any, tj: Mapping[str, Any], count: int) -> None:
    """Remove the partial-result Secrets once merged (missing ones are fine)."""
    from kubernetes.client.exceptions import ApiException

    core_v1 = _need(core_v1)
    job = JobRef.of(tj)
    for index in range(count):
        name = partial_secret_name(job.name, index)
        try:
            core_v1.delete_namespaced_secret(name, job.namespace)
        except ApiException as error:
            if error.status != 404:
                raise _api_error(f"cannot delete Secret {job.namespace}/{name}", error) from error
