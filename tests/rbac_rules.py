"""What Kubernetes RBAC would allow for a list of PolicyRules, for the tests of the rules ifw renders."""

from __future__ import annotations

from typing import Any


def _matches(values: list[str], value: str) -> bool:
    return "*" in values or value in values


def allows(
    rules: list[dict[str, Any]], verb: str, group: str, resource: str, name: str | None = None
) -> bool:
    """Whether ``rules`` grant ``verb`` on ``resource`` (``plural`` or ``plural/subresource``) of ``group``.

    As in Kubernetes: a rule with resourceNames never matches a request without a name
    (list, watch, create, deletecollection).
    """
    for rule in rules:
        if not (_matches(rule.get("verbs", []), verb) and _matches(rule.get("apiGroups", []), group)
                and _matches(rule.get("resources", []), resource)):
            continue
        names = rule.get("resourceNames") or []
        if names and (name is None or name not in names):
            continue
        return True
    return False
