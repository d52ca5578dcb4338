"""Kubernetes' own comparison of RBAC rules, for the least-privilege tests (test-only)."""

from __future__ import annotations

import json
import subprocess

from ifw.local.control_plane import ControlPlaneError, build_apiserver

_covers_binary: str | None = None


def covers(owner: list[dict], servant: list[dict]) -> tuple[bool, list[dict]]:
    """Whether the `owner` PolicyRules allow everything the `servant` rules allow, and the servant's
    rules (broken down to one verb, resource and name each) that they do not: Kubernetes' own
    comparison (k8s.io/component-helpers/auth/rbac/validation.Covers), run by the project's
    apiserver binary (`ifw-test-apiserver covers`)."""
    global _covers_binary
    _covers_binary = _covers_binary or build_apiserver()  # once: the build script takes a lock
    proc = subprocess.run([_covers_binary, "covers"], input=json.dumps({"owner": owner, "servant": servant}),
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ControlPlaneError(f"ifw-test-apiserver covers failed ({proc.returncode}): {proc.stderr[-2000:]}")
    answer = json.loads(proc.stdout)
    return answer["covers"], answer["uncovered"]
