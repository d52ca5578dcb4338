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
    text: str  # as Whisper wrote it, leading space included (" Hello")
    speaker: str | None = None
    probability: float | None = Field(None, description="Mean token probability of the word, 0-1.")
    channel: int | None = Field(None, ge=0, description="Multichannel jobs: the audio channel (0 = first) it was said on.")


class Segment(BaseModel):
    start: float
    end: float
    text: str  # as Whisper wrote it, leading space included
    speaker: str | None = None
    words: list[Word] | None = Field(None, description="Present when word timestamps were asked for.")
    channel: int | None = Field(None, ge=0, description="Multichannel jobs: the audio channel (0 = first) it was said on.")
    # Whisper's own quality measures of the decode that produced the segment (OpenAI verbose_json).
    language: str | None = Field(None, description="Language of the piece the segment came from.")
    tokens: list[int] | None = Field(None, description="Text token ids of the segment.")
    logprobs: list[float] | None = Field(None, description="Log-probability of each of those tokens.")
    temperature: float | None = Field(None, description="Sampling temperature of the decode that was kept.")
    avg_logprob: float | None = Field(None, description="Mean log-probability of the segment's tokens.")
    compression_ratio: float | None = Field(None, description="gzip ratio of the text: high means repetitive.")
    no_speech_prob: float | None = Field(None, description="Probability of no speech in the piece.")


class SpeakerTurn(BaseModel):
    """A stretch of one speaker's speech with the words said in it."""

    speaker: str
    start: float
    end: float
    text: str
    channel: int | None = Field(None, ge=0, description="Multichannel jobs: the audio channel of the turn.")


class ShardRunner(BaseModel):
    """Who transcribed one shard of a sharded job (ifw.core.shards), and which stretch of the file."""

    index: int
    start: float
    end: float
    pod: str | None = None
    node: str | None = None
    runtime: Literal["Pool", "Job", "Local"] | None = None


class ProcessedBy(BaseModel):
    """The machine that did the work (the original API reported fly_machine_id), and how the model ran."""

    pod: str | None = None
    node: str | None = None
    runtime: Literal["Pool", "Job", "Local"] | None = None
    # Absent in results stored before they were recorded.
    device: str | None = Field(None, description="cuda or cpu.")
    dtype: str | None = Field(None, description="float32, float16, bfloat16, or int8 (int8 Linear layers on CPU).")
    attention: str | None = Field(None, description="The attention implementation: flash_attention_2, sdpa or eager.")
    # Only on a sharded job's merged transcript: every runner and the stretch it did, in time order.
    runners: list[ShardRunner] | None = Field(None, description="The runners of a sharded job, one per shard.")


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
    # Nothing dropped silently: how much speech the VAD found, how much of it has text, and how
    # many pieces with speech were given up after every retry.
    speech_seconds: float | None = Field(None, description="Seconds of speech the VAD detected.")
    text_seconds: float | None = Field(None, description="Seconds of detected speech covered by segments.")
    dropped_pieces: int = Field(0, ge=0, description="Pieces with speech that produced no text after retries.")
    # A file cut short (an interrupted upload, a recording cut off) is transcribed as far as it goes,
    # and says so: `duration` is how far that is (ifw.runner.audio.DecodeReport).
    cut_short: bool = Field(
        False, description="The audio ends before its container says it does: transcribed as far as it goes."
    )
    stated_duration: float | None = Field(None, ge=0, description="With cut_short: the seconds the container states.")
    audio_note: str | None = Field(None, description="With cut_short: why, in words.")
    processed_by: ProcessedBy | None = Field(None, description="Which pod on which node transcribed it.")
