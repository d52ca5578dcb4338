"""Least privilege of the pool worker, shown against a real apiserver that enforces RBAC.

A real pool worker (tiny.en) runs exactly as the chart's pool Deployment runs it: its command
and env from `helm template` (downward API fields filled in as the kubelet would, paths moved to
this machine), authenticated as the chart's worker ServiceAccount, bound to the Roles and
RoleBindings the chart renders: a Role in each namespace it serves and one for its Lease in its
own. The operator runs from the chart's rendered settings as admin. The worker takes a job that
succeeds, one whose audio URL is a 404, and one that is cancelled (deleted) while it fetches the
audio, then drains on SIGTERM. The audit log names the worker in `user.username`; each request
becomes a PolicyRule, and Kubernetes' own comparison (validation.Covers, via
`ifw-test-apiserver covers`) shows
  1. allowed: every request is covered by the Roles bound in its namespace (and the server
     allowed each one: its decision is in the event);
  2. nothing beyond: the requests (plus the exceptions listed below, with their reasons) cover
     each Role. Names are left out on both sides: a worker serves any job of its namespaces and
     its Lease is named after its pod, so the Roles cannot name objects (the trade-off against a
     Job's runner, whose Role names its one job; see the chart's README).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from kubernetes import client, config

from ifw.core.results import load_result
from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from ifw.local.control_plane import ControlPlane, service_account_user
from ifw.local.crd import install_crd
from tests.cluster.origin import Origin
from tests.cluster.test_least_privilege import (
    distinct,
    granted_beyond,
    not_allowed,
    read_audit,
    request_rule,
    without_names,
)
from tests.helm.conftest import Helm, find_helm, one
from tests.speaking import speak
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.model]

RELEASE, RELEASE_NS, SERVED = "ifw", "ifw-system", "tenant-a"
POD_NAME, POD_UID = "ifw-pool-5d8f7-q2x9z", "7a1c9e4e-0000-4000-8000-00000000c0de"
SAID = "Please call me tomorrow morning."
# Grants no recorded request uses, each with its reason: role name -> [(rule, reason)]. Empty:
# the run uses every rule of both Roles.
JUSTIFIED: dict[str, list[tuple[dict, str]]] = {f"{RELEASE}-pool": [], f"{RELEASE}-pool-leases": []}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@dataclass
class Recorded:
    username: str
    roles: dict[tuple[str, str], list[dict]]  # (namespace, name) -> rules, as rendered
    events: list[dict]  # the worker's audit events
    jobs: dict[str, dict | None]  # name -> the TranscriptionJob at the end (None: deleted)
    lease_left: bool
    transcript: str  # what the worker stored for the job that succeeded
    processed_by: dict | None  # who the stored transcript says did the work


def _render(work: Path, health_port: int) -> list[dict]:
    return Helm(find_helm(), work / "helm").template(
        "--set", "pool.enabled=true", "--set-json", f'operator.watchNamespaces=["{SERVED}"]',
        "--set", "gateway.enabled=false", "--set", "operator.defaultModel=tiny.en",
        "--set", "pool.capacity=2", "--set", "pool.drainSeconds=10", "--set", f"pool.healthPort={health_port}",
        "--set", "runner.modelCache.hubOffline=true",
        "--set-json", 'runner.env={"IFW_DEVICE":"cpu","IFW_CPU_THREADS":"2","IFW_FETCH_ALLOWLIST":"[\\"127.0.0.1\\"]"}',
        "--set", f"operator.livenessPort={_free_port()}", "--set", f"operator.metricsPort={_free_port()}",
        "--set", "operator.logFormat=plain", "--set", "operator.resyncIntervalSeconds=2",
        release=RELEASE, namespace=RELEASE_NS)


def _apply_pool_identity(api: client.ApiClient, objects: list[dict]) -> tuple[str, dict]:
    """Create the worker's ServiceAccount, Roles and RoleBindings as rendered."""
    pool = [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "pool"]
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    roles = {}
    for obj in pool:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] == "ServiceAccount":
            core.create_namespaced_service_account(ns, obj)
        elif obj["kind"] == "Role":
            rbac.create_namespaced_role(ns, obj)
            roles[(ns, obj["metadata"]["name"])] = obj["rules"]
        elif obj["kind"] == "RoleBinding":
            rbac.create_namespaced_role_binding(ns, obj)
    assert not [o for o in pool if o["kind"].startswith("Cluster")]
    account = one(objects, "Deployment", f"{RELEASE}-pool")["spec"]["template"]["spec"]["serviceAccountName"]
    return account, roles


