"""Task ids: the client's own string (the original API's managed_task_id) and the object name it maps to.

The original API takes any string as a task id (it was a dict key): "Meeting_2026-12-01_A",
"crm:call/8812". A TranscriptionJob's name must be a DNS-1123 label, so an id that is one is
used as the name; any other becomes a readable slug plus a hash of the whole id (same id, same
name, every time), and the id itself is kept in the annotation ifw.dev/task-id. Answers,
/tasks and the lookups of /status and /cancel speak the client's id.
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
# Control characters, lone surrogates and line/paragraph separators: nothing a log line,
# an annotation or a URL should carry.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_HASH = 10  # hex digits of sha256: 40 bits, no collision among any realistic number of tasks
_SLUG = 63 - _HASH - 1


def is_object_name(value: str) -> bool:
    return len(value) <= 63 and DNS1123_LABEL.match(value) is not None


def check_task_id(value: str) -> str:
    """A usable task id, or ValueError saying what is wrong with it."""
    if not value:
        raise ValueError("managed_task_id must not be empty")
    if len(value) > MAX_TASK_ID:
        raise ValueError(f"managed_task_id must be at most {MAX_TASK_ID} characters, got {len(value)}")
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in value):
        raise ValueError("managed_task_id must not contain control characters or line breaks")
    return value


def is_task_id(value: str) -> bool:
    try:
        check_task_id(value)
    except ValueError:
        return False
    return True


def object_name(task_id: str) -> str:
    """The TranscriptionJob name of a task id: the id itself when it is a valid name, else
    a slug of it and a hash of all of it."""
    if is_object_name(task_id):
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
    return {} if is_object_name(task_id) else {ANNOTATION_TASK_ID: task_id}
