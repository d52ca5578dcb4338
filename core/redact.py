"""Secrets out of every text a component passes on: answers, /status, termination messages, logs.

Two kinds of secret ride in URLs that end up in other components' messages: the per-upload
token, the last path segment of `<internal_url>/internal/uploads/<ns>/<name>/<token>` (a runner
that cannot fetch an upload names the URL in status.message), and the userinfo of a URL
(`user:pass@`, refused at the gateway, but a kubectl-applied job may carry one).
"""

from __future__ import annotations

import logging
import re

UPLOADS_PATH = "/internal/uploads/"
HIDDEN = "***"

# The token segment after /internal/uploads/<ns>/<name>/: secrets.token_urlsafe's alphabet.
_UPLOAD_TOKEN = re.compile(re.escape(UPLOADS_PATH) + r"([^/\s]+/[^/\s]+/)[A-Za-z0-9_-]+")
# scheme://user:pass@ (or scheme://token@): what stands before the host.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]*@")


def redact(text: str) -> str:
    """`text` with upload tokens and URL credentials replaced by ***."""
    if "://" not in text and UPLOADS_PATH not in text:
        return text  # the common case: nothing to look for
    text = _UPLOAD_TOKEN.sub(rf"{UPLOADS_PATH}\1{HIDDEN}", text)
    return _USERINFO.sub(rf"\1{HIDDEN}@", text)


def redact_opt(text: str | None) -> str | None:
    return None if text is None else redact(text)


class RedactingFilter(logging.Filter):
    """Redacts the arguments of log records (uvicorn's access log prints each request's path,
    and the runner's fetch of an upload carries the token in it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True
