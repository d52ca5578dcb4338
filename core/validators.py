"""Checks that the CRD types, the REST models and the runner all apply, written once.

Each raises ValueError with a message that names the field as the caller spells it (the CRD
says ``diarization.numSpeakers``, the REST API ``num_speakers``), so pydantic turns it into a
field error and the runner into an InvalidSpec.
"""

from __future__ import annotations

import re

MAX_URL_LENGTH = 2048
# What the apiserver's CEL rule accepts: http(s), a host, then optionally a path/query/fragment.
URL_PATTERN = r"^https?://[^\s/?#]+([/?#][^\s]*)?$"
_URL_RE = re.compile(URL_PATTERN)


def check_http_url(value: str, field: str) -> str:
    """An http or https URL with a host (the same rule as the CRD's CEL validation)."""
    from pydantic import AnyUrl

    if not _URL_RE.match(value or ""):
        raise ValueError(f"{field} must be an http or https URL such as https://example.com/audio.mp3")
    try:
        url = AnyUrl(value)
    except ValueError as error:
        raise ValueError(f"{field} is not a valid URL: {error}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{field} must be an http or https URL")
    if url.username or url.password:
        raise ValueError(f"{field} must not carry credentials (user:password@host): use a pre-signed URL or headers")
    return value


def check_speaker_hints(
    num: int | None, low: int | None, high: int | None, *, names: tuple[str, str, str]
) -> None:
    """numSpeakers excludes min/max; min ≤ max; every hint at least 1. ``names`` as the caller spells them."""
    num_name, low_name, high_name = names
    for name, value in ((num_name, num), (low_name, low), (high_name, high)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if num is not None and (low is not None or high is not None):
        raise ValueError(f"{num_name} cannot be combined with {low_name} or {high_name}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"{low_name} must be less than or equal to {high_name}")