def _worker_env(c: dict, work: Path, kubeconfig: str) -> dict[str, str]:
    """The worker container's env as the kubelet makes it, paths moved to this machine."""
    downward = {"metadata.name": POD_NAME, "metadata.namespace": RELEASE_NS, "metadata.uid": POD_UID,
                "spec.nodeName": socket.gethostname()}
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("IFW_", "HF_"))}
    for e in c["env"]:
        env[e["name"]] = e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
    # The pod's /tmp emptyDir and /models volume; HOME stays this machine's (the converted weights).
    env |= {"TMPDIR": str(work / "tmp"), "IFW_WORK_DIR": str(work / "tmp" / "ifw"), "HF_HOME": str(work / "models"),
            "HOME": os.environ.get("HOME", str(work)), "OMP_NUM_THREADS": "2", "KUBECONFIG": kubeconfig}
    (work / "tmp").mkdir(exist_ok=True)
    (work / "models").mkdir(exist_ok=True)
    return env


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    assert cmd[0] == "python"
    return subprocess.Popen([sys.executable, *cmd[1:]], env=env, cwd=log.parent, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM as the kubelet sends it; SIGKILL after the pod's grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Recorded:
    work = tmp_path_factory.mktemp("pool-least-privilege")
    audio = speak(SAID, work / "speech.wav")

    health = _free_port()
    objects = _render(work, health)
    deployment = one(objects, "Deployment", f"{RELEASE}-pool")
    pod = deployment["spec"]["template"]["spec"]
    worker_c = pod["containers"][0]
    operator_c = one(objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["containers"][0]
    (work / "operator.yaml").write_text(one(objects, "ConfigMap", f"{RELEASE}-operator")["data"]["operator.yaml"])

    audit_log = work / "audit.log"
    processes: list[subprocess.Popen] = []
    with Origin(audio=audio.read_bytes()) as origin, ControlPlane(audit_log=audit_log) as cp:
        admin = config.new_client_from_config(config_file=cp.kubeconfig)
        core = client.CoreV1Api(admin)
        for ns in (RELEASE_NS, SERVED):
            core.create_namespace({"metadata": {"name": ns}})
        install_crd(admin)
        account, roles = _apply_pool_identity(admin, objects)
        custom = client.CustomObjectsApi(admin)
        try:
            operator_env = {k: v for k, v in os.environ.items() if not k.startswith("IFW_OPERATOR_")}
            operator_env |= {e["name"]: e["value"] for e in operator_c["env"] if "value" in e}
            operator_env |= {"IFW_OPERATOR_CONFIG_FILE": str(work / "operator.yaml"), "KUBECONFIG": cp.kubeconfig}
            processes.append(_spawn(operator_c["command"], operator_env, work / "operator.log"))
            worker = _spawn(worker_c["command"], _worker_env(worker_c, work, cp.service_account_kubeconfig(
                RELEASE_NS, account)), work / "worker.log")
            processes.append(worker)
            probe = worker_c["readinessProbe"]["httpGet"]
            port = {p["name"]: p["containerPort"] for p in worker_c["ports"]}[probe["port"]]

            def ready() -> bool:
                if worker.poll() is not None:
                    raise AssertionError(f"the worker exited {worker.returncode}")
                try:
                    return httpx.get(f"http://127.0.0.1:{port}{probe['path']}", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, 300, "the pool worker's readiness")
            _exercise(custom, origin)
            code = _stop(worker, pod["terminationGracePeriodSeconds"])
            assert code == 0, f"the worker exited {code} on SIGTERM"
            lease_left = bool(client.CoordinationV1Api(admin).list_namespaced_lease(RELEASE_NS).items)
            jobs = {}
            for name in ("hello", "missing", "cancel-me"):
                try:
                    jobs[name] = custom.get_namespaced_custom_object(GROUP, VERSION, SERVED, PLURAL, name)
                except client.ApiException as error:
                    assert error.status == 404
                    jobs[name] = None
            hello = jobs["hello"]
            stored = load_result(hello["status"]["result"], SERVED, job_uid=hello["metadata"]["uid"], core_v1=core)
        except BaseException:
            for log in sorted(work.glob("*.log")):
                if log != audit_log:
                    print(f"--- {log}\n{log.read_text(errors='replace')[-4000:]}")
            raise
        finally:
            for proc in reversed(processes):
                _stop(proc, 20)
        events = read_audit(audit_log)  # complete: each event is written before its response
    username = service_account_user(RELEASE_NS, account)
    return Recorded(username, roles, events.get(username, []), jobs, lease_left, stored.text,
                    stored.processed_by.model_dump() if stored.processed_by else None)


def _exercise(custom: client.CustomObjectsApi, origin: Origin) -> None:
    base = origin.base

    def create(name: str, url: str) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, SERVED, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob", "metadata": {"name": name},
            "spec": {"audio": {"url": url}, "language": "en", "runtime": "Pool"}})

    def phase(name: str) -> str | None:
        tj = custom.get_namespaced_custom_object(GROUP, VERSION, SERVED, PLURAL, name)
        return (tj.get("status") or {}).get("phase")

    # 1. cancelled (deleted) while the worker fetches its audio
    create("cancel-me", f"{base}/slow.wav")
    assert origin.fetching.wait(120), "the worker never fetched the audio"
    custom.delete_namespaced_custom_object(GROUP, VERSION, SERVED, PLURAL, "cancel-me")
    # 2. succeeds: the worker patches the transcript into the result Secret
    create("hello", f"{base}/speech.wav")
    wait_for(lambda: phase("hello") == "Succeeded", 300, "the job to succeed", interval=0.5)
    # 3. the audio is a 404: the worker reports the failure
    create("missing", f"{base}/missing.wav")
    wait_for(lambda: phase("missing") == "Failed", 120, "the job to fail", interval=0.5)
    origin.release.set()  # the cancelled run's fetch ends; its report finds the job gone


