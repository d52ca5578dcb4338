"""Give each word (or segment) of a transcript the speaker who said it.

Rule: the speaker whose diarization turns overlap it longest. Unlike the
original ("each turn takes the chunk whose end is nearest"), a short
interjection cannot take over a long segment, nothing after the last turn is
lost (it keeps the nearest speaker), and no turns at all is not an error.

With word timestamps, words are assigned one by one and a segment that spans
two speakers is split where the speaker changes, so no segment (subtitle cue,
chunk) mixes two people. Where people talk at once, a word goes to the speaker
who overlaps it most, and on a tie to the one whose turns around it are
longest (the main speaker, not the "mm-hm"). Without word timestamps the
segment is the unit.

Chunk timestamps with diarization: the pipeline computes word times anyway (they
cost one small alignment pass) and asks for timestamp="chunk" here: segments are
split at speaker changes as above, then their words are dropped, so the output
keeps the original API's chunk shape while no chunk (and no srt/vtt cue) names
two people.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import accumulate

from ifw.core.languages import join_texts
from ifw.core.transcript import Segment, SpeakerTurn, Transcript, Word

Turn = tuple[float, float, str]


class _TurnIndex:
    """Turns sorted by start, for fast overlap and nearest-turn queries."""

    def __init__(self, turns: Iterable[Turn]):
        self.turns = sorted((float(s), float(e), spk) for s, e, spk in turns if e > s)
        self.starts = [t[0] for t in self.turns]
        self.longest = max((e - s for s, e, _ in self.turns), default=0.0)
        # Running maximum of ends: the earlier turn that reaches furthest, for "nearest before".
        self.reach = list(accumulate(self.turns, lambda a, t: t if t[1] >= a[1] else a))

    def speaker_for(self, start: float, end: float) -> str:
        """The speaker overlapping [start, end] longest; else the nearest in time."""
        if end < start:
            start, end = end, start
        # Only turns starting in (start - longest, end) can overlap.
        lo = bisect_left(self.starts, start - self.longest)
        hi = bisect_left(self.starts, end)
        overlap: dict[str, float] = defaultdict(float)
        span: dict[str, float] = defaultdict(float)  # length of the speaker's turns that touch it
        mid = (start + end) / 2
        for s, e, spk in self.turns[lo:hi]:
            if end > start:
                got = max(0.0, min(end, e) - max(start, s))
            else:  # a zero-length word: the turn it falls in
                got = 1.0 if s <= mid <= e else 0.0
            if got > 0:
                overlap[spk] += got
                span[spk] += e - s
        if overlap:
            return max(overlap, key=lambda spk: (overlap[spk], span[spk]))
        return self._nearest(start, end)

    def _nearest(self, start: float, end: float) -> str:
        after = bisect_left(self.starts, end)
        candidates = []
        if after < len(self.turns):
            candidates.append((self.turns[after][0] - end, self.turns[after][2]))
        if after > 0:
            before = self.reach[after - 1]
            candidates.append((start - before[1], before[2]))
        return min(candidates)[1]


def assign_speakers(transcript: Transcript, turns: Sequence[Turn], timestamp: str | None = None) -> Transcript:
    """A copy of ``transcript`` with speakers on its words/segments and ``speakers`` filled in.

    ``turns`` are ``(start, end, speaker)`` from diarization, in any order. No turns
    (no speech found) gives ``speakers == []`` and leaves everything unassigned.
    ``timestamp="chunk"``: the transcript was made with word times only for this; its segments
    are split by them, then the words are dropped (a chunk-level transcript comes back).
    """
    out = transcript.model_copy(deep=True)
    index = _TurnIndex(turns)
    if not index.turns:
        out.speakers = []
        return _chunk_level(out) if timestamp == "chunk" else out

    by_words = any(seg.words for seg in out.segments)
    segments: list[Segment] = []
    for seg in out.segments:
        if by_words and seg.words:
            for word in seg.words:
                word.speaker = index.speaker_for(word.start, word.end)
            segments.extend(_split_by_speaker(seg, out.language))
        else:
            seg.speaker = index.speaker_for(seg.start, seg.end)
            segments.append(seg)
    out.segments = segments

    units: list[Word | Segment] = []
    for seg in out.segments:
        units.extend(seg.words if by_words and seg.words else [seg])
    out.speakers = _merge(units, join=_joiner(out))
    return _chunk_level(out) if timestamp == "chunk" else out


def _chunk_level(transcript: Transcript) -> Transcript:
    """The transcript as chunk timestamps give it: no words (they were only computed to split by speaker)."""
    transcript.timestamp = "chunk"
    for seg in transcript.segments:
        seg.words = None
    return transcript


def _split_by_speaker(seg: Segment, language: str | None) -> list[Segment]:
    """The segment cut between words where the speaker changes (itself when one speaker says it all).

    Each piece keeps the decode's scores and language; the first starts and the last ends where
    the segment did. Token ids cannot be divided among words, so pieces carry none.
    """
    runs: list[list[Word]] = []
    for word in seg.words or []:
        if runs and runs[-1][-1].speaker == word.speaker:
            runs[-1].append(word)
        else:
            runs.append([word])
    if len(runs) <= 1:
        seg.speaker = runs[0][0].speaker if runs else None
        return [seg]
    return [
        seg.model_copy(
            update={
                "start": seg.start if i == 0 else run[0].start,
                "end": seg.end if i == len(runs) - 1 else run[-1].end,
                "text": join_texts([w.text for w in run], language),
                "speaker": run[0].speaker,
                "words": run,
                "tokens": None,
            }
        )
        for i, run in enumerate(runs)
    ]


def _merge(units: list[Word | Segment], join) -> list[SpeakerTurn]:
    """Consecutive units of one speaker become one SpeakerTurn."""
    turns: list[SpeakerTurn] = []
    texts: list[str] = []
    for unit in sorted(units, key=lambda u: (u.start, u.end)):
        if turns and turns[-1].speaker == unit.speaker:
            turns[-1].end = max(turns[-1].end, unit.end)
            texts.append(unit.text)
        else:
            if turns:
                turns[-1].text = join(texts)
            turns.append(SpeakerTurn(speaker=unit.speaker, start=unit.start, end=unit.end, text=""))
            texts = [unit.text]
    if turns:
        turns[-1].text = join(texts)
    return turns


def _joiner(transcript: Transcript):
    def join(texts: list[str]) -> str:
        return join_texts(texts, transcript.language).strip()

    return join
