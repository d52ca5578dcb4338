"""Permissions: the runner's per-job Role and the operator's own ClusterRole.

Here the operator runs as the test's admin, so its ClusterRole is checked the way an authorizer
would: the whole lifecycle runs against a control plane with the apiserver's audit log on, and
every request the operator made (kopf's and its own client's, told apart from the test's by
User-Agent) must be allowed by the rendered rules. (The test server can also enforce RBAC:
tests/cluster/test_least_privilege*.py run each component under its chart identity.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ifw.crds.transcriptionjob import GROUP, PLURAL
from ifw.operator import rbac
from ifw.operator.jobs import runner_role_rules
from tests.operator.conftest import OperatorThread, Sim, operator_settings, wait_for
from tests.rbac_rules import allows


def test_runner_role_allows_only_its_own_job_status_and_result():
    rules = runner_role_rules("job-a")
    ok = [
        ("get", GROUP, PLURAL, "job-a"),
        ("patch", GROUP, f"{PLURAL}/status", "job-a"),
        ("get", "", "secrets", "job-a-result"),
        ("patch", "", "secrets", "job-a-result"),
    ]
    refused = [
        ("get", GROUP, PLURAL, "job-b"),  # another job
        ("update", GROUP, f"{PLURAL}/status", "job-a"),  # it merge-patches its fields, never replaces
        ("update", "", "secrets", "job-a-result"),  # it patches the data in, never replaces the Secret
        ("patch", GROUP, PLURAL, "job-a"),  # its own spec
        ("patch", GROUP, f"{PLURAL}/status", "job-b"),  # another job's status
        ("list", GROUP, PLURAL, None),
        ("delete", GROUP, PLURAL, "job-a"),
        ("get", "", "secrets", "job-b-result"),  # another job's result
        ("get", "", "secrets", "hf-token"),
        ("create", "", "secrets", None),  # create cannot be limited by name: the operator pre-creates it
        ("list", "", "secrets", None),
        ("delete", "", "secrets", "job-a-result"),
        ("create", "", "pods", None),
        ("get", "batch", "jobs", "job-a"),
    ]
    for verb, group, resource, name in ok:
        assert allows(rules, verb, group, resource, name), (verb, resource, name)
    for verb, group, resource, name in refused:
        assert not allows(rules, verb, group, resource, name), (verb, resource, name)


def test_operator_cluster_role_renders_and_escalation_is_covered():
    role = rbac.cluster_role()
    assert role["kind"] == "ClusterRole" and role["rules"] == rbac.CLUSTER_ROLE_RULES
    # Kubernetes lets the operator create the runner's Role only if it holds every permission in it.
    for rule in runner_role_rules("x"):
        for verb in rule["verbs"]:
            for resource in rule["resources"]:
                assert allows(role["rules"], verb, rule["apiGroups"][0], resource, "x-result"), (verb, resource)
    assert not allows(role["rules"], "escalate", "rbac.authorization.k8s.io", "roles")
    assert not allows(role["rules"], "bind", "rbac.authorization.k8s.io", "roles")


@pytest.fixture
def audited_cluster(tmp_path):
    """A control plane of its own, with the audit log on (the session one has it off)."""
    from kubernetes import config

    from ifw.local.control_plane import ControlPlane
    from ifw.local.crd import install_crd

    policy = tmp_path / "audit-policy.yaml"
    policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n")
    audit_log = tmp_path / "audit.log"

    class AuditedControlPlane(ControlPlane):
        def _spawn(self, name, argv):
            if "apiserver" in name:
                argv = [*argv, f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}",
                        "--audit-log-mode=blocking"]
            return super()._spawn(name, argv)

    with AuditedControlPlane() as cp:
        api_client = config.new_client_from_config(config_file=cp.kubeconfig)
        install_crd(api_client)
        yield cp, api_client, audit_log


def test_every_request_the_operator_makes_is_allowed_by_its_cluster_role(audited_cluster, monkeypatch):
    from kubernetes import client

    import ifw.operator.handlers  # noqa: F401

    cp, api_client, audit_log = audited_cluster
    # kopf logs in through the kubernetes client, which read KUBECONFIG when it was imported.
    import kubernetes.config.kube_config

    monkeypatch.setenv("KUBECONFIG", cp.kubeconfig)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", cp.kubeconfig)
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": "audited"}})
    sim = Sim(api_client, "audited")

    # Cluster-wide, as the chart deploys it (this control plane is the test's alone).
    op = OperatorThread("audited", operator_settings(startup_deadline_seconds=1.5,
                                                     webhook={"max_attempts": 1, "timeout_seconds": 2}))
    op.thread._target = lambda: _run_clusterwide(op)
    op.start()
    try:
        done = sim.create_tj("done", ttlSecondsAfterFinished=0)
        job = sim.job_of(done)
        pod = sim.create_pod(job)
        sim.pod_running(pod)
        sim.wait_phase("done", "Running")
        sim.set_job_condition(job, "Complete", "CompletionsReached")
        wait_for(lambda: sim.tj("done") is None, 10, what="TTL deletion")
        stuck = sim.create_tj("stuck")
        sim.create_pod(sim.job_of(stuck))
        sim.wait_phase("stuck", "Failed", "StartupDeadlineExceeded")
        # A webhook: the operator puts its finalizer on, and takes it off again once the job is deleted.
        paused = sim.create_tj("paused", webhook={"url": "https://hooks.example.com/x"})
        sim.job_of(paused)
        sim.patch_tj("paused", {"spec": {"suspend": True}})
        sim.wait_phase("paused", "Queued", "Suspended")
        sim.delete_tj("paused")
        wait_for(lambda: not sim.jobs(paused["metadata"]["uid"]), 15, what="cancel")
        # Its record goes once the whole cleanup (pods, Secrets, RBAC) is done: all of it in the audit log.
        wait_for(lambda: paused["metadata"]["uid"] not in op.controller.states, 15, what="the cleanup done")
    finally:
        op.stop()

    requests = _operator_requests(audit_log)
    kinds = {(verb, resource) for verb, _, resource, _ in requests}
    # The lifecycle above really exercised the operator's writes.
    for expected in [("create", "jobs"), ("patch", "transcriptionjobs/status"), ("patch", "transcriptionjobs"),
                     ("create", "roles"),
                     ("delete", "transcriptionjobs"), ("deletecollection", "pods"), ("patch", "jobs"),
                     ("create", "events"), ("watch", "pods")]:
        assert expected in kinds, (expected, sorted(kinds))
    denied = sorted({r for r in requests if not allows(rbac.CLUSTER_ROLE_RULES, *r)})
    assert not denied, f"the ClusterRole misses: {denied}"
    # And nothing granted goes unused, except what is justified without being exercised here.
    justified = {
        ("get", "transcriptionjobs"),  # granted on to the runner (escalation check)
        ("patch", "secrets"),  # granted on to the runner (escalation check)
        ("get", "secrets"),  # webhook header Secrets and result Secrets
        ("get", "jobs"),  # reading back an existing Job after a restart (409 on create)
        ("get", "serviceaccounts"), ("get", "roles"), ("get", "rolebindings"),  # 409: ours or a namesake's?
        ("list", "namespaces"), ("watch", "namespaces"),  # kopf, for namespace patterns
    }
    granted = {(verb, resource) for rule in rbac.CLUSTER_ROLE_RULES
               for verb in rule["verbs"] for resource in rule["resources"]}
    assert granted - kinds - justified == set(), "granted but never used"


def _run_clusterwide(op: OperatorThread) -> None:
    import asyncio

    import kopf

    try:
        asyncio.run(kopf.operator(clusterwide=True, standalone=True, memo=op.memo,
                                  stop_flag=op._stop, ready_flag=op._ready))
    except BaseException as error:
        op.error = error


def _operator_requests(audit_log: Path) -> list[tuple[str, str, str, str | None]]:
    out = []
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        agent = entry.get("userAgent", "")
        ref = entry.get("objectRef")
        if entry.get("stage") != "ResponseComplete" or ref is None:
            continue
        if not (agent.startswith("kopf/") or agent.startswith("ifw-operator/")):
            continue
        resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        out.append((entry["verb"], ref.get("apiGroup", ""), resource, ref.get("name")))
    assert out, "no operator requests in the audit log"
    return out
