"""Task ids: the client's own string (the original API's managed_task_id) and the object name it maps to.

The original API takes any string as a task id (it was a dict key): "Meeting_2026-12-01_A",
"crm:call/8812". A TranscriptionJob's name must be a DNS-1123 label, so an id that is one is
used as the name; any other becomes a readable slug plus a hash of the whole id (same id, same
name, every time, on every replica), and the id itself is kept in the annotation ifw.dev/task-id.
Answers, /tasks and the lookups of /status and /cancel speak the client's id.

The two kinds of names never meet: an id that is a DNS-1123 label but looks like a hashed name
(it ends in "-" and 10 hex digits, as "foo-bar-55282c1820" does) is hashed too, so no client
can take the name another id hashes to by choosing it as its own id. Two ids then share a name
only if sha256 gives both the same first 40 bits (with the same slug): a search of about 2^40
hashes aimed at one id known in advance. A lookup still compares the object's id with the one
asked for, so a name held by another id (one made with kubectl, or before this rule) is
"not found" for the others, never their task.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from ifw.core.contract import ANNOTATION_TASK_ID

# A TranscriptionJob name doubles as the batch/v1 Job name and pod label value: a DNS-1123
# label of at most 63 characters.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_TASK_ID = 256
# Control characters (Cc), format characters (Cf: bidi overrides and isolates U+202A-202E,
# U+2066-2069, marks U+200E/F, zero-width U+200B-200D, U+FEFF, soft hyphen, ...), lone
# surrogates and line/paragraph separators: nothing a log line, an annotation, a webhook
# payload or a URL should carry, and the invisible ones make two ids look alike.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_HASH = 10  # hex digits of sha256: 40 bits, no collision among any realistic number of tasks
_SLUG = 63 - _HASH - 1
# What a hashed name ends with: an id used as its own name never does (see the module's doc).
_HASHED_SUFFIX = re.compile(r"-[0-9a-f]{%d}$" % _HASH)


def refused_character(value: str, allow: str = "") -> str | None:
    """The first control, invisible format (bidi, zero-width), surrogate or line-break character
    of value (except those in allow), or None."""
    for c in value:
        if c not in allow and unicodedata.category(c) in _REFUSED_CATEGORIES:
            return c
    return None


def is_object_name(value: str) -> bool:
    return len(value) <= 63 and DNS1123_LABEL.match(value) is not None


def check_task_id(value: str) -> str:
    """A usable task id, or ValueError saying what is wrong with it."""
    if not value:
        raise ValueError("managed_task_id must not be empty")
    if len(value) > MAX_TASK_ID:
        raise ValueError(f"managed_task_id must be at most {MAX_TASK_ID} characters, got {len(value)}")
    if (c := refused_character(value)) is not None:
        raise ValueError(
            "managed_task_id must not contain control characters, invisible format characters "
            f"(bidi, zero-width) or line breaks; found U+{ord(c):04X}"
        )
    return value


def is_task_id(value: str) -> bool:
    try:
        check_task_id(value)
    except ValueError:
        return False
    return True


def is_own_name(task_id: str) -> bool:
    """Whether the id is used as its object's name: a DNS-1123 label that no hashed name can equal."""
    return is_object_name(task_id) and _HASHED_SUFFIX.search(task_id) is None


def object_name(task_id: str) -> str:
    """The TranscriptionJob name of a task id: the id itself when it is a valid name that does
    not look like a hashed one, else a slug of it and a hash of all of it."""
    if is_own_name(task_id):
        return task_id
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH]
    slug = re.sub(r"[^a-z0-9]+", "-", task_id.lower())[:_SLUG].strip("-")
    return f"{slug}-{digest}" if slug else f"task-{digest}"


def task_id_of(tj: Mapping[str, Any]) -> str:
    """The client's id of a TranscriptionJob: its annotation, else its name (made with kubectl,
    or an id that was a valid name already)."""
    meta = tj["metadata"]
    return (meta.get("annotations") or {}).get(ANNOTATION_TASK_ID) or meta["name"]


def annotations_for(task_id: str) -> dict[str, str]:
    """The annotation that keeps an id that is not its object's name."""
    return {} if is_own_name(task_id) else {ANNOTATION_TASK_ID: task_id}
