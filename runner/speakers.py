"""Give each word (or segment) of a transcript the speaker who said it.

Rule: the speaker whose diarization turns overlap it longest. Unlike the
original ("each turn takes the chunk whose end is nearest"), a short
interjection cannot take over a long segment, nothing after the last turn is
lost (it keeps the nearest speaker), and no turns at all is not an error.

With word timestamps, words are assigned one by one, so a segment spanning two
speakers is split where the speaker changes in ``speakers``; the segment itself
keeps its boundaries (subtitles and chunks stay as transcribed) and takes the
speaker of most of its words. Without word timestamps the segment is the unit.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import accumulate

from ifw.core.languages import NO_SPACE_LANGUAGES
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
        mid = (start + end) / 2
        for s, e, spk in self.turns[lo:hi]:
            if end > start:
                overlap[spk] += max(0.0, min(end, e) - max(start, s))
            elif s <= mid <= e:  # a zero-length word: the turn it falls in
                overlap[spk] += 1.0
        if overlap and max(overlap.values()) > 0:
            return max(overlap, key=overlap.__getitem__)
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


def assign_speakers(transcript: Transcript, turns: Sequence[Turn]) -> Transcript:
    """A copy of ``transcript`` with speakers on its words/segments and ``speakers`` filled in.

    ``turns`` are ``(start, end, speaker)`` from diarization, in any order. No turns
    (no speech found) gives ``speakers == []`` and leaves everything unassigned.
    """
    out = transcript.model_copy(deep=True)
    index = _TurnIndex(turns)
    if not index.turns:
        out.speakers = []
        return out

    by_words = any(seg.words for seg in out.segments)
    for seg in out.segments:
        if by_words and seg.words:
            for word in seg.words:
                word.speaker = index.speaker_for(word.start, word.end)
            seg.speaker = _dominant(seg.words)
        else:
            seg.speaker = index.speaker_for(seg.start, seg.end)

    units: list[Word | Segment] = []
    for seg in out.segments:
        units.extend(seg.words if by_words and seg.words else [seg])
    out.speakers = _merge(units, join=_joiner(out))
    return out


def _dominant(words: list[Word]) -> str | None:
    """The speaker of most of the words' time (ties: the earliest such speaker)."""
    time: dict[str, float] = {}
    for w in words:
        if w.speaker is not None:
            time[w.speaker] = time.get(w.speaker, 0.0) + max(w.end - w.start, 1e-3)
    return max(time, key=time.__getitem__) if time else None


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
    """Whisper texts carry their own leading spaces (" Hello"); stripped ones get one between them."""

    def join(texts: list[str]) -> str:
        if transcript.language in NO_SPACE_LANGUAGES or any(t[:1].isspace() for t in texts[1:]):
            return "".join(texts).strip()
        return " ".join(t.strip() for t in texts if t.strip())

    return join
