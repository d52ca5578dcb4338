"""The transcript: the one schema the runner stores and the gateway renders.

Stored as JSON (this model, superset of every output); the renderers turn it
into the original API's shape and into text / srt / vtt / verbose_json.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Word(BaseModel):
    start: float
    end: float
    text: str
    speaker: str | None = None


class Segment(BaseModel):
    start: float
    end: float
    text: str
    speaker: str | None = None
    words: list[Word] | None = Field(None, description="Present when word timestamps were asked for.")


class SpeakerTurn(BaseModel):
    """A stretch of one speaker's speech with the words said in it."""

    speaker: str
    start: float
    end: float
    text: str


class Transcript(BaseModel):
    text: str
    segments: list[Segment]
    task: Literal["transcribe", "translate"] = "transcribe"
    timestamp: Literal["chunk", "word"] = "chunk"
    language: str | None = None
    language_probability: float | None = None
    duration: float = 0.0
    model: str | None = None
    speakers: list[SpeakerTurn] | None = Field(None, description="Present only when diarization ran.")
