"""Known speakers' reference clips and multichannel checks, as far as the gateway can make them.

- A reference given inline (a ``data:`` URL, as OpenAI's ``known_speaker_references[]`` and
  ifw's ``known_speakers[].url`` take them) is decoded here and kept beside the task's upload,
  served to the runner by URL with a token of its own (gateway/uploads.py), exactly as an
  uploaded audio file is: the TranscriptionJob spec only ever holds URLs.
- ``channels_of`` reads the channel count from a WAV or FLAC header (no decoder needed), so a
  mono upload with ``multichannel`` is refused with a 422 before any job starts; other formats
  are left to the runner (which fails the job with NotMultichannel).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from pathlib import Path

from ifw.core.riff import wave_chunks

# Decoded bytes of one inline reference: 2-10 s of speech; 1 MiB holds 10 s of 16-bit mono WAV up
# to 48 kHz (960 KB) and any compressed format. (OpenAI's form fields have the same order of size.)
MAX_REFERENCE_BYTES = 1024 * 1024
MAX_DATA_URL_LENGTH = 4 * MAX_REFERENCE_BYTES // 3 + 256  # base64 plus the media type
_DATA_URL = re.compile(r"^data:(?P<type>[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+)?(?P<params>(;[^;,]*)*),", re.S)


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:"


def decode_data_url(value: str, field: str) -> bytes:
    """The bytes of a base64 ``data:`` URL of audio; ValueError naming `field` otherwise."""
    match = _DATA_URL.match(value)
    if not match or ";base64" not in match["params"].lower():
        raise ValueError(f"{field} must be a base64 data URL such as data:audio/wav;base64,UklGR...")
    kind = (match["type"] or "").lower()
    if kind and not kind.startswith(("audio/", "video/", "application/octet-stream")):
        raise ValueError(f"{field} must hold audio (data:audio/...), not {kind}")
    try:
        data = base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64") from None
    if not data:
        raise ValueError(f"{field} holds no audio (0 bytes)")
    if len(data) > MAX_REFERENCE_BYTES:
        raise ValueError(
            f"{field} is {len(data)} bytes; a reference clip (2-10 s) may have at most {MAX_REFERENCE_BYTES}"
        )
    return data


def check_reference(value: str, field: str) -> str:
    """An inline reference (data URL) is decoded to check it; an http(s) URL is checked as a URL."""
    if is_data_url(value):
        decode_data_url(value, field)
        return value
    from ifw.core.validators import MAX_URL_LENGTH, check_http_url

    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"{field} is longer than {MAX_URL_LENGTH} characters")
    return check_http_url(value.strip(), field)  # credentials (user:password@) refused too


def channels_of(path: Path) -> int | None:
    """The channel count a WAV (RIFF/RF64, WAVE_FORMAT_EXTENSIBLE too) or FLAC file states; None for
    any other format or a header that cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        for tag, body, _ in wave_chunks(head):
            if tag == b"fmt " and body + 4 <= len(head):
                return struct.unpack("<H", head[body + 2 : body + 4])[0] or None
        return None
    if head[:4] == b"fLaC" and len(head) >= 8 + 34 and head[4] & 0x7F == 0:  # STREAMINFO comes first
        return ((head[8 + 12] >> 1) & 0x07) + 1
    return None
