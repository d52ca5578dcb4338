"""The operator's own permissions, as data: the Helm chart renders ``cluster_role()``.

Every rule is here because the operator makes that call (a test runs the whole lifecycle with
the apiserver's audit log on and checks each request the operator made against these rules).
Two entries need a word:

- ``secrets: patch``: the operator never patches Secrets, but Kubernetes refuses to let anyone
  create a Role granting what they do not hold themselves (RBAC escalation check), and the
  per-job Role grants the runner patch on its own result Secret. The alternative (the
  ``escalate`` verb on roles) would allow granting anything at all.

``allows()`` evaluates rules the way the RBAC authorizer does (verb, API group, resource with
subresource, resourceNames), for tests of both this role and the runner's per-job Role.
"""

from __future__ import annotations

from typing import Any

from ifw.crds.transcriptionjob import GROUP, PLURAL

CLUSTER_ROLE_RULES: list[dict[str, Any]] = [
    # The API it serves: watch them, write their status, delete them when their TTL expires.
    # (get: granted to the runner, so the operator must hold it, and a re-read when a metadata
    # patch conflicts; list/watch: kopf; patch: its finalizer and queue-order annotation; delete: TTL.)
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # The runner Jobs and their Pods.
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete", "deletecollection"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "delete", "deletecollection"]},
    # Per job: the result Secret, and the runner's ServiceAccount, Role and RoleBinding.
    {"apiGroups": [""], "resources": ["secrets"],
     "verbs": ["get", "create", "patch", "deletecollection"]},
    # (get: when a create answers 409, whether the object is this job's or a deleted namesake's.)
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "create", "deletecollection"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
     "verbs": ["get", "create", "deletecollection"]},
    # Pool workers' Leases: who is alive, what it serves, how many jobs it takes.
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["list", "watch"]},
    # Events on TranscriptionJobs (kubectl describe).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf: discovery of the CRD, and namespaces when the configured namespaces are patterns.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]


def cluster_role(name: str = "ifw-operator") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ifw", "app.kubernetes.io/component": "operator"}},
        "rules": CLUSTER_ROLE_RULES,
    }


if __name__ == "__main__":  # python -m ifw.operator.rbac > clusterrole.yaml
    import yaml

    print(yaml.safe_dump(cluster_role(), sort_keys=False), end="")
