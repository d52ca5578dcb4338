"""What the operator writes into a TranscriptionJob's metadata, and what it reads there.

It writes two things, each only its own, with JSON patches that leave every other tool's
entries alone:

- the finalizer ``ifw.dev/cleanup``, only on a job whose deletion still needs the operator:
  an S3 result (an S3 object has no owner reference, so nothing else deletes it) or a webhook
  (an unfinished job that is deleted owes its receiver a ``cancelled`` webhook). A finished job
  with only a webhook loses it again: nothing is owed after its deletion.
- the annotation ``ifw.dev/queue-order``, under a concurrency cap, just before the operator's
  first status write on a job that has no Job yet (one started at once never needs it): the
  resourceVersion at which the operator first saw it. creationTimestamp has
  one-second resolution, so jobs created in the same second are ordered by that revision; the
  operator's own status writes change the resourceVersion, so without the annotation a restarted
  operator would order them by its last status write instead of their creation.

It reads GitOps tracking labels and annotations (``gitops_marker``): see GitOpsSettings.
"""

from __future__ import annotations

from typing import Any

from ifw.core.contract import FINALIZER  # the chart's pre-delete hook strips the same one
from ifw.crds.transcriptionjob import GROUP
from ifw.operator.config import GitOpsSettings

__all__ = ["ANNOTATION_QUEUE_ORDER", "FINALIZER", "gitops_marker", "has_finalizer", "metadata_patch", "queue_order"]

ANNOTATION_QUEUE_ORDER = f"{GROUP}/queue-order"


def queue_order(tj: dict[str, Any]) -> int:
    """The revision that orders the job among those created in the same second."""
    meta = tj["metadata"]
    try:
        return int((meta.get("annotations") or {})[ANNOTATION_QUEUE_ORDER])
    except (KeyError, ValueError):
        return int(meta.get("resourceVersion") or 0)


def has_finalizer(tj: dict[str, Any]) -> bool:
    return FINALIZER in (tj["metadata"].get("finalizers") or [])


def gitops_marker(tj: dict[str, Any], settings: GitOpsSettings) -> str | None:
    """The tracking label or annotation of the GitOps tool that keeps the job in the cluster, if any."""
    meta = tj["metadata"]
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    for key in settings.annotations:
        if annotations.get(key):
            return key
    for key in settings.labels:
        if labels.get(key):
            return key
    return None


def _pointer(key: str) -> str:
    """A map key as a JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def metadata_patch(
    tj: dict[str, Any], *, finalizer: bool | None = None, annotations: dict[str, str] | None = None
) -> list[dict[str, Any]] | None:
    """A JSON patch that adds (True) or removes (False) only our finalizer and sets only our
    annotations; None when the metadata already says so.

    Removing tests the entry first, so a list another tool changed meanwhile is never cut at the
    wrong index; creating a list or map that is absent tests the resourceVersion, so one made
    meanwhile is never replaced. A failed test is answered 409/422: read again and retry.
    """
    meta = tj["metadata"]
    finalizers = meta.get("finalizers")
    ops: list[dict[str, Any]] = []
    guard = False
    if finalizer is True and FINALIZER not in (finalizers or []):
        if finalizers is None:
            ops.append({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
            guard = True
        else:
            ops.append({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER})
    elif finalizer is False and FINALIZER in (finalizers or []):
        index = finalizers.index(FINALIZER)
        ops += [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
                {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    current = meta.get("annotations")
    wanted = {key: value for key, value in (annotations or {}).items() if (current or {}).get(key) != value}
    if wanted and current is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": wanted})
        guard = True
    else:
        ops += [{"op": "add", "path": f"/metadata/annotations/{_pointer(key)}", "value": value}
                for key, value in wanted.items()]
    if not ops:
        return None
    if guard:
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]})
    # Never a namesake made since: the same name may be a new TranscriptionJob.
    return [{"op": "test", "path": "/metadata/uid", "value": meta["uid"]}, *ops]
