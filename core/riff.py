"""The chunks of a RIFF/WAVE header, for the two places that read one without a decoder: the
gateway (a WAV's channel count, gateway/references.py) and the runner (the length its data chunk
states, runner/audio.py)."""

from __future__ import annotations

from collections.abc import Iterator


def wave_chunks(head: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(tag, offset of its body in `head`, its stated size) of each chunk of a RIFF or RF64 WAVE
    header, in order, as far as `head` (the file's first bytes) reaches; none for anything else."""
    if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(head):
        size = int.from_bytes(head[pos + 4 : pos + 8], "little")
        yield head[pos : pos + 4], pos + 8, size
        pos += 8 + size + (size & 1)  # chunks are word-aligned