# ------------------------------------------------------------------ the proofs


def _role_for(rule: dict) -> str:
    """Which of the worker's Roles a request falls under."""
    return f"{RELEASE}-pool-leases" if rule["resources"] == ["leases"] else f"{RELEASE}-pool"


def test_the_worker_ran_the_jobs_as_the_charts_identity(recorded):
    print(f"\nrecorded calls of {recorded.username}: {len(recorded.events)} requests")
    for rule in distinct([{**request_rule(e), "namespace": e["objectRef"].get("namespace")} for e in recorded.events]):
        print(f"    {rule}")
    hello, missing = recorded.jobs["hello"], recorded.jobs["missing"]
    assert hello["status"]["execution"]["worker"] == POD_NAME and hello["status"]["result"]["store"] == "secret"
    assert "call me" in recorded.transcript.lower(), recorded.transcript
    # the original's fly_machine_id: the worker pod and its node, from the downward API
    where = {"pod": POD_NAME, "node": socket.gethostname(), "runtime": "Pool", "device": "cpu", "dtype": "float32"}
    assert recorded.processed_by.items() >= where.items() and recorded.processed_by["attention"]
    assert missing["status"]["phase"] == "Failed" and missing["status"]["execution"]["worker"] == POD_NAME
    assert recorded.jobs["cancel-me"] is None
    assert not recorded.lease_left  # deleted on drain
    assert recorded.events, "no request by the worker's ServiceAccount"
    for event in recorded.events:
        annotations = event.get("annotations") or {}
        assert annotations.get("authorization.k8s.io/decision") == "allow", event
        assert event["responseStatus"]["code"] != 403, event
        assert event["objectRef"].get("namespace") in (RELEASE_NS, SERVED), event  # nothing cluster-wide


def test_every_worker_call_is_allowed_by_the_roles_of_its_namespace(recorded):
    for event in recorded.events:
        ns = event["objectRef"]["namespace"]
        rules = [rule for (role_ns, _), role in recorded.roles.items() if role_ns == ns for rule in role]
        assert not_allowed(rules, [request_rule(event)]) == [], event


def test_the_pool_roles_grant_nothing_the_worker_did_not_use(recorded):
    calls = [request_rule(e) for e in recorded.events]
    for (ns, name), rules in recorded.roles.items():
        used = without_names([c for c in calls if _role_for(c) == name])
        assert granted_beyond(rules, used, JUSTIFIED[name]) == [], (ns, name)
    # One Role, the same, in every namespace it serves: the operator's namespaces, its own among them.
    assert {ns for ns, name in recorded.roles if name == f"{RELEASE}-pool"} == {SERVED, RELEASE_NS}
    assert recorded.roles[(SERVED, f"{RELEASE}-pool")] == recorded.roles[(RELEASE_NS, f"{RELEASE}-pool")]
    assert {ns for ns, name in recorded.roles if name == f"{RELEASE}-pool-leases"} == {RELEASE_NS}


def test_the_check_refuses_a_widened_or_narrowed_pool_role(recorded):
    calls = without_names([request_rule(e) for e in recorded.events])
    served = recorded.roles[(SERVED, f"{RELEASE}-pool")]
    leases = recorded.roles[(RELEASE_NS, f"{RELEASE}-pool-leases")]
    used = [c for c in calls if c["resources"] != ["leases"]]
    wider = [*served, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]
    assert granted_beyond(wider, used, []) == [wider[-1]]
    lease_calls = [c for c in calls if c["resources"] == ["leases"]]
    wider = [*leases, {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}]
    assert granted_beyond(wider, lease_calls, []) == [wider[-1]]
    narrower = [{**r, "verbs": [v for v in r["verbs"] if v != "delete"]} for r in leases]
    assert not_allowed(narrower, lease_calls) == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["delete"]}]
    narrower = [r for r in served if r["resources"] != ["secrets"]]
    refused = not_allowed(narrower, used)
    assert refused and all(r["resources"] == ["secrets"] for r in refused), refused

